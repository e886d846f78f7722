"""Which fused attention serves a causal prefill chunk with grouped KV heads on this GPU:
torch SDPA per backend, with enable_gqa or with the KV heads repeated, against the Triton
paged kernel (one layer of random:llama3-8b shapes, medians of triton.testing.do_bench).

    python benchmarks/gpu_sdpa_variants.py [--tokens 4096]
"""
import argparse

import torch
import torch.nn.functional as F
import triton.testing as tt
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    T = ap.parse_args().tokens
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


if __name__ == "__main__":
    main()
