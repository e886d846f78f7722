"""Helpers shared by the test files (conftest.py holds only fixtures; no test file imports
another). Import what you need: `from helpers import assert_no_leaks, wait_until`.

  - waiting: wait_until / await_until poll a condition and fail with what was awaited;
  - engines: assert_no_leaks, run_to_completion, hf_greedy (the transformers oracle),
    save_random_hf (the small random HF checkpoints of the random_hf_models fixture);
  - workers driven in one process: MODEL, EKW, PROMPT, PARAMS, FakeRouter, gen, drive, settle;
  - a Cluster on local Ray in a background loop: ClusterThread (CLUSTER_ENGINE, CLUSTER_THRESHOLD);
  - the autoscale controller without Ray: FakeWorker, FakeSpawner, FakeClock and the
    snapshot builders pools_config, pool_report, prefill_entry, decode_entry.

Heavy imports (zmq, grpc, deploy, transformers) stay inside the functions that need them.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import defaultdict

import torch

from engine import SamplingParams


# ---- waiting on a condition ------------------------------------------------------------------------

def wait_until(cond, timeout_s: float = 30.0, what: str = "condition", interval_s: float = 0.05):
    """Poll cond() until it returns something truthy (returned); fail after timeout_s with
    `what` in the message. cond may do work each poll (collect, run a loop once)."""
    end = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


async def await_until(cond, timeout_s: float = 10.0, what: str = "condition", interval_s: float = 0.02):
    """wait_until for code on an asyncio loop: sleeps with asyncio.sleep, so the loop's other
    tasks (a router's token loop, its monitor) run between polls."""
    end = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)


# ---- engines --------------------------------------------------------------------------------------------

def assert_no_leaks(engine) -> None:
    """Every block that is not a cached prefix is free once no request is in flight."""
    sch = engine.scheduler
    assert not sch.running and not sch.waiting and not sch.awaiting_kv and not sch.held, "requests left in flight"
    engine.blocks.check_invariants()
    in_use = [b for b in range(engine.blocks.num_blocks) if engine.blocks.ref_count[b] != 0]
    assert not in_use, f"{len(in_use)} KV blocks still referenced"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def run_to_completion(engine, max_steps=100_000) -> dict[str, list[int]]:
    """Step until idle; returns request id -> generated token ids."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("engine did not finish")


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: bool = False) -> list[int]:
    """Unpadded single-sequence greedy decode with transformers (the oracle)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=0 if eos else max_new_tokens, do_sample=False,
                         eos_token_id=model.config.eos_token_id if eos else None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def save_random_hf(tmp_root, kind: str) -> str:
    """A small random HF checkpoint (config.json + safetensors) in float64, so greedy ties
    between implementations are practically impossible."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1234)
    if kind == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, rope_theta=1e6, use_sliding_window=False)
        model = Qwen2ForCausalLM(cfg)
    # Larger weights than the default init make the logits peaked, like a trained model's.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
    path = os.path.join(tmp_root, kind)
    model.to(torch.float64).save_pretrained(path, safe_serialization=True)
    return path


# ---- workers driven in one process by a fake router ---------------------------------------------------

MODEL = "random:tiny"
EKW = dict(num_kv_blocks=64)            # 64 blocks of 16 tokens
PROMPT = [(i * 7919) % 49000 + 10 for i in range(75)]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


class FakeRouter:
    """The router's side of the planes: a PULL for token batches, a PUSH per worker."""

    def __init__(self):
        import zmq
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.pushes = {}
        self.batches: list = []
        self.tokens = defaultdict(list)
        self.text = defaultdict(str)
        self.final: dict = {}

    def send(self, endpoint, data, *more):
        import zmq
        s = self.pushes.get(endpoint)
        if s is None:
            s = self.pushes[endpoint] = zmq.Context.instance().socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
        s.send_multipart([data, *more]) if more else s.send(data)

    def collect(self):
        import zmq

        from planes import messages
        while True:
            try:
                buf = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            b = messages.decode_tokens(buf)
            self.batches.append(b)
            for it in b.items:
                assert it.rid not in self.final, f"item after the final one for {it.rid}"
                self.tokens[it.rid] += it.token_ids
                self.text[it.rid] += it.text
                if it.finish_reason is not None:
                    self.final[it.rid] = it

    @property
    def kv_events(self):
        return [e for b in self.batches for e in b.kv_events]

    def close(self):
        for s in self.pushes.values():
            s.close(0)
        self.pull.close(0)


def gen(rid, prompt=PROMPT, params=PARAMS, **kw) -> bytes:
    from planes import messages
    return messages.GenerateMsg(rid, list(prompt), params, **kw).encode()


def drive(router, dw, pw, until, timeout_s=15.0):
    """Run both loops synchronously until until() holds."""
    end = time.monotonic() + timeout_s
    while True:
        dw.run_once(5)
        if pw is not None:
            pw.run_once(0)
        router.collect()
        if until():
            return
        assert time.monotonic() < end, f"timed out; decode={dw.stats()} final={router.final}"


def settle(router, dw, pw, n=20):
    """A few idle iterations, so in-flight messages (aborts, late KV) are processed."""
    for _ in range(n):
        dw.run_once(2)
        if pw is not None:
            pw.run_once(2)
        router.collect()


# ---- a Cluster on local Ray ------------------------------------------------------------------------------

CLUSTER_ENGINE = dict(block_size=16, num_kv_blocks=512, max_num_batched_tokens=512)
CLUSTER_THRESHOLD = 64


class ClusterThread:
    """Runs a Cluster's asyncio loop (router + gRPC server) in a background thread."""

    def __init__(self, num_prefill=1, num_decode=1, router=None, **sections):
        import grpc

        from deploy.cluster import Cluster
        from deploy.config import ServeConfig
        from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
        self.loop = asyncio.new_event_loop()
        # Fixed pools unless controller.enabled; config sections as a file gives them.
        self.cluster = Cluster(ServeConfig.simple(
            MODEL, num_prefill, num_decode, dtype="float64", engine=dict(CLUSTER_ENGINE),
            router={"port": 0, "disagg_threshold": CLUSTER_THRESHOLD, **(router or {})}, **sections))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.cluster.start(), timeout=300)
        self.address = f"127.0.0.1:{self.cluster.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, prompt, max_tokens=8, **kw):
        from deploy.client import build_request, collect
        return collect(self.stub.Generate(build_request(prompt, max_tokens, **kw), timeout=120))

    def worker_stats(self):
        return self.call(self.cluster.worker_stats())

    def wait_idle(self, timeout=30):
        """Until every worker holds no request and no referenced block; returns their stats."""
        last = {}

        def idle():
            last["stats"] = stats = self.worker_stats()
            last["busy"] = {w: s for w, s in stats.items()
                            if s["num_running"] or s["num_waiting"] or s["num_awaiting_kv"]
                            or s["num_free_blocks"] != s["num_blocks"]}
            return not last["busy"]
        try:
            wait_until(idle, timeout, "idle workers with every block free", interval_s=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}; still busy: {last.get('busy')}") from None
        return last["stats"]

    def close(self):
        self.channel.close()
        self.call(self.cluster.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


# ---- the autoscale controller without Ray --------------------------------------------------------------

class FakeWorker:
    def __init__(self, kind, wid):
        self.kind, self.wid = kind, wid
        self.drained = self.stopped = False


class FakeSpawner:
    def __init__(self, fail=(), hang=()):
        self.spawned: list[FakeWorker] = []
        self.fail, self.hang = set(fail), set(hang)
        self.log: list[tuple[str, str]] = []

    def spawn(self, kind, wid):
        w = FakeWorker(kind, wid)
        self.spawned.append(w)
        return w

    async def ready(self, w):
        await asyncio.sleep(0)      # yield once, as a real start would
        if w.wid in self.hang:
            await asyncio.Event().wait()    # a node that never comes
        if w.wid in self.fail:
            raise RuntimeError("no node")
        return {"request": f"tcp://127.0.0.1:1/{w.wid}"}

    async def drain(self, w, timeout_s):
        w.drained = True
        self.log.append(("drain", w.wid))
        return {"drained": True, "in_flight": 0}

    async def stop(self, w, graceful=True):
        w.stopped, w.graceful = True, graceful
        self.log.append(("stop", w.wid))


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def pools_config(pmax=3, dmax=2):
    from deploy.autoscale_policy import DecodeTargets, PrefillTargets
    from deploy.config import DecodePool, PrefillPool, ScalingSection
    fast = ScalingSection(up_stable_s=1, down_stable_s=2, up_cooldown_s=3, down_cooldown_s=4)
    return {"prefill": PrefillPool(min_replicas=1, max_replicas=pmax, scaling=fast,
                                   targets=PrefillTargets(queued_tokens_per_replica=1000, ttft_s=None)),
            "decode": DecodePool(min_replicas=1, max_replicas=dmax, scaling=fast,
                                 targets=DecodeTargets(kv_use=0.9, running_per_replica=8, tpot_s=None))}


def pool_report(prefill: dict, decode: dict, **lat):
    return dict(time=0.0, prefill=prefill, decode=decode, ttft_disagg_p90_s=lat.get("ttft"),
                tpot_p90_s=lat.get("tpot"))


def prefill_entry(queued=0, inflight=0, draining=False):
    return dict(queued_tokens=queued, inflight=inflight, draining=draining)


def decode_entry(running=0, inflight=0, draining=False, free=100, total=100):
    return dict(running=running, inflight=inflight, draining=draining, free_blocks=free, num_blocks=total)
