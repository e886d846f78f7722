"""Which attention a step's prefill chunks take: one rule for the engine and its simulator.

The model runner asks it for every step (engine/model_runner.py); the planner's cost model
imports it to price a simulated step the way the engine would run it
(planner/profile_format.prefill_sums).
"""
from __future__ import annotations

from typing import Iterable


def dense_prefill_step(computed_before: Iterable[int], dense_prefill: bool, several_prompts: bool) -> bool:
    """Does a step whose prefill chunks (of more than one token each; a one-token chunk runs
    as a decode row) had ``computed_before`` tokens of their sequences already in the cache
    attend densely over its own K/V? Only with dense prefill on, only when every chunk starts
    its sequence (one chunk after a prefix sends the whole step through the paged kernel),
    and with several chunks only where the dense kernel serves several prompts in one
    launch (``several_prompts``: not the triton backend's, which runs one per launch)."""
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
    step of several prompts is slower than the paged kernel's single launch
    (benchmarks/RESULTS.md, issue 14); on a CPU (the torch and cpu backends) the paged
    reference is the slower one whatever the batch."""
    return kernel_backend != "triton"
