"""CPU: end-to-end decode speed of SmolLM2-135M with int8 weights against fp32, batch 1.

One 128-token random prompt, 128 greedy tokens (EOS ignored), each configuration loaded
and timed in turn, alternating `--repeat` times in one process after a warm-up generate
each. Reports wall seconds per run and whether the first tokens agree. Results in
benchmarks/RESULTS.md (Quantization, CPU speed).

    python benchmarks/cpu_quant_speed.py [--repeat 2] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import random
import time

import engine  # noqa: F401  (sets the engine's OpenMP default before torch loads)
from engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 40000) for _ in range(128)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    firsts = {}
    for _ in range(args.repeat):
        for quant in (None, "int8"):
            llm = LLM("smollm2", quantization=quant) if quant else LLM("smollm2")
            llm.generate([prompt], params)
            t = time.perf_counter()
            out = llm.generate([prompt], params)[0]
            dt = time.perf_counter() - t
            name = quant or "fp32"
            firsts[name] = out.token_ids[:8]
            print(f"{name}: {dt:.2f} s, {args.max_tokens / dt:.1f} tok/s, first tokens {out.token_ids[:8]}",
                  flush=True)
            del llm
    print("first 8 tokens equal:", firsts["fp32"] == firsts["int8"])


if __name__ == "__main__":
    main()
