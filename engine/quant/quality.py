"""Teacher-forced scoring with an engine's own model: log-probs, perplexity, top-1 agreement.

One token window runs as a single prefill through the engine's model and kernels (the same
Attention/QuantLinear/KV-ops path serving uses, KV cache dtype included) with a private
paged KV cache, so the engine's own pool and prefix cache are never touched.
"""
from __future__ import annotations

import math

import torch

from engine.model.llama import ForwardBatch


@torch.inference_mode()
def window_logits(runner, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [n-1, V] predicting token_ids[1:] from their prefixes, for one window run
    on `runner` (an engine's ModelRunner) as one sequence."""
    n = len(token_ids)
    if n < 2:
        raise ValueError("a window needs at least 2 tokens")
    mcfg, dev, bs = runner.mcfg, runner.device, runner.block_size
    nblocks = -(-n // bs)
    cache_dtype = runner.kv_cache.dtype
    caches = [(torch.zeros(nblocks, bs, mcfg.num_kv_heads, mcfg.head_dim, device=dev, dtype=cache_dtype),
               torch.zeros(nblocks, bs, mcfg.num_kv_heads, mcfg.head_dim, device=dev, dtype=cache_dtype))
              for _ in range(mcfg.num_layers)]
    positions = torch.arange(n, device=dev)
    batch = ForwardBatch(positions=positions, slot_mapping=positions.clone(), num_decodes=0,
                         decode_block_tables=None, decode_context_lens=None,
                         prefill_block_tables=torch.arange(nblocks, device=dev, dtype=torch.int32)[None],
                         prefill_query_start_loc=torch.tensor([0, n], device=dev, dtype=torch.int32),
                         prefill_context_lens=torch.tensor([n], device=dev, dtype=torch.int32),
                         kv_caches=caches)
    ids = torch.tensor(token_ids, device=dev)
    hidden = runner.model(ids, batch)
    return runner.model.compute_logits(hidden[:-1]).float()


def windows(token_ids: list[int], size: int, count: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `size` tokens (the last, shorter one dropped)."""
    out = [token_ids[i:i + size] for i in range(0, len(token_ids) - size + 1, size)]
    return out[:count] if count is not None else out


def perplexity(runner, token_ids: list[int], window: int = 512, max_windows: int | None = None) -> float:
    """exp(mean negative log-likelihood) over the windows; each window starts fresh."""
    nll, count = 0.0, 0
    for w in windows(token_ids, window, max_windows):
        logp = torch.log_softmax(window_logits(runner, w), dim=-1)
        target = torch.tensor(w[1:], device=logp.device)
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += len(w) - 1
    if count == 0:
        raise ValueError(f"need at least {window} tokens, got {len(token_ids)}")
    return math.exp(nll / count)


def top1_agreement(runner, token_ids: list[int], start: int, reference: list[int] | None = None) -> float:
    """Fraction of positions p >= start where the runner's argmax prediction of token p
    equals reference[p - start] (default: token_ids[p] itself, i.e. a greedy continuation
    produced by another model is scored token by token, teacher-forced)."""
    ref = token_ids[start:] if reference is None else reference
    pred = window_logits(runner, token_ids).argmax(dim=-1)[start - 1:].tolist()
    if len(pred) != len(ref) or not ref:
        raise ValueError("reference must cover token_ids[start:]")
    return sum(a == b for a, b in zip(pred, ref)) / len(ref)
