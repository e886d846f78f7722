"""CPU kernels: the torch reference ops, with the ones that the reference does badly on a
CPU replaced by numba-compiled loops.

Why: on a CPU, the reference decode attention first gathers each sequence's KV blocks into
a padded contiguous copy and then runs SDPA over it, so every decode step reads the whole
KV cache three times (gather read, gather write, attention read) and pays SDPA's per-call
overhead per length group. The loop below reads each sequence's blocks where they lie,
once, with one (sequence, KV head) pair per work item, which is several times faster at
every batch size (benchmarks/RESULTS.md). Likewise the linear layers at decode-sized
batches (fp32 weights, and int8 weights for the quantized QuantLinear): torch's GEMM
reaches a fraction of the memory bandwidth there, a plain loop over the weight rows most
of it (see "linear layers with few rows" below).

The loops themselves are serial, without numba's parallel regions: those share OpenMP
with torch, and on a busy host (several workers per node, or CI) the two spinning thread
pools fight (a short call can take orders of magnitude longer); the workqueue layer avoids
that but cannot be entered from two Python threads at once, which the workers do. Decode
attention at large batches is instead split by sequence, and a large linear layer by output
rows, over plain Python threads running the nogil kernels (see "threads for decode
attention" below; the pool serves both).

Only float32/float64 are compiled (numpy has no bfloat16); other dtypes, or a machine
without numba, use the reference op. The numba functions compile on first use (a few
seconds) and are cached on disk next to this file.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading

import torch
import torch.nn.functional as F

from engine.kernels import reference
from engine.quant import reference as qref
from engine.kernels.reference import causal_prefill_attention, paged_prefill_attention, silu_and_mul  # noqa: F401
from engine.kernels.reference import rotary_embedding_write_kv  # noqa: F401
from engine.kernels.reference import rms_norm_linear, silu_and_mul_linear  # noqa: F401  (composed, nothing to fuse)

log = logging.getLogger(__name__)

try:
    import numba
    import numpy as np
    from numba import njit
except ImportError:  # numba is a declared dependency, but keep the engine importable without it
    numba = None

_COMPILED_DTYPES = (torch.float32, torch.float64)

if numba is not None:
    # reassoc lets the dot products vectorise (the order of a float sum changes, as it does
    # between any two attention kernels); no other fast-math license is taken.
    _FASTMATH = {"reassoc", "contract"}

    @njit(fastmath=_FASTMATH, cache=True, nogil=True)
    def _paged_decode_kernel(q, k_cache, v_cache, block_tables, context_lens, scale, out,
                             w_lo, w_hi):  # pragma: no cover
        # Work items w_lo..w_hi-1 of S * KH: disjoint ranges write disjoint rows of `out`,
        # so several threads may run this at once on one batch.
        S, H, D = q.shape
        BS = k_cache.shape[1]
        KH = k_cache.shape[2]
        G = H // KH
        for w in range(w_lo, w_hi):
            s = w // KH
            kh = w - s * KH
            n = context_lens[s]
            # Pass 1: scores of the G query heads that share this KV head.
            scores = np.empty((G, n), dtype=out.dtype)
            for t in range(n):
                b = block_tables[s, t // BS]
                o = t % BS
                for g in range(G):
                    acc = 0.0
                    for d in range(D):
                        acc += q[s, kh * G + g, d] * k_cache[b, o, kh, d]
                    scores[g, t] = acc * scale
            # Softmax in place (max-subtracted, as SDPA does).
            for g in range(G):
                m = scores[g, 0]
                for t in range(1, n):
                    if scores[g, t] > m:
                        m = scores[g, t]
                total = 0.0
                for t in range(n):
                    e = math.exp(scores[g, t] - m)
                    scores[g, t] = e
                    total += e
                inv = 1.0 / total
                for t in range(n):
                    scores[g, t] *= inv
            # Pass 2: probability-weighted sum of V, read in place.
            acc_o = np.zeros((G, D), dtype=out.dtype)
            for t in range(n):
                b = block_tables[s, t // BS]
                o = t % BS
                for g in range(G):
                    p = scores[g, t]
                    for d in range(D):
                        acc_o[g, d] += p * v_cache[b, o, kh, d]
            for g in range(G):
                for d in range(D):
                    out[s, kh * G + g, d] = acc_o[g, d]

    # The small per-token ops below replace 6-25 torch ops each (and their per-op dispatch,
    # which dominates at batch 1) with one call; they follow the reference's arithmetic,
    # including its float32 statistics.
    def _rms_norm_loop(x, residual, weight, eps, out, res_out, add):  # pragma: no cover
        T, N = x.shape
        for t in range(T):
            ss = np.float32(0.0)
            for i in range(N):
                v = x[t, i] + residual[t, i] if add else x[t, i]
                if add:
                    res_out[t, i] = v
                f = np.float32(v)
                ss += f * f
            r = np.float32(1.0) / np.sqrt(ss / np.float32(N) + np.float32(eps))
            for i in range(N):
                v = res_out[t, i] if add else x[t, i]
                out[t, i] = weight[i] * (np.float32(v) * r)

    def _rotary_loop(x, positions, cos_sin, out):  # pragma: no cover
        T, NH, D = x.shape
        half = D // 2
        for t in range(T):
            p = positions[t]
            for h in range(NH):
                for i in range(half):
                    c = cos_sin[p, i]
                    sn = cos_sin[p, half + i]
                    a = np.float32(x[t, h, i])
                    b = np.float32(x[t, h, half + i])
                    out[t, h, i] = a * c - b * sn
                    out[t, h, half + i] = b * c + a * sn

    @njit(cache=True, nogil=True)
    def _write_kv_kernel(k, v, k_cache, v_cache, slots):  # pragma: no cover
        BS = k_cache.shape[1]
        n_slots = k_cache.shape[0] * BS
        for t in range(slots.shape[0]):
            s = slots[t]
            if s < 0:
                continue  # padding: nothing to write
            if s >= n_slots:
                raise IndexError("write_kv: slot out of range")
            b = s // BS
            o = s - b * BS
            k_cache[b, o] = k[t]
            v_cache[b, o] = v[t]

    @njit(fastmath=_FASTMATH, cache=True, nogil=True)
    def _linear_kernel(x, w, bias, has_bias, zero, out, n_lo, n_hi):  # pragma: no cover
        # out[:, n_lo:n_hi] = x @ w[n_lo:n_hi].T (+ bias): each weight row is read once from
        # memory and dotted with every input row while it sits in cache. Disjoint n ranges
        # write disjoint columns, so several threads may run this at once.
        M, K = x.shape
        for n in range(n_lo, n_hi):
            for m in range(M):
                acc = zero
                for k in range(K):
                    acc += x[m, k] * w[n, k]
                out[m, n] = acc + bias[n] if has_bias else acc

    @njit(fastmath=_FASTMATH, cache=True, nogil=True)
    def _int8_linear_kernel(x, q, scale, bias, has_bias, zero, out, n_lo, n_hi):  # pragma: no cover
        # As _linear_kernel over int8 weights with one scale per output row: the row's dot
        # product runs on the int8 values (converted in registers) and is scaled once, so
        # memory carries one byte per weight.
        M, K = x.shape
        for n in range(n_lo, n_hi):
            s = scale[n]
            for m in range(M):
                acc = zero
                for k in range(K):
                    acc += x[m, k] * q[n, k]
                out[m, n] = acc * s + bias[n] if has_bias else acc * s

    _rms_norm_kernel = njit(cache=True, nogil=True)(_rms_norm_loop)
    _rotary_kernel = njit(cache=True, nogil=True)(_rotary_loop)


def available() -> bool:
    return numba is not None


def warm_up(dtype: torch.dtype) -> None:
    """Run every compiled op once at a tiny shape so that its machine code for `dtype` is
    compiled, or loaded from numba's cache, before the first real step."""
    if numba is None or dtype not in _COMPILED_DTYPES:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=g).to(dtype)
    w = torch.ones(8, dtype=dtype)
    linear(x, x, w[:2])
    linear(x, x)
    if dtype == torch.float32:
        q = torch.ones(2, 8, dtype=torch.int8)
        quant_linear(x, q, torch.ones(2), w[:2])
        quant_linear(x, q, torch.ones(2))
    rms_norm(x, w, 1e-6)
    add_rms_norm(x, x, w, 1e-6)
    q, k = torch.randn(2, 2, 4, generator=g).to(dtype), torch.randn(2, 1, 4, generator=g).to(dtype)
    rotary_embedding(q, k, torch.tensor([0, 1]), torch.zeros(4, 4))
    cache = torch.zeros(2, 4, 1, 4, dtype=dtype)
    write_kv(k, k, cache, cache.clone(), torch.tensor([0, 1]))
    paged_decode_attention(q, cache, cache, torch.zeros(2, 1, dtype=torch.int32),
                           torch.tensor([1, 2], dtype=torch.int32), 0.5)


# ---- linear layers with few rows ----------------------------------------------------------------------
# At a decode step of a few sequences every linear layer is a matrix-vector product: it
# streams the weights once and does two flops per weight, so its speed is the memory
# bandwidth its loop reaches. torch's CPU GEMM (MKL) reaches far less than the machine's
# bandwidth at one to a few rows, a plain loop over the weight rows most of it (figures:
# benchmarks/cpu_linear.py and its section in benchmarks/RESULTS.md). Above
# _LINEAR_MAX_ROWS rows (prefill chunks, large decode batches) the GEMM's cache blocking
# pays off and F.linear is used.
_LINEAR_MAX_ROWS = 8
_INT8_LINEAR_MAX_ROWS = 64   # the int8 fallback dequantizes the whole matrix per call: the loop wins longer
# Work (rows x N x K multiply-adds) per thread below which a hand-off costs more than it
# saves: a matrix is split over at most work // this many threads, so small projections
# stay on the calling thread and only large ones (a logits table, or any layer of a big
# model) use every thread, as F.linear would.
_LINEAR_SPLIT_MIN_MACS = 1 << 21


def _linear_args_ok(x: torch.Tensor, rows: int, max_rows: int, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> bool:
    K = x.shape[-1]
    return (0 < rows <= max_rows and _compiled(x) and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[1] == K and weight.is_contiguous()
            # the loops detach: anything that must carry gradients takes torch's path
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and (bias is None or (bias.device.type == "cpu" and bias.dtype == x.dtype
                                  and bias.shape == weight.shape[:1])))


def _run_linear(kernel, x: torch.Tensor, rows: int, weight_args: tuple, N: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    K = x.shape[-1]
    x2 = x.detach().reshape(rows, K).contiguous()
    out = torch.empty((rows, N), dtype=x.dtype)
    b = bias.detach().contiguous() if bias is not None else out[0]   # unread when has_bias is False
    xn = x2.numpy()
    # `zero` types the accumulator: numba compiles one version per activation dtype.
    args = (xn, *weight_args, b.numpy(), bias is not None, xn.dtype.type(0), out.numpy())
    parts = max(1, min(_kernel_threads(), N, rows * N * K // _LINEAR_SPLIT_MIN_MACS))
    cuts = [N * i // parts for i in range(parts + 1)]
    _run_ranges(kernel, args, list(zip(cuts, cuts[1:])))
    return out.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`engine.kernels.reference.linear` (F.linear)."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if not (_linear_args_ok(x, rows, _LINEAR_MAX_ROWS, weight, bias) and weight.dtype == x.dtype):
        return F.linear(x, weight, bias)   # also raises F.linear's own errors on bad shapes
    return _run_linear(_linear_kernel, x, rows, (weight.detach().numpy(),), weight.shape[0], bias)


def quant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`engine.quant.reference.quant_linear` for fp32 activations and
    int8 weights with per-row fp32 scales; the reference (dequantize the whole matrix, then
    F.linear) for anything else. The loop scales each row's sum once instead of each weight,
    so results differ from the reference by fp32 rounding."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if not (_linear_args_ok(x, rows, _INT8_LINEAR_MAX_ROWS, q, bias) and x.dtype == torch.float32
            and q.dtype == torch.int8 and scale.device.type == "cpu" and scale.dtype == torch.float32
            and scale.shape == q.shape[:1]):
        return qref.quant_linear(x, q, scale, bias)
    return _run_linear(_int8_linear_kernel, x, rows, (q.numpy(), scale.contiguous().numpy()), q.shape[0], bias)


def _run_ranges(kernel, args, ranges) -> None:
    """kernel(*args, lo, hi) for every range: the first on this thread, the others on the
    pool at the same time (the kernels are nogil and write disjoint outputs)."""
    if len(ranges) == 1:
        kernel(*args, *ranges[0])
        return
    pool = _thread_pool(len(ranges) - 1)
    futures = []
    for lo, hi in ranges[1:]:
        try:
            futures.append(pool.submit(kernel, *args, lo, hi))
        except RuntimeError:   # the interpreter is shutting down: no new threads, run it here
            kernel(*args, lo, hi)
    kernel(*args, *ranges[0])
    for f in futures:
        f.result()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Same contract as :func:`engine.kernels.reference.paged_decode_attention`."""
    if (numba is None or q.device.type != "cpu" or q.dtype not in _COMPILED_DTYPES
            or k_cache.dtype != q.dtype or q.shape[1] % k_cache.shape[2] != 0):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    n = q.shape[0]
    if n:
        # numba does not bounds-check: a bad length would read outside the block table.
        lo, hi = (int(x) for x in torch.aminmax(context_lens))
        if lo < 1 or hi > block_tables.shape[1] * k_cache.shape[1]:
            raise ValueError(f"paged_decode_attention: context lengths must be in [1, "
                             f"{block_tables.shape[1] * k_cache.shape[1]}], got [{lo}, {hi}]")
    out = torch.empty_like(q)
    args = (q.detach().contiguous().numpy(), k_cache.detach().numpy(), v_cache.detach().numpy(),
            block_tables.to(torch.int32).contiguous().numpy(), context_lens.to(torch.int32).contiguous().numpy(),
            float(scale), out.numpy())
    kv_heads = k_cache.shape[2]
    parts = _split_sequences(args[4], kv_heads * q.shape[2])
    _run_ranges(_paged_decode_kernel, args, [(lo * kv_heads, hi * kv_heads) for lo, hi in parts])
    return out


# ---- threads for decode attention (and large linear layers) ------------------------------------------------------------------------
# At batch 32 decode attention is a third of a CPU step, and a serial loop leaves every core
# but one idle while it runs (torch's matmuls, the rest of the step, are multi-threaded).
# Splitting the sequences over plain Python threads running the nogil kernel uses those
# cores without OpenMP: an idle or waiting thread sleeps on a lock (futex), it does not spin, so
# on a busy host this degrades to about the serial speed instead of collapsing. The thread
# count follows torch.get_num_threads(), the budget an operator already sets per worker.
# The linear loops above split a large matrix over the same pool.
_SPLIT_MIN_WORK = 1 << 18     # context tokens x KV width below which one thread is faster
_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def _kernel_threads() -> int:
    return max(1, torch.get_num_threads())


def _split_sequences(context_lens, kv_width: int) -> list[tuple[int, int]]:
    """Contiguous sequence ranges, one per thread, with about equal context tokens each;
    a single range when the batch is too small to pay for a hand-off."""
    n_seq = context_lens.shape[0]
    total = int(context_lens.sum())
    threads = min(_kernel_threads(), n_seq)
    if threads < 2 or total * kv_width < _SPLIT_MIN_WORK:
        return [(0, n_seq)]
    cum = np.cumsum(context_lens)
    cuts = [0]
    for i in range(1, threads):
        cut = int(np.searchsorted(cum, total * i / threads)) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), n_seq - (threads - i)))
    cuts.append(n_seq)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _thread_pool(workers: int):
    """A pool of at least `workers` threads. A smaller one is replaced, never shut down:
    another engine thread may be submitting to it right now (it keeps its reference, and
    the old pool's idle threads exit once it is garbage-collected)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpu-kernels")
            _pool_size = workers
        return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: submits would wait forever.
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _compiled(*tensors: torch.Tensor) -> bool:
    return numba is not None and all(t.device.type == "cpu" and t.dtype in _COMPILED_DTYPES for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _compiled(x, weight) or x.dtype != weight.dtype:
        return reference.rms_norm(x, weight, eps)
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    a = x2.numpy()
    _rms_norm_kernel(a, a, weight.detach().contiguous().numpy(), float(eps), out.numpy(), a, False)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    if not _compiled(x, residual, weight) or not x.dtype == residual.dtype == weight.dtype:
        return reference.add_rms_norm(x, residual, weight, eps)
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    r2 = residual.detach().reshape(-1, x.shape[-1]).contiguous()
    out, res_out = torch.empty_like(x2), torch.empty_like(x2)
    _rms_norm_kernel(x2.numpy(), r2.numpy(), weight.detach().contiguous().numpy(), float(eps),
                     out.numpy(), res_out.numpy(), True)
    return out.view(x.shape), res_out.view(x.shape)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not _compiled(q, k) or cos_sin_cache.dtype != torch.float32 or q.dtype != k.dtype:
        return reference.rotary_embedding(q, k, positions, cos_sin_cache)
    if positions.numel():
        lo, hi = (int(x) for x in torch.aminmax(positions))
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            raise ValueError(f"rotary_embedding: positions must be in [0, {cos_sin_cache.shape[0]}), got [{lo}, {hi}]")
    pos = positions.detach().to(torch.int64).contiguous().numpy()
    table = cos_sin_cache.detach().contiguous().numpy()
    outs = []
    for x in (q, k):
        xc = x.detach().contiguous()
        out = torch.empty_like(xc)
        _rotary_kernel(xc.numpy(), pos, table, out.numpy())
        outs.append(out)
    return outs[0], outs[1]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Same contract as the reference; skips slot -1 without a host round trip per layer."""
    if not _compiled(k, v, k_cache) or not k.dtype == v.dtype == k_cache.dtype == v_cache.dtype:
        return reference.write_kv(k, v, k_cache, v_cache, slot_mapping)
    _write_kv_kernel(k.detach().contiguous().numpy(), v.detach().contiguous().numpy(),
                     k_cache.detach().numpy(), v_cache.detach().numpy(),
                     slot_mapping.detach().to(torch.int64).contiguous().numpy())
