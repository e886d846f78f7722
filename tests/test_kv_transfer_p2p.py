"""The "nccl" KV transfer backend (kv_transfer/p2p_backend.py) on CPU: the same code with a
gloo pair group, between this process (the decode side's receiver) and sender processes
started from this file (``python tests/test_kv_transfer_p2p.py sender ENDPOINT``, driven by
JSON lines on stdin). The GPU test (marked ``gpu``) needs two GPUs and NCCL."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import zmq

import kv_transfer as kt
from kv_transfer import p2p_backend as p2p
from kv_transfer.wire import KVLayout, WireError

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
LAYOUT = dict(num_layers=4, num_blocks=64, block_size=4, num_kv_heads=2, head_dim=8, vocab_size=1000)


def layer_data(seed: int, layer: int, n: int, layout: KVLayout) -> torch.Tensor:
    """The KV a sender ships for (seed, layer): both processes build it the same way."""
    g = torch.Generator().manual_seed(seed * 1009 + layer)
    return torch.randn(layout.block_shape(n), generator=g).to(layout.torch_dtype)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


class Sink:
    """A stand-in paged cache [layer, 2, block, slot, head, dim]; records every write."""

    def __init__(self, layout: KVLayout):
        self.cache = torch.zeros(layout.num_layers, *layout.block_shape(layout.num_blocks), dtype=layout.torch_dtype)
        self.writes = []

    def __call__(self, rid, layer, block_ids, tensor):
        self.cache[layer][:, torch.tensor(block_ids)] = tensor
        self.writes.append((rid, layer, tuple(block_ids)))


# ---- the sender process ------------------------------------------------------------------------------
def sender_main(endpoint: str, layout_json: str) -> None:
    layout = KVLayout(**json.loads(layout_json))
    tx = kt.make_sender("nccl", endpoint, send_timeout_s=3.0, connect_timeout_s=60.0)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "send":
            dst = cmd["dst"]
            for layer in cmd["layers"]:
                t = layer_data(cmd["seed"], layer, len(dst), layout)
                tx.send_layer(cmd["rid"], layer, dst, t.to(cmd["device"]) if cmd.get("device") else t)
            if cmd.get("first_token") is not None:
                tx.send_done(cmd["rid"], cmd["first_token"], layout.num_layers)
            ok = tx.flush(60)
            reply = dict(flushed=ok, failed=sorted(tx.failed_requests()), stats=tx.stats)
        elif op == "header_only":
            # A prefill worker that dies between a layer's header and its data: send the
            # header on the pair's control stream, never the tensor.
            assert tx.flush(60) and tx._pair is not None
            h = p2p.encode_kv_header(cmd["rid"], cmd["layer"], cmd["dst"], layout.dtype,
                                     layout.block_shape(len(cmd["dst"])))
            tx._sock.send_multipart([p2p.encode_envelope("msg", tx._pair, tx._seq), h])
            reply = dict(ok=True)
        elif op == "close":
            tx.close()
            reply = dict(closed=True)
        print(json.dumps(reply), flush=True)
        if op == "close":
            return


class Sender:
    """A sender process; ``run(rx, cmd, until)`` polls the receiver while the sender works
    (its sends complete only once the receiver has posted the matching receives)."""

    def __init__(self, endpoint: str, layout: KVLayout):
        lj = json.dumps({k: getattr(layout, k) for k in (*LAYOUT, "dtype")})
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, HERE, "sender", endpoint, lj], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.completed, self.failed = [], []

    def run(self, rx, cmd: dict, until=lambda s: True, timeout_s: float = 90.0) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = None
        end = time.monotonic() + timeout_s
        while reply is None or not until(self):
            self.poll(rx, 20)
            if reply is None and select.select([self.proc.stdout], [], [], 0)[0]:
                line = self.proc.stdout.readline()
                assert line, f"sender exited (rc={self.proc.poll()})"
                reply = json.loads(line)
            assert time.monotonic() < end, f"timed out on {cmd}: completed={self.completed} failed={self.failed}"
        return reply

    def poll(self, rx, ms: int = 20) -> None:
        r = rx.poll(ms)
        self.completed += r.completed
        self.failed += r.failed

    def poll_until(self, rx, cond, timeout_s: float = 30.0) -> None:
        end = time.monotonic() + timeout_s
        while not cond():
            self.poll(rx)
            assert time.monotonic() < end, f"timed out: completed={self.completed} failed={self.failed} {rx.stats}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def procs():
    started = []
    yield started
    for s in started:
        s.kill()


def make_rx(layout, sink, **kw):
    return kt.make_receiver("nccl", layout, sink, **{**dict(op_timeout_s=3.0, connect_timeout_s=60.0), **kw})


# ---- two processes ------------------------------------------------------------------------------------
def test_exact_transfer_killed_sender_and_a_new_pair_after_it(procs):
    """Multi-layer random KV lands bit-equal in scattered reserved blocks; a sender killed
    between a header and its data fails its transfer within the op timeout (no hang);
    the next sender forms a new pair and its KV lands exactly; a sender that closes
    tears its pair down on the receiver."""
    layout = KVLayout(**LAYOUT, dtype="bfloat16")
    sink = Sink(layout)
    L = layout.num_layers
    with make_rx(layout, sink) as rx:
        assert rx.endpoint.startswith("nccl://127.0.0.1:") and "pg=gloo" in rx.endpoint
        a = Sender(rx.endpoint, layout)
        procs.append(a)
        dst = [41, 3, 17, 29, 8, 60, 12]
        rx.expect("a", dst, L, time.monotonic() + 120)
        reply = a.run(rx, dict(op="send", rid="a", seed=1, dst=dst, layers=list(range(L)), first_token=7),
                      until=lambda s: s.completed or s.failed)
        assert reply["flushed"] and reply["failed"] == [] and reply["stats"]["pairs_formed"] == 1
        assert a.completed == [kt.Completed("a", 7)] and not a.failed
        for layer in range(L):
            assert raw(sink.cache[layer][:, dst]) == raw(layer_data(1, layer, len(dst), layout))
        assert not sink.cache[:, :, [b for b in range(layout.num_blocks) if b not in dst]].any()
        assert rx.num_pairs() == 1 and rx.stats["pairs_formed"] == 1 and rx.stats["rejected"] == 0

        # Killed mid-transfer: layer 0 landed, layer 1's header came, its data never will.
        k = [5, 6]
        rx.expect("k", k, L, time.monotonic() + 60)
        a.run(rx, dict(op="send", rid="k", seed=2, dst=k, layers=[0], first_token=None),
              until=lambda s: rx.progress("k")["layers_landed"] == [0])
        a.run(rx, dict(op="header_only", rid="k", layer=1, dst=k))
        t0 = time.monotonic()
        a.kill()
        a.poll_until(rx, lambda: a.failed)
        assert time.monotonic() - t0 < rx.op_timeout_s + 5, "must fail on the pair, not the 60 s deadline"
        assert [f.request_id for f in a.failed] == ["k"] and "pair broken" in a.failed[0].reason
        assert rx.num_pairs() == 0 and rx.stats["pairs_broken"] == 1

        # A new prefill worker pairs with the same receiver.
        b = Sender(rx.endpoint, layout)
        procs.append(b)
        dst_b = [0, 63, 31, 2]
        rx.expect("b", dst_b, L, time.monotonic() + 120)
        b.run(rx, dict(op="send", rid="b", seed=3, dst=dst_b, layers=list(range(L)), first_token=11),
              until=lambda s: s.completed or s.failed)
        assert b.completed == [kt.Completed("b", 11)] and not b.failed
        for layer in range(L):
            assert raw(sink.cache[layer][:, dst_b]) == raw(layer_data(3, layer, len(dst_b), layout))
        assert raw(sink.cache[1][:, k]) == raw(torch.zeros(layout.block_shape(2), dtype=layout.torch_dtype))
        assert rx.stats["pairs_formed"] == 2 and rx.num_pairs() == 1
        b.run(rx, dict(op="close"), until=lambda s: rx.num_pairs() == 0)
        assert b.proc.wait(30) == 0 and rx.stats["pairs_closed"] == 1


def test_deadline_fail_late_data_dropped_refused_header_drained_pair_stays_in_sync(procs):
    """A transfer past its deadline fails (-> in-place prefill) and its late data is
    received and dropped, never written; a header refused against the reservation fails
    its transfer while its data is still drained; the pair's data stream stays in step,
    so the next transfer lands exactly."""
    layout = KVLayout(**LAYOUT, dtype="float32")
    sink = Sink(layout)
    L = layout.num_layers
    with make_rx(layout, sink) as rx:
        s = Sender(rx.endpoint, layout)
        procs.append(s)
        t0 = time.monotonic()
        rx.expect("t", [1, 2, 3], L, t0 + 1.0)
        s.poll_until(rx, lambda: s.failed)
        assert time.monotonic() - t0 >= 1.0 and "deadline" in s.failed[0].reason
        s.run(rx, dict(op="send", rid="t", seed=4, dst=[1, 2, 3], layers=list(range(L)), first_token=5),
              until=lambda _: rx.stats["dropped_late"] == L + 1)   # every layer and the done
        assert sink.writes == [] and rx.stats["rejected"] == 0

        rx.expect("v", [9, 10], L, time.monotonic() + 60)
        s.run(rx, dict(op="send", rid="v", seed=5, dst=[9, 10, 11], layers=[0, 1], first_token=None),
              until=lambda s_: s_.failed[1:])
        assert s.failed[1].request_id == "v" and "not reserved" in s.failed[1].reason
        assert sink.writes == [] and rx.num_pairs() == 1

        dst = [20, 4, 33]
        rx.expect("u", dst, L, time.monotonic() + 60)
        s.run(rx, dict(op="send", rid="u", seed=6, dst=dst, layers=list(range(L)), first_token=3),
              until=lambda s_: s_.completed)
        assert s.completed == [kt.Completed("u", 3)] and len(s.failed) == 2
        for layer in range(L):
            assert torch.equal(sink.cache[layer][:, dst], layer_data(6, layer, len(dst), layout))
        assert {w[0] for w in sink.writes} == {"u"} and rx.stats["pairs_broken"] == 0


# ---- one process: control-plane validation ---------------------------------------------------------------
def test_endpoints_envelopes_and_factories():
    ep = p2p.parse_endpoint("nccl://10.0.0.2:5555?store=5556&pg=nccl")
    assert ep == p2p.P2PEndpoint("10.0.0.2", 5555, 5556, "nccl") and str(ep) == "nccl://10.0.0.2:5555?store=5556&pg=nccl"
    for bad in ["tcp://h:1", "nccl://h:1", "nccl://h:1?store=2", "nccl://h?store=2&pg=gloo",
                "nccl://h:1?store=2&pg=mpi", "nccl://h:1?store=x&pg=gloo", "nccl://h:1?store=2&pg=gloo&x=1",
                "nccl://h:1/p?store=2&pg=gloo", "nccl://h:1?store=99999&pg=gloo", "nccl://h:1?store=2&store=3&pg=gloo"]:
        with pytest.raises(ValueError):
            p2p.parse_endpoint(bad)
    assert kt.backend_of("nccl://h:1?store=2&pg=gloo") == "nccl" and kt.backend_of("tcp://h:1") == "zmq"
    env = p2p.decode_envelope(p2p.encode_envelope("msg", "abc", 7))
    assert env == p2p.Envelope("msg", "abc", 7)
    for bad in [b"", b"\xc1", msgpack.packb([1]), msgpack.packb(dict(v=1, type="hello")),
                msgpack.packb(dict(v=1, type="hello", pair="a b")), msgpack.packb(dict(v=2, type="bye", pair="a")),
                msgpack.packb(dict(v=1, type="msg", pair="a", seq=-1)),
                msgpack.packb(dict(v=1, type="msg", pair="a", seq=True)), b"\x81" + b"\xa1x" * 200]:
        with pytest.raises(WireError):
            p2p.decode_envelope(bad)
    with pytest.raises(ValueError):
        kt.make_sender("nccl", "tcp://127.0.0.1:5555")
    layout = KVLayout(**LAYOUT, dtype="float32")
    with pytest.raises(RuntimeError, match="CUDA"):
        kt.make_receiver("nccl", layout, Sink(layout), pg="nccl")


def test_malformed_control_and_a_hello_that_never_rendezvouses():
    layout = KVLayout(**LAYOUT, dtype="float32")
    sink = Sink(layout)
    with make_rx(layout, sink, connect_timeout_s=1.0) as rx:
        raw_sock = zmq.Context.instance().socket(zmq.PUSH)
        raw_sock.setsockopt(zmq.LINGER, 0)
        raw_sock.connect(p2p.parse_endpoint(rx.endpoint).ctrl)
        rx.expect("x", [1, 2], deadline=time.monotonic() + 60)
        hdr = p2p.encode_kv_header("x", 0, [1, 2], "float32", layout.block_shape(2))
        bad = [[b"junk"], [p2p.encode_envelope("hello", "p1"), b"extra"], [p2p.encode_envelope("msg", "p1", 0)],
               [p2p.encode_envelope("msg", "nopair", 0), b"\xc1"],
               [p2p.encode_envelope("msg", "nopair", 0), hdr]]   # a kv header on a pair that does not exist
        failed = []
        for frames in bad:
            raw_sock.send_multipart(frames)
        end = time.monotonic() + 10
        while rx.stats["rejected"] < len(bad):
            failed += rx.poll(20).failed
            assert time.monotonic() < end, rx.stats
        assert [f.request_id for f in failed] == ["x"] and "not open" in failed[0].reason
        # A hello whose sender never joins: the pair thread gives up after connect_timeout_s.
        raw_sock.send_multipart([p2p.encode_envelope("hello", "ghost")])
        end = time.monotonic() + 15
        while rx.stats["pairs_broken"] < 1:
            rx.poll(50)
            assert time.monotonic() < end, rx.stats
        assert rx.num_pairs() == 0 and sink.writes == []
        raw_sock.close(0)


# ---- the workers, backend picked from config ------------------------------------------------------------
def test_workers_disaggregate_over_the_nccl_backend_and_equal_a_single_engine():
    """A decode worker built with kv_backend="nccl" (gloo pairs on CPU) advertises an
    nccl:// KV endpoint; the prefill worker picks the backend from that endpoint; the
    disaggregated request's greedy tokens equal a single engine's."""
    from decode_worker import DecodeWorker
    from engine import LLM
    from helpers import EKW, MODEL, PARAMS, PROMPT, FakeRouter, assert_no_leaks, drive, gen
    from prefill_worker import PrefillWorker

    want = LLM(MODEL, **EKW).generate([list(PROMPT)], PARAMS)[0].token_ids
    router = FakeRouter()
    dw = DecodeWorker("d0", MODEL, router.endpoint, engine_kwargs=EKW, kv_backend="nccl")
    pw = PrefillWorker("p0", MODEL, engine_kwargs=EKW)
    try:
        assert dw.endpoints()["kv"].startswith("nccl://") and "pg=gloo" in dw.endpoints()["kv"]
        router.send(dw.endpoints()["request"], gen("r1", mode="disaggregated", prefill_endpoint=pw.endpoints()["request"]))
        drive(router, dw, pw, lambda: "r1" in router.final, timeout_s=60)
        fin = router.final["r1"]
        assert router.tokens["r1"] == want and (fin.error, fin.fallback) == (None, None)
        kv = dw.stats()["kv"]
        assert dw.stats()["disaggregated"] == 1 and kv["completed"] == 1 and kv["pairs_formed"] == 1
        assert kv["layers_written"] == dw.num_layers and pw.stats()["completed"] == 1
        assert_no_leaks(dw.engine)
        assert_no_leaks(pw.engine)
    finally:
        pw.stop()
        dw.stop()
        router.close()


def test_cluster_resolves_auto_backend_only_when_both_pools_have_gpus():
    """"auto" reaches the decode workers (cuda_ipc same host, nccl across) only when both
    pools get a GPU or a share of one; otherwise zmq."""
    from deploy.cluster import _resolve_kv_backend
    from deploy.config import PoolsSection, ServeConfig, TransferSection

    def cfg(backend="auto", pools=None):
        return ServeConfig(transfer=TransferSection(backend=backend), pools=pools or PoolsSection())
    assert _resolve_kv_backend(ServeConfig(), 0) == "zmq"      # the default is auto
    assert _resolve_kv_backend(ServeConfig(), 1) == "auto"
    assert _resolve_kv_backend(cfg("auto"), 0.5) == "auto"   # one GPU shared by both pools
    assert _resolve_kv_backend(cfg("zmq"), 1) == "zmq"
    assert _resolve_kv_backend(cfg("nccl"), 0) == "nccl"
    assert _resolve_kv_backend(cfg("cuda_ipc"), 0) == "cuda_ipc"
    pools = PoolsSection()
    pools.prefill.num_gpus, pools.decode.num_gpus = 0, 1
    assert _resolve_kv_backend(cfg("auto", pools), 1) == "zmq"
    pools.prefill.num_gpus = 1
    assert _resolve_kv_backend(cfg("auto", pools), 0) == "auto"
    pools.decode.num_gpus = None   # follows the cluster
    assert _resolve_kv_backend(cfg("auto", pools), 0) == "zmq"


def test_gpu_benchmark_pieces_run_on_cpu_with_gloo():
    """benchmarks/gpu_kv_transfer.py --cpu-smoke: the benchmark's own code (raw p2p, the
    backend's transfer with its bit-exactness check, TTFT both ways) on two CPU processes."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_kv_transfer.py"), "--cpu-smoke",
                          "--json", "--repeat", "1", "--warmup", "1", "--iters", "2", "--decode-tokens", "4"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(r["raw_gbs"]) == 2 and all(v > 0 for v in r["raw_gbs"].values())
    assert r["transfer"]["bytes"] == 2 * 64 * 2 * 16 * 4 * 2 and r["transfer"]["gbs"] > 0   # K+V, 64 tokens,
    # random:tiny's 2 KV heads of dim 16, fp32, 2 layers
    assert r["transfer"]["pairs_formed"] == 1 and r["transfer_vs_raw_whole_prompt"] > 0
    assert r["ttft"]["tokens_equal"] is True and r["ttft"]["in_place_ms"] > 0 and r["ttft"]["disagg_ms"] > 0


# ---- GPU: two GPUs, NCCL --------------------------------------------------------------------------------
LLAMA3_8B_KV = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (an NCCL pair cannot be formed on one GPU)")
def test_nccl_moves_a_4096_token_llama3_8b_prompt_between_two_gpus(procs):
    """Sender on cuda:0 (a child process), receiver on cuda:1 (this process): 256 blocks of
    32 layers (512 MiB) land bit-equal to the source."""
    layout = KVLayout(**LLAMA3_8B_KV, num_blocks=300)
    L, n = layout.num_layers, 4096 // layout.block_size
    cache = torch.zeros(L, *layout.block_shape(layout.num_blocks), dtype=torch.bfloat16, device="cuda:1")

    def write(rid, layer, block_ids, t):
        assert t.device == cache.device
        cache[layer][:, torch.tensor(block_ids, device=t.device)] = t

    with kt.make_receiver("nccl", layout, write, device="cuda:1", op_timeout_s=30, connect_timeout_s=120) as rx:
        assert "pg=nccl" in rx.endpoint
        s = Sender(rx.endpoint, layout)
        procs.append(s)
        dst = list(range(layout.num_blocks - 1, layout.num_blocks - 1 - n, -1))   # reversed: scattered order
        rx.expect("g", dst, L, time.monotonic() + 300)
        s.run(rx, dict(op="send", rid="g", seed=8, dst=dst, layers=list(range(L)), first_token=1,
                        device="cuda:0"),
              until=lambda s_: s_.completed or s_.failed, timeout_s=300)
        assert s.completed == [kt.Completed("g", 1)]
        for layer in range(L):
            assert torch.equal(cache[layer][:, dst].cpu(), layer_data(8, layer, n, layout))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "sender":
    sender_main(sys.argv[2], sys.argv[3])
