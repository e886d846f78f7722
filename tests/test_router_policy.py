"""Conditional disaggregation decisions and the prefix index, without any sockets."""
import pytest

from planes.prefix_hash import hash_prefix_blocks
from router.policy import PolicyConfig, WorkerLoad, decide
from router.prefix_index import PrefixIndex

CFG = PolicyConfig(disagg_threshold=64, max_prefill_queue_tokens=1000, load_penalty_tokens=16)


def test_short_long_cached_and_saturated():
    d = [WorkerLoad("d0")]
    p = [WorkerLoad("p0")]
    assert decide(50, 16, d, p, CFG).reason == "short_prompt"
    long = decide(300, 16, d, p, CFG)
    assert (long.kind, long.reason, long.prefill_worker, long.uncached_tokens) == ("disaggregated",
                                                                                 "long_uncached_prompt", "p0", 300)
    cached = decide(300, 16, [WorkerLoad("d0", overlap_blocks=16)], p, CFG)
    assert (cached.kind, cached.reason, cached.cached_tokens) == ("direct", "cached_prefix", 256)
    assert decide(300, 16, d, [], CFG).reason == "no_prefill_workers"
    assert decide(300, 16, d, [WorkerLoad("p0", queued_tokens=900)], CFG).reason == "prefill_saturated"
    with pytest.raises(LookupError):
        decide(10, 16, [], p, CFG)


def test_worker_choice_trades_overlap_against_load():
    busy_holder = WorkerLoad("d0", inflight=3, overlap_blocks=4)   # 64 cached - 48 penalty = 16
    idle = WorkerLoad("d1", inflight=0)
    assert decide(100, 16, [busy_holder, idle], [], CFG).decode_worker == "d0"
    very_busy = WorkerLoad("d0", inflight=10, overlap_blocks=4)    # 64 - 160 < 0
    assert decide(100, 16, [very_busy, idle], [], CFG).decode_worker == "d1"
    p = [WorkerLoad("p0", queued_tokens=500), WorkerLoad("p1", queued_tokens=100)]
    assert decide(300, 16, [idle], p, CFG).prefill_worker == "p1"


def test_prefix_index_follows_events():
    idx = PrefixIndex()
    hashes = hash_prefix_blocks(list(range(64)), 16)
    idx.apply("d0", [("stored", h, None) for h in hashes[:3]])
    assert idx.overlap("d0", hashes) == 3 and idx.overlap("d1", hashes) == 0
    idx.apply("d0", [("evicted", hashes[1], None)])
    assert idx.overlap("d0", hashes) == 1  # a gap ends the usable prefix
    idx.apply("d0", [("cleared", None, None)])
    assert idx.overlap("d0", hashes) == 0
