"""What one forward gives back (ModelRunner.execute -> LLMEngine, and the speculative
draft model): plain data, laid out once by the runner, so no caller re-derives which
logits row belongs to which sequence."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.scheduler import ScheduledSeq


@dataclass
class RunnerOutput:
    # The scheduled entries that sample (ScheduledSeq.samples), in scheduled order.
    sampling: list[ScheduledSeq] = field(default_factory=list)
    # [rows, V]: sampling[i]'s rows start at first_rows[i]; a verify chunk (num_spec > 0)
    # owns 1 + num_spec consecutive rows, every other entry one. None if nothing samples.
    logits: torch.Tensor | None = None
    first_rows: list[int] = field(default_factory=list)
    # logits.argmax(-1) when the decode CUDA graph computed it (the sampler then need not).
    greedy_ids: torch.Tensor | None = None

    @classmethod
    def for_step(cls, scheduled: list[ScheduledSeq], logits: torch.Tensor | None,
                 greedy_ids: torch.Tensor | None = None) -> RunnerOutput:
        sampling = [s for s in scheduled if s.samples]
        first, row = [], 0
        for s in sampling:
            first.append(row)
            row += 1 + s.num_spec
        return cls(sampling, logits if sampling else None, first, greedy_ids if sampling else None)

    def rows(self, i: int) -> slice:
        """sampling[i]'s rows of logits."""
        return slice(self.first_rows[i], self.first_rows[i] + 1 + self.sampling[i].num_spec)

    @property
    def last_rows(self) -> list[int]:
        """Each sampling entry's last row: the next token's logits after all of its tokens."""
        return [r + s.num_spec for r, s in zip(self.first_rows, self.sampling)]
