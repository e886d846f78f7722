"""`pdserve` command line (the `pdserve` entry point in pyproject.toml): `serve`, `demo`
and `bench` assemble a cluster from deploy/; `generate` runs offline on a local engine, or
against a server with --address."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# engine first, before anything imports torch: its CPU OpenMP default (engine/__init__.py)
# is read once, when torch loads libgomp (as when this module lived in engine/).
import engine  # noqa: F401,I001  isort: skip


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
    api_key = os.environ.get("PDSERVE_API_KEY") or None
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:   # first non-comment line
            api_key = next((ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")), None)
    security = dict(api_key=api_key, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                    tls_key=args.tls_key, server_name=args.tls_server_name)
    for prompt in args.prompts:
        try:
            out = generate(args.address, prompt, args.max_tokens, temperature=args.temperature, seed=args.seed,
                           chat=args.chat, **security)
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

    from deploy.cluster import serve_forever
    from deploy.config import config_from_args
    # --config FILE, then the flags given (security and edge limits included: CLI_FIELDS);
    # ConfigError is a ValueError: main() prints it.
    cfg = config_from_args(args)
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


def _bench(args) -> int:
    from deploy.bench import run
    run(args)
    return 0


def _profile(args) -> int:
    from deploy.deployed_probe import measure as deployed
    from deploy.frontend_probe import measure as front_end
    from planner.profiler import run_command
    return run_command(args, front_end=front_end, deployed=deployed)


def _plan(args) -> int:
    from planner.plan import run
    run(args)
    return 0


def _demo(args) -> int:
    from deploy.demo import run_demo
    return run_demo(args.model, args.max_tokens, args.json)


def build_parser() -> argparse.ArgumentParser:
    from deploy.config import ServeConfig
    defaults = ServeConfig()   # shown in `serve --help`; defined once, in the schema
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
    # With --address: how to reach a server that has API keys and/or TLS (SECURITY.md).
    g.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="API key sent as 'authorization: Bearer' (default: $PDSERVE_API_KEY)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="TLS: trust this CA for the server certificate")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="mutual TLS: client certificate")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="mutual TLS: client private key")
    g.add_argument("--tls-server-name", default=None, help="TLS: name to check the server certificate against")
    g.set_defaults(func=_generate)

    # Every flag maps to a field of the config file (deploy/config.py: CLI_FIELDS) and
    # overrides it; defaults (shown) are the schema's.
    s = sub.add_parser("serve", help="start the router and the prefill/decode pools on Ray")
    s.add_argument("--config", default=None, metavar="FILE", help="deployment YAML (see deploy/README section)")
    s.add_argument("--model", default=None, help=f"model (default {defaults.model})")
    s.add_argument("--prefill", type=int, default=None, help=f"prefill workers: the pool's min_replicas (default {defaults.pools.prefill.min_replicas})")
    s.add_argument("--prefill-max", type=int, default=None, help="prefill pool max_replicas (default = min)")
    s.add_argument("--decode", type=int, default=None, help=f"decode workers: the pool's min_replicas (default {defaults.pools.decode.min_replicas})")
    s.add_argument("--decode-max", type=int, default=None, help="decode pool max_replicas (default = min)")
    s.add_argument("--address", default=None, help="existing Ray cluster (default: start a local one)")
    s.add_argument("--host", default=None, help=f"gRPC listen address (default {defaults.router.host})")
    s.add_argument("--port", type=int, default=None, help=f"gRPC port (default {defaults.router.port})")
    s.add_argument("--disagg-threshold", type=int, default=None,
                   help="uncached prompt tokens above which prefill runs on the prefill pool "
                        f"(default {defaults.router.disagg_threshold})")
    s.add_argument("--kv-timeout", type=float, default=None, help=f"seconds before a KV transfer falls back (default {defaults.transfer.timeout_s:g})")
    s.add_argument("--record-trace", default=None, metavar="PATH",
                   help="append each finished request's arrival time and prompt/cached/output lengths (JSONL, no "
                        "content) to PATH, for `pdserve plan --trace`")
    s.add_argument("--kv-cache-gb", type=float, default=None)
    s.add_argument("--dtype", default=None)
    s.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) on this port "
                        "(default off; same API keys, TLS and limits as gRPC)")
    s.add_argument("--http-host", default=None, help=f"HTTP API listen address (default {defaults.router.http_host})")
    s.add_argument("--shutdown-grace", type=float, default=None, metavar="SECONDS",
                   help=f"on SIGTERM/SIGINT, in-flight requests get this long to finish (default {defaults.router.shutdown_grace_s:g})")
    s.add_argument("--metrics-port", type=int, default=None, help="router Prometheus /metrics port (default off)")
    s.add_argument("--controller-metrics-port", type=int, default=None,
                   help="autoscaling controller Prometheus /metrics port (default off)")
    s.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="require an API key (one per line; also $PDSERVE_API_KEYS, comma-separated)")
    s.add_argument("--tls-cert", default=None, metavar="PEM", help="serve gRPC over TLS with this certificate")
    s.add_argument("--tls-key", default=None, metavar="PEM", help="the TLS certificate's private key")
    s.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="mutual TLS: require client certificates signed by this CA")
    s.add_argument("--zmq-curve", action="store_true",
                   help="encrypt and authenticate the internal ZeroMQ planes (CurveZMQ)")
    s.add_argument("--internal-host", default=None,
                   help="interface of the router's internal token plane (default loopback / the node's Ray IP)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="per-request prompt limit (default: context)")
    s.add_argument("--max-tokens-limit", type=int, default=None, help="per-request max_tokens limit (default: context)")
    s.set_defaults(func=_serve)

    b = sub.add_parser("bench", help="serving benchmark: TTFT/TPOT/ITL/E2E percentiles and goodput under SLOs, "
                                     "against --address (gRPC), --http URL (any OpenAI API) or local clusters")
    from deploy.bench import add_arguments   # argparse only; the load generator's imports wait for the run
    add_arguments(b)
    b.set_defaults(func=_bench)

    pr = sub.add_parser("profile", help="measure this machine's engine cost model (step times, KV transfer, "
                                        "router overheads) into a JSON profile for `pdserve plan`")
    from planner.profiler import add_arguments as add_profile_arguments   # argparse only
    add_profile_arguments(pr)
    pr.set_defaults(func=_profile)

    pl = sub.add_parser("plan", help="simulate colocated / xPyD / conditional deployments on a workload with a "
                                     "profile's cost model; the best for a GPU budget, or --validate against bench")
    from planner.plan import add_arguments as plan_arguments   # argparse only
    plan_arguments(pl)
    pl.set_defaults(func=_plan)

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
