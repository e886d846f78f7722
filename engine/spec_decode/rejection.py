"""Verification of draft tokens against the target's logits at the 1 + k positions of a
verify chunk.

Greedy: keep drafts while they equal the target's argmax, then emit the argmax at the
first mismatch (or the bonus position): exactly the tokens plain greedy decoding gives.

Sampling: standard speculative rejection sampling (Leviathan et al. 2023; Chen et al.
2023). Draft token x_i (drawn from q_i) is kept with probability min(1, p_i(x)/q_i(x));
at the first rejection a token is drawn from norm(max(0, p_i - q_i)); if all k are kept a
bonus token is drawn from p_k. Each emitted token is then distributed exactly as p. A
deterministic proposer (n-gram) is the case q_i = one-hot(x_i)."""
from __future__ import annotations

import torch

from engine.sampler import filter_rows
from engine.sampling_params import SamplingParams


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, V] logits -> the distribution the sampler draws from (temperature, top-k,
    top-p applied to each row), in fp32."""
    n = logits.shape[0]
    return filter_rows(logits.float() / params.temperature, [params.top_k] * n, [params.top_p] * n).softmax(-1)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: list[int]) -> list[int]:
    """target_logits [k+1, V]. Returns the accepted drafts followed by one target token."""
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == best[n]:
        n += 1
    return draft_tokens[:n] + [best[n]]


def rejection_sample(target_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     draft_probs: torch.Tensor | None, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched over B sequences that all proposed k tokens.
    target_probs [B, k+1, V]; draft_tokens [B, k] int64; draft_probs [B, k, V] or None
    (a point mass on each draft token). Returns (tokens [B, k+1], num_accepted [B]):
    row b's output is tokens[b, :num_accepted[b] + 1]."""
    B, k1, V = target_probs.shape
    k = k1 - 1
    dev = target_probs.device
    if draft_tokens.shape != (B, k):
        raise ValueError(f"draft_tokens: shape {tuple(draft_tokens.shape)} != {(B, k)}")
    rows = torch.arange(B, device=dev)
    if draft_probs is None:
        draft_probs = torch.zeros(B, k, V, device=dev, dtype=target_probs.dtype)
        draft_probs.scatter_(-1, draft_tokens[..., None], 1.0)
    p_x = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)
    q_x = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
    u = torch.rand(B, k, device=dev, generator=generator, dtype=target_probs.dtype)
    # u < p/q, written without the division (q_x > 0: x was drawn from q).
    accept = u * q_x < p_x
    num_accepted = accept.to(torch.int64).cumprod(-1).sum(-1)
    # The distribution of the token after the accepted run: the residual where a draft
    # was rejected, the target itself at the bonus position.
    at = num_accepted.clamp(max=max(k - 1, 0))
    if k:
        residual = (target_probs[rows, at] - draft_probs[rows, at]).clamp_(min=0)
        mass = residual.sum(-1, keepdim=True)
        # p == q (up to rounding) makes a rejection (nearly) impossible; if one happens
        # anyway, p itself is the right fallback.
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target_probs[rows, at])
        final_dist = torch.where((num_accepted < k)[:, None], residual, target_probs[:, k])
    else:
        final_dist = target_probs[:, 0]
    final = torch.multinomial(final_dist, 1, generator=generator).squeeze(-1)
    tokens = torch.cat([draft_tokens, torch.zeros(B, 1, dtype=draft_tokens.dtype, device=dev)], dim=1)
    tokens[rows, num_accepted] = final
    return tokens, num_accepted
