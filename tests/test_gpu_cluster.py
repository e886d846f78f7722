"""The whole cluster on one GPU with the default flags (device machine: `pytest -m gpu`):
`Cluster` shares the GPU between one prefill and one decode actor (fractional num_gpus,
the KV memory split), the KV backend resolves to cuda_ipc, and a short prompt (direct) and
a long one (disaggregated) give a single fp32 engine's greedy tokens; no block leaks."""
from __future__ import annotations

import asyncio
import gc
import threading

import grpc
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODEL = "random:llama3-1b"
SHORT = [(i * 31) % 20000 + 7 for i in range(24)]
LONG = [(i * 7919) % 30000 + 10 for i in range(900)]


def test_one_gpu_cluster_serves_direct_and_disaggregated_over_cuda_ipc():
    ray = pytest.importorskip("ray")
    from deploy.client import build_request, collect
    from deploy.cluster import Cluster
    from deploy.config import ServeConfig
    from engine import LLM, SamplingParams
    from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc

    ref = LLM(MODEL, device="cuda", dtype="float32", num_kv_blocks=256)
    want = [o.token_ids for o in ref.generate([SHORT, LONG], SamplingParams(max_tokens=12, ignore_eos=True))]
    del ref
    gc.collect()
    torch.cuda.empty_cache()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro, timeout=600):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    cluster = Cluster(ServeConfig.simple(MODEL, dtype="float32", router=dict(port=0, disagg_threshold=256)))
    try:
        call(cluster.start())
        with grpc.insecure_channel(f"127.0.0.1:{cluster.port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            outs = []
            for prompt in (SHORT, LONG):
                req = build_request(prompt, 12)
                req.sampling.ignore_eos = True
                outs.append(collect(stub.Generate(req, timeout=300)))
        assert [o["route"] for o in outs] == ["direct", "disaggregated"], outs
        assert [o["token_ids"] for o in outs] == want
        stats = call(cluster.worker_stats())
        dec = next(s for w, s in stats.items() if w.startswith("decode"))
        assert dec["kv"]["completed"] == 1 and dec["kv"]["grants"] == 1, dec["kv"]   # over cuda_ipc
        for w, s in stats.items():
            assert s["num_running"] == s["num_waiting"] == s["num_awaiting_kv"] == 0, (w, s)
            assert s["num_free_blocks"] == s["num_blocks"], (w, s)
    finally:
        try:
            call(cluster.stop())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            ray.shutdown()
