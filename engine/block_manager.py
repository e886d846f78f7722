"""Paged KV-cache bookkeeping: fixed-size blocks, ref counts, a prefix cache keyed by
chained hashes of full blocks, and LRU eviction of cached blocks nobody references.

Pure Python over block ids: the tensors live in the model runner. Every block is in
exactly one of three states, which keeps the accounting exact:
  free       ref 0, no hash              (in `_free`)
  evictable  ref 0, hashed, reusable     (in `_evictable`, LRU order: oldest first)
  in use     ref > 0                     (hashed or not)
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

# The chained block hash is defined in planes/prefix_hash.py, where the router uses it too
# (its prefix index must key blocks exactly as this cache does); re-exported here.
from planes.prefix_hash import ROOT_HASH, hash_block, hash_prefix_blocks  # noqa: F401


@dataclass
class KVEvent:
    kind: str          # "stored" | "evicted" | "cleared"
    block_hash: bytes | None
    parent_hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.events: list[KVEvent] = []

    # ---- queries ---------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """Block ids of the longest run of leading hashes present in the cache."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def num_reclaimable(self, blocks: list[int]) -> int:
        """How many of `blocks` are counted as free now (evictable), i.e. taking a
        reference to them would shrink the free count."""
        return sum(1 for b in blocks if self.ref_count[b] == 0)

    # ---- mutation ----------------------------------------------------------------------
    def _emit(self, ev: KVEvent):
        self.events.append(ev)

    def take_events(self) -> list[KVEvent]:
        ev, self.events = self.events, []
        return ev

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference to (cached) blocks, e.g. on a prefix hit."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self._evictable[b]
            self.ref_count[b] += 1

    def _pop_free(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            h = self.block_hash[b]
            del self.cached[h]
            self.block_hash[b] = None
            self._emit(KVEvent("evicted", h))
        self.ref_count[b] = 1
        return b

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (ref 1), evicting LRU cached blocks if needed; None if short."""
        if n > self.num_free_blocks:
            return None
        return [self._pop_free() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block. Pass blocks in reverse sequence order so a
        sequence's tail is evicted before its head (the head is the likelier shared prefix)."""
        for b in blocks:
            rc = self.ref_count[b] - 1
            if rc < 0:
                raise RuntimeError(f"block {b} released more often than acquired")
            self.ref_count[b] = rc
            if rc == 0:
                if self.block_hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, block_hash: bytes, parent: bytes | None) -> int:
        """Mark a just-filled block as holding the prefix `block_hash`. If another block
        already holds it, the caller's block stays private (and is freed normally);
        returns the block that is now the cached one."""
        if not self.enable_prefix_caching:
            return block
        existing = self.cached.get(block_hash)
        if existing is not None:
            return existing
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        self._emit(KVEvent("stored", block_hash, parent))
        return block

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (in-use blocks keep their hash)."""
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            del self.cached[self.block_hash[b]]
            self.block_hash[b] = None
            self._free.append(b)
        self._emit(KVEvent("cleared", None))

    def check_invariants(self) -> None:
        """Exact accounting: the three states partition the blocks. Used by tests."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not (free & evictable)
        for b in range(self.num_blocks):
            rc, h = self.ref_count[b], self.block_hash[b]
            if rc == 0:
                assert (b in free) != (b in evictable), f"block {b} lost"
                assert (h is None) == (b in free), f"block {b} hash/state mismatch"
            else:
                assert b not in free and b not in evictable, f"in-use block {b} on a free list"
            if h is not None:
                assert self.cached.get(h) == b
        assert len(self.cached) == sum(h is not None for h in self.block_hash)
