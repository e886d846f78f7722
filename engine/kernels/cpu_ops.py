"""CPU kernels: the torch reference ops, with the ones that the reference does badly on a
CPU replaced by numba-compiled loops.

Why: on a CPU, the reference decode attention first gathers each sequence's KV blocks into
a padded contiguous copy and then runs SDPA over it, so every decode step reads the whole
KV cache three times (gather read, gather write, attention read) and pays SDPA's per-call
overhead per length group. The loop below reads each sequence's blocks where they lie,
once, with one (sequence, KV head) pair per work item, which is several times faster at
every batch size (benchmarks/RESULTS.md).

Only float32/float64 are compiled (numpy has no bfloat16); other dtypes, or a machine
without numba, use the reference op. The numba functions compile on first use (a few
seconds) and are cached on disk next to this file.
"""
from __future__ import annotations

import logging
import math

import torch

from engine.kernels import reference
from engine.kernels.reference import (add_rms_norm, paged_prefill_attention, rms_norm,  # noqa: F401
                                      rotary_embedding, silu_and_mul, write_kv)

log = logging.getLogger(__name__)

try:
    import numba
    import numpy as np
    from numba import njit, prange
except ImportError:  # numba is a declared dependency, but keep the engine importable without it
    numba = None

_COMPILED_DTYPES = (torch.float32, torch.float64)

if numba is not None:
    # reassoc lets the dot products vectorise (the order of a float sum changes, as it does
    # between any two attention kernels); no other fast-math license is taken.
    _FASTMATH = {"reassoc", "contract"}

    @njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
    def _paged_decode_kernel(q, k_cache, v_cache, block_tables, context_lens, scale, out):  # pragma: no cover
        S, H, D = q.shape
        BS = k_cache.shape[1]
        KH = k_cache.shape[2]
        G = H // KH
        for w in prange(S * KH):
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

    # Run numba's parallel loops on as many threads as torch uses (no oversubscription).
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def available() -> bool:
    return numba is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Same contract as :func:`engine.kernels.reference.paged_decode_attention`."""
    if (numba is None or q.device.type != "cpu" or q.dtype not in _COMPILED_DTYPES
            or k_cache.dtype != q.dtype or q.shape[1] % k_cache.shape[2] != 0):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    n = q.shape[0]
    if n and int(context_lens.min()) < 1:
        raise ValueError("paged_decode_attention: every context length must be >= 1")
    out = torch.empty_like(q)
    _paged_decode_kernel(q.detach().contiguous().numpy(), k_cache.detach().numpy(), v_cache.detach().numpy(),
                         block_tables.to(torch.int32).contiguous().numpy(),
                         context_lens.to(torch.int32).contiguous().numpy(), float(scale), out.numpy())
    return out
