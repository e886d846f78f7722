"""fp8 (e4m3) KV cache: K/V are stored as float8_e4m3fn divided by a per-tensor scale.

Nothing in the attention kernels knows about it. The model's attention modules get a copy
of their ops namespace in which
  - write_kv quantizes K/V (divide by the scale, saturate to +-448, cast) and writes the
    bytes through the ordinary kernel on uint8 views of the cache (CPU torch has no
    index_copy_ for float8; the bytes are the same on either backend);
  - attention reads the fp8 cache as is (both backends upcast K/V tiles to the query dtype
    on load), with the K scale folded into the softmax scale (q.(s*k) = s*(q.k)) and the V
    scale applied to the output (sum p*(s*v) = s*sum p*v).
So a scale costs two scalar multiplies, and the default scale 1.0 costs nothing.
"""
from __future__ import annotations

import types

import torch

from engine.quant.reference import FP8_DTYPE, FP8_MAX

KV_CACHE_DTYPES = {"fp8": FP8_DTYPE}


def kv_cache_torch_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    if name is None or name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)} or None, got {name!r}")
    return KV_CACHE_DTYPES[name]


def _to_fp8_bytes(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale != 1.0:
        x = x / scale
    # e4m3fn has no infinity: an out-of-range value would become NaN, so saturate first.
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)


def fp8_kv_ops(base: types.SimpleNamespace, k_scale: float = 1.0, v_scale: float = 1.0) -> types.SimpleNamespace:
    """A copy of the ops namespace `base` whose KV write/attention work on an fp8 cache."""
    ops = types.SimpleNamespace(**vars(base))

    def write_kv(k, v, k_cache, v_cache, slot_mapping):
        base.write_kv(_to_fp8_bytes(k, k_scale), _to_fp8_bytes(v, v_scale),
                      k_cache.view(torch.uint8), v_cache.view(torch.uint8), slot_mapping)

    def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
        out = base.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale * k_scale)
        return out if v_scale == 1.0 else out * v_scale

    def paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale):
        out = base.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                           context_lens, scale * k_scale)
        return out if v_scale == 1.0 else out * v_scale

    ops.write_kv = write_kv
    ops.paged_decode_attention = paged_decode_attention
    ops.paged_prefill_attention = paged_prefill_attention
    ops.kv_scales = (k_scale, v_scale)
    return ops
