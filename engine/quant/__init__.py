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

The decoder layers' projections (qkv, o, gate_up, down) are quantized, and so is the logits
projection for int8 (EngineConfig.quantize_lm_head, which can also force it on or off): a
decode step reads it whole (Llama-3-8B: 1.05 GB in bf16, 13% of the step's bytes once the
layers are int8). int8 with one scale per vocabulary row moves SmolLM2's perplexity by
under 0.4% (it is -0.3%); e4m3's 3-bit mantissa does cost there (fp8 +2.2% against +0.8%
with the head in fp32; fp8_tensor +4.5% against +2.1%; benchmarks/quant_quality.py), so
fp8 keeps it in the model dtype unless asked. The embedding table stays in the model dtype: the lookup gathers a step's few rows, so a
smaller table would save no time. With tied embeddings (SmolLM2, Llama-3.2) the quantized
head is therefore a separate copy of the table: vocab x hidden more bytes of weights
(SmolLM2-135M: 28 MB; Llama-3.2-1B: 263 MB), in exchange for a step reading half the bytes
(from bf16) for its logits.
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

__all__ = ["QUANTIZATION_METHODS", "KV_CACHE_DTYPES", "QuantLinear", "quantize_model", "quantize_lm_head",
           "apply_fp8_kv_cache", "prepare_model", "kv_cache_torch_dtype"]


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, use_triton: bool, lm_head: bool = True,
                   cpu_loop: bool = False) -> nn.Module:
    """Replace the decoder layers' linears of a LlamaForCausalLM by QuantLinears, in place,
    and (`lm_head`) its logits projection. One matrix at a time, so the full-precision copy
    of only one is alive at once."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {sorted(METHODS)}, got {method!r}")
    for layer in model.layers:
        for owner_name, attr in QUANTIZED_LINEARS:
            owner = getattr(layer, owner_name)
            linear = getattr(owner, attr)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{owner_name}.{attr} is {type(linear).__name__}, not nn.Linear "
                                "(quantized twice?)")
            setattr(owner, attr, QuantLinear.from_linear(linear, method, use_triton, cpu_loop))
            del linear
    if lm_head:
        quantize_lm_head(model, method, use_triton, cpu_loop)
    return model


@torch.no_grad()
def quantize_lm_head(model: nn.Module, method: str, use_triton: bool, cpu_loop: bool = False) -> None:
    """Make the logits projection a QuantLinear. Untied: it replaces the lm_head Linear,
    whose full-precision weight is then freed. Tied: embed_tokens keeps the full-precision
    table (its lookup is a gather, not a matmul) and lm_head becomes a quantized copy of it,
    which adds vocab x hidden bytes (plus 4 x vocab of scales) to the weights."""
    head = model.lm_head
    if isinstance(head, QuantLinear):
        raise TypeError("lm_head is already a QuantLinear (quantized twice?)")
    weight, bias = (model.embed_tokens.weight, None) if head is None else (head.weight, head.bias)
    model.lm_head = QuantLinear.from_weight(weight, bias, method, use_triton, cpu_loop)


def apply_fp8_kv_cache(model: nn.Module, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Point every attention module at KV ops that store and read an fp8 cache."""
    for layer in model.layers:
        attn = layer.self_attn
        attn.ops = fp8_kv_ops(attn.ops, k_scale, v_scale)


def prepare_model(model: nn.Module, cfg, backend: str, model_dtype: torch.dtype) -> torch.dtype:
    """Apply cfg.quantization and cfg.kv_cache_dtype to a model whose weights are final.
    Returns the dtype the KV cache must be allocated in."""
    if cfg.quantization is not None:
        head = cfg.quantize_lm_head if cfg.quantize_lm_head is not None else cfg.quantization == "int8"
        quantize_model(model, cfg.quantization, use_triton=(backend == "triton"), lm_head=head,
                       cpu_loop=(backend == "cpu"))
        device = next(model.buffers()).device
        if device.type == "cuda":
            # Hand the freed full-precision weights back to the driver: the KV pool is sized
            # from the device's free memory.
            torch.cuda.empty_cache()
    kv_dtype = kv_cache_torch_dtype(cfg.kv_cache_dtype, model_dtype)
    if kv_dtype == KV_CACHE_DTYPES["fp8"]:
        apply_fp8_kv_cache(model, cfg.kv_cache_scale, cfg.kv_cache_scale)
    return kv_dtype
