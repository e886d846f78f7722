"""Overlapped scheduling: the record of a launched step whose results are still on the device.

With `async_scheduling` on, LLMEngine.step() schedules and launches step n+1 before it
reads back step n's sampled tokens, so the host's scheduling and input building run while
the device computes (instead of the device idling while the host works). The pieces:

- At launch, every sampling sequence gets PLACEHOLDER appended to its token_ids and its
  num_computed_tokens advanced, so the scheduler sees exactly the state a synchronous
  engine would have (one token left to compute), only without the token's value.
- Step n+1 feeds that placeholder from step n's token tensor on the device: the runner
  marks the row's source (LaunchedStep.rows) and the value is gathered there (inside the
  decode CUDA graph, or by the eager path), never through the host.
- The tokens (and logprobs) are copied to pinned host memory right after step n's
  sampling, behind an event; step n+1 is launched before the host waits on it.
- When step n is processed the placeholder is replaced by the token and the usual stop
  checks run. A sequence they finish may already be in step n+1: the token computed for
  it there is discarded, never returned, and its blocks stay allocated until step n+1 is
  processed too (Scheduler.deferred); abort() instead waits for the device, so its blocks
  are free when it returns.
- A token certain to end its sequence (max_tokens, the context, prefill-only) marks the
  sequence `finishing`: it is not scheduled again, so no step ever runs past those limits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.scheduler import ScheduledSeq

# Stands in for a token that is still being sampled on the device. Never a valid id, so
# an input built from it by mistake fails loudly (embedding index) instead of silently.
PLACEHOLDER = -1


@dataclass
class LaunchedStep:
    scheduled: list[ScheduledSeq]
    sampling: list[ScheduledSeq]     # the entries that sample, in row order of `tokens`
    positions: list[int]             # where each sampling entry's placeholder sits in token_ids
    rows: dict[int, int]             # id(sequence) -> its row of `tokens` (for the next step's inputs)
    tokens: torch.Tensor | None      # [N] int64 on the device
    host_tokens: torch.Tensor | None  # the same, being copied to (pinned) host memory
    host_logprobs: torch.Tensor | None
    done: torch.cuda.Event | None    # recorded after the copies, i.e. after the whole step

    @classmethod
    def start(cls, scheduled, sampling, positions, rows, tokens, logprobs, device) -> "LaunchedStep":
        """Queue the copies back to the host behind the step and record its event."""
        done = None
        host_tokens = host_lp = None
        if device.type == "cuda":
            # non_blocking device->host copies land in pinned memory (torch allocates it),
            # so they are truly asynchronous; the event marks them (and the step) done.
            if tokens is not None:
                host_tokens = tokens.to("cpu", non_blocking=True)
            if logprobs is not None:
                host_lp = logprobs.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host_tokens, host_lp = tokens, logprobs
        return cls(scheduled, sampling, positions, rows, tokens, host_tokens, host_lp, done)

    def wait(self) -> None:
        """Block until the device has finished the step (and its copies)."""
        if self.done is not None:
            self.done.synchronize()

    def results(self) -> tuple[list[int], list[float] | None]:
        self.wait()
        tokens = [] if self.host_tokens is None else self.host_tokens.tolist()
        return tokens, None if self.host_logprobs is None else self.host_logprobs.tolist()

    def live(self) -> bool:
        """Some sequence of the step is still unfinished (its outputs are still wanted)."""
        return any(not s.seq.is_finished for s in self.scheduled)


def placeholder_source(seq, pos: int, prev: LaunchedStep | None) -> int:
    """The row of prev.tokens holding seq's token at `pos` while it is still a placeholder,
    else -1. Only a sequence's last token can be one (it is never computed before it is
    sampled), so callers ask about a chunk's last token only."""
    if seq.token_ids[pos] != PLACEHOLDER:
        return -1
    if prev is None or id(seq) not in prev.rows:
        raise RuntimeError(f"{seq.seq_id}: input token {pos} is unresolved and not from the launched step")
    return prev.rows[id(seq)]
