"""Keeping `pdserve profile` to minutes on slow machines: predict what a grid point will cost
from the points measured so far (the cost model's own fit), and skip the points whose steps,
or whose set-up (prefilling a cached prefix, or the prompts of a decode batch), would run past
the limits. On a GPU nothing is near them; on a CPU a 135M model's 2048-token step takes
seconds, and its longest points are left to the fit's linear terms instead.
"""
from __future__ import annotations

from planner.costmodel import _features, _fit_arrays, predict_entry
from planner.profile_format import step_entry

MIN_POINTS = 3   # fewer measured steps predict nothing: measure


class CostGuard:
    def __init__(self, max_step_s: float, max_setup_s: float, budget: int, dense_prefill: bool = False):
        self.max_step_s, self.max_setup_s, self.budget = float(max_step_s), float(max_setup_s), int(budget)
        # The engine's (costmodel.dense_prefill_of): which points' attention is priced as dense.
        self.dense_prefill = bool(dense_prefill)
        self.steps: list[dict] = []
        self.coef: dict | None = None
        self.skipped: list[str] = []

    def add(self, entry: dict) -> None:
        self.steps.append(entry)
        if len(self.steps) >= MIN_POINTS:
            self.coef = _fit_arrays(_features(self.steps, self.dense_prefill))

    def step_s(self, chunks, contexts) -> float | None:
        """Predicted seconds of one step, or None while too little is measured."""
        if self.coef is None:
            return None
        return predict_entry(self.coef, step_entry(chunks, contexts, 1.0), self.dense_prefill)

    def prefill_s(self, tokens: int) -> float | None:
        """Predicted seconds to prefill one prompt alone, in budget-sized chunks."""
        if self.coef is None:
            return None
        t, done = 0.0, 0
        while done < tokens:
            n = min(self.budget, tokens - done)
            t += self.step_s([(n, done)], [])
            done += n
        return t

    def allows_step(self, chunks, contexts, what: str) -> bool:
        t = self.step_s(chunks, contexts)
        if t is not None and t > self.max_step_s:
            self.skipped.append(f"{what}: a step predicted at {t:.2f} s > {self.max_step_s:g} s")
            return False
        return True

    def allows_setup(self, prompts: int, tokens: int, what: str) -> bool:
        """Prefilling `prompts` prompts of `tokens` each (predicted one after another)."""
        one = self.prefill_s(tokens)
        if one is not None and prompts * one > self.max_setup_s:
            self.skipped.append(f"{what}: set-up predicted at {prompts * one:.1f} s > {self.max_setup_s:g} s")
            return False
        return True

    def largest_batch(self, batches: list[int], context: int, what: str) -> list[int]:
        """The batches (largest first) whose prompts prefill within the set-up limit."""
        one = self.prefill_s(context)
        kept = [b for b in batches if one is None or b * one <= self.max_setup_s]
        if len(kept) < len(batches):
            dropped = sorted(set(batches) - set(kept))
            self.skipped.append(f"{what}: batches {dropped} (prefilling them predicted past {self.max_setup_s:g} s)")
        return kept
