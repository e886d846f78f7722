"""Quality cost of quantization on SmolLM2-135M (CPU, fp32 activations, reference kernels).

For each configuration an LLMEngine is built with the engine options under test (the
quantized ones with the engine's default for the logits projection, int8: quantized, fp8:
fp32, and again with the other choice), and:
  perplexity     teacher-forced over tests/data/quant_eval.txt (an original English passage,
                 1284 tokens), in non-overlapping windows of --window tokens (--windows of them)
  teacher-forced top-1 agreement
                 the fp32 engine's greedy continuation (--tokens per prompt, 8 prompts) is fed
                 to the quantized model; the fraction of positions whose argmax is the fp32 token
  free-running   each engine generates greedily itself: mean fraction of the --tokens that
                 match fp32 before the first difference, and prompts identical throughout

    python benchmarks/quant_quality.py [--windows 2] [--window 512] [--tokens 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.quant.quality import perplexity, top1_agreement  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "quant_eval.txt"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The theory of evolution by natural selection states that",
    "In 1969, the first humans to walk on the Moon were",
    "A good way to learn a new programming language is to",
]
# The quantized configurations use the engine's default for the logits projection
# (quantized for int8, full precision for fp8); the "(... head)" rows force the other choice.
CONFIGS = {
    "fp32": dict(),
    "int8": dict(quantization="int8"),
    "int8 (fp32 head)": dict(quantization="int8", quantize_lm_head=False),
    "fp8": dict(quantization="fp8"),
    "fp8 (fp8 head)": dict(quantization="fp8", quantize_lm_head=True),
    "fp8_tensor": dict(quantization="fp8_tensor"),
    "fp8_tensor (fp8 head)": dict(quantization="fp8_tensor", quantize_lm_head=True),
    "fp32 + fp8 KV": dict(kv_cache_dtype="fp8"),
    "int8 + fp8 KV": dict(quantization="int8", kv_cache_dtype="fp8"),
}


def greedy(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    sp = SamplingParams(max_tokens=n, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", p, sp)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[f"q{i}"] for i in range(len(prompts))]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json")
    args = ap.parse_args()
    rows, base_out, base_ppl = [], None, None
    for name in args.configs.split(","):
        t0 = time.time()
        engine = LLMEngine("smollm2", device="cpu", dtype="float32", num_kv_blocks=256,
                           enable_prefix_caching=False, **CONFIGS[name])
        ids = engine.tokenizer.encode(TEXT.read_text())
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        ppl = perplexity(engine.runner, ids, args.window, args.windows)
        outs = greedy(engine, prompts, args.tokens)
        if base_out is None:  # the first configuration is the reference
            base_out, base_ppl = outs, ppl
        tf = [top1_agreement(engine.runner, p + o, len(p), o) for p, o in zip(prompts, base_out)]
        prefix = [common_prefix(a, b) / args.tokens for a, b in zip(outs, base_out)]
        row = dict(config=name, options=CONFIGS[name], perplexity=ppl, ppl_vs_fp32=ppl / base_ppl - 1,
                   teacher_forced_top1=sum(tf) / len(tf), free_running_prefix=sum(prefix) / len(prefix),
                   identical_prompts=sum(p == 1.0 for p in prefix), seconds=time.time() - t0)
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), tokens=len(ids), rows=rows), f, indent=1)
    n_eval = args.windows * (args.window - 1)
    print(f"\nSmolLM2-135M, CPU fp32 activations; perplexity over {args.windows} x {args.window}-token windows "
          f"({n_eval} predicted tokens); agreement over {len(PROMPTS)} prompts x {args.tokens} greedy tokens")
    print("| weights / KV | perplexity | vs fp32 | teacher-forced top-1 | free-running prefix | identical prompts |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['perplexity']:.3f} | {r['ppl_vs_fp32']:+.2%} | {r['teacher_forced_top1']:.1%} "
              f"| {r['free_running_prefix']:.1%} | {r['identical_prompts']}/{len(PROMPTS)} |")


if __name__ == "__main__":
    main()
