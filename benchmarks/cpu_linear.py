"""CPU: one decode step's linear layers, torch's F.linear against the cpu backend's op.

Weights at SmolLM2-135M's shapes (30 layers of fused qkv, o, gate_up, down, plus the tied
logits projection: 538 MB in fp32), so they stream from memory as in a real step, not from
cache. For each row count (the decode batch) it times one pass over all of them through
F.linear and through `engine.kernels.cpu_ops.linear`, and a plain sum over the same number
of bytes as the machine's read-bandwidth reference. `--int8` also times the int8 weights
(per-row scales) through the quant reference (dequantize, F.linear) and the cpu op.
Results in benchmarks/RESULTS.md.

`--split-ab N` instead alternates, N times in this process, one row with the large
matrices split over the kernel threads (the default) against everything on one thread.

    python benchmarks/cpu_linear.py [--rows 1,2,4,8,16,32] [--iters 6] [--int8] [--json out.json]
    python benchmarks/cpu_linear.py --split-ab 3
"""
from __future__ import annotations

import argparse
import json
import time

import engine  # noqa: F401  (sets the engine's OpenMP default before torch loads)
import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.quant import reference as qref

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536, vocab 49152.
LAYER_SHAPES = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]
LAYERS, VOCAB = 30, 49152


def timed(fn, iters: int) -> float:
    fn()   # warm-up (and numba compile / cache load)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def split_ab(weights, reps: int, iters: int, g) -> None:
    xs = {k: torch.randn(1, k, generator=g) for k in (576, 1536)}
    default = cpu_ops._LINEAR_SPLIT_MIN_MACS
    for rep in range(reps):
        for name, min_macs in (("split large matrices", default), ("one thread", 1 << 62)):
            cpu_ops._LINEAR_SPLIT_MIN_MACS = min_macs
            ms = timed(lambda: [cpu_ops.linear(xs[w.shape[1]], w) for w in weights], iters) * 1e3
            print(f"rep {rep}: one row, {name}: {ms:.1f} ms")
    cpu_ops._LINEAR_SPLIT_MIN_MACS = default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--split-ab", type=int, default=0, metavar="N")
    ap.add_argument("--json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(*s, generator=g) for _ in range(LAYERS) for s in LAYER_SHAPES]
    weights.append(torch.randn(VOCAB, 576, generator=g))
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    quant = [qref.quantize_int8(w) for w in weights] if args.int8 else []
    flat = torch.randn(nbytes // 4, generator=g)
    sum_s = timed(lambda: flat.sum(), args.iters)
    print(f"{nbytes / 1e6:.0f} MB of weights; a plain sum over as many bytes: {sum_s * 1e3:.1f} ms "
          f"({nbytes / sum_s / 1e9:.1f} GB/s), torch threads {torch.get_num_threads()}")
    if args.split_ab:
        split_ab(weights, args.split_ab, args.iters, g)
        return
    rows_out = []
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for k in (576, 1536)}
        torch_s = timed(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], args.iters)
        ours_s = timed(lambda: [cpu_ops.linear(xs[w.shape[1]], w) for w in weights], args.iters)
        path = "loop" if m <= cpu_ops._LINEAR_MAX_ROWS else "F.linear"
        row = dict(rows=m, torch_ms=torch_s * 1e3, cpu_op_ms=ours_s * 1e3, cpu_op_path=path,
                   torch_gbps=nbytes / torch_s / 1e9, cpu_op_gbps=nbytes / ours_s / 1e9, speedup=torch_s / ours_s)
        rows_out.append(row)
        print(f"rows {m:3d}: F.linear {torch_s * 1e3:6.1f} ms ({row['torch_gbps']:.1f} GB/s)   "
              f"cpu op [{path}] {ours_s * 1e3:6.1f} ms ({row['cpu_op_gbps']:.1f} GB/s)   x{row['speedup']:.2f}")
        if quant:
            ref_s = timed(lambda: [qref.quant_linear(xs[q.shape[1]], q, sc) for q, sc in quant], args.iters)
            q_s = timed(lambda: [cpu_ops.quant_linear(xs[q.shape[1]], q, sc) for q, sc in quant], args.iters)
            row.update(int8_reference_ms=ref_s * 1e3, int8_cpu_op_ms=q_s * 1e3, int8_vs_fp32_op=ours_s / q_s)
            print(f"          int8: reference {ref_s * 1e3:6.1f} ms   cpu op {q_s * 1e3:6.1f} ms   "
                  f"x{ours_s / q_s:.2f} against the fp32 cpu op")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(weight_bytes=nbytes, sum_ms=sum_s * 1e3, rows=rows_out), f, indent=1)


if __name__ == "__main__":
    main()
