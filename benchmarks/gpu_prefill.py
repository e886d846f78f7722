"""GPU prefill benchmark: time to first token of one long prompt on `random:llama3-8b`
(bf16), against the bf16 matmul rate measured in the same run.

TTFT is LLMEngine wall time from add_request to the step that returns the first token
(one step: --max-batched-tokens covers the prompt, no chunking, no prefix cache), median
of --repeat runs after a warm-up. Useful FLOPs: 2 x (decoder matrix params) x tokens +
2 x (logits projection params) for the one sampled row + causal attention
(4 x head_dim x heads x layers x L(L+1)/2). The rate is an 8192^3 bf16 product on
random data. Each length runs twice in the run: with dense attention for the fresh chunk
(ops.causal_prefill_attention, the default) and with the paged Triton kernel
(runner.dense_fresh_prefill off). With --attention it also times one layer's prefill
attention (Triton paged kernel under a few tilings, and torch SDPA on contiguous q/k/v) x layers.

    python benchmarks/gpu_prefill.py [--lengths 1024,4096,8191] [--repeat 3] [--attention] [--kernels]
                                  [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import gpu_common as gc_

from engine import LLMEngine, SamplingParams  # noqa: E402


def ttft_s(engine, prompt: list[int], rid: str) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while True:
        outs = engine.step()
        if any(o.request_id == rid for o in outs):
            break
    return time.perf_counter() - t


def attention_times(engine, L: int) -> dict:
    import triton.testing as tt

    from engine.kernels import triton_ops as tri
    r = engine.runner
    cfg = r.mcfg
    H, KH, D, BS = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, r.block_size
    dev, dt = r.device, r.dtype
    k_cache, v_cache = r.kv_caches[0]
    nb = -(-L // BS)
    tables = torch.randperm(r.num_blocks, device=dev)[:nb].to(torch.int32)[None]
    q = torch.randn(L, H, D, device=dev, dtype=dt)
    qsl = torch.tensor([0, L], device=dev, dtype=torch.int32)
    lens = torch.tensor([L], device=dev, dtype=torch.int32)
    n = cfg.num_layers
    out = {}
    for name, conf in {"m64n64w4s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                       "m128n64w8s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                       "m128n128w8s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                       "m128n64w4s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)}.items():
        try:
            ms = tt.do_bench(lambda: tri._paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens,
                                                                  D ** -0.5, config=conf), return_mode="median")
            out[f"triton_{name}_ms_all_layers"] = ms * n
        except Exception as e:  # a tiling that does not fit shared memory
            out[f"triton_{name}_ms_all_layers"] = f"failed: {type(e).__name__}"
    qt = q.transpose(0, 1)[None]
    k = torch.randn(1, KH, L, D, device=dev, dtype=dt)
    v = torch.randn(1, KH, L, D, device=dev, dtype=dt)
    ms = tt.do_bench(lambda: F.scaled_dot_product_attention(qt, k, v, is_causal=True, enable_gqa=True),
                     return_mode="median")
    out["sdpa_ms_all_layers"] = ms * n
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,8191")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--kernels", action="store_true",
                    help="per length, the kernels of one prefill step and their device time (torch.profiler)")
    ap.add_argument("--json")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    tflops = gc_.matmul_tflops()
    print(f"bf16 matmul 8192^3: {tflops:.0f} TFLOP/s", flush=True)
    engine = LLMEngine(args.model, device="cuda", dtype="bfloat16", enable_prefix_caching=False,
                       max_num_seqs=8, max_num_batched_tokens=max(lengths), dense_prefill=True)
    dense_ok = engine.runner.dense_fresh_prefill   # the start-up probe's answer
    print(f"dense prefill attention: {'available' if dense_ok else 'unavailable here (paged only)'}", flush=True)
    mc = engine.model_config
    layer_p, head_p = gc_.matmul_params(engine.runner.model)
    g = torch.Generator().manual_seed(0)
    rows = []
    for L in lengths:
        prompts = [torch.randint(100, 120000, (L,), generator=g).tolist() for _ in range(args.repeat + 1)]
        flops = 2 * layer_p * L + 2 * head_p + 4 * mc.head_dim * mc.num_heads * mc.num_layers * L * (L + 1) / 2
        row = dict(tokens=L, dense_available=dense_ok)
        # Dense attention for the prompt's one fresh chunk (dense_prefill=True, where the
        # probe allows it), then the paged kernel for the same prompts in the same run.
        for dense, tag in ((True, ""), (False, "_paged")) if dense_ok else ((False, ""), (False, "_paged")):
            engine.runner.dense_fresh_prefill = dense
            ttft_s(engine, prompts[0], f"warm{L}{tag}")
            times = [ttft_s(engine, p, f"{L}-{i}{tag}") for i, p in enumerate(prompts[1:])]
            t = statistics.median(times)
            row.update({f"ttft{tag}_ms": t * 1000, f"ttft{tag}_all_ms": [x * 1000 for x in times],
                        f"tflops{tag}": flops / t / 1e12, f"ratio{tag}": flops / t / 1e12 / tflops})
        engine.runner.dense_fresh_prefill = dense_ok
        if args.kernels:
            iters = 3   # kernel_profile calls fn once more, as a warm-up; prompts of their own seed
            gk = torch.Generator().manual_seed(L)
            extra = iter([torch.randint(100, 120000, (L,), generator=gk).tolist() for _ in range(iters + 1)])
            row["kernels"] = gc_.kernel_profile(lambda: ttft_s(engine, next(extra), f"prof{L}-{time.time()}"),
                                                iters=iters)
            gc_.print_kernel_profile(f"prefill of {L} tokens (dense={dense_ok})", row["kernels"])
        if args.attention:
            row["attention"] = attention_times(engine, L)
        rows.append(row)
        print(row, flush=True)
    rec = dict(device=gc_.device_info(), matmul_tflops=tflops, rows=rows)
    gc_.dump(args.json, rec)
    print(f"\n{rec['device']['gpu']}: bf16 matmul {tflops:.0f} TFLOP/s")
    print("| prompt tokens | TTFT ms | achieved TFLOP/s | of matmul rate | paged attention: TTFT ms | of matmul rate |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['ttft_ms']:.1f} | {r['tflops']:.0f} | {r['ratio']:.1%} | "
              f"{r['ttft_paged_ms']:.1f} | {r['ratio_paged']:.1%} |")


if __name__ == "__main__":
    main()
