"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over flattened, paged batches.

The forward pass sees one flat stream of tokens from many sequences (no padding). Each
layer writes its new K/V into the paged cache and attends through the block tables, so
the same code runs prefill chunks, prefix-cache hits and decode steps. q/k/v and
gate/up are fused into single matmuls at load time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kernels import reference
from engine.model.rope import build_cos_sin_cache


@dataclass
class ForwardBatch:
    """What one forward needs besides the tokens. Decode sequences come first in the
    token stream (one token each), prefill chunks after them."""
    positions: torch.Tensor                  # [T] int64 (int32 from the decode graphs)
    slot_mapping: torch.Tensor               # [T] int64 (int32 from the decode graphs)
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32
    prefill_block_tables: torch.Tensor | None
    prefill_query_start_loc: torch.Tensor | None  # [P+1], offsets within the prefill tokens
    prefill_context_lens: torch.Tensor | None
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Called after each layer has written its KV (the prefill pool ships KV layer by layer).
    on_layer_done: Callable[[int], None] | None = None
    # When the step's prefill attends densely (engine/attention_path.dense_prefill_step: every
    # chunk starts its sequence, and one chunk only on the triton backend): their
    # lengths, on the host. Attention then reads the chunk's own K/V densely
    # (ops.causal_prefill_attention) instead of gathering it back from the paged cache.
    prefill_fresh_lens: list[int] | None = None


class Linear(nn.Linear):
    """nn.Linear whose product goes through the kernel backend's `linear` op (on a CPU, a
    weight-streaming loop for decode-sized batches; elsewhere F.linear). Weight quantization
    swaps these for QuantLinear modules like any nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops):
        super().__init__(in_features, out_features, bias=bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, ops)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, False, ops)

    def _fuse_rope_kv(self, k_cache: torch.Tensor, q: torch.Tensor) -> bool:
        # The fused op only when the backend really fuses (a backend that re-exports the
        # reference composition keeps calling its own two ops, e.g. the numba rotary on
        # CPU), and only when the cache stores the activations' dtype: a quantized cache
        # (fp8) swaps in its own write_kv, which the fused kernel would bypass.
        return (self.ops.rotary_embedding_write_kv is not reference.rotary_embedding_write_kv
                and k_cache.dtype == q.dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: tuple[torch.Tensor, torch.Tensor],
                cos_sin: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv_proj(x), batch, kv, cos_sin)

    def attend(self, qkv: torch.Tensor, batch: ForwardBatch, kv: tuple[torch.Tensor, torch.Tensor],
               cos_sin: torch.Tensor) -> torch.Tensor:
        """The layer's attention from its q/k/v projection (qkv_proj's output), through o_proj."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv
        # Dense prefill attention needs the rotated K in hand (the fused op only writes it to
        # the cache), and a cache of the activations' dtype (a quantized cache's K/V are what
        # the paged kernel, and every later step, attends to).
        dense = batch.prefill_fresh_lens is not None and k_cache.dtype == q.dtype
        if not dense and self._fuse_rope_kv(k_cache, q):
            q = self.ops.rotary_embedding_write_kv(q, k, v, batch.positions, cos_sin, k_cache, v_cache,
                                                   batch.slot_mapping)
        else:
            q, k = self.ops.rotary_embedding(q, k, batch.positions, cos_sin)
            self.ops.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        nd = batch.num_decodes
        if nd == T:
            return self.o_proj(self.ops.paged_decode_attention(q, k_cache, v_cache, batch.decode_block_tables,
                                                               batch.decode_context_lens, self.scale)
                               .reshape(T, self.q_size))
        if dense:
            pre = self.ops.causal_prefill_attention(q[nd:], k[nd:], v[nd:], batch.prefill_fresh_lens, self.scale)
        else:
            pre = self.ops.paged_prefill_attention(q[nd:], k_cache, v_cache, batch.prefill_block_tables,
                                                   batch.prefill_query_start_loc, batch.prefill_context_lens,
                                                   self.scale)
        if nd == 0:
            out = pre
        else:
            out = torch.empty_like(q)
            out[:nd] = self.ops.paged_decode_attention(q[:nd], k_cache, v_cache, batch.decode_block_tables,
                                                       batch.decode_context_lens, self.scale)
            out[nd:] = pre
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, ops)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(silu(gate) * up), from gate_up_proj's output."""
        if _fused_into(self.ops.silu_and_mul_linear, reference.silu_and_mul_linear, self.down_proj):
            return self.ops.silu_and_mul_linear(gate_up, self.down_proj.weight)
        return self.down_proj(self.ops.silu_and_mul(gate_up))


def _fused_into(op, composed, proj: nn.Module) -> bool:
    # A fused product only where the backend really fuses (not the reference composition,
    # which would bypass a backend's own linear, e.g. the CPU's weight-streaming loop) and
    # the projection is a plain Linear: a quantized one (QuantLinear) has its own product.
    return op is not composed and type(proj) is Linear and proj.bias is None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.ops = ops
        self.eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x, residual, batch, kv, cos_sin):
        qkv, residual = self._norm_then(x, residual, self.input_layernorm, self.self_attn.qkv_proj)
        h = self.self_attn.attend(qkv, batch, kv, cos_sin)
        gate_up, residual = self._norm_then(h, residual, self.post_attention_layernorm, self.mlp.gate_up_proj)
        return self.mlp.down(gate_up), residual

    def _norm_then(self, x, residual, norm_weight, proj):
        """proj(rms_norm(x + residual)) and the new residual (x itself when residual is None)."""
        if _fused_into(self.ops.rms_norm_linear, reference.rms_norm_linear, proj):
            return self.ops.rms_norm_linear(x, residual, norm_weight, self.eps, proj.weight)
        if residual is None:
            return proj(self.ops.rms_norm(x, norm_weight, self.eps)), x
        h, residual = self.ops.add_rms_norm(x, residual, norm_weight, self.eps)
        return proj(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        # The logits projection. None when the embeddings are tied: the table itself is then
        # the projection. Weight quantization (engine/quant) may replace it by a QuantLinear,
        # for tied models one holding a quantized copy of the table.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, ops)
        self.cos_sin_cache: torch.Tensor | None = None  # set by init_rope() once on its device

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        cfg = self.cfg
        self.cos_sin_cache = build_cos_sin_cache(cfg.head_dim, max_positions, cfg.rope_theta,
                                                 cfg.rope_scaling).to(device)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, batch, batch.kv_caches[i], self.cos_sin_cache)
            if batch.on_layer_done is not None:
                batch.on_layer_done(i)
        x, _ = self.ops.add_rms_norm(x, residual, self.norm, self.cfg.rms_norm_eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab]."""
        if self.lm_head is None:
            return self.ops.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()  # nn.Linear, or a QuantLinear once quantized

    # ---- weights -------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters. Every parameter must be set once."""
        params = dict(self.named_parameters())
        q, kv = self.layers[0].self_attn.q_size, self.layers[0].self_attn.kv_size
        inter = self.cfg.intermediate_size
        # HF name suffix -> (our suffix, row offset into the fused tensor)
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0),
            "self_attn.k_proj": ("self_attn.qkv_proj", q),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0),
            "mlp.up_proj": ("mlp.gate_up_proj", inter),
        }
        rows_loaded: dict[str, int] = {}
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            ours = name.removeprefix("model.")
            if ours.endswith("layernorm.weight") or ours == "norm.weight":
                ours = ours.removesuffix(".weight")
            offset = None
            for hf, (mine, off) in fused.items():
                if f".{hf}." in ours:
                    ours, offset = ours.replace(hf, mine), off
                    break
            if ours == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # tied: some checkpoints store the copy anyway
            if ours not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            p = params[ours]
            with torch.no_grad():
                if offset is None:
                    if p.shape != tensor.shape:
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(p.shape)}")
                    p.copy_(tensor)
                    rows_loaded[ours] = p.shape[0]
                else:
                    n = tensor.shape[0]
                    if offset + n > p.shape[0] or tensor.shape[1:] != p.shape[1:]:
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {ours}")
                    p[offset:offset + n].copy_(tensor)
                    rows_loaded[ours] = rows_loaded.get(ours, 0) + n
        missing = [n for n, p in params.items() if rows_loaded.get(n, 0) != p.shape[0]]
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
