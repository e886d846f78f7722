"""`pdserve` command line. `generate` runs offline on a local engine."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _generate(args) -> int:
    from engine import LLM, SamplingParams
    overrides = {}
    if args.kv_cache_gb is not None:
        overrides["kv_cache_memory_gb"] = args.kv_cache_gb
    llm = LLM(args.model, device=args.device, dtype=args.dtype, **overrides)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or None)
    outs = llm.generate(args.prompts, params, apply_chat_template=args.chat)
    for prompt, o in zip(args.prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}), flush=True)
        else:
            print(f"{prompt}{o.text}" if not args.chat else o.text)
            print("-" * 40)
    return 0


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
    g.set_defaults(func=_generate)
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
