"""Triton matmul with one-byte weights (int8 or fp8 e4m3) and per-output-channel scales.

    out[m, n] = scale[n] * sum_k x[m, k] * q[n, k]  (+ bias[n])

The weight tile is loaded as bytes and converted to the activation dtype in registers
(exact for int8 and for e4m3 into bf16/fp16/fp32); products accumulate in fp32 and the
scale is applied once per output, after the reduction. Decode is bound by reading the
weights, so halving their bytes is the whole point; two kernels serve it:

  _wq_gemv_kernel   one row (batch-1 decode): plain fp32 FMAs over a [BLOCK_N, BLOCK_K] tile,
                    no tensor cores, nothing padded.
  _wq_gemm_kernel   tl.dot on tiles of BLOCK_M rows: batched decode and prefill (and batch 1
                    on very wide outputs, where it measured faster).

Both can split K over several programs ("split-K") when there are too few output tiles to
fill the GPU (a 4096-wide output is 64-256 tiles for 132 SMs); the partial sums (fp32) are
then added by a torch reduction. Under TRITON_INTERPRET=1 the kernels run on CPU tensors,
which is how CI checks them against reference.quant_linear.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

# Split-K aims at about this many programs per SM: a program that only streams weights has
# nothing else to hide memory latency behind.
_PROGRAMS_PER_SM = 2
# ... but never splits K below this many elements per program (each split costs a partial
# row of fp32 writes plus the reduction).
_MIN_K_PER_SPLIT = 512


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: pretend to be a tiny GPU so the split heuristic still runs
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def _wq_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
                    N, K, k_per_split, stride_wn, stride_split,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + k_start + offs_k
    # Elementwise accumulation, reduced once at the end: the loop body is loads + FMAs.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        else:
            k_mask = (k0 + offs_k) < k_end
            x = tl.load(x_ptrs, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        if FP8:
            w = w.to(tl.float8e4nv, bitcast=True)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if SPLIT:
        tl.store(out_ptr + pid_k * stride_split + offs_n, y, mask=n_mask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _wq_gemm_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
                    M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_split,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Row tiles vary fastest, so the programs sharing a weight tile run together and read
    # it from L2 (prefill); at decode there is one row tile and this changes nothing.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k)[None, :]
    # The weight tile is read as [BLOCK_K, BLOCK_N] (k contiguous in memory) so it feeds
    # tl.dot directly as the right-hand operand.
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_start + offs_k)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
        else:
            k_mask = (k0 + offs_k) < k_end
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        if FP8:
            b = b.to(tl.float8e4nv, bitcast=True)
        if UPCAST:
            # The interpreter's tl.dot multiplies the raw bits of bf16 operands
            # (triton-lang/triton#11584): go through fp32 there.
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        o_ptrs = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def m_bucket(M: int) -> int:
    """Row counts that share a launch configuration (0: prefill-sized)."""
    return 1 if M == 1 else 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 0


# (m_bucket, N, K) -> config measured to be faster than pick_config's heuristic on this
# device; benchmarks/gpu_quant.py --sweep fills it (set_tuned_config) before the engines
# it times are built.
_TUNED: dict[tuple[int, int, int], dict] = {}


def set_tuned_config(M: int, N: int, K: int, config: dict) -> None:
    _TUNED[(m_bucket(M), N, K)] = dict(config)


def pick_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Launch configuration for an [M, K] x [K, N] product: a tuned entry if there is one,
    else a heuristic. No BLOCK_M means the GEMV kernel; SPLIT_K, if absent, is chosen by
    quant_linear from the tile count."""
    tuned = _TUNED.get((m_bucket(M), N, K))
    if tuned is not None:
        return dict(tuned)
    if device.type != "cuda":
        # Interpreter: small tiles so a test shape spans several tiles in every dimension.
        if M == 1:
            return dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
    # The M == 1 choices are the winners of benchmarks/gpu_quant.py --sweep on an H100 for
    # Llama-3-8B's projections (int8, weights streamed from HBM): the GEMV kernel with
    # narrow row tiles, except for very wide outputs where the 16-row tl.dot kernel won.
    if M == 1:
        if N >= 16384:   # gate_up 28672x4096: 47 us vs 86 us bf16
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
        if N >= 6144:    # qkv 6144x4096: 12.8 us vs 21.9 us
            return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=2)
        return dict(BLOCK_N=8, BLOCK_K=1024, num_warps=8, num_stages=2)  # o, down: 10.0 / 26.7 us
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if M <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def candidate_configs(M: int) -> list[dict]:
    """Launch configurations worth timing for M rows on a GPU (benchmarks/gpu_quant.py
    --sweep times them; the gpu tests check each against the reference)."""
    if M == 1:
        # GEMV: more bytes in flight per program (BLOCK_N x BLOCK_K) and more programs
        # (split-K) are the two levers; plus the tl.dot kernel on a padded 16-row tile.
        out = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=2)
               for bn, bk, w in [(8, 512, 4), (16, 256, 4), (8, 1024, 4), (8, 1024, 8), (16, 1024, 8),
                                 (4, 2048, 4), (8, 2048, 8), (16, 512, 4)]]
        out += [dict(BLOCK_N=8, BLOCK_K=bk, num_warps=4, num_stages=2, SPLIT_K=sk)
                for bk in (512, 1024) for sk in (2, 4)]
        out += [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4)
                for bn, bk in [(64, 128), (32, 256), (32, 512)]]
        return out
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    out = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4)
           for bn, bk in itertools.product((32, 64, 128), (128, 256))]
    out.append(dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=1))
    return out


def _pick_split(tiles: int, K: int, block_k: int, device: torch.device) -> int:
    want = -(-_PROGRAMS_PER_SM * _device_sms(device) // tiles)
    most = max(1, K // max(_MIN_K_PER_SPLIT, block_k))
    return max(1, min(want, most))


def quant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, config: dict | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (fp32/bf16/fp16) times q [N, K] (int8 or float8_e4m3fn) with scale [N] fp32
    -> [M, N] in x's dtype. Same contract as reference.quant_linear, restricted to 2-D x.
    `config` / `split_k` override pick_config (tests, tuning); a config without BLOCK_M
    selects the GEMV kernel (one row only)."""
    M, K = x.shape
    N, Kw = q.shape
    if K != Kw:
        raise ValueError(f"x has {K} columns but the weight has {Kw}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert q.stride(-1) == 1 and scale.is_contiguous()
    # fp8 weights travel as their bytes (masked loads need an integer `other`) and are
    # bitcast back to e4m3 in the kernel.
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8:
        q = q.view(torch.uint8)
    elif q.dtype != torch.int8:
        raise ValueError(f"weights must be int8 or float8_e4m3fn, got {q.dtype}")
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    cfg = dict(config or pick_config(M, N, K, x.device))
    warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
    gemv = "BLOCK_M" not in cfg
    if gemv and M != 1:
        raise ValueError("the GEMV kernel takes one row; give BLOCK_M for more")
    bm, bn, bk = cfg.get("BLOCK_M", 1), cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = split_k if split_k is not None else cfg.get("SPLIT_K") or _pick_split(tiles, K, bk, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per_split)
    even_k = K % bk == 0
    dst = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else out
    stride_split = dst.stride(0) if split > 1 else 0
    has_bias = bias is not None and split == 1
    bias_arg = bias if has_bias else scale  # any valid pointer; never read without HAS_BIAS
    if gemv:
        _wq_gemv_kernel[(triton.cdiv(N, bn), split)](
            x, q, scale, bias_arg, dst, N, K, k_per_split, q.stride(0), stride_split,
            HAS_BIAS=has_bias, SPLIT=split > 1, EVEN_K=even_k, FP8=fp8, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, num_stages=stages)
    else:
        upcast = x.device.type != "cuda"
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _wq_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), split)](
            x, q, scale, bias_arg, dst, M, N, K, k_per_split, x.stride(0), q.stride(0),
            dst.stride(-2), stride_split,
            HAS_BIAS=has_bias, SPLIT=split > 1, EVEN_K=even_k, FP8=fp8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            DOT_PRECISION=precision, UPCAST=upcast, num_warps=warps, num_stages=stages)
    if split > 1:
        out.copy_(dst.sum(dim=0))
        if bias is not None:
            out += bias
    return out
