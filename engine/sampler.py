"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Greedy rows are one batched argmax. Sampled rows draw from their own torch.Generator
when a seed is given, so a seeded request gives the same tokens whatever else shares
its batch."""
from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] (already temperature-scaled). Masks to -inf what top-k/top-p exclude."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the first
        # token is always kept.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None],
           greedy_ids: torch.Tensor | None = None) -> tuple[list[int], list[float] | None]:
    """logits: [N, V] fp32, one row per sampling sequence. Returns (token ids, logprobs of
    the chosen tokens under the model's unmodified distribution, or None if nobody asked).
    greedy_ids: logits.argmax(-1) when the caller already has it (the decode CUDA graph
    computes it in the graph), saving a launch and a pass over the logits."""
    tokens, logprobs = sample_on_device(logits, params, generators, greedy_ids)
    return tokens.tolist(), None if logprobs is None else logprobs.tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None],
                     greedy_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample() without reading anything back: token ids [N] int64 and the logprobs [N]
    (or None) stay on the logits' device, so the host can go on to the next step while
    they are computed (overlapped scheduling)."""
    tokens = logits.argmax(dim=-1) if greedy_ids is None else greedy_ids
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        tokens = tokens.clone()
        for i in sampled_rows:
            p = params[i]
            row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
            probs = row.softmax(-1)
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    logprobs = None
    if any(p.logprobs for p in params):
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
