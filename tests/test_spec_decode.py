"""Speculative decoding (engine/spec_decode): the proposers, the rejection sampler's output
distribution, the adaptive controller, and the engine's verify/rollback path, whose greedy
tokens must equal plain decoding while the KV block accounting stays exact."""
from __future__ import annotations

import random

import pytest
import torch

from helpers import run_to_completion
from engine import LLMEngine, SamplingParams
from engine.block_manager import hash_prefix_blocks
from engine.spec_decode import (NgramProposer, SpecController, SpecTuning, expected_tokens, rejection_sample,
                                verify_greedy)

# ---- proposers and verification, as units -------------------------------------------------------


def test_ngram_proposes_what_followed_the_longest_latest_match():
    p = NgramProposer(max_ngram=3, min_ngram=1)
    # The 3-gram [1, 2, 3] beats the later 1-gram match of [3] (at index 5, followed by 10).
    assert p.propose_one([1, 2, 3, 4, 7, 3, 10, 1, 2, 3], 3) == [4, 7, 3]
    # Of two occurrences the most recent wins, unless it has fewer than k tokens after it.
    assert p.propose_one([5, 6, 1, 5, 6, 2, 9, 5, 6], 2) == [2, 9]
    assert p.propose_one([5, 6, 1, 5, 6, 2, 9, 5, 6], 5) == [1, 5, 6, 2, 9]
    assert p.propose_one([8, 3, 3, 3, 3, 3, 3, 3], 3) == [3, 3, 3]     # a loop: a full-length guess
    # The proposal stops where the sequence does; no match gives nothing.
    assert p.propose_one([5, 6, 5], 4) == [6, 5]
    assert p.propose_one([1, 2, 3, 4], 3) == []
    assert NgramProposer(max_ngram=3, min_ngram=2).propose_one([1, 2, 1], 3) == []
    assert p.propose_one([1, 2, 1], 0) == []


def test_ngram_index_agrees_with_a_full_scan():
    """The engine's incremental per-sequence index gives what a rescan gives, as the
    sequence grows one token or several at a time."""
    from engine.sequence import Sequence
    rng = random.Random(3)
    p = NgramProposer()
    for trial in range(20):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 30))]
        seq = Sequence(f"s{trial}", list(tokens), len(tokens), SamplingParams())
        while len(seq.token_ids) < 120:
            k = rng.randrange(1, 6)
            assert p.propose([seq], [k])[0][0] == p.propose_one(seq.token_ids, k)
            seq.token_ids.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))
        p.forget(seq.seq_id)
    assert not p._index


def test_verify_greedy_keeps_the_matching_run_then_the_target_token():
    logits = torch.full((4, 10), -1.0)
    for pos, tok in enumerate([4, 7, 2, 9]):
        logits[pos, tok] = 1.0
    assert verify_greedy(logits, [4, 7, 2]) == [4, 7, 2, 9]   # all accepted + bonus
    assert verify_greedy(logits, [4, 8, 2]) == [4, 7]         # first mismatch: target's token
    assert verify_greedy(logits, [5, 7, 2]) == [4]


def _tv(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    emp = torch.bincount(tokens, minlength=probs.numel()).double() / tokens.numel()
    return 0.5 * (emp - probs).abs().sum().item()


@pytest.mark.parametrize("proposer", ["draft_model", "point_mass"])
def test_rejection_sampling_reproduces_the_target_distribution(proposer):
    """Synthetic target p_j and draft q_j per position (independent of the context): every
    emitted token at position j must be distributed as p_j, although the drafts follow q_j."""
    gen = torch.Generator().manual_seed(1234)
    V, k, B = 6, 3, 60_000
    p = torch.rand(k + 1, V, generator=gen, dtype=torch.float64) ** 3
    p /= p.sum(-1, keepdim=True)
    if proposer == "draft_model":
        r = torch.rand(k, V, generator=gen, dtype=torch.float64) ** 3
        q = 0.4 * p[:k] + 0.6 * r / r.sum(-1, keepdim=True)   # overlaps p, far from equal
        drafts = torch.stack([torch.multinomial(q[j], B, replacement=True, generator=gen) for j in range(k)], 1)
        draft_probs = q.expand(B, k, V)
        accept0 = torch.minimum(p[0], q[0]).sum().item()   # P(first draft kept) = sum min(p, q)
    else:   # n-gram: a deterministic guess, i.e. q = one-hot
        guess = p[:k].argmax(-1)
        drafts = guess[None].expand(B, k).contiguous()
        draft_probs = None
        accept0 = p[0, guess[0]].item()
    tokens, num_acc = rejection_sample(p.expand(B, k + 1, V), drafts, draft_probs, gen)
    assert tokens.shape == (B, k + 1) and int(num_acc.min()) >= 0 and int(num_acc.max()) <= k
    assert torch.equal(tokens[:, :k][torch.arange(k) < num_acc[:, None]],
                       drafts[torch.arange(k) < num_acc[:, None]]), "accepted tokens must be the drafts"
    assert abs((num_acc >= 1).double().mean().item() - accept0) < 0.01
    for j in range(k + 1):
        emitted = tokens[num_acc >= j, j]
        assert emitted.numel() > 5000
        assert _tv(emitted, p[j]) < 0.03, f"position {j}: emitted tokens are not distributed as p"
    # Control: the proposals themselves are far from p, so the bound above can fail.
    if proposer == "draft_model":
        assert _tv(drafts[:, 0], p[0]) > 0.1


def test_rejection_sampling_is_seeded():
    p = torch.softmax(torch.randn(1, 4, 50, generator=torch.Generator().manual_seed(0)), -1)
    d = torch.tensor([[1, 2, 3]])
    a = rejection_sample(p, d, None, torch.Generator().manual_seed(9))
    b = rejection_sample(p, d, None, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_controller_adapts_to_batch_and_acceptance():
    c = SpecController(max_k=5, max_batch=16, tuning=SpecTuning(probe_every=4))
    assert c.num_tokens("s", 17) == 0                     # off at large batches
    for _ in range(20):
        c.observe("s", 5, 5)
    assert c.num_tokens("s", 1) == 5                       # all accepted: speculate fully
    for _ in range(20):
        c.observe("s", 5, 4)
    ks = [c.num_tokens("s", b) for b in (1, 4, 8, 16)]
    assert ks == sorted(ks, reverse=True) and ks[-1] < 5   # fewer tokens as verifying costs more
    for _ in range(30):
        c.observe("s", 5, 0)
    picks = [c.num_tokens("s", 1) for _ in range(8)]
    assert picks == [0, 0, 0, 1, 0, 0, 0, 1]               # off, with a 1-token probe every 4 steps
    c.observe("s", 1, 0)                                   # a failed probe: the gap doubles
    assert [c.num_tokens("s", 1) for _ in range(8)] == [0] * 7 + [1]
    c.observe("s", 1, 1)                                   # a successful one resets it
    assert c.acceptance["s"] > 0.2 and c.num_tokens("s", 1) >= 1   # and speculation resumes
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4
    assert SpecController(max_k=3, max_batch=4, adaptive=False).num_tokens("x", 4) == 3


def test_controller_keeps_verify_steps_within_the_cheap_row_limit():
    cheap = SpecTuning(verify_token_cost=0.0, verify_overhead=0.0, max_verify_rows=8)
    c = SpecController(max_k=6, max_batch=16, tuning=cheap)
    for _ in range(20):
        c.observe("s", 6, 6)                               # everything accepted: k as large as allowed
    assert [c.num_tokens("s", b) for b in (1, 2, 3, 4, 5, 8)] == [6, 3, 1, 1, 0, 0]
    assert SpecController(max_k=6, max_batch=16, tuning=SpecTuning(verify_token_cost=0.0, verify_overhead=0.0)
                          ).choose_k(1.0, 8) == 6          # no limit: k is the cost model's alone


def test_cpu_backend_cost_model_is_the_linear_loops():
    from engine.config import EngineConfig, ModelConfig
    from engine.kernels import cpu_ops
    from engine.spec_decode import SpecDecoder
    mc = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1)
    tunings = {}
    for backend in ("cpu", "torch"):
        d = SpecDecoder(EngineConfig(speculative="ngram", kernel_backend=backend), mc, 16, torch.device("cpu"),
                        torch.float32, 64)
        tunings[backend] = d.controller.t
    assert tunings["cpu"].max_verify_rows == cpu_ops._LINEAR_MAX_ROWS and tunings["cpu"].verify_token_cost < 0.2
    assert tunings["torch"].max_verify_rows is None and tunings["torch"].verify_token_cost > 0.5


# ---- the engine ----------------------------------------------------------------------------------

_rng = random.Random(0)
_BASE = [_rng.randrange(3, 2000) for _ in range(12)]
# Repetitive prompts (n-gram matches) and a free-form one; the random model's own output
# also falls into loops now and then, so drafts get both accepted and rejected.
TINY_PROMPTS = [_BASE * 3 + _BASE[:5], [_rng.randrange(3, 2000) for _ in range(30)], _BASE[:7] * 4]
# Two short loops after which the model's output follows the loop part of the way: drafts
# accepted and rejected within one verify chunk (picked from random.Random(1) loops).
_rng = random.Random(1)
_LOOPS = [[_rng.randrange(3, 2000) for _ in range(4)] * 6 for _ in range(4)]
TINY_PROMPTS += [_LOOPS[1], _LOOPS[3]]
TINY = dict(dtype="float64", block_size=4, num_kv_blocks=160)


def _run_checked(engine, prompts, params, prefix="r", steps: list | None = None) -> dict[str, list[int]]:
    """Run to completion, checking after every step that the block accounting is exact:
    each block's ref count is the number of running tables holding it, a table covers
    exactly the computed tokens, and registered hashes are those of the sequence's tokens."""
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", p, params)
    out: dict[str, list[int]] = {}
    bm, bs = engine.blocks, engine.cfg.block_size
    for _ in range(10_000):
        if not engine.has_unfinished():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if params.logprobs:   # one logprob per emitted token, however many a step emits
                assert len(o.new_logprobs) == len(o.new_token_ids) and all(lp <= 0 for lp in o.new_logprobs)
        if steps is not None:
            steps.append(1)
        bm.check_invariants()
        refs = [0] * bm.num_blocks
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == bm.blocks_for(seq.num_computed_tokens)
            n = len(seq.block_hashes)
            assert n * bs <= seq.num_computed_tokens < seq.num_tokens
            assert seq.block_hashes == hash_prefix_blocks(seq.token_ids[:n * bs], bs, seq.cache_salt)
            for b in seq.block_table:
                refs[b] += 1
        assert refs == bm.ref_count
    raise AssertionError("engine did not finish")


@pytest.fixture(scope="module")
def tiny_plain():
    e = LLMEngine("random:tiny", **TINY)
    return run_to_completion_all(e, TINY_PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))


def run_to_completion_all(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    return run_to_completion(engine)


@pytest.mark.parametrize("spec", ["ngram", "random:tiny-qwen2", "random:tiny"])
def test_greedy_equals_plain_decoding_random_fp64(spec, make_engine, tiny_plain):
    e = make_engine("random:tiny", speculative=spec, spec_adaptive=False, num_speculative_tokens=3, **TINY)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert _run_checked(e, TINY_PROMPTS, params) == tiny_plain
    st = e.spec.stats
    assert st.num_proposed > 0 and st.num_emitted == st.num_accepted + st.num_verify
    if spec == "ngram":
        assert 0 < st.num_accepted < st.num_proposed        # both acceptance and rollback ran
    elif spec == "random:tiny":
        assert st.num_accepted == st.num_proposed           # the target as its own draft: bonus path
    else:
        assert st.num_accepted < st.num_proposed
    # The prefix cache now holds blocks written by verify steps; reusing them must give
    # the same tokens (a block holding a rejected draft's KV would change them).
    assert _run_checked(e, TINY_PROMPTS, params, prefix="again") == \
        {k.replace("r", "again"): v for k, v in tiny_plain.items()}
    assert e.stats()["num_cached_blocks"] > 0


def test_greedy_equal_under_chunked_prefill_and_preemption(make_engine, tiny_plain):
    # 11 blocks of 4 tokens cannot hold three 40-70 token sequences at once; an 8-token
    # budget chunks prompts and mixes their chunks with verify steps.
    need = -(-(max(map(len, TINY_PROMPTS)) + 24) // 4)
    e = make_engine("random:tiny", speculative="ngram", spec_adaptive=False, num_speculative_tokens=4,
                    dtype="float64", block_size=4, num_kv_blocks=need + 2, max_num_batched_tokens=8)
    assert _run_checked(e, TINY_PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True)) == tiny_plain
    assert e.scheduler.num_preemptions > 0 and e.spec.stats.num_accepted > 0


def test_verify_rows_through_the_decode_graph_path(make_engine, tiny_plain):
    """On a GPU a verify step replays the decode CUDA graph with 1 + k rows per sequence.
    DecodeGraphs(use_graphs=False) runs that padded static-buffer forward on the CPU."""
    from engine.cuda_graphs import DecodeGraphs
    # The Triton kernels (interpreted on a CPU): the static buffers are int32, as on a GPU.
    e = make_engine("random:tiny", speculative="ngram", spec_adaptive=False, num_speculative_tokens=3,
                    kernel_backend="triton", **TINY)
    r = e.runner
    r.decode_graphs = DecodeGraphs(r.model, r.kv_caches, (1, 2, 4, 8, 16), -(-r.mcfg.max_position_embeddings
                                   // r.block_size), r.device, use_graphs=False)
    steps = []
    out = _run_checked(e, TINY_PROMPTS[2:], SamplingParams(max_tokens=12, ignore_eos=True), steps=steps)
    assert out == {f"r{i}": tiny_plain[f"r{i + 2}"][:12] for i in range(3)}
    # After the first (prefill) step every step, verify steps included, took that path.
    assert e.spec.stats.num_verify > 0 and r.decode_graphs.num_replays == len(steps) - 1


def test_stop_token_and_max_tokens_inside_an_accepted_run(make_engine, tiny_plain):
    # The target as its own draft accepts all 4 drafts: after the first token, tokens
    # 1-5, 6-10, ... each arrive in one step, so a stop at token 2 falls inside a run.
    e = make_engine("random:tiny", speculative="random:tiny", spec_adaptive=False, num_speculative_tokens=4,
                    **TINY)
    plain = tiny_plain["r2"]
    stop = plain[2]
    first = plain.index(stop)
    assert 1 <= first < 5
    out = _run_checked(e, [TINY_PROMPTS[2]], SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=[stop]))
    assert out["r0"] == plain[:first + 1]
    out = _run_checked(e, [TINY_PROMPTS[2]], SamplingParams(max_tokens=7, ignore_eos=True), prefix="m")
    assert out["m0"] == plain[:7]


def test_off_at_large_batches(make_engine):
    e = make_engine("random:tiny", speculative="ngram", spec_adaptive=False, spec_max_batch=1, **TINY)
    for i, p in enumerate(TINY_PROMPTS):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=8 + 12 * i, ignore_eos=True))
    while e.has_unfinished():
        running, before = len(e.scheduler.running), e.spec.stats.num_verify
        e.step()
        if running > 1:
            assert e.spec.stats.num_verify == before
    assert e.spec.stats.num_verify > 0     # the last one left alone speculates


# A random model's logits are nearly flat: its sampled text only loops (giving n-gram
# matches) at a very low temperature, which still leaves some draws random.
@pytest.mark.parametrize("spec,temperature", [("ngram", 0.001), ("random:tiny", 0.8)])
def test_sampling_with_speculation_is_seeded_and_complete(spec, temperature, make_engine):
    e = make_engine("random:tiny", speculative=spec, spec_adaptive=False, **TINY)
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=temperature, top_k=3, seed=5,
                            logprobs=True)
    outs = [_run_checked(e, TINY_PROMPTS[2:], params, prefix=f"s{n}") for n in range(2)]
    assert outs[0]["s00"] == outs[1]["s10"] and len(outs[0]["s00"]) == 16
    assert e.spec.stats.num_verify > 0
    # The draft as its own target (p == q) must accept every draft even when sampling.
    if spec == "random:tiny":
        assert e.spec.stats.num_accepted == e.spec.stats.num_proposed


def test_smollm2_greedy_equals_plain_with_ngram(make_engine):
    prompts = ["def area(w, h):\n    return w * h\n\n# The same function with type hints:\ndef area(",
               "The capital of France is"]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = make_engine("smollm2")
    spec = make_engine("smollm2", speculative="ngram", spec_adaptive=False)
    assert _run_checked(spec, prompts, params) == run_to_completion_all(plain, prompts, params)
    assert spec.spec.stats.num_accepted > 0


def test_config_validation():
    from engine.config import EngineConfig
    for bad in (dict(speculative=""), dict(num_speculative_tokens=0), dict(num_speculative_tokens=True),
                dict(spec_max_batch=0)):
        with pytest.raises(ValueError):
            EngineConfig(**bad).validate()
    assert EngineConfig().speculative is None
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine("random:tiny", speculative="random:llama3-1b", num_kv_blocks=8)
