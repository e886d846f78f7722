"""Which attention a step's prefill chunks take: one rule for the engine and its simulator.

The model runner asks it for every step (engine/model_runner.py). The planner prices a
simulated step the same way but restates the rule (planner/profile_format.prefill_sums):
importing the engine loads torch, which planning does not need; a test holds the two equal.
"""
from __future__ import annotations

from typing import Iterable


def dense_prefill_step(computed_before: Iterable[int], dense_prefill: bool, several_prompts: bool) -> bool:
    """Does a step whose prefill chunks (of more than one token each; a one-token chunk runs
    as a decode row) had ``computed_before`` tokens of their sequences already in the cache
    attend densely over its own K/V? Only with dense prefill on, only when every chunk starts
    its sequence (one chunk after a prefix sends the whole step through the paged kernel),
    and with several chunks only where the dense path beats the paged kernel for several
    prompts (``several_prompts``, dense_serves_several_prompts)."""
    if not dense_prefill:
        return False
    n = 0
    for before in computed_before:
        if before:
            return False
        n += 1
    return n == 1 or (n > 1 and several_prompts)


def dense_serves_several_prompts(kernel_backend: str) -> bool:
    """The triton backend's dense kernel (cuDNN) takes one sequence per launch, which for a
    step of several short prompts is several times slower than the paged kernel's single
    launch (for two long ones it is still faster: a rule by prompt length would need the
    crossover measured; benchmarks/RESULTS.md, issue 14). On a CPU (the torch and cpu
    backends) the paged reference is the slower one whatever the batch."""
    return kernel_backend != "triton"
