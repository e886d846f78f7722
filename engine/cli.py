"""`pdserve` command line. `generate` runs offline on a local engine."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _generate(args) -> int:
    if args.address:
        return _generate_remote(args)
    from engine import LLM, SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or None)
    params.validate()  # before the (slow) model load
    overrides = {}
    if args.kv_cache_gb is not None:
        overrides["kv_cache_memory_gb"] = args.kv_cache_gb
    llm = LLM(args.model, device=args.device, dtype=args.dtype, **overrides)
    outs = llm.generate(args.prompts, params, apply_chat_template=args.chat)
    for prompt, o in zip(args.prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}), flush=True)
        else:
            print(f"{prompt}{o.text}" if not args.chat else o.text)
            print("-" * 40)
    return 0


def _generate_remote(args) -> int:
    import grpc

    from deploy.client import generate
    for prompt in args.prompts:
        try:
            out = generate(args.address, prompt, args.max_tokens, temperature=args.temperature, seed=args.seed,
                           chat=args.chat)
        except grpc.RpcError as e:
            print(f"pdserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out["text"], "token_ids": out["token_ids"],
                              "route": out["route"], "reason": out["reason"],
                              "cached_tokens": out["cached_tokens"], "finish_reason": out["finish_reason"],
                              "decode_worker": out["decode_worker"], "prefill_worker": out["prefill_worker"]}),
                  flush=True)
        else:
            print(f"{prompt}{out['text']}")
            print(f"-- route: {out['route']} ({out['reason']}), cached tokens: {out['cached_tokens']}")
    return 0


def _serve(args) -> int:
    import asyncio

    from deploy.cluster import ClusterConfig, serve_forever
    engine_kwargs = {}
    if args.kv_cache_gb is not None:
        engine_kwargs["kv_cache_memory_gb"] = args.kv_cache_gb
    cfg = ClusterConfig(model=args.model, num_prefill=args.prefill, num_decode=args.decode, address=args.address,
                        host=args.host, port=args.port, disagg_threshold=args.disagg_threshold,
                        kv_timeout_s=args.kv_timeout, engine_kwargs=engine_kwargs, dtype=args.dtype)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve_forever(cfg))
    except KeyboardInterrupt:
        pass
    return 0


def _demo(args) -> int:
    from deploy.demo import run_demo
    return run_demo(args.model, args.max_tokens, args.json)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions for PROMPTs")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.add_argument("--model", default="smollm2", help="smollm2 | HF folder | .gguf file | random:<shape>")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--kv-cache-gb", type=float, default=None)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="send the prompts to a running `pdserve serve` instead of a local engine")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="start the router and the prefill/decode pools on Ray")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--prefill", type=int, default=1, help="prefill workers")
    s.add_argument("--decode", type=int, default=1, help="decode workers")
    s.add_argument("--address", default=None, help="existing Ray cluster (default: start a local one)")
    s.add_argument("--host", default="127.0.0.1", help="gRPC listen address")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--disagg-threshold", type=int, default=256,
                   help="uncached prompt tokens above which prefill runs on the prefill pool")
    s.add_argument("--kv-timeout", type=float, default=30.0, help="seconds before a KV transfer falls back")
    s.add_argument("--kv-cache-gb", type=float, default=None)
    s.add_argument("--dtype", default=None)
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="start a local 1+1 cluster, send a short and a long prompt, show their routes")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--max-tokens", type=int, default=24)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input and model errors: one clear line, no traceback
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
