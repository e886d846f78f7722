"""A request trace for `pdserve plan --trace`: one JSON line per finished request with its
arrival time, prompt length, cached prompt tokens and output length. No content: no token
ids, no text, no tenant.

    {"arrival_s": 1718000000.123, "prompt_tokens": 812, "cached_tokens": 256, "output_tokens": 64}

arrival_s is wall-clock time at submission (so traces of several runs appended to one file
still sort; the planner replays from the first arrival). Lines are written when a request
finishes, so they are in finishing order; the planner sorts them.

Cheap on the hot path: the file is opened once and written through a buffer (a line is a
format and a memory copy; the buffer reaches the disk every FLUSH_EVERY lines and at close),
and recording stops after max_records lines so a long-running router cannot fill the disk.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

FLUSH_EVERY = 256


class TraceRecorder:
    def __init__(self, path: str, max_records: int = 1_000_000):
        self.path, self.max_records = path, max_records
        self.records = 0
        self._f = open(path, "a", encoding="utf-8", buffering=1 << 16)

    def record(self, arrival_s: float, prompt_tokens: int, cached_tokens: int, output_tokens: int) -> None:
        if self._f is None:
            return
        if self.records >= self.max_records:
            log.warning("router: trace %s reached %d records; recording stops", self.path, self.max_records)
            self.close()
            return
        try:
            self._f.write(f'{{"arrival_s": {arrival_s:.6f}, "prompt_tokens": {int(prompt_tokens)}, '
                          f'"cached_tokens": {int(cached_tokens)}, "output_tokens": {int(output_tokens)}}}\n')
            self.records += 1
            if self.records % FLUSH_EVERY == 0:
                self._f.flush()
        except OSError as e:   # a full disk must not fail requests: stop recording instead
            log.error("router: writing the trace %s failed (%s); recording stops", self.path, e)
            self.close()

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError as e:
                log.error("router: closing the trace %s failed: %s", self.path, e)
