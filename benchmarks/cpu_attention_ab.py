"""CPU A/B of the threaded decode attention: the engine alone on cpu_vs_hf's batch scenario
(32 mixed prompts, SmolLM2 fp32), reporting the whole run's time and the time spent inside
the decode-attention op.

Each --modes entry is one timed run in this process: "split" (ranges of sequences over
Python threads, engine/kernels/cpu_ops.py) or "serial" (one thread). The OpenMP spin is
fixed per process when torch loads libgomp, so compare spins across processes, e.g.

    GOMP_SPINCOUNT=300000 python benchmarks/cpu_attention_ab.py --modes serial   # libgomp's default spin
    python benchmarks/cpu_attention_ab.py --modes split                          # engine default (3000)

--load-hf also loads transformers' model into this process first (unused afterwards): the
engine's batch run was seen to be faster in such a process (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_vs_hf  # noqa: E402  (imports engine before torch, as the CLI does)

from engine.kernels import cpu_ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="split,serial", help="comma-separated: split, serial")
    ap.add_argument("--load-hf", action="store_true")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if any(m not in ("split", "serial") for m in modes):
        ap.error("--modes takes split and serial")
    tok = cpu_vs_hf.load_hf()[0] if args.load_hf else cpu_vs_hf.load_tokenizer()
    llm, _ = cpu_vs_hf.load_engine({})

    spent = {"s": 0.0}
    attention = cpu_ops.paged_decode_attention

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return attention(*a, **k)
        finally:
            spent["s"] += time.perf_counter() - t

    for layer in llm.engine.runner.model.layers:   # each layer's own view of the ops, timed
        ops = layer.self_attn.ops
        layer.self_attn.ops = types.SimpleNamespace(**{n: getattr(ops, n) for n in dir(ops) if not n.startswith("_")})
        layer.self_attn.ops.paged_decode_attention = timed

    work = cpu_vs_hf.make_workload(tok, "batch", 0, 32)
    cpu_vs_hf.run_engine(llm, work[:2])          # warm-up, with the workload's own shapes
    split_min = cpu_ops._SPLIT_MIN_WORK
    print(f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} load_hf={args.load_hf}")
    for mode in modes:
        cpu_ops._SPLIT_MIN_WORK = split_min if mode == "split" else 1 << 62
        spent["s"] = 0.0
        secs, _, _ = cpu_vs_hf.run_engine(llm, work)
        print(f"{mode}: total {secs:.2f} s, attention {spent['s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
