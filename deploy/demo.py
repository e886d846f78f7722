"""`pdserve demo`: start a local cluster (1 prefill + 1 decode worker on Ray), send one
short prompt (prefilled in place by the decode worker) and one long prompt (prefilled on
the prefill pool, KV shipped over ZeroMQ), print both with their routes, and stop."""
from __future__ import annotations

import asyncio
import json

from deploy.cluster import Cluster, ClusterConfig

SHORT = "The capital of France is"
LONG = ("Pdserve splits LLM serving into two pools. Prefill workers run the prompt through the "
        "model once and ship the resulting key/value cache, layer by layer, to a decode worker, "
        "which then generates the answer token by token. Short prompts skip the prefill pool "
        "because shipping their cache would cost more than computing it in place. ") * 3 + \
       "In one sentence, why split prefill from decode?"


async def _demo(cfg: ClusterConfig, max_tokens: int) -> list[dict]:
    from deploy.client import build_request, collect
    import grpc
    from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc

    cluster = Cluster(cfg)
    await cluster.start()
    try:
        address = f"{cfg.host}:{cluster.port}"
        loop = asyncio.get_running_loop()

        def call(prompt):
            with grpc.insecure_channel(address) as ch:
                stub = pb_grpc.GenerationStub(ch)
                return collect(stub.Generate(build_request(prompt, max_tokens, temperature=0.0), timeout=300))

        results = []
        for prompt in (SHORT, LONG):
            out = await loop.run_in_executor(None, call, prompt)
            out["prompt"] = prompt
            results.append(out)
        return results
    finally:
        await cluster.stop()


def run_demo(model: str = "smollm2", max_tokens: int = 24, as_json: bool = False) -> int:
    cfg = ClusterConfig(model=model, num_prefill=1, num_decode=1, port=0, disagg_threshold=64,
                        engine_kwargs={"kv_cache_memory_gb": 0.5})
    results = asyncio.run(_demo(cfg, max_tokens))
    for r in results:
        if as_json:
            print(json.dumps({k: r[k] for k in ("prompt", "text", "token_ids", "route", "reason", "cached_tokens",
                                                "decode_worker", "prefill_worker")}))
        else:
            print(f"--- route: {r['route']} ({r['reason']}); decode={r['decode_worker']} "
                  f"prefill={r['prefill_worker']}; prompt: {r['prompt'][:60]!r}...")
            print(r["text"].strip())
    return 0
