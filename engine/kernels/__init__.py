"""Kernel dispatch: one namespace of ops per backend, chosen by device.

`torch` (reference.py) runs anywhere and is the test oracle; `triton` (triton_ops.py)
is the fast path on CUDA; `cpu` (cpu_ops.py) is the reference with numba loops where the
reference is slow on a CPU (decode attention, linear layers at decode-sized batches). All
expose the same functions with the same signatures.
"""
from __future__ import annotations

import types

import torch

from engine.kernels import reference

OP_NAMES = ("linear", "rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding", "write_kv",
            "rotary_embedding_write_kv", "paged_decode_attention", "paged_prefill_attention",
            "causal_prefill_attention", "rms_norm_linear", "silu_and_mul_linear")


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from engine.kernels import cpu_ops
        if cpu_ops.available():
            return "cpu"
    return "torch"


def get_ops(backend: str) -> types.SimpleNamespace:
    if backend == "torch":
        mod = reference
    elif backend == "triton":
        from engine.kernels import triton_ops as mod
    elif backend == "cpu":
        from engine.kernels import cpu_ops as mod
    else:
        raise ValueError(f"unknown kernel backend {backend!r}")
    return types.SimpleNamespace(**{name: getattr(mod, name) for name in OP_NAMES})
