"""Plain-torch weight quantization: quantize, dequantize, and the reference matmul.

Weights are stored [out_features, in_features] like nn.Linear, one byte per element, with
fp32 scales so that  w ~= q * scale[:, None].  The reference matmul dequantizes the whole
weight to the activation dtype and calls F.linear: it runs on any device (the CPU path)
and is the oracle the Triton kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127.0  # symmetric: -128 is never produced, so q and -q are both representable
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448; e4m3fn has no inf, so overflow would be NaN

# A row (or tensor) of zeros gets this amax instead, so its scale is not 0 (0/0 = NaN).
_TINY = 1e-12


def _amax(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    a = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
    return a.float().clamp_min(_TINY)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scale [N] fp32)."""
    scale = _amax(w, per_channel=True) / INT8_MAX
    q = torch.round(w.float() / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with a per-output-channel (or one per-tensor) scale mapping amax to 448:
    (q [N, K] float8_e4m3fn, scale [N] fp32; per-tensor repeats one value N times)."""
    scale = _amax(w, per_channel) / FP8_MAX
    q = (w.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in fp32, then cast: the weight the quantized layer stands for."""
    return (q.float() * scale[:, None]).to(dtype)


def quant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(q, scale).T + bias, in x's dtype."""
    return F.linear(x, dequantize(q, scale, x.dtype), bias)
