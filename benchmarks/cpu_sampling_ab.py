"""CPU: what sampling costs a batch of requests, with the batched sampler (engine/sampler.py)
against the one-row-at-a-time form it replaced (restated in sampler_batch.py), in one
process on the embedded SmolLM2-135M.

A batch of --batch requests (~30-token prompts, --max-tokens each, EOS ignored) runs with
each setting: greedy (no sampling work: the floor), temperature 1.0 (the OpenAI API's
default), and temperature 0.7 with top-p 0.9. The sampled settings run under both
samplers, alternating A B B A over --repeat rounds; each run's wall time and output
tokens/s are recorded, and the best per variant printed.

    python benchmarks/cpu_sampling_ab.py [--batch 32] [--max-tokens 64] [--repeat 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import engine.llm_engine as llm_engine  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from sampler_batch import per_row  # noqa: E402

BATCHED = llm_engine.sample


def per_row_lists(logits, params, generators, greedy_ids=None):
    tokens = per_row(logits, params, generators)
    lps = None
    if any(p.logprobs for p in params):
        lps = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1).tolist()
    return tokens.tolist(), lps


SETTINGS = {"greedy": dict(), "temperature 1.0": dict(temperature=1.0),
            "temperature 0.7, top-p 0.9": dict(temperature=0.7, top_p=0.9)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    llm = LLM("smollm2", device="cpu")
    words = "the a river stone light quiet early market north winter paper garden".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(30)) for i in range(args.batch)]
    llm.generate(prompts[:4], SamplingParams(max_tokens=8))   # warm-up
    runs = []

    def run(setting, sampler_name):
        llm_engine.sample = BATCHED if sampler_name == "batched" else per_row_lists
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **SETTINGS[setting])
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t
        ntok = sum(len(o.token_ids) for o in outs)
        runs.append(dict(setting=setting, sampler=sampler_name, wall_s=wall, tokens=ntok, tok_s=ntok / wall))
        print(f"{setting:28s} {sampler_name:8s} {wall:7.2f} s  {ntok / wall:7.1f} tok/s", flush=True)

    try:
        for _ in range(args.repeat):
            run("greedy", "batched")
            for setting in list(SETTINGS)[1:]:
                for name in ("per_row", "batched", "batched", "per_row"):
                    run(setting, name)
    finally:
        llm_engine.sample = BATCHED
    best = {}
    for r in runs:
        key = (r["setting"], r["sampler"])
        best[key] = max(best.get(key, 0.0), r["tok_s"])
    print(f"\nbest of each ({args.batch} requests x {args.max_tokens} tokens, {torch.get_num_threads()} threads):")
    print("| setting | per-row sampler tok/s | batched sampler tok/s | batched / per-row |")
    print("|---|---|---|---|")
    print(f"| greedy | - | {best[('greedy', 'batched')]:.0f} | - |")
    for s in list(SETTINGS)[1:]:
        a, b = best[(s, "per_row")], best[(s, "batched")]
        print(f"| {s} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model="smollm2", batch=args.batch, max_tokens=args.max_tokens, repeat=args.repeat, threads=torch.get_num_threads(),
                           torch=torch.__version__, runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
