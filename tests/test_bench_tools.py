"""The benchmarks' own arithmetic that their GPU runs rely on, checked on the CPU."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from gpu_common import timeline  # noqa: E402


def test_timeline_splits_a_call_into_busy_idle_and_named_gaps():
    # b overlaps a (another stream), c starts 5 after b ends, d 2 after c, e inside d.
    span, idle, gaps = timeline([(20, 30, "c"), (0, 10, "a"), (4, 15, "b"), (32, 50, "d"), (35, 40, "e")])
    assert span == 50
    assert idle == 5 + 2
    assert gaps == [dict(us=5, at_us=15, after="b", before="c"), dict(us=2, at_us=30, after="c", before="d")]
    assert timeline([(3, 9, "x")]) == (6, 0.0, [])
