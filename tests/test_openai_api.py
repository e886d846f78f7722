"""The OpenAI-compatible HTTP API, driven by the official `openai` client against a real
local cluster (SmolLM2 on CPU, one decode worker on Ray, one cluster for the module; the
prefill pool's path is the gRPC tests' and is the same router call): chat and completions, streamed and not, give the gRPC API's greedy text for the
same prompt; bad fields get 400 naming them; a client that disconnects mid-stream frees
the request's blocks on the workers; API keys, overload and draining get 401, 429, 503."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading

import grpc
import pytest

from deploy.client import build_request, collect
from helpers import wait_until
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")

MODEL = "smollm2"
KEY = "sk-test-" + "0123456789abcdef" * 2
PROMPT = "The three primary colors are"
QUESTION = "What is the capital of France?"


class ClusterThread:
    """A Cluster (router, gRPC and HTTP servers) on its own event loop in a thread."""

    def __init__(self):
        from deploy.cluster import Cluster
        from deploy.config import ServeConfig
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cluster = Cluster(ServeConfig.simple(MODEL, num_prefill=0, num_decode=1,
                                                  router={"port": 0, "http_port": 0},
                                                  engine=dict(kv_cache_memory_gb=0.25)))
        self.call(self.cluster.start(), timeout=300)
        self.grpc = grpc.insecure_channel(f"127.0.0.1:{self.cluster.port}")
        self.stub = pb_grpc.GenerationStub(self.grpc)
        self.base_url = f"http://127.0.0.1:{self.cluster.http_port}/v1"

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn):
        async def run():
            return fn()
        return self.call(run())

    def client(self, **kw) -> "openai.OpenAI":
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=kw.pop("base_url", self.base_url), max_retries=0, timeout=120, **kw)

    def grpc_generate(self, prompt, max_tokens, chat=False, salt=b""):
        req = build_request(prompt, max_tokens, temperature=0.0, chat=chat)
        req.cache_salt = salt
        return collect(self.stub.Generate(req, timeout=120))

    def wait_idle(self, timeout=30):
        """Until the router and every worker hold no request and no referenced block."""
        last = {}

        def idle():
            last["stats"] = stats = self.call(self.cluster.worker_stats())
            last["busy"] = {w: s for w, s in stats.items()
                            if s["num_running"] or s["num_waiting"] or s["num_awaiting_kv"]
                            or s["num_free_blocks"] != s["num_blocks"]}
            return not last["busy"] and not self.cluster.router.requests
        try:
            wait_until(idle, timeout, "idle router and workers", interval_s=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}; still busy: {last.get('busy')}, router: {list(self.cluster.router.requests)}") \
                from None
        return last["stats"]

    def close(self):
        self.grpc.close()
        self.call(self.cluster.stop(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    c = ClusterThread()
    try:
        yield c
    finally:
        c.close()
        ray.shutdown()


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def test_models_and_health(cluster):
    models = cluster.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert raw(cluster.cluster.http_port, "GET", "/health") == (200, {"status": "ok"})


def test_completions_equal_grpc_greedy(cluster):
    # Distinct cache salts: neither request reuses the other's prefix cache, so both compute
    # the same way and greedy text must match exactly.
    want = cluster.grpc_generate(PROMPT, 12, salt=b"grpc")
    c = cluster.client()
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                             extra_body={"cache_salt": "http"})
    assert r.choices[0].text == want["text"] and r.choices[0].finish_reason == want["finish_reason"]
    assert r.usage.completion_tokens == len(want["token_ids"]) and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"cache_salt": "sse"}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want["text"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["token_ids"])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want["finish_reason"]


def test_chat_applies_template_and_equals_grpc(cluster):
    want = cluster.grpc_generate(QUESTION, 10, chat=True, salt=b"grpc")
    assert "Paris" in want["text"]     # the instruct model answers when it gets its template
    c = cluster.client()
    msgs = [{"role": "user", "content": QUESTION}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10, temperature=0,
                                  logprobs=True, extra_body={"cache_salt": "http"})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want["text"]
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens and all(x.logprob <= 0 for x in lps)
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"cache_salt": "sse"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want["text"]
    assert all(ch.usage is None for ch in chunks)     # no include_usage: no usage chunk


def test_bad_fields_get_400_naming_them(cluster):
    c = cluster.client()
    cases = [
        (dict(temperature=-1), "temperature"),
        (dict(n=2), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=1.5), "top_p"),
        (dict(logprobs=3), "logprobs"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(extra_body={"frobnicate": 1}), "frobnicate"),
        (dict(extra_body={"cache_salt": "x" * 100}), "cache_salt"),
        (dict(prompt=[50] * cluster.cluster.model_info["max_model_len"]), "prompt"),   # no room to generate
        (dict(stream_options={"include_usage": True}), "stream_options"),   # without stream
    ]
    for kw, param in cases:
        kw = dict(dict(model=MODEL, prompt="Hi", max_tokens=4), **kw)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**kw)
        err = e.value.body
        assert e.value.status_code == 400 and err["param"] == param and err["message"].startswith(param), (kw, err)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=-1)
    assert e.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="Hi")
    assert e.value.body["param"] == "model"
    port = cluster.cluster.http_port
    status, body = raw(port, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = raw(port, "POST", "/v1/completions", b"x" * (9 << 20))
    assert status == 413 and "larger than" in body["error"]["message"]
    cluster.wait_idle()


def test_disconnect_mid_stream_frees_blocks(cluster):
    c = cluster.client()
    stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1500, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    busy = cluster.call(cluster.cluster.worker_stats())["decode-0"]
    assert busy["num_running"] == 1 and busy["num_free_blocks"] < busy["num_blocks"]
    stream.close()      # drops the connection
    cluster.wait_idle(timeout=20)


def test_api_key_enforced(cluster):
    """A second HTTP front end with API keys on the same router (no second cluster needed)."""
    from router.auth import APIKeys
    from router.http_server import HTTPServer
    from router.openai_api import OpenAIAPI
    api = OpenAIAPI(lambda: cluster.cluster.service, MODEL, api_keys=APIKeys.from_keys([KEY]))
    server = HTTPServer(api.app(), "127.0.0.1", 0)
    port = cluster.call(server.start())
    try:
        url = f"http://127.0.0.1:{port}/v1"
        c = openai.OpenAI(base_url=url, api_key="sk-wrong-" + "x" * 20, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 401 and "invalid API key" in e.value.body["message"]
        body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
        status, err = raw(port, "POST", "/v1/completions", body)     # (the client insists on a key)
        assert status == 401 and "missing API key" in err["error"]["message"]
        assert raw(port, "GET", "/v1/models")[0] == 401
        assert raw(port, "GET", "/health")[0] == 200       # probes need no key
        r = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).completions.create(
            model=MODEL, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
    finally:
        cluster.call(server.stop())


def test_overload_429_and_draining_503(cluster):
    c = cluster.client()
    router = cluster.cluster.router
    cap = router.cfg.max_inflight_per_decode
    cluster.on_loop(lambda: setattr(router.cfg, "max_inflight_per_decode", 0))
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 429 and "overloaded" in e.value.body["message"]
    finally:
        cluster.on_loop(lambda: setattr(router.cfg, "max_inflight_per_decode", cap))
    service = cluster.cluster.service
    cluster.on_loop(lambda: setattr(service, "draining", True))
    try:
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503
        assert raw(cluster.cluster.http_port, "GET", "/health")[0] == 503
    finally:
        cluster.on_loop(lambda: setattr(service, "draining", False))
    assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("target", ["http", "grpc"])
def test_bench_against_the_cluster(cluster, target, tmp_path):
    """`pdserve bench` with a handful of requests over either API: every request completes
    with its output length, percentiles and goodput are reported, the JSON is written."""
    from deploy.cli import main
    where = ["--http", cluster.base_url] if target == "http" else ["--address", f"127.0.0.1:{cluster.cluster.port}"]
    out = tmp_path / "bench.json"
    assert main(["bench"] + where + ["--rates", "20", "--requests", "4", "--warmup", "1", "--prompt-min", "8",
                                     "--prompt-max", "40", "--output-min", "4", "--output-max", "8",
                                     "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    s = record["modes"]["external"][0]["summary"]
    assert s["completed"] == 4 and s["errors"] == 0 and s["wrong_token_count"] == 0, s
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert 0 < s[key]["p50"] <= s[key]["p99"], (key, s[key])
    assert 0 <= s["slo_attainment"] <= 1 and s["goodput_rps"] >= 0
    if target == "http":
        assert record["model"] == MODEL     # found through /v1/models
    cluster.wait_idle()


def test_readme_openai_snippet_runs_as_written(cluster, capsys):
    """The README's "Use it from the OpenAI client" block, with only the port changed."""
    import os
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme.split("### Use it from the OpenAI client", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "http://127.0.0.1:8000/v1" in code
    exec(compile(code.replace("http://127.0.0.1:8000/v1", cluster.base_url), "README.md", "exec"), {})
    out = capsys.readouterr().out
    first, _, rest = out.partition("\n")
    assert "Paris" in first and rest.strip(), out      # the chat answer, then the streamed completion
