"""The batch-1 projections of a decode step with and without their neighbouring op fused in
(engine/kernels/triton_ops.py: rms_norm_linear, silu_and_mul_linear), on one GPU.

For each projection of `random:llama3-8b` that reads a norm or an activation, a CUDA graph
of --layers copies (distinct weights, as the layers have, so nothing is served from L2)
is replayed and timed per copy:

  separate   the op's own kernel (add_rms_norm / silu_and_mul) then cuBLAS (F.linear)
  cublas     F.linear alone: what the product costs without its neighbour
  fused      the Triton product that recomputes its input, at each (BLOCK_N, BLOCK_K,
             num_warps) of the sweep

and the weights' bytes over the time gives each variant's read bandwidth. The best fused
configuration per shape is printed beside the engine's (triton_ops._GEMV_CONFIGS), and
whether the engine fuses that shape at all (triton_ops.FUSED_GEMV_MAX_WEIGHT_BYTES).

    python benchmarks/gpu_gemv.py [--layers 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import gpu_common as gc_

from engine.kernels import triton_ops as tri

# (name, N, K, the op before it) at Llama-3-8B's shapes
SHAPES = [("qkv_proj", 6144, 4096, "add_norm"), ("gate_up_proj", 28672, 4096, "add_norm"),
          ("down_proj", 4096, 14336, "silu")]
SWEEP = list(itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8)))


def weight_bytes_fused(nbytes: int) -> bool:
    return nbytes <= tri.FUSED_GEMV_MAX_WEIGHT_BYTES


def graph_us(fn, layers: int, replays: int = 20) -> float:
    """Median GPU time per layer of a graph that calls fn(i) for i in range(layers)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(layers):   # warm-up: compiles, cuBLAS heuristics
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(layers):
            fn(i)
    return gc_.cuda_time_ms(g.replay, iters=replays, warmup=1) * 1000 / layers


def bench_shape(name, N, K, op, layers, dt):
    dev = torch.device("cuda")
    ws = [torch.randn(N, K, device=dev, dtype=dt) * K ** -0.5 for _ in range(layers)]
    nw = torch.rand(K, device=dev, dtype=dt) + 0.5
    x = torch.randn(1, 2 * K if op == "silu" else K, device=dev, dtype=dt)
    res = torch.randn(1, K, device=dev, dtype=dt)
    if op == "silu":
        separate = lambda i: F.linear(tri.silu_and_mul(x), ws[i])  # noqa: E731
        fused = lambda i: tri.silu_and_mul_linear(x, ws[i])        # noqa: E731
        plain_in = tri.silu_and_mul(x)
    else:
        separate = lambda i: F.linear(tri.add_rms_norm(x, res, nw, 1e-5)[0], ws[i])  # noqa: E731
        fused = lambda i: tri.rms_norm_linear(x, res, nw, 1e-5, ws[i])[0]              # noqa: E731
        plain_in = x
    gb = N * K * dt.itemsize / 1e9
    row = dict(name=name, N=N, K=K, op=op, weight_gb=gb,
               separate_us=graph_us(separate, layers), cublas_us=graph_us(lambda i: F.linear(plain_in, ws[i]), layers))
    fused_us = {}
    saved = tri.GEMV_CONFIG, tri.FUSED_GEMV_MAX_WEIGHT_BYTES
    tri.FUSED_GEMV_MAX_WEIGHT_BYTES = 1 << 62   # every shape fused here, whatever the engine would do
    try:
        engine_us = graph_us(fused, layers)    # the engine's configuration for this op
        for cfg in SWEEP:
            tri.GEMV_CONFIG = cfg
            fused_us[str(cfg)] = graph_us(fused, layers)
        tri.GEMV_CONFIG = saved[0]
        torch.testing.assert_close(fused(0).float(), separate(0).float(), atol=3e-2, rtol=2e-2)
    finally:
        tri.GEMV_CONFIG, tri.FUSED_GEMV_MAX_WEIGHT_BYTES = saved
    best = min(fused_us, key=fused_us.get)
    row.update(fused_us=fused_us, best=best, best_us=fused_us[best], engine_cfg_us=engine_us,
               engine_fuses=weight_bytes_fused(N * K * dt.itemsize),
               gbs=dict(separate=gb / row["separate_us"] * 1e6, cublas=gb / row["cublas_us"] * 1e6,
                        best=gb / fused_us[best] * 1e6))
    del ws
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    dt = torch.bfloat16
    rows = []
    for name, N, K, op in SHAPES:
        r = bench_shape(name, N, K, op, args.layers, dt)
        rows.append(r)
        print(f"{name:13s} separate {r['separate_us']:7.2f} us  cublas alone {r['cublas_us']:7.2f}  "
              f"fused best {r['best_us']:7.2f} {r['best']}  engine cfg {r['engine_cfg_us']:7.2f}"
              f"{'' if r['engine_fuses'] else ' (not fused by the engine)'}  "
              f"GB/s sep/cublas/best {r['gbs']['separate']:.0f}/{r['gbs']['cublas']:.0f}/{r['gbs']['best']:.0f}",
              flush=True)
    totals = {k: sum(r[k] for r in rows) for k in ("separate_us", "cublas_us", "best_us", "engine_cfg_us")}
    print("per layer, the three projections:", {k: round(v, 2) for k, v in totals.items()})
    gc_.dump(args.json, dict(device=gc_.device_info(), layers=args.layers, rows=rows, totals=totals))


if __name__ == "__main__":
    main()
