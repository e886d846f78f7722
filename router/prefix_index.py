"""Which decode worker holds which cached prefix blocks, fed by the workers' KV events."""
from __future__ import annotations

from collections import defaultdict


class PrefixIndex:
    def __init__(self):
        self._blocks: dict[str, set[bytes]] = defaultdict(set)

    def apply(self, worker: str, events) -> None:
        held = self._blocks[worker]
        for kind, block_hash, _parent in events:
            if kind == "stored":
                held.add(block_hash)
            elif kind == "evicted":
                held.discard(block_hash)
            elif kind == "cleared":
                held.clear()

    def forget(self, worker: str) -> None:
        self._blocks.pop(worker, None)

    def overlap(self, worker: str, hashes: list[bytes]) -> int:
        """Leading blocks of the prompt (by chained hash) the worker has cached."""
        held = self._blocks.get(worker)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n
