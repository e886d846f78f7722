"""A real `pdserve serve` process, stopped as systemd, Docker and Kubernetes stop it: SIGTERM
while requests stream. Health turns NOT_SERVING, new requests are refused (gRPC
UNAVAILABLE, HTTP 503), the streams in flight finish, the process exits 0, and nothing of
its Ray instance (GCS, raylet, agents, worker actors) is left running. Its start logs no
ERROR or WARNING."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from deploy.client import build_request
from helpers import wait_until
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc

psutil = pytest.importorskip("psutil")
openai = pytest.importorskip("openai")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "random:tiny"
TOKENS = 1500          # long enough to be mid-stream when SIGTERM lands, short enough to drain
SERVING = re.compile(r"pdserve: serving \S+ on [\d.]+:(\d+), OpenAI API on (http://[\d.]+:\d+/v1)")
# Python logging (levelname) and Ray's C++ logs ("[date time W pid tid]").
BAD_LOG = re.compile(r"\b(ERROR|WARNING|CRITICAL)\b|Traceback|Fatal Python error|^\[\S+ \S+ [WEF] \d+", re.M)


def _read_until(proc, pattern, timeout):
    found, lines = [], []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = pattern.search(line)
            if m:
                found.append(m)
                return
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        raise AssertionError(f"pdserve serve did not start in {timeout}s; stdout: {''.join(lines)}")
    return found[0]


def _health(port: int) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def test_sigterm_drains_streams_and_stops_everything(tmp_path):
    err_path = tmp_path / "stderr.log"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", "--model", MODEL, "--port", "0",
                                 "--http-port", "0", "--kv-cache-gb", "0.2", "--shutdown-grace", "30"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    ray_procs = []
    try:
        m = _read_until(proc, SERVING, timeout=240)
        grpc_port, base_url = int(m.group(1)), m.group(2)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in ray_procs)
        assert "gcs_server" in names and "raylet" in names, names
        session = re.search(r"--session[-_]dir=(\S+)", names).group(1)

        results, started = {}, threading.Barrier(4, timeout=60)

        def http_stream(i):
            c = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
            n, finish = 0, None
            for k, ch in enumerate(c.completions.create(model=MODEL, prompt=f"Hello {i}", max_tokens=TOKENS,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True},
                                                        extra_body={"ignore_eos": True})):
                if k == 0:
                    started.wait()
                if ch.usage is not None:
                    n = ch.usage.completion_tokens
                if ch.choices and ch.choices[0].finish_reason:
                    finish = ch.choices[0].finish_reason
            results[f"http-{i}"] = (n, finish)

        def grpc_stream():
            req = build_request("Hello grpc", TOKENS, temperature=0.0)
            req.sampling.ignore_eos = True
            n, finish = 0, None
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                for k, r in enumerate(pb_grpc.GenerationStub(ch).Generate(req, timeout=120)):
                    if k == 0:
                        started.wait()
                    n += len(r.token_ids)
                    finish = r.finish_reason or finish
            results["grpc"] = (n, finish)

        threads = [threading.Thread(target=http_stream, args=(i,)) for i in range(2)] + \
                  [threading.Thread(target=grpc_stream)]
        for t in threads:
            t.start()
        started.wait()                 # every stream has its first tokens
        assert _health(grpc_port) == "SERVING"
        start_log = err_path.read_text()
        proc.send_signal(signal.SIGTERM)

        wait_until(lambda: _health(grpc_port) == "NOT_SERVING", 10, "health to turn NOT_SERVING", interval_s=0.1)
        c = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt="late", max_tokens=2)
        assert e.value.status_code == 503
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch, pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.GenerationStub(ch).Generate(build_request("late", 2), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert results == {}, "the in-flight streams ended before the refusal checks; raise TOKENS"

        for t in threads:
            t.join(90)
        from pdserve_api.v1 import pdserve_pb2 as pb
        assert results == {"http-0": (TOKENS, "length"), "http-1": (TOKENS, "length"),
                           "grpc": (TOKENS, pb.FINISH_REASON_LENGTH)}
        assert proc.wait(90) == 0
        gone, alive = psutil.wait_procs(ray_procs, timeout=20)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        later = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
        assert not later, later      # nothing Ray started after we looked either
        assert not BAD_LOG.search(start_log), start_log
        log = err_path.read_text()
        assert "Fatal Python error" not in log and "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for p in ray_procs:
            try:
                p.kill()
            except psutil.Error:
                pass
