"""Quantization for the engine: weight-only int8/fp8 linears and an fp8 KV cache.

ModelRunner calls prepare_model() once the weights are final (loaded or randomly
initialised), so both pools get it from their engine options alone:

  quantization="int8"        per-output-channel symmetric int8 weights
  quantization="fp8"         e4m3 weights, per-output-channel scales
  quantization="fp8_tensor"  e4m3 weights, one scale per matrix
  kv_cache_dtype="fp8"       K/V stored as e4m3 / kv_cache_scale

fp8 is weight-only too, through the same Triton kernel as int8 (e4m3 bytes upcast in
registers): torch._scaled_mm would also need the activations in fp8, adding their rounding
error, and decode, bound by reading the weights, gains nothing from fp8 tensor cores.

Only the decoder layers' projections (qkv, o, gate_up, down) are quantized. The embedding
table and the logits projection stay in the model dtype: they are one matrix (tied in
SmolLM2), the logits are the most precision-sensitive product, and for Llama-3-8B the
head is 6.5% of the parameters (13% of the bytes a decode step reads once the rest is int8).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.quant.kv_cache import KV_CACHE_DTYPES, fp8_kv_ops, kv_cache_torch_dtype
from engine.quant.linear import METHODS, QuantLinear

QUANTIZATION_METHODS = tuple(METHODS)
# (module under each decoder layer, attribute) of every linear that gets quantized.
QUANTIZED_LINEARS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                     ("mlp", "gate_up_proj"), ("mlp", "down_proj"))

__all__ = ["QUANTIZATION_METHODS", "KV_CACHE_DTYPES", "QuantLinear", "quantize_model",
           "apply_fp8_kv_cache", "prepare_model", "kv_cache_torch_dtype"]


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, use_triton: bool) -> nn.Module:
    """Replace the decoder layers' linears of a LlamaForCausalLM by QuantLinears, in place.
    One layer at a time, so the full-precision copy of only one matrix is alive at once."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {sorted(METHODS)}, got {method!r}")
    for layer in model.layers:
        for owner_name, attr in QUANTIZED_LINEARS:
            owner = getattr(layer, owner_name)
            linear = getattr(owner, attr)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{owner_name}.{attr} is {type(linear).__name__}, not nn.Linear "
                                "(quantized twice?)")
            setattr(owner, attr, QuantLinear.from_linear(linear, method, use_triton))
            del linear
    return model


def apply_fp8_kv_cache(model: nn.Module, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Point every attention module at KV ops that store and read an fp8 cache."""
    for layer in model.layers:
        attn = layer.self_attn
        attn.ops = fp8_kv_ops(attn.ops, k_scale, v_scale)


def prepare_model(model: nn.Module, cfg, backend: str, model_dtype: torch.dtype) -> torch.dtype:
    """Apply cfg.quantization and cfg.kv_cache_dtype to a model whose weights are final.
    Returns the dtype the KV cache must be allocated in."""
    if cfg.quantization is not None:
        quantize_model(model, cfg.quantization, use_triton=(backend == "triton"))
        device = next(model.buffers()).device
        if device.type == "cuda":
            # Hand the freed full-precision weights back to the driver: the KV pool is sized
            # from the device's free memory.
            torch.cuda.empty_cache()
    kv_dtype = kv_cache_torch_dtype(cfg.kv_cache_dtype, model_dtype)
    if kv_dtype == KV_CACHE_DTYPES["fp8"]:
        apply_fp8_kv_cache(model, cfg.kv_cache_scale, cfg.kv_cache_scale)
    return kv_dtype
