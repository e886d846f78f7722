"""`pdserve demo`: start a local cluster (1 prefill + 1 decode worker on Ray), send one
short prompt (prefilled in place by the decode worker) and one long prompt (prefilled on
the prefill pool, KV shipped over ZeroMQ), print both with their routes, time to first
token and decode speed, and stop. An instruct model gets its chat template."""
from __future__ import annotations

import asyncio
import json
import time

from deploy.cluster import Cluster, quiet_ray_auth_notice
from deploy.config import ServeConfig

SHORT = "What is the capital of France?"
LONG = ("Pdserve splits LLM serving into two pools. Prefill workers run the prompt through the "
        "model once and ship the resulting key/value cache, layer by layer, to a decode worker, "
        "which then generates the answer token by token. Short prompts skip the prefill pool "
        "because shipping their cache would cost more than computing it in place. ") * 3 + \
       "In one sentence, why split prefill from decode?"


def _timed(responses) -> dict:
    """collect() plus the client's clock: TTFT and tokens/s after the first token."""
    from deploy.client import collect
    t0 = time.perf_counter()
    stamps = []

    def stamped():
        for r in responses:
            if r.token_ids:
                stamps.append((time.perf_counter(), len(r.token_ids)))
            yield r
    out = collect(stamped())
    n = sum(k for _, k in stamps)
    out["ttft_s"] = stamps[0][0] - t0 if stamps else None
    span = stamps[-1][0] - stamps[0][0] if stamps else 0.0
    out["tokens_per_s"] = (n - stamps[0][1]) / span if span > 0 else None
    return out


async def _demo(cfg: ServeConfig, max_tokens: int) -> list[dict]:
    from deploy.client import build_request
    import grpc
    from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc

    cluster = Cluster(cfg)
    await cluster.start()
    try:
        address = f"{cfg.router.host}:{cluster.port}"
        loop = asyncio.get_running_loop()
        chat = cluster.service.has_chat_template

        def call(prompt):
            with grpc.insecure_channel(address) as ch:
                stub = pb_grpc.GenerationStub(ch)
                return _timed(stub.Generate(build_request(prompt, max_tokens, temperature=0.0, chat=chat),
                                            timeout=300))

        results = []
        for prompt in (SHORT, LONG):
            out = await loop.run_in_executor(None, call, prompt)
            out["prompt"], out["chat"] = prompt, chat
            results.append(out)
        return results
    finally:
        await cluster.stop()


def run_demo(model: str = "smollm2", max_tokens: int = 24, as_json: bool = False) -> int:
    quiet_ray_auth_notice()
    cfg = ServeConfig.simple(model, num_prefill=1, num_decode=1, router={"port": 0, "disagg_threshold": 64},
                             engine={"kv_cache_memory_gb": 0.5})
    results = asyncio.run(_demo(cfg, max_tokens))
    for r in results:
        if as_json:
            print(json.dumps({k: r[k] for k in ("prompt", "chat", "text", "token_ids", "route", "reason",
                                                "cached_tokens", "decode_worker", "prefill_worker", "ttft_s",
                                                "tokens_per_s")}))
        else:
            speed = f"{r['tokens_per_s']:.1f} tokens/s" if r["tokens_per_s"] else "n/a tokens/s"
            ttft = f"{r['ttft_s']:.2f}s" if r["ttft_s"] is not None else "n/a"
            print(f"--- route: {r['route']} ({r['reason']}); TTFT {ttft}, {speed}; decode={r['decode_worker']} "
                  f"prefill={r['prefill_worker']}; {'chat' if r['chat'] else 'prompt'}: {r['prompt'][:60]!r}...")
            print(r["text"].strip())
    return 0
