"""Exact KV-block accounting, prefix hashing, LRU eviction and cache events."""
from hypothesis import given, settings, strategies as st

from engine.block_manager import ROOT_HASH, BlockManager, hash_prefix_blocks


def test_allocate_release_accounting():
    bm = BlockManager(8, 4)
    a = bm.allocate(5)
    assert len(a) == 5 and bm.num_free_blocks == 3
    assert bm.allocate(4) is None and bm.num_free_blocks == 3  # all-or-nothing
    bm.release(list(reversed(a)))
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_chained_hashes_depend_on_whole_prefix_and_salt():
    a = hash_prefix_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = hash_prefix_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2  # the partial third block is not hashed
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different parent
    assert hash_prefix_blocks([1, 2, 3, 4], 4, salt=b"tenant-a") != hash_prefix_blocks([1, 2, 3, 4], 4)
    # Incremental hashing from a parent equals hashing from scratch.
    assert hash_prefix_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == [a[1]]


def test_prefix_hit_reuse_and_lru_eviction_with_events():
    bm = BlockManager(4, 2)
    h = hash_prefix_blocks([1, 2, 3, 4], 2)
    blocks = bm.allocate(2)
    bm.register(blocks[0], h[0], None)
    bm.register(blocks[1], h[1], h[0])
    assert [e.kind for e in bm.take_events()] == ["stored", "stored"]
    bm.release(list(reversed(blocks)))
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # A hit takes references to the cached blocks and removes them from the free count.
    hits = bm.match_prefix(h)
    assert hits == blocks
    assert bm.num_reclaimable(hits) == 2
    bm.acquire(hits)
    assert bm.num_free_blocks == 2
    bm.release(list(reversed(hits)))
    # Filling the pool evicts cached blocks, tail first (released first = least recent).
    bm.allocate(3)
    ev = bm.take_events()
    assert [e.kind for e in ev] == ["evicted"] and ev[0].block_hash == h[1]
    assert bm.match_prefix(h) == [blocks[0]]
    bm.check_invariants()


def test_duplicate_registration_keeps_first_block():
    bm = BlockManager(4, 2)
    h = hash_prefix_blocks([5, 6], 2)[0]
    a, b = bm.allocate(2)
    assert bm.register(a, h, None) == a
    assert bm.register(b, h, None) == a  # b stays private
    bm.release([a, b])
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 4
    bm.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "hit"]), st.integers(0, 5)), max_size=60))
def test_random_operations_keep_exact_accounting(ops):
    bm = BlockManager(12, 2)
    owned: list[list[int]] = []
    next_tok = 0
    for op, n in ops:
        if op == "alloc":
            got = bm.allocate(n)
            if got is not None:
                # register the blocks under fresh hashes, like full prompt blocks
                parent = ROOT_HASH
                for b in got:
                    hs = hash_prefix_blocks([next_tok, next_tok + 1], 2, parent=parent)
                    next_tok += 2
                    bm.register(b, hs[0], parent)
                    parent = hs[0]
                owned.append(got)
        elif op == "free" and owned:
            blocks = owned.pop(n % len(owned))
            bm.release(list(reversed(blocks)))
        elif op == "hit" and bm.cached:
            h = list(bm.cached)[n % len(bm.cached)]
            hit = bm.match_prefix([h])
            bm.acquire(hit)
            owned.append(hit)
        bm.check_invariants()
        assert bm.num_free_blocks == 12 - sum(1 for b in range(12) if bm.ref_count[b] > 0)
    for blocks in owned:
        bm.release(list(reversed(blocks)))
    assert bm.num_free_blocks == 12
