"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Greedy rows are one batched argmax. The sampled rows of a step are filtered and drawn as
one batch too: a loop over rows costs several launches per row on a GPU (host time that a
large batch of sampled requests would put back on the step's critical path), and on a
CPU a full sort per top-p row and a random number per vocabulary entry per draw. A
request with a seed draws from its own torch.Generator, so it gives the same tokens
whatever else shares its batch.

The filters, per row (filter_rows):
- top-k keeps the logits >= the k-th largest (ties with it included);
- top-p then keeps a token when the probability mass of the tokens with a strictly larger
  logit (under the top-k-filtered distribution) is below top_p: the smallest set of most
  likely tokens whose mass reaches top_p, with any ties of its least likely member.
Both come down to a floor under which a row's logits are masked to -inf.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.host_to_device import to_device
from engine.sampling_params import SamplingParams

# Widths of the sorted prefix that the nucleus search tries on a CPU before sorting whole
# rows (a full sort of a 50k-130k vocabulary costs milliseconds a row there; the nucleus
# of a real model's distribution is usually far narrower). On other devices whole rows
# are sorted at once: checking whether a prefix sufficed would read back to the host and
# stall an overlapped step.
CPU_PREFIX_WIDTHS = (256, 2048)


def filter_rows(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """logits [R, V] (temperature-scaled) with row r's top_k[r] (-1: off) and top_p[r]
    (1.0: off) applied (the rules in the module's docstring), in a fixed number of
    launches whatever R is."""
    R, V = logits.shape
    ks = [k if 0 < k < V else 0 for k in top_k]   # 0: no top-k for that row
    p_rows = [r for r, p in enumerate(top_p) if p < 1.0]
    if not any(ks) and not p_rows:
        return logits
    dev = logits.device
    floor = torch.full((R, 1), float("-inf"), device=dev, dtype=logits.dtype)
    if any(ks):
        # topk's values come sorted: row r's k-th largest is at column ks[r] - 1.
        top = torch.topk(logits, max(ks), dim=-1).values
        kth = top.gather(-1, to_device([max(k, 1) - 1 for k in ks], dev)[:, None])
        floor = torch.where(to_device(ks, dev)[:, None] > 0, kth, floor)
    if p_rows:
        every = len(p_rows) == R
        sel = None if every else to_device(p_rows, dev)
        x, kfloor = (logits, floor) if every else (logits[sel], floor[sel])
        if any(ks[r] for r in p_rows):
            x = x.masked_fill(x < kfloor, float("-inf"))
        ps = to_device([top_p[r] for r in p_rows], dev, torch.float32)[:, None]
        tau = _nucleus_floor(x, ps)
        if every:
            floor = torch.maximum(floor, tau)
        else:
            floor[sel] = torch.maximum(kfloor, tau)
    return logits.masked_fill(logits < floor, float("-inf"))


def _nucleus_floor(x: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """[S, V] logits (top-k already masked) and their top_p [S, 1] -> each row's least
    kept logit [S, 1] under the top-p rule."""
    S, V = x.shape
    # Masses relative to each row's maximum: exp(top - logsumexp(x)) loses the small ones
    # where logits are large (a low temperature), since logsumexp's rounding grows with
    # them; top - peak is exact for the logits near the peak, which carry the mass.
    peak = x.amax(-1, keepdim=True)
    lse = torch.logsumexp(x - peak, dim=-1, keepdim=True)
    widths = [w for w in CPU_PREFIX_WIDTHS if w < V] if x.device.type == "cpu" else []
    widths.append(V)
    # Off the CPU the one width is V, so the first pass answers every row (nothing read back).
    todo = tau = None   # the rows still open past a prefix, and every row's answer so far
    for w in widths:
        xs, peak_s, lse_s, ps_s = (x, peak, lse, ps) if todo is None else (x[todo], peak[todo], lse[todo], ps[todo])
        top = torch.topk(xs, w, dim=-1).values if w < V else torch.sort(xs, dim=-1, descending=True).values
        cum = ((top - peak_s) - lse_s).exp().cumsum(-1)
        before = F.pad(cum[:, :-1], (1, 0))       # mass strictly ahead of each position
        n_keep = (before < ps_s).sum(-1, keepdim=True).clamp(min=1)
        # (Past the last finite logit, where rounding leaves the mass of every token a hair
        # under a top_p near 1, t is -inf: every finite logit kept, as it should be.)
        t = top.gather(-1, n_keep - 1)
        # Settled: the prefix holds the first position whose mass ahead reaches top_p, or
        # every finite logit (a whole row always does).
        settled = None if w == V else ((n_keep < w) | torch.isinf(top[:, -1:])).squeeze(-1)
        done = settled is None or bool(settled.all())
        if tau is None:
            if done:
                return t
            tau, todo = t, torch.arange(S, device=x.device)
        else:
            tau[todo] = t
            if done:
                return tau
        todo = todo[~settled]
    raise AssertionError("the last width is the whole row, which settles every row")


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
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    tokens = greedy_ids
    if tokens is None and len(sampled) < len(params):   # (a pass over the logits, for greedy rows only)
        tokens = logits.argmax(dim=-1)
    if sampled:
        tokens = _draw(logits, tokens, sampled, params, generators)
    logprobs = None
    if any(p.logprobs for p in params):
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def _draw(logits: torch.Tensor, greedy: torch.Tensor | None, sampled: list[int], params: list[SamplingParams],
          generators: list[torch.Generator | None]) -> torch.Tensor:
    """greedy's ids with the rows `sampled` replaced by draws from their filtered
    distributions (greedy may be None when every row samples)."""
    dev = logits.device
    every = len(sampled) == logits.shape[0]
    rows = None if every else to_device(sampled, dev)
    x = logits if every else logits[rows]
    temps = to_device([params[i].temperature for i in sampled], dev, torch.float32)[:, None]
    probs = filter_rows(x / temps, [params[i].top_k for i in sampled],
                        [params[i].top_p for i in sampled]).softmax(-1)
    gens = [generators[i] for i in sampled]
    drawn = _draw_inverse_cdf(probs, gens) if dev.type == "cpu" else _draw_race(probs, gens)
    if every:
        return drawn
    out = greedy.clone()
    out[rows] = drawn
    return out


def _draw_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Per row, argmax of probs / E with E exponential noise: token i wins with probability
    probs[i] (the minimum of exponentials of rates probs[i] is token i's with that
    probability). What torch.multinomial does for one sample, less its check of the
    probabilities, which reads a flag back to the host and so would stall an overlapped step
    until the device caught up."""
    noise = torch.empty_like(probs)
    seeded = [j for j, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    # A seeded row's noise comes from its own generator (a launch per seeded row): its
    # tokens then depend on its seed and its logits only, never on its neighbours.
    for j in seeded:
        noise[j].exponential_(generator=generators[j])
    # (A zero draw would turn a masked token's 0 / 0 into NaN, which argmax would pick.)
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)


def _draw_inverse_cdf(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    # The CPU's draw: noise for every vocabulary entry (the race, or torch.multinomial)
    # costs a random number each there; inverting the cumulative distribution needs one per
    # row. A seeded row's number comes from its own generator, as in the race.
    u = torch.rand(probs.shape[0], 1, dtype=probs.dtype)
    for j, g in enumerate(generators):
        if g is not None:
            u[j] = torch.rand((), generator=g, dtype=probs.dtype)
    return inverse_cdf(probs, u)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (rows summing to about 1), u [R, 1] uniform in [0, 1) -> [R] int64:
    per row the token whose cumulative-probability interval holds u (scaled to the row's
    sum). A token of probability 0 is never chosen: the search returns the first position
    whose running sum is strictly above the target, and adding 0 leaves a running sum as
    it was."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[1] - 1)
