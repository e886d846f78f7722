"""The host-side inputs of one forward, one row per token position, built in one place for
the eager path and the decode CUDA graph path of ModelRunner.execute.

A scheduled entry contributes num_new_tokens rows: its tokens from num_computed_tokens on,
then (a speculative verify chunk, num_spec > 0) its draft tokens. A verify chunk's rows
are decode rows over the same block table, row i seeing the context up to its own token:
all of the chunk's K/V is written before attention, so this is causal attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.overlap import LaunchedStep, placeholder_source
from engine.scheduler import ScheduledSeq


@dataclass
class StepInputs:
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)      # KV cache slot each row's K/V is written to
    block_tables: list[list[int]] = field(default_factory=list)   # each row's sequence's table
    # Overlapped scheduling: the row of the launched step's token tensor that holds this
    # row's input while it is still a placeholder (its token_ids entry is then 0), else -1.
    sources: list[int] = field(default_factory=list)
    first_row: dict[int, int] = field(default_factory=dict)       # id(entry) -> its first row
    has_placeholders: bool = False   # some source is >= 0

    def sample_rows(self, entries: list[ScheduledSeq]) -> list[int]:
        """The rows whose logits are sampled, for `entries` in their order: the last row of
        an entry that samples, all 1 + num_spec rows of a verify chunk."""
        rows = []
        for s in entries:
            if s.samples:
                end = self.first_row[id(s)] + s.num_new_tokens
                rows.extend(range(end - 1 - s.num_spec, end))
        return rows


def build_inputs(entries: list[ScheduledSeq], block_size: int, prev: LaunchedStep | None) -> StepInputs:
    """Rows for `entries` in this order. `prev` is the launched step whose sampled tokens
    some inputs still are (placeholders, see engine/overlap.py)."""
    inp = StepInputs()
    for s in entries:
        seq, start = s.seq, s.seq.num_computed_tokens
        num_known = s.num_new_tokens - s.num_spec   # rows whose token is in token_ids
        tokens = seq.token_ids[start:start + num_known] + seq.spec_token_ids[:s.num_spec]
        # Only a sequence's last token can be a placeholder (it is never computed before it
        # is sampled), so only an entry reaching it asks.
        last = start + num_known - 1
        src = placeholder_source(seq, last, prev) if last == seq.num_tokens - 1 else -1
        n = len(tokens)
        inp.first_row[id(s)] = len(inp.token_ids)
        table = seq.block_table
        # A long prefill chunk is thousands of rows: the rows are built a block at a time
        # (list ops in C), not a token at a time, since the GPU waits for them.
        inp.token_ids.extend(tokens)
        inp.sources.extend([-1] * n)
        if src >= 0 and num_known > 0:
            row = len(inp.token_ids) - n + num_known - 1
            inp.token_ids[row], inp.sources[row] = 0, src
            inp.has_placeholders = True
        end = start + n
        inp.positions.extend(range(start, end))
        p = start
        while p < end:
            base = table[p // block_size] * block_size
            stop = min(end, (p // block_size + 1) * block_size)
            inp.slots.extend(range(base + p % block_size, base + p % block_size + stop - p))
            p = stop
        inp.block_tables.extend([table] * n)
    return inp
