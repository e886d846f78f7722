"""GPU figures for weight quantization: decode tokens/s and memory of `random:llama3-8b`
in bf16, int8 and fp8 (weight-only, engine/quant), at batch 1 and 32. A quantized mode uses
the engine's default for the logits projection (int8: quantized; fp8: bf16) unless suffixed
":head" (quantize it) or ":nohead" (keep it in bf16), e.g. --modes bf16,int8,int8:nohead.

1. --sweep: times a few launch configurations of the quantized matmul on the model's four
   projection shapes and its lm_head at M = 1 and M = 32 (weights rotated through > 2x L2
   so every call streams from HBM, like a decode step does), next to bf16 F.linear, and installs the
   fastest per shape with set_tuned_config() before any engine is built.
2. For each mode, an LLMEngine (CUDA graphs on, prefix cache off, a fixed KV pool) gets B
   requests with --ctx-token random prompts; after all are prefilled, --steps decode steps
   are timed (engine.step() wall time, so scheduling and sampling are included).

    python benchmarks/gpu_quant.py [--sweep] [--batches 1,32] [--modes bf16,int8,fp8]
                                   [--ctx 256] [--steps 24] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.quant import reference as qref  # noqa: E402
from engine.quant import triton_kernels as qtri  # noqa: E402

# Llama-3-8B projections (N, K): qkv, o, gate_up, down, and the logits projection.
SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
             "lm_head": (128256, 4096)}


def graph_time_us(fn, reps: int = 20) -> float:
    """Median CUDA-event time of a CUDA graph of fn, in microseconds."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def sweep(ms=(1, 32)) -> list[dict]:
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for name, (N, K) in SHAPES_8B.items():
        copies = max(2, -(-2 * l2 // (N * K)) + 1)  # int8 copies to overflow L2 twice
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        q, s = qref.quantize_int8(w)
        qs = [q.clone() for _ in range(copies)]
        q8, s8 = qref.quantize_fp8(w)
        q8s = [q8.clone() for _ in range(copies)]
        ws = [w.clone() for _ in range(max(2, copies // 2 + 1))]
        del w
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            bf16_us = graph_time_us(lambda: [F.linear(x, wi) for wi in ws]) / len(ws)
            best = None
            for cfg in qtri.candidate_configs(M):
                try:
                    us = graph_time_us(lambda: [qtri.quant_linear(x, qi, s, config=cfg) for qi in qs]) / len(qs)
                except Exception as e:  # a config that does not compile/fit is just skipped
                    print(f"  {name} M={M} {cfg}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                    continue
                if best is None or us < best[0]:
                    best = (us, cfg)
            us, cfg = best
            qtri.set_tuned_config(M, N, K, cfg)
            fp8_us = graph_time_us(lambda: [qtri.quant_linear(x, qi, s8, config=cfg) for qi in q8s]) / len(q8s)
            row = dict(shape=name, N=N, K=K, M=M, bf16_us=bf16_us, int8_us=us, fp8_us=fp8_us,
                       int8_speedup=bf16_us / us, fp8_speedup=bf16_us / fp8_us,
                       bf16_gbs=N * K * 2 / bf16_us / 1e3, int8_gbs=N * K / us / 1e3, config=cfg)
            rows.append(row)
            print(row, flush=True)
        del qs, q8s, ws
        torch.cuda.empty_cache()
    return rows


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())
               if t is not model.cos_sin_cache)


def bench_mode(model: str, mode: str, batches: list[int], ctx: int, steps: int) -> dict:
    method, _, head = mode.partition(":")
    if head not in ("", "head", "nohead"):
        raise SystemExit(f"mode {mode!r}: the suffix must be :head or :nohead")
    quant = None if method == "bf16" else method
    lm_head = None if not head else head == "head"
    torch.cuda.reset_peak_memory_stats()
    blocks = -(-(ctx + 3 * steps + 16) // 16) * max(batches) + 64
    t0 = time.time()
    engine = LLMEngine(model, device="cuda", dtype="bfloat16", quantization=quant, quantize_lm_head=lm_head,
                       enable_prefix_caching=False, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                       num_kv_blocks=blocks, cuda_graph_batch_sizes=tuple(sorted(set(batches))))
    r = engine.runner
    if quant is not None:
        quantized_head = type(r.model.lm_head).__name__ == "QuantLinear"
        mode = f"{method}, {method if quantized_head else 'bf16'} head"
    rec = dict(mode=mode, startup_s=time.time() - t0, weight_gb=model_bytes(r.model) / 1e9,
               kv_gb=r.kv_cache.numel() * r.kv_cache.element_size() / 1e9,
               allocated_gb=torch.cuda.memory_allocated() / 1e9, rows=[])
    print(f"{mode}: up in {rec['startup_s']:.0f}s, weights {rec['weight_gb']:.2f} GB", flush=True)
    for B in batches:
        sp = SamplingParams(max_tokens=3 * steps + 8, ignore_eos=True)
        g = torch.Generator().manual_seed(B)
        for i in range(B):
            engine.add_request(f"{mode}-{B}-{i}", torch.randint(100, 120000, (ctx,), generator=g).tolist(), sp)
        first = set()
        while len(first) < B:
            first.update(o.request_id for o in engine.step())
        torch.cuda.reset_peak_memory_stats()

        def timed():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                assert len(engine.step()) == B
            return (time.perf_counter() - t) / steps * 1000

        timed()  # warm-up
        ms = timed()  # best of two timed runs (the second one below) against a noisy host
        graphs = r.decode_graphs
        replays = graphs.num_replays if graphs is not None else 0
        ms = min(ms, timed())
        graphed = graphs is not None and graphs.num_replays - replays == steps
        for rid in list(engine._seqs):
            engine.abort(rid)
        row = dict(batch=B, step_ms=ms, cuda_graphs=graphed, tokens_per_s=B / ms * 1000,
                   peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        rec["rows"].append(row)
        print(row, flush=True)
    del engine, r, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--modes", default="bf16,int8,int8:nohead,fp8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    out = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, args=vars(args))
    if args.sweep:
        out["sweep"] = sweep(tuple(sorted({1 if b == 1 else min(32, b) for b in batches})))
    out["modes"] = [bench_mode(args.model, m, batches, args.ctx, args.steps) for m in args.modes.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    base = {row["batch"]: row["tokens_per_s"] for row in out["modes"][0]["rows"]}
    print(f"\n{out['gpu']}, {args.model}, prompt {args.ctx} tokens, {args.steps} timed decode steps")
    print("| weights | batch | tok/s | vs bf16 | step ms | CUDA graphs | weights GB | KV GB | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in out["modes"]:
        for row in m["rows"]:
            print(f"| {m['mode']} | {row['batch']} | {row['tokens_per_s']:.0f} | "
                  f"{row['tokens_per_s'] / base[row['batch']]:.2f}x | {row['step_ms']:.2f} | "
                  f"{row['cuda_graphs']} | {m['weight_gb']:.2f} | {m['kv_gb']:.2f} | "
                  f"{row['peak_gb']:.2f} |")
    if "sweep" in out:
        print("\n| shape | M | bf16 us | int8 us | fp8 us | int8 x | fp8 x | int8 GB/s | config |")
        print("|---|---|---|---|---|---|---|---|---|")
        for s in out["sweep"]:
            print(f"| {s['shape']} {s['N']}x{s['K']} | {s['M']} | {s['bf16_us']:.1f} | {s['int8_us']:.1f} | "
                  f"{s['fp8_us']:.1f} | {s['int8_speedup']:.2f} | {s['fp8_speedup']:.2f} | {s['int8_gbs']:.0f} | "
                  f"{s['config']} |")


if __name__ == "__main__":
    main()
