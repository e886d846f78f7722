"""How many tokens to speculate for each sequence this step (0 = plain decode).

Model: a token proposed at depth i is accepted with probability a**i given the ones before
it were (a = the sequence's measured per-token acceptance, an EWMA), so k drafts yield
E[tokens] = (1 - a**(k+1)) / (1 - a) per verify step. Their cost, relative to a plain
decode step of the same batch: each extra verified token adds `verify_token_cost` per
sequence in the batch (decode is bandwidth-bound, so a few extra tokens are nearly free
at batch 1 but not at batch 32), plus `draft_token_cost` per draft token for a draft
model, plus a fixed `verify_overhead` (the host work of proposing and verifying); the
engine sets these per device (decoder.py). The k with the best tokens-per-cost wins; if
none beats plain decoding (ratio 1), the sequence decodes plainly, with an occasional
1-token probe so its estimate can recover when the text turns repetitive."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecTuning:
    ewma_weight: float = 0.3          # weight of the newest verify step's acceptance rate
    prior_acceptance: float = 0.7     # before a sequence has been measured
    verify_token_cost: float = 0.01   # one extra verified token, per sequence in the batch
    verify_overhead: float = 0.1      # a verify step's fixed extra (proposing, verifying on the host)
    draft_token_cost: float = 0.0     # one draft-model token (set from the size ratio)
    # Rows per verify step (batch x (1 + k)) past which a row stops being cheap (the CPU
    # linear loop's limit, beyond which torch's GEMM runs): k is capped to stay within it.
    max_verify_rows: int | None = None
    probe_every: int = 8              # steps between probes while speculation is off ...
    max_probe_every: int = 128        # ... doubled after each failed probe, up to this


def expected_tokens(a: float, k: int) -> float:
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class SpecController:
    def __init__(self, max_k: int, max_batch: int, adaptive: bool = True, tuning: SpecTuning | None = None):
        self.max_k, self.max_batch, self.adaptive = max_k, max_batch, adaptive
        self.t = tuning or SpecTuning()
        self.acceptance: dict[str, float] = {}
        self._idle_steps: dict[str, int] = {}
        # A probe is not free (a draft model must first catch up on the tokens it skipped;
        # on an H100 a hopeless random draft probed every 8 steps cost up to 2x), so the
        # gap between probes doubles while they keep failing.
        self._probe_gap: dict[str, int] = {}
        self._probing: set[str] = set()

    def choose_k(self, a: float, batch_size: int) -> int:
        """The k in [0, max_k] with the most expected tokens per unit of step cost."""
        best_k, best = 0, 1.0
        max_k = self.max_k
        if self.t.max_verify_rows is not None:
            max_k = min(max_k, self.t.max_verify_rows // max(batch_size, 1) - 1)
        for k in range(1, max_k + 1):
            cost = 1.0 + self.t.verify_overhead + k * (self.t.verify_token_cost * batch_size
                                                       + self.t.draft_token_cost)
            gain = expected_tokens(a, k) / cost
            if gain > best * 1.02:   # a margin against noise-driven flapping
                best_k, best = k, gain
        return best_k

    def num_tokens(self, seq_id: str, batch_size: int) -> int:
        if batch_size > self.max_batch:
            return 0
        if not self.adaptive:
            return self.max_k
        a = self.acceptance.get(seq_id, self.t.prior_acceptance)
        k = self.choose_k(a, batch_size)
        if k == 0:
            idle = self._idle_steps.get(seq_id, 0) + 1
            self._idle_steps[seq_id] = idle
            if idle >= self._probe_gap.get(seq_id, self.t.probe_every):
                self._idle_steps[seq_id] = 0
                self._probing.add(seq_id)
                return 1
        return k

    def observe(self, seq_id: str, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        rate = accepted / proposed
        if seq_id in self._probing:
            self._probing.discard(seq_id)
            gap = self._probe_gap.get(seq_id, self.t.probe_every)
            self._probe_gap[seq_id] = self.t.probe_every if accepted else min(2 * gap, self.t.max_probe_every)
        prev = self.acceptance.get(seq_id, self.t.prior_acceptance)
        self.acceptance[seq_id] = (1 - self.t.ewma_weight) * prev + self.t.ewma_weight * rate

    def forget(self, seq_id: str) -> None:
        self.acceptance.pop(seq_id, None)
        self._idle_steps.pop(seq_id, None)
        self._probe_gap.pop(seq_id, None)
        self._probing.discard(seq_id)
