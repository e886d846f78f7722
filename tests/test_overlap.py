"""Overlapped scheduling (engine/overlap.py) forced on, on CPU: every request's outputs
(tokens, text, finish reason, logprobs) equal those of the synchronous engine, through
staggered arrivals, max_tokens and the context limit, stop tokens and strings, aborts
mid-flight, preemption in a tiny KV pool, prefix-cache hits, remote prefills (landed and
failed) and seeded sampling; no token past a stop is ever returned and no block leaks.
The GPU check (fp32 greedy tokens on/off on random:llama3-1b) is marked gpu.

On CPU the device work is done by the time the host goes on, but the engine takes the
same path as on a GPU: placeholders, device-side token feeding, deferred frees."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import assert_no_leaks, run_to_completion  # noqa: E402
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402

MODEL = "random:tiny"


def prompt(i: int, n: int) -> list[int]:
    return [(7 * i + 3 * j) % 400 + 10 for j in range(n)]


def make(overlap: bool, **kw) -> LLMEngine:
    kw.setdefault("max_model_len", 256)
    return LLMEngine(MODEL, device="cpu", dtype="float64", async_scheduling=overlap, **kw)


def drive(engine: LLMEngine, arrivals: dict[int, list], aborts: dict[int, list[str]] | None = None,
          on_call=None) -> dict[str, dict]:
    """Call step() until idle. arrivals[k]: add_request args queued before call k; aborts[k]:
    request ids aborted before call k. Returns per request its tokens, text, finish reason,
    logprobs and cached tokens; fails on any output after a request finished or was aborted."""
    rec: dict[str, dict] = {}
    closed: set[str] = set()
    last = max(list(arrivals) + list(aborts or {}) + [0])
    k = 0
    while engine.has_unfinished() or k <= last:
        for args in arrivals.get(k, []):
            engine.add_request(*args)
            rec[args[0]] = dict(tokens=[], text="", finish=None, logprobs=[], cached=None)
        for rid in (aborts or {}).get(k, []):
            engine.abort(rid)
            closed.add(rid)
        for o in engine.step():
            assert o.request_id not in closed, f"{o.request_id}: output after it finished or was aborted"
            r = rec[o.request_id]
            r["tokens"] += o.new_token_ids
            r["text"] += o.text_delta
            r["logprobs"] += o.new_logprobs
            r["cached"] = o.num_cached_tokens
            assert o.num_output_tokens == len(r["tokens"])
            if o.finished:
                r["finish"] = o.finish_reason
                closed.add(o.request_id)
        if on_call is not None:
            on_call(engine)
        k += 1
        assert k < 5000, "engine did not finish"
    return rec


def both(arrivals, aborts=None, on_call=None, setup=None, **kw) -> tuple[dict, dict, LLMEngine]:
    """The same script with overlap off and forced on; both engines must end leak-free."""
    off, on = make(False, **kw), make(True, **kw)
    assert not off.overlap and on.overlap
    if setup is not None:
        setup(off)
        setup(on)
    a = drive(off, arrivals, aborts, on_call)
    b = drive(on, arrivals, aborts, on_call)
    assert_no_leaks(off)
    assert_no_leaks(on)
    return a, b, on


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        for k in ("tokens", "text", "finish"):
            assert a[rid][k] == b[rid][k], (rid, k)
        assert a[rid]["logprobs"] == pytest.approx(b[rid]["logprobs"], abs=1e-9), rid


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def test_switch_defaults_off_on_cpu_and_is_validated():
    assert EngineConfig().async_scheduling is None
    e = LLMEngine(MODEL, device="cpu", dtype="float32", max_model_len=64)
    assert not e.overlap
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes").validate()


def test_staggered_arrivals_and_max_tokens_equal_sync_and_single_runs():
    arrivals = {0: [("a", prompt(0, 5), greedy(9)), ("b", prompt(1, 23), greedy(3))],
                2: [("c", prompt(2, 40), greedy(7))],
                3: [("d", prompt(3, 2), greedy(1))],
                6: [("e", prompt(4, 11), greedy(12))]}
    # A small token budget forces chunked prefills alongside decodes.
    a, b, _ = both(arrivals, max_num_batched_tokens=16)
    same(a, b)
    assert [len(a[r]["tokens"]) for r in "abcde"] == [9, 3, 7, 1, 12]
    assert all(a[r]["finish"] == "length" for r in a)
    single = make(True)
    for args in (x for xs in arrivals.values() for x in xs):
        single.add_request(*args)
        assert run_to_completion(single)[args[0]] == a[args[0]]["tokens"]
    assert_no_leaks(single)


def test_max_tokens_and_context_end_without_a_wasted_step():
    # A token certain to end its sequence (max_tokens, the context) marks it finishing: no
    # overlapped step is launched for it after that, so it runs in as many steps as without
    # overlap and never needs a block more.
    arrivals = {0: [("a", prompt(0, 60), greedy(50)), ("b", prompt(1, 9), greedy(20))]}
    steps: list[list[str]] = []

    def count(e):
        real = e.runner.execute
        runs = []
        steps.append(runs)

        def spy(scheduled, *args, **kw):
            runs.extend(s.seq.seq_id for s in scheduled)
            return real(scheduled, *args, **kw)
        e.runner.execute = spy

    a, b, _ = both(arrivals, setup=count, max_model_len=64)
    same(a, b)
    assert len(b["a"]["tokens"]) == 4 and b["a"]["finish"] == "length"
    assert len(b["b"]["tokens"]) == 20
    off, on = steps
    assert off.count("a") == on.count("a") == 4 and off.count("b") == on.count("b") == 20


def test_stop_tokens_and_strings_return_nothing_past_the_stop():
    base, _, _ = both({0: [("a", prompt(0, 7), greedy(16)), ("b", prompt(1, 12), greedy(16))]})
    toks, text = base["a"]["tokens"], base["b"]["text"]
    stop_tok = toks[5]
    stop_str = text[len(text) // 2:len(text) // 2 + 3]
    assert stop_str
    peak = []
    arrivals = {0: [("a", prompt(0, 7), greedy(16, stop_token_ids=[stop_tok])),
                    ("b", prompt(1, 12), greedy(16, stop=[stop_str])),
                    ("c", prompt(2, 9), greedy(16))]}
    a, b, on = both(arrivals, on_call=lambda e: peak.append(len(e.scheduler.deferred)))
    same(a, b)
    assert b["a"]["tokens"] == toks[:toks.index(stop_tok) + 1] and b["a"]["finish"] == "stop"
    assert b["b"]["text"] == text[:text.index(stop_str)] and b["b"]["finish"] == "stop"
    assert len(b["b"]["tokens"]) < 16
    # With overlap a stopped sequence was already in the next launched step: its blocks
    # were held (deferred) until that step was processed, and its token there discarded.
    assert max(peak) > 0


def test_abort_mid_flight_frees_blocks_at_once():
    full, _, _ = both({0: [(r, prompt(i, 6 + 5 * i), greedy(12)) for i, r in enumerate("abc")]})
    arrivals = {0: [(r, prompt(i, 6 + 5 * i), greedy(12)) for i, r in enumerate("abc")]}
    a, b, _ = both(arrivals, aborts={4: ["b"]})
    for rec in (a, b):
        assert rec["a"]["tokens"] == full["a"]["tokens"] and rec["c"]["tokens"] == full["c"]["tokens"]
        assert full["b"]["tokens"][:len(rec["b"]["tokens"])] == rec["b"]["tokens"]
        assert rec["b"]["finish"] is None
    # Abort everything while a step is on the "device": nothing in flight, nothing held.
    e = make(True)
    for args in arrivals[0]:
        e.add_request(*args)
    for _ in range(3):
        e.step()
    assert e._launched is not None
    for r in "abc":
        assert e.abort(r)
    assert not e.has_unfinished()
    assert_no_leaks(e)
    assert e.step() == []


def test_preemption_in_a_tiny_kv_pool():
    arrivals = {0: [(r, prompt(i, 8 + 3 * i), greedy(14)) for i, r in enumerate("abcd")],
                3: [("e", prompt(5, 5), greedy(10))]}
    counts = []
    a, b, on = both(arrivals, on_call=lambda e: counts.append(e.scheduler.num_preemptions),
                    block_size=4, num_kv_blocks=14, enable_prefix_caching=False)
    same(a, b)
    assert on.scheduler.num_preemptions > 0
    ref = make(False)
    for xs in arrivals.values():
        for args in xs:
            ref.add_request(*args)
    assert {r: t for r, t in run_to_completion(ref).items()} == {r: b[r]["tokens"] for r in b}
    assert_no_leaks(ref)


def test_prefix_cache_hits():
    shared = prompt(9, 40)
    arrivals = {0: [("a", shared + [11, 12], greedy(6)), ("b", prompt(1, 5), greedy(20))],
                8: [("c", shared + [13], greedy(8)), ("d", shared[:33], greedy(5))]}
    a, b, _ = both(arrivals, block_size=8)
    same(a, b)
    assert b["c"]["cached"] >= 32 and b["d"]["cached"] >= 32
    uncached = make(False, enable_prefix_caching=False)
    ref = drive(uncached, arrivals)
    assert {r: v["tokens"] for r, v in ref.items()} == {r: v["tokens"] for r, v in b.items()}


def test_remote_prefill_landed_and_failed():
    """The decode worker's calls, between steps while an overlapped step is in flight:
    add_remote_prefill, the KV written by a prefill engine, remote_kv_landed with its first
    token; and a transfer that fails and falls back to a local prefill."""
    p_remote, p_failed, p_local = prompt(3, 21), prompt(4, 17), prompt(5, 6)
    ref = make(False)
    for rid, p in (("loc", p_local), ("r", p_remote), ("f", p_failed)):
        ref.add_request(rid, p, greedy(10))
    expected = run_to_completion(ref)
    prefill = make(False)

    def run(overlap: bool) -> dict[str, list[int]]:
        e = make(overlap)
        got: dict[str, list[int]] = {"r": [], "f": []}
        e.add_request("loc", p_local, greedy(10))
        got.update({o.request_id: o.new_token_ids for o in e.step()})
        seq_r = e.add_remote_prefill("r", p_remote, greedy(10))
        seq_f = e.add_remote_prefill("f", p_failed, greedy(10))
        assert seq_r is not None and seq_f is not None
        for o in e.step() + e.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        # The prefill engine computes the prompt and the first token; its KV lands.
        prefill.add_request("r", p_remote, greedy(10), prefill_only=True)
        first = [o for _ in range(4) for o in prefill.step(on_layer_done=lambda layer: None)][-1]
        held = prefill.scheduler.held["r"]
        for layer in range(prefill.model_config.num_layers):
            e.runner.write_kv_blocks(layer, seq_r.block_table, prefill.runner.read_kv_blocks(layer, held.block_table))
        assert prefill.release("r")
        if overlap:
            assert e._launched is not None   # a step is on the device meanwhile
        out = e.remote_kv_landed("r", first.new_token_ids[0])
        got["r"] += out.new_token_ids
        e.remote_kv_failed("f")
        for rid, toks in run_to_completion(e).items():
            got.setdefault(rid, []).extend(toks)
        assert_no_leaks(e)
        return got

    assert run(False) == expected
    assert run(True) == expected
    assert_no_leaks(prefill)


def test_seeded_sampling_and_logprobs():
    arrivals = {0: [("s1", prompt(0, 6), SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1,
                                                         logprobs=True, ignore_eos=True)),
                    ("g", prompt(1, 9), greedy(10, logprobs=True))],
                2: [("s2", prompt(2, 14), SamplingParams(max_tokens=8, temperature=1.2, top_k=40, seed=7,
                                                          ignore_eos=True))]}
    a, b, _ = both(arrivals)
    same(a, b)
    assert len(b["s1"]["logprobs"]) == 12 and len(b["g"]["logprobs"]) == 10


def test_decode_graph_path_feeds_placeholders_on_the_device():
    """The decode-graph input path (DecodeGraphs(use_graphs=False) runs the forward a
    CUDA graph replays, Triton kernels interpreted): sampled tokens reach the next step
    through the graph's source rows, and greedy tokens equal overlap off."""
    pytest.importorskip("triton")
    from engine.cuda_graphs import DecodeGraphs
    from engine.kernels import triton_ops as tri
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(tri._rms_norm_kernel, InterpretedFunction):
            pytest.skip("triton_ops was imported before TRITON_INTERPRET=1 was set")
    # Graphs hold at most 2 rows: 3 decodes run eagerly, and when one ends, the graph step
    # after takes its inputs from an eager step's 3 sampled rows.
    arrivals = {0: [("a", prompt(0, 3), greedy(6)), ("b", prompt(1, 9), greedy(3)), ("c", prompt(2, 6), greedy(5))]}
    results, fed, wide = [], [], []
    for overlap in (False, True):
        e = LLMEngine(MODEL, device="cpu", dtype="float32", kernel_backend="triton", max_model_len=128,
                      enable_prefix_caching=False, max_num_batched_tokens=64, async_scheduling=overlap)
        r = e.runner
        graphs = DecodeGraphs(r.model, r.kv_caches, (1, 2), -(-128 // r.block_size), r.device, use_graphs=False)
        real_run = graphs.run

        def spy(*args, _run=real_run, _on=overlap):
            if _on:
                fed.append(args[5] is not None)
                wide.append(args[6] is not None and len(args[6]) > 2)
            return _run(*args)

        graphs.run = spy
        r.decode_graphs = graphs
        results.append(drive(e, arrivals))
        assert graphs.num_replays >= 3
        assert_no_leaks(e)
    same(*results)
    assert sum(fed) >= 3   # decode steps took their input ids from the previous step's tensor
    assert any(wide)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp32_greedy_equal_with_overlap_on_and_off():
    import gc
    outs = []
    for overlap in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        e = LLMEngine("random:llama3-1b", device="cuda", dtype="float32", async_scheduling=overlap,
                      max_model_len=1024, kv_cache_memory_gb=2.0, max_num_seqs=16)
        assert e.overlap == overlap and e.runner.decode_graphs is not None
        g = torch.Generator().manual_seed(0)
        arrivals = {k: [(f"r{k}-{i}", torch.randint(100, 120000, (int(n),), generator=g).tolist(),
                         greedy(int(m)))
                        for i, (n, m) in enumerate(zip(torch.randint(4, 300, (3,), generator=g),
                                                       torch.randint(1, 40, (3,), generator=g)))]
                    for k in (0, 3, 10)}
        replays = e.runner.decode_graphs.num_replays
        outs.append(drive(e, arrivals))
        assert e.runner.decode_graphs.num_replays - replays > 10
        assert_no_leaks(e)
        del e
    same(*outs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_overlapped_steps_make_no_synchronizing_torch_call():
    """Launching a step (inputs, forward, sampling, the copy back) must not synchronize the
    host with the device, or the overlap is lost. torch's sync debug mode raises at any
    synchronizing torch call (a blocking copy, .item(), a check read back to the host).
    It does not see event waits (the step's wait on the previous launch, by design, and the
    graphs' wait for their staging buffer) or a driver stalling a pageable copy: the decode
    benchmark's host-visible time covers those. Greedy, temperature, top-k/top-p and seeded
    requests, prefill chunks and decode rows (graph replays and eager steps) all run under it."""
    e = LLMEngine("random:llama3-1b", device="cuda", dtype="bfloat16", max_model_len=1024,
                  kv_cache_memory_gb=2.0, max_num_seqs=16, max_num_batched_tokens=256)
    assert e.overlap and e.runner.decode_graphs is not None
    kinds = [SamplingParams(max_tokens=24, ignore_eos=True),
             SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8),
             SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.7, top_k=40, top_p=0.9),
             SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, top_p=0.95, seed=5, logprobs=True)]
    for i in range(8):   # one long prompt: chunked prefill steps beside decode rows
        e.add_request(f"r{i}", prompt(i, 400 if i == 3 else 20 + 7 * i), kinds[i % 4])
    e.step()   # the first launches compile and warm what they need outside the check
    e.step()
    replays = e.runner.decode_graphs.num_replays
    finished, steps = set(), 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        while e.has_unfinished():
            outs = e.step()
            steps += 1
            finished |= {o.request_id for o in outs if o.finished}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert steps > 20 and e.runner.decode_graphs.num_replays > replays
    assert finished == {f"r{i}" for i in range(8)}
    assert_no_leaks(e)
