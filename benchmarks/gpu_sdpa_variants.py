"""Which fused attention serves a causal prefill chunk with grouped KV heads on this GPU:
torch SDPA per backend, with enable_gqa or with the KV heads repeated, against the Triton
paged kernel (one layer of random:llama3-8b shapes, medians of triton.testing.do_bench).

    python benchmarks/gpu_sdpa_variants.py [--tokens 4096] [--batch-lengths]

--batch-lengths adds what a serving stream asks of the fresh-prefill path: a step of several
fresh prompts of different lengths (the engine's per-sequence cuDNN loop against the paged
kernel's one launch, and torch's varlen flash attention where this torch has it, with each
causal keyword its releases have used), the
first call at a length not seen before (cuDNN builds a plan per shape), and whether the
cuDNN output comes back in the [tokens, heads, dim] order the engine reshapes it to.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import triton.testing as tt
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch-lengths", action="store_true")
    args = ap.parse_args()
    T = args.tokens
    H, KH, D = 32, 8, 128
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, KH, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    print(torch.__version__, torch.cuda.get_device_name(0))

    def run(name, f):
        try:
            print(f"{name:40s} {tt.do_bench(f, return_mode='median'):8.3f} ms")
        except Exception as e:
            print(f"{name:40s} failed {type(e).__name__}: {str(e)[:100]}")

    run("gqa 3d default", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))
    run("gqa 4d default", lambda: F.scaled_dot_product_attention(qt[None], kt[None], vt[None], is_causal=True,
                                                                 enable_gqa=True))
    rep = H // KH
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        def gqa(b=b):
            with sdpa_kernel([b]):
                return F.scaled_dot_product_attention(qt[None], kt[None], vt[None], is_causal=True, enable_gqa=True)

        def repeated(b=b):
            with sdpa_kernel([b]):
                return F.scaled_dot_product_attention(qt[None], kt.repeat_interleave(rep, 0)[None],
                                                      vt.repeat_interleave(rep, 0)[None], is_causal=True)
        run(f"gqa 4d {b.name}", gqa)
        run(f"repeated kv 4d {b.name}", repeated)
    from engine.kernels import triton_ops as tri
    nb = -(-T // 16)
    tables = torch.randperm(2 * nb, device="cuda")[:nb].to(torch.int32)[None]
    kc = torch.randn(2 * nb, 16, KH, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    qsl = torch.tensor([0, T], device="cuda", dtype=torch.int32)
    lens = torch.tensor([T], device="cuda", dtype=torch.int32)
    run("triton paged", lambda: tri.paged_prefill_attention(q, kc, vc, tables, qsl, lens, D ** -0.5))
    if args.batch_lengths:
        batch_lengths(run, H, KH, D)


def batch_lengths(run, H, KH, D):
    from engine.kernels import triton_ops as tri
    scale = D ** -0.5
    out = tri.causal_prefill_attention(*(torch.randn(512, n, D, device="cuda", dtype=torch.bfloat16)
                                         for n in (H, KH, KH)), [512], scale)
    print(f"cuDNN output, one sequence: [T, H, D] contiguous = {out.is_contiguous()}")
    g = torch.Generator().manual_seed(0)
    for n_seqs, lo, hi in ((8, 256, 768), (32, 256, 768), (2, 1024, 4096)):
        lens = torch.randint(lo, hi + 1, (n_seqs,), generator=g).tolist()
        T = sum(lens)
        q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, KH, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        tag = f"{n_seqs} seqs {lo}-{hi} ({T} tokens)"
        run(f"{tag}: cuDNN per sequence", lambda: tri.causal_prefill_attention(q, k, v, lens, scale))
        bs = 16
        nbs = [-(-n // bs) for n in lens]
        width = max(nbs)
        perm = torch.randperm(2 * sum(nbs), device="cuda").to(torch.int32)
        tables = torch.zeros(n_seqs, width, dtype=torch.int32, device="cuda")
        at = 0
        for i, nb in enumerate(nbs):
            tables[i, :nb] = perm[at:at + nb]
            at += nb
        kc = torch.randn(2 * sum(nbs), bs, KH, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
        ctx = torch.tensor(lens, device="cuda", dtype=torch.int32)
        run(f"{tag}: triton paged", lambda: tri.paged_prefill_attention(q, kc, vc, tables, cu, ctx, scale))
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            print("torch.nn.attention.varlen: not in this torch")
            continue
        m = max(lens)
        for kw in (dict(window_size=(-1, 0), enable_gqa=True), dict(window_size=(-1, 0)), dict(is_causal=True)):
            run(f"{tag}: varlen_attn {sorted(kw)}", lambda kw=kw: varlen_attn(q, k, v, cu, cu, m, m, scale=scale, **kw))
    # The first call at a new length: cuDNN plans per shape.
    firsts, again = [], []
    for n in range(1000, 1010):
        qq = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
        kk = torch.randn(n, KH, D, device="cuda", dtype=torch.bfloat16)
        for lst in (firsts, again):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tri.causal_prefill_attention(qq, kk, kk, [n], scale)
            torch.cuda.synchronize()
            lst.append(1e3 * (time.perf_counter() - t0))
    print(f"cuDNN at 10 new lengths 1000-1009: first call median {statistics.median(firsts):.2f} ms, "
          f"second call median {statistics.median(again):.3f} ms")


if __name__ == "__main__":
    main()
