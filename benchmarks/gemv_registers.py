"""Registers and spills of the batch-1 Triton product's tiles, compiled for an H100 (sm_90) on
any machine, no GPU needed: what each GemvTile of benchmarks/gpu_gemv.py's sweep costs an SM
before it is timed.

For each tile and op: registers per thread and stack bytes per thread (spilled registers) from
the cubin (cuobjdump, shipped with Triton), the programs an SM can hold by registers
(65536 / (registers rounded up to 8, x threads), at most 64 warps), and, for each Llama-3-8B shape of
that op, the grid and how many of those SM-fulls it takes on 132 SMs (the tail wave is where
a one-wave product idles part of the GPU).

    python benchmarks/gemv_registers.py [--ops add_norm,silu,none] [--json out.json]

The numbers are this machine's Triton's; the device's Triton may allocate differently.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import gpu_common as gc_
import gpu_gemv

from engine.kernels import triton_ops as tri

SMS = 132   # H100 SXM
REGS_PER_SM, MAX_WARPS_PER_SM = 65536, 64
SIGNATURE = {"x_ptr": "*bf16", "res_ptr": "*bf16", "nw_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
             "res_out_ptr": "*bf16", "stride_x": "i32", "stride_res": "i32", "stride_w": "i32", "stride_out": "i32",
             "stride_res_out": "i32", "N": "i32", "K": "i32", "eps": "fp32"}


def resources(op: str, tile: tri.GemvTile, K: int = 4096) -> dict:
    consts = {"PROLOGUE": gpu_gemv.PROLOGUES[op], "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k,
              "NORM_BLOCK": tri._norm_block(tile, K), "PREFETCH": tile.prefetch,
              "ROW_ACC": tile.row_acc, "PDL": tile.pdl}
    # What the launch specializes on at these shapes: 16-byte-aligned pointers and strides, N and
    # K multiples of 16 (without the hints the loads are not vectorized: another kernel).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(SIGNATURE) if name != "eps"}
    kernel = triton.compile(ASTSource(tri._gemv_kernel, {**SIGNATURE, **{c: "constexpr" for c in consts}}, consts,
                                      attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": tile.warps, **({"launch_pdl": True} if tile.pdl else {})})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    # Registers are handed to a warp in units of 256: a thread's count rounds up to 8.
    allocated = -(-regs // 8) * 8
    per_sm = min(REGS_PER_SM // (allocated * tile.warps * 32), MAX_WARPS_PER_SM // tile.warps)
    return dict(registers=regs, stack_bytes=stack, programs_per_sm=per_sm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="add_norm,silu,none")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for op in args.ops.split(","):
        shapes = [(name, n) for name, n, _k, o in gpu_gemv.SHAPES if o == op and not name.startswith("smollm2")]
        for tile in gpu_gemv.sweep(op, quick=False):
            r = dict(op=op, tile=gpu_gemv.tile_key(tile), **resources(op, tile))
            r["sm_fulls"] = {name: round(math.ceil(n / tile.block_n) / (SMS * r["programs_per_sm"]), 2)
                             for name, n in shapes}
            rows.append(r)
            print(f"{op:8s} {r['tile']:16s} regs {r['registers']:3d}  stack {r['stack_bytes']:4d} B  "
                  f"programs/SM {r['programs_per_sm']:2d}  SM-fulls {r['sm_fulls']}", flush=True)
    gc_.dump(args.json, dict(triton=triton.__version__, target="sm_90", rows=rows))


if __name__ == "__main__":
    main()
