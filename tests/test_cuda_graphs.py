"""The decode-graph input path (engine/cuda_graphs.py) on CPU.

Nothing can be captured without a GPU, but DecodeGraphs(use_graphs=False) runs the very
forward a graph would replay: static buffers, batches padded up to a bucket (slot -1,
context 0), block tables as wide as the longest admitted sequence. Greedy tokens through
that path must equal the plain eager path's. The capture itself is checked on the GPU
(tests/test_gpu.py).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from helpers import assert_no_leaks  # noqa: E402
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.cuda_graphs import DecodeGraphs  # noqa: E402
from engine.kernels import triton_ops as tri  # noqa: E402

if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tri._rms_norm_kernel, InterpretedFunction):
        pytest.skip("triton_ops was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

PROMPTS = [[(5 * i + 3 * j) % 400 + 10 for j in range(n)] for i, n in enumerate([3, 9, 17, 6, 12])]
# Different lengths: the batch shrinks 5 -> 4 -> 2 -> 1, crossing buckets 8, 4, 2, 1.
MAX_TOKENS = [6, 3, 8, 5, 4]


def _run(engine: LLMEngine) -> list[list[int]]:
    for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(PROMPTS))]


def _engine() -> LLMEngine:
    return LLMEngine("random:tiny", device="cpu", dtype="float32", kernel_backend="triton",
                     max_model_len=128, enable_prefix_caching=False, max_num_batched_tokens=64)


def test_padded_static_decode_path_matches_eager():
    eager = _engine()
    assert eager.runner.decode_graphs is None  # graphs are GPU-only
    expected = _run(eager)

    padded = _engine()
    runner = padded.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, (1, 2, 4, 8), -(-128 // runner.block_size),
                          runner.device, use_graphs=False)
    runner.decode_graphs = graphs
    got = _run(padded)
    assert got == expected
    assert [len(t) for t in got] == MAX_TOKENS
    # Every decode step went through the padded path (prefill steps stay eager).
    assert graphs.num_replays >= max(MAX_TOKENS) - 1
    assert_no_leaks(padded)
    assert_no_leaks(eager)


def test_bucket_choice():
    g = DecodeGraphs.__new__(DecodeGraphs)
    g.batch_sizes, g.max_batch, g.max_blocks = [1, 2, 4, 8, 16], 16, 32
    assert [g.bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert g.bucket_for(17) is None
    assert g.can_run(16, 32) and not g.can_run(17, 1) and not g.can_run(3, 33) and not g.can_run(0, 1)


def test_greedy_ids_from_graph_reach_the_sampler(monkeypatch):
    """The decode graph's in-graph argmax is what the sampler uses for greedy rows, and it
    equals the argmax of the logits it returns; eager (prefill) steps pass none. A sampled
    request in the same batch still gets its own draw."""
    import engine.llm_engine as le
    engine = _engine()
    runner = engine.runner
    runner.decode_graphs = DecodeGraphs(runner.model, runner.kv_caches, (1, 2, 4), -(-128 // runner.block_size),
                                        runner.device, use_graphs=False)
    seen = []
    real_sample = le.sample

    def spy(logits, params, generators, greedy_ids=None):
        seen.append(None if greedy_ids is None else (greedy_ids.clone(), logits.argmax(-1)))
        return real_sample(logits, params, generators, greedy_ids)

    monkeypatch.setattr(le, "sample", spy)
    engine.add_request("g", PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request("s", PROMPTS[1], SamplingParams(max_tokens=5, ignore_eos=True, temperature=1.0, seed=3))
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    graph_steps = [s for s in seen if s is not None]
    assert len(graph_steps) >= 3 and None in seen  # decode steps via the graph, the prefill eager
    for got, expected in graph_steps:
        assert torch.equal(got, expected)
    assert len(outs["g"]) == len(outs["s"]) == 5
    assert_no_leaks(engine)
