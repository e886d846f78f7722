"""The batch-1 projections of a decode step through cuBLAS and through the Triton product
(engine/kernels/triton_ops.py: linear, rms_norm_linear, silu_and_mul_linear), on one GPU.

For each projection of `random:llama3-8b` (and SmolLM2's tied lm_head), a CUDA graph of
--layers copies (distinct weights, as the layers have, so nothing is served from L2) is
replayed and timed per copy:

  separate   the op before the product as its own kernel (add_rms_norm / silu_and_mul),
             then cuBLAS (F.linear); for a product with nothing before it, cuBLAS alone
  cublas     F.linear alone: what the product costs without its neighbour
  triton     the Triton product that recomputes its input, at each GemvTile of the sweep
             (tile, warps, and the kernel's variants: the norm's pass in wider blocks
             (_NORM_BLOCK_MAX), the next weight tile prefetched, a per-tile row reduction); then each
             op's fastest tiles again as programmatic dependent launches (pdl: launched while
             the kernel ahead drains; with prefetch its first weight tile is already loading)

and the weights' bytes over the time gives each one's read bandwidth. Per op, the tile with
the least time summed over that op's shapes is written as `engine_tiles` (the form
triton_ops.GEMV_CONFIGS takes; `gpu_decode.py --gemv-tiles FILE` runs the engine with it),
with `fuse_max_weight_bytes`: the largest weight at which the best Triton product still
beats the separate kernels.

    python benchmarks/gpu_gemv.py [--layers 32] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

import gpu_common as gc_

from engine.kernels import triton_ops as tri

# (name, N, K, the op before it): Llama-3-8B's batch-1 projections, and SmolLM2-135M's lm_head
# (tied to the embedding, 49152 x 576), a plain product with a short row.
SHAPES = [("qkv_proj", 6144, 4096, "add_norm"), ("o_proj", 4096, 4096, "none"),
          ("gate_up_proj", 28672, 4096, "add_norm"), ("down_proj", 4096, 14336, "silu"),
          ("smollm2_lm_head", 49152, 576, "none")]
DEVICE = "cuda"
# The engine's tiles before the variants (printed beside the sweep's best)
OLD_TILES = {"add_norm": tri.GemvTile(32, 512, 4), "silu": tri.GemvTile(8, 1024, 4)}
PROLOGUES = {"none": tri._PRO_NONE, "add_norm": tri._PRO_ADD_NORM, "silu": tri._PRO_SILU_MUL}
# Tiles of at most 32 KB of bf16 weights in flight per program.
TILES = [(4, 512), (4, 1024), (4, 2048), (8, 512), (8, 1024), (8, 2048), (16, 512), (16, 1024), (32, 512)]
# (prefetch, row_acc, wide_norm); the first is the kernel as it was before the variants.
VARIANTS = [(False, False, False), (False, False, True), (True, False, True), (True, True, True)]


# --quick: the engine's tiles, the earlier sweep's best region, and register-light tiles at 8
# warps (benchmarks/gemv_registers.py: 5-8 programs an SM), for a call that must also run
# the decode engine. (BLOCK_N, BLOCK_K, warps)
QUICK_TILES = [(32, 512, 4), (8, 1024, 4), (16, 512, 8), (8, 512, 8), (4, 512, 8)]


def sweep(op: str, quick: bool) -> list[tri.GemvTile]:
    variants = VARIANTS if op == "add_norm" else [v for v in VARIANTS if v[2]]  # wide_norm: norms only
    launches = QUICK_TILES if quick else [(bn, bk, w) for (bn, bk), w in itertools.product(TILES, (4, 8))]
    return [tri.GemvTile(bn, bk, warps, pf, ra, wn and op == "add_norm")
            for (bn, bk, warps), (pf, ra, wn) in itertools.product(launches, variants)]


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


class Shape:
    """One projection's --layers weight copies and the callables that time it."""

    def __init__(self, name, N, K, op, layers, dt):
        self.name, self.N, self.K, self.op, self.layers = name, N, K, op, layers
        dev = torch.device(DEVICE)
        ws = [torch.randn(N, K, device=dev, dtype=dt) * K ** -0.5 for _ in range(layers)]
        nw = torch.rand(K, device=dev, dtype=dt) + 0.5
        x = torch.randn(1, 2 * K if op == "silu" else K, device=dev, dtype=dt)
        res = torch.randn(1, K, device=dev, dtype=dt)
        if op == "silu":
            self.separate = lambda i: F.linear(tri.silu_and_mul(x), ws[i])  # noqa: E731
            self.triton = lambda i: tri.silu_and_mul_linear(x, ws[i])        # noqa: E731
            plain_in = tri.silu_and_mul(x)
        elif op == "add_norm":
            self.separate = lambda i: F.linear(tri.add_rms_norm(x, res, nw, 1e-5)[0], ws[i])  # noqa: E731
            self.triton = lambda i: tri.rms_norm_linear(x, res, nw, 1e-5, ws[i])[0]              # noqa: E731
            plain_in = x
        else:
            self.separate = lambda i: F.linear(x, ws[i])  # noqa: E731
            self.triton = lambda i: tri.linear(x, ws[i])   # noqa: E731
            plain_in = x
        self.cublas = lambda i: F.linear(plain_in, ws[i])  # noqa: E731
        self.gb = N * K * dt.itemsize / 1e9
        self.row = dict(name=name, N=N, K=K, op=op, weight_gb=self.gb, triton_us={},
                        separate_us=graph_us(self.separate, layers), cublas_us=graph_us(self.cublas, layers))

    def time(self, tile: tri.GemvTile) -> None:
        saved = tri.GEMV_CONFIG, tri.FUSED_GEMV_MAX_WEIGHT_BYTES
        tri.FUSED_GEMV_MAX_WEIGHT_BYTES = 1 << 62   # every shape through Triton here, whatever the engine would do
        tri.GEMV_CONFIG = tile
        try:
            try:
                us = graph_us(self.triton, self.layers)
            except Exception as e:   # a tile that does not compile (registers) is reported, not fatal
                print(f"  {self.name} {tile}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                return
            torch.testing.assert_close(self.triton(0).float(), self.separate(0).float(), atol=3e-2, rtol=2e-2)
            self.row["triton_us"][tile_key(tile)] = us
        finally:
            tri.GEMV_CONFIG, tri.FUSED_GEMV_MAX_WEIGHT_BYTES = saved

    def finish(self) -> dict:
        r = self.row
        if not r["triton_us"]:
            raise SystemExit(f"{self.name}: no tile compiled")
        best = min(r["triton_us"], key=r["triton_us"].get)
        r.update(best=best, best_us=r["triton_us"][best])
        r["gbs"] = dict(separate=self.gb / r["separate_us"] * 1e6, cublas=self.gb / r["cublas_us"] * 1e6,
                        best=self.gb / r["best_us"] * 1e6)
        return r


def top_tiles(shapes: list[Shape], n: int = 3) -> list[tri.GemvTile]:
    """The n fastest tiles of each shape, every one of them (for timing on all the shapes)."""
    keys = []
    for sh in shapes:
        us = sh.row["triton_us"]
        keys += [k for k in sorted(us, key=us.get)[:n] if k not in keys]
    return [from_key(k) for k in keys]


def tile_key(t: tri.GemvTile) -> str:
    return ",".join(str(int(v)) for v in t)


def from_key(key: str) -> tri.GemvTile:
    fields = [int(v) for v in key.split(",")]
    return tri.GemvTile(*fields[:3], *(bool(v) for v in fields[3:]))


def engine_tiles(rows) -> tuple[dict, int]:
    """The engine's FUSED_GEMV_MAX_WEIGHT_BYTES: the largest weight of a fused product (a norm
    or the activation before it) at which the fastest Triton tile beats the separate kernels,
    below any such weight where it loses. Then per op, the tile with the least time summed
    over that op's shapes within the limit, kept only where it beats the separate kernels on
    every one of them: for the plain product that includes SmolLM2's lm_head, since the
    engine sends every plain product under the limit to the same tile."""
    fused = [r for r in rows if r["op"] != "none"]
    wins = [r["weight_gb"] for r in fused if r["best_us"] < r["separate_us"]]
    losses = [r["weight_gb"] for r in fused if r["best_us"] >= r["separate_us"]]
    limit = max((w for w in wins if all(w < lo for lo in losses)), default=0.0)
    tiles = {}
    for op in PROLOGUES:
        mine = [r for r in rows if r["op"] == op and r["weight_gb"] <= limit]
        if not mine:
            continue
        keys = set.intersection(*(set(r["triton_us"]) for r in mine))
        if not keys:   # no tile compiled on every shape of the op
            continue
        key = min(keys, key=lambda k: sum(r["triton_us"][k] for r in mine))
        if all(r["triton_us"][key] < r["separate_us"] for r in mine):
            tiles[op] = key
    return tiles, round(limit * 1e9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="QUICK_TILES only")
    ap.add_argument("--json")
    args = ap.parse_args()
    dt = torch.bfloat16
    if not tri._pdl_supported(torch.device(DEVICE)):
        print("programmatic dependent launch not available here: the pdl tiles run without it", flush=True)
    shapes = []
    for name, N, K, op in SHAPES:
        t0 = time.time()
        sh = Shape(name, N, K, op, args.layers, dt)
        for tile in sweep(op, args.quick):
            sh.time(tile)
        shapes.append(sh)
        us = sh.row["triton_us"]
        top = {k: round(us[k], 2) for k in sorted(us, key=us.get)[:5]}
        print(f"{name}: {len(us)} tiles in {time.time() - t0:.0f} s; separate {sh.row['separate_us']:.2f} us, "
              f"cublas {sh.row['cublas_us']:.2f}, fastest {top}", flush=True)
    # The kernel launched as a programmatic dependent launch, at each op's fastest tiles.
    for op in PROLOGUES:
        mine = [sh for sh in shapes if sh.op == op]
        for tile in top_tiles(mine):
            for sh in mine:
                sh.time(tile._replace(pdl=True))
                if tile_key(tile) not in sh.row["triton_us"]:
                    sh.time(tile)
    rows = []
    for sh in shapes:
        r = sh.finish()
        rows.append(r)
        base = r["triton_us"].get(tile_key(OLD_TILES.get(r["op"], tri.GemvTile(32, 512, 4))))
        print(f"{r['name']:16s} separate {r['separate_us']:7.2f} us  cublas alone {r['cublas_us']:7.2f}  "
              f"triton best {r['best_us']:7.2f} [{r['best']}]  old engine tile {base or float('nan'):7.2f}  "
              f"GB/s sep/cublas/best {r['gbs']['separate']:.0f}/{r['gbs']['cublas']:.0f}/{r['gbs']['best']:.0f}",
              flush=True)
    tiles, limit = engine_tiles(rows)
    print("engine tiles:", tiles, "fuse up to", limit / 1e6, "MB", flush=True)
    lm = next(r for r in rows if r["name"].startswith("smollm2"))
    if "none" in tiles:
        print(f"SmolLM2 lm_head at the plain product's tile: {lm['triton_us'].get(tiles['none'], float('nan')):.2f} us "
              f"against cuBLAS {lm['cublas_us']:.2f}", flush=True)
    gc_.dump(args.json, dict(device=gc_.device_info(), layers=args.layers, rows=rows, engine_tiles=tiles,
                             fuse_max_weight_bytes=limit, tile_fields=list(tri.GemvTile._fields)))


if __name__ == "__main__":
    main()
