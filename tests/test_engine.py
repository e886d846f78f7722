"""Engine behaviour beyond the HF oracle: stop conditions, aborts, bad input, seeds,
prefix-cache events, and the two disaggregation modes (prefill-only and remote KV)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import run_to_completion
from engine import LLM, CapacityError, InvalidRequestError, ModelLoadError, SamplingParams


@pytest.fixture(scope="module")
def smol():
    llm = LLM("smollm2")
    yield llm
    from helpers import assert_no_leaks
    assert_no_leaks(llm.engine)


def test_generate_api_and_finish_reasons(smol):
    outs = smol.generate(["The capital of France is", [504, 3575, 282, 4649, 314]],
                         SamplingParams(max_tokens=5, logprobs=True))
    assert outs[0].token_ids == outs[1].token_ids  # text and ids give the same prompt
    assert len(outs[0].token_ids) == 5 and outs[0].finish_reason == "length"
    assert outs[0].text == smol.tokenizer.decode(outs[0].token_ids)
    assert len(outs[0].logprobs) == 5 and all(lp <= 0 for lp in outs[0].logprobs)


def test_stop_strings_and_stop_tokens(smol):
    base = smol.generate(["The capital of France is"], SamplingParams(max_tokens=12))[0]
    assert "\n" in base.text  # " Paris.\n\nThe answer is: ..."
    stop_at = base.text.index(".")
    cut = smol.generate(["The capital of France is"], SamplingParams(max_tokens=12, stop=["."]))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[:stop_at]
    tok = base.token_ids[2]
    cut2 = smol.generate(["The capital of France is"], SamplingParams(max_tokens=12, stop_token_ids=[tok]))[0]
    assert cut2.finish_reason == "stop" and cut2.token_ids == base.token_ids[:3]


def test_eos_ends_chat_reply(smol):
    out = smol.generate(["What is 2+2? Answer with one word."], SamplingParams(max_tokens=64),
                        apply_chat_template=True)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in smol.engine.eos_token_ids
    assert out.text.strip()


def test_seeded_sampling_reproducible(smol):
    p = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=42)
    a = smol.generate(["Tell me a story about a cat"], p)[0]
    b = smol.generate(["Tell me a story about a cat", "Something else entirely"], [p, p])[0]
    assert a.token_ids == b.token_ids


def test_abort_frees_blocks_at_any_time(smol):
    e = smol.engine
    free0 = e.num_free_blocks()
    e.add_request("a", "Once upon a time " * 20, SamplingParams(max_tokens=50))
    e.add_request("b", "Another request", SamplingParams(max_tokens=50))
    e.add_request("c", "Never scheduled", SamplingParams(max_tokens=50))
    e.step()
    e.step()
    assert e.num_free_blocks() < free0
    assert e.abort("a") and e.abort("b") and e.abort("c")
    assert not e.abort("a")
    assert not e.has_unfinished() and e.num_free_blocks() == free0


@pytest.mark.parametrize("prompt,params,field", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1, 2, 10**7], SamplingParams(), "prompt_token_ids"),
    ([-1], SamplingParams(), "prompt_token_ids"),
    ([5, True], SamplingParams(), "prompt_token_ids"),
    ([5, 6.0], SamplingParams(), "prompt_token_ids"),
    ("hi", SamplingParams(max_tokens=0), "max_tokens"),
    ("hi", SamplingParams(temperature=-1.0), "temperature"),
    ("hi", SamplingParams(top_p=0), "top_p"),
    ("hi", SamplingParams(top_p=1.01), "top_p"),
])
def test_bad_requests_are_rejected_before_allocation(smol, prompt, params, field):
    free0 = smol.engine.num_free_blocks()
    with pytest.raises(InvalidRequestError) as e:
        smol.generate([prompt], params)
    assert e.value.field == field
    assert smol.engine.num_free_blocks() == free0 and not smol.engine.has_unfinished()


def test_prompt_longer_than_context_and_capacity(smol):
    too_long = [5] * smol.engine.max_model_len
    with pytest.raises(InvalidRequestError, match="context is 8192"):
        smol.generate([too_long])
    small = LLM("random:tiny", num_kv_blocks=4, block_size=16)
    with pytest.raises(CapacityError, match="KV blocks"):
        small.generate([[5] * 40], SamplingParams(max_tokens=100))


def test_unknown_model_and_unreadable_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not a known name"):
        LLM("no-such-model")
    with pytest.raises(ModelLoadError, match="unknown random shape"):
        LLM("random:huge")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        LLM(str(bad))
    (tmp_path / "hf").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path / "hf"))


def test_prefix_cache_events(smol):
    e = smol.engine
    e.blocks.reset_prefix_cache()
    e.take_kv_events()
    prompt = "A long shared system prompt. " * 12
    smol.generate([prompt], SamplingParams(max_tokens=2))
    stored = [ev for ev in e.take_kv_events() if ev.kind == "stored"]
    n_prompt = len(smol.tokenizer.encode(prompt))
    assert len(stored) == (n_prompt + 1) // e.cfg.block_size  # full blocks of computed tokens
    assert stored[0].parent_hash is None and stored[1].parent_hash == stored[0].block_hash


def test_disaggregated_prefill_then_decode_equals_single_engine(smol, make_engine):
    """Prefill-only engine computes the prompt and its first token; its KV blocks are
    copied layer by layer into blocks a decode engine reserved; the decode engine continues.
    Same tokens as one engine doing everything, and no leaked blocks on either side."""
    prompt = "The history of the printing press begins in the fifteenth century. " * 4
    params = SamplingParams(max_tokens=12)
    expected = smol.generate([prompt], params)[0].token_ids

    prefill = make_engine("smollm2")
    decode = make_engine("smollm2")
    # Warm the decode side's prefix cache with the start of the prompt, so only the
    # uncached tail has to be shipped.
    run_to_completion_prompt(decode, "The history of the printing press begins in the fifteenth century. " * 2)
    seq_d = decode.add_remote_prefill("x", prompt, params)
    assert seq_d is not None and seq_d.num_cached_tokens > 0
    first_block = seq_d.num_computed_tokens // decode.cfg.block_size

    layers_done = []
    prefill.add_request("x", prompt, params, prefill_only=True)
    outs = []
    while prefill.has_unfinished():
        outs += prefill.step(on_layer_done=layers_done.append)
    assert outs[-1].finished and len(outs[-1].new_token_ids) == 1
    assert layers_done[:prefill.model_config.num_layers] == list(range(prefill.model_config.num_layers))
    seq_p = prefill.scheduler.held["x"]
    for layer in range(prefill.model_config.num_layers):
        data = prefill.runner.read_kv_blocks(layer, seq_p.block_table[first_block:])
        decode.runner.write_kv_blocks(layer, seq_d.block_table[first_block:], data)
    assert prefill.release("x")
    decode.remote_kv_landed("x", outs[-1].new_token_ids[0])
    got = outs[-1].new_token_ids + run_to_completion(decode)["x"]
    assert got == expected


def test_landed_prompts_past_max_num_seqs_wait_for_a_slot(smol, make_engine):
    """A decode engine whose batch is full (max_num_seqs running) does not grow it when
    more remote prefills land: they wait with their KV in place, ahead of prompts not yet
    started, and join as slots free; every request's tokens equal one engine's."""
    prompts = [f"Request number {i} asks about the tides of the northern sea. " * 3 for i in range(5)]
    params = SamplingParams(max_tokens=6)
    expected = {f"r{i}": o.token_ids for i, o in enumerate(smol.generate(prompts, params))}
    prefill = make_engine("smollm2")
    decode = make_engine("smollm2", max_num_seqs=2)
    decode.add_request("r0", prompts[0], params)
    decode.add_request("r1", prompts[1], params)
    got = {f"r{i}": [] for i in range(5)}
    for o in decode.step():
        got[o.request_id] += o.new_token_ids
    assert len(decode.scheduler.running) == 2
    decode.add_request("r4", prompts[4], params)   # a prompt not started: it queues behind the landed ones
    for i in (2, 3):
        rid = f"r{i}"
        seq_d = decode.add_remote_prefill(rid, prompts[i], params)
        prefill.add_request(rid, prompts[i], params, prefill_only=True)
        outs = []
        while prefill.has_unfinished():
            outs += prefill.step()
        seq_p = prefill.scheduler.held[rid]
        for layer in range(prefill.model_config.num_layers):
            decode.runner.write_kv_blocks(layer, seq_d.block_table, prefill.runner.read_kv_blocks(layer, seq_p.block_table))
        assert prefill.release(rid)
        got[rid] += decode.remote_kv_landed(rid, outs[-1].new_token_ids[0]).new_token_ids
    assert len(decode.scheduler.running) == 2
    assert [s.seq_id for s in decode.scheduler.waiting] == ["r2", "r3", "r4"]
    most = 0
    while decode.has_unfinished():
        for o in decode.step():
            got[o.request_id] += o.new_token_ids
        most = max(most, len(decode.scheduler.running))
    assert most <= 2
    assert got == expected


def test_failed_transfer_falls_back_to_local_prefill(smol, make_engine):
    prompt = "Fallback prompt that would have been prefilled remotely. " * 3
    params = SamplingParams(max_tokens=8)
    expected = smol.generate([prompt], params)[0].token_ids
    decode = make_engine("smollm2")
    seq = decode.add_remote_prefill("y", prompt, params)
    assert decode.num_free_blocks() < decode.blocks.num_blocks
    # garbage "partially landed" data must not leak into results or the prefix cache
    decode.runner.kv_cache.normal_()
    decode.remote_kv_failed("y")
    assert run_to_completion(decode)["y"] == expected
    assert seq.finish_reason.value == "length"


def run_to_completion_prompt(engine, prompt):
    engine.add_request("warm", prompt, SamplingParams(max_tokens=1))
    run_to_completion(engine)


def test_cli_generate_json():
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--model", "smollm2", "--max-tokens", "6",
                        "--json", "The capital of France is", "def add(a, b):"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.strip().splitlines()]
    assert len(lines) == 2
    assert lines[0]["text"].startswith(" Paris") and len(lines[0]["token_ids"]) == 6


def test_cli_bad_input_is_one_clear_line():
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--max-tokens", "0", "x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "max_tokens" in r.stderr and "Traceback" not in r.stderr


def test_step_inputs_and_runner_output_rows():
    """One layout of a step's rows for the eager and the graph path (engine/step_inputs.py),
    and the logits rows the engine reads per sampling entry (engine/runner_output.py): a
    prefill chunk, a decode, a chunk that does not sample and a speculative verify chunk."""
    import torch
    from engine.runner_output import RunnerOutput
    from engine.scheduler import ScheduledSeq
    from engine.sequence import Sequence
    from engine.step_inputs import build_inputs

    def seq(name, n, computed, table, spec=()):
        return Sequence(name, list(range(100, 100 + n)), n, SamplingParams(), num_computed_tokens=computed,
                        block_table=table, spec_token_ids=list(spec))
    a = ScheduledSeq(seq("a", 5, 0, [3, 4]), 5)                      # whole prompt: samples
    b = ScheduledSeq(seq("b", 8, 7, [5, 6]), 1)                      # decode
    d = ScheduledSeq(seq("d", 20, 0, [7, 8, 9, 10, 11]), 8)          # first chunk of 20: no sample
    c = ScheduledSeq(seq("c", 6, 5, [1, 2], spec=(7, 9)), 3, num_spec=2)   # verify: last token + 2 drafts
    scheduled = [a, b, d, c]
    inp = build_inputs([b, c, a, d], block_size=4, prev=None)      # decode rows first, as execute orders them
    assert inp.token_ids[:4] == [107, 105, 7, 9] and inp.positions[:4] == [7, 5, 6, 7]
    assert inp.slots[:4] == [6 * 4 + 3, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3]
    assert inp.block_tables[1] == [1, 2] and inp.sources == [-1] * len(inp.token_ids)
    assert len(inp.token_ids) == 1 + 3 + 5 + 8
    assert inp.sample_rows(scheduled) == [8, 0, 1, 2, 3]            # in scheduled order: a, b, then c's 3 rows
    out = RunnerOutput.for_step(scheduled, torch.arange(5.0)[:, None])
    assert out.sampling == [a, b, c] and out.first_rows == [0, 1, 2]
    assert out.rows(2) == slice(2, 5) and out.last_rows == [0, 1, 4]
    assert RunnerOutput.for_step([d], None).logits is None


def test_step_inputs_built_a_block_at_a_time_equal_the_per_token_rows():
    """build_inputs lays rows out a block at a time; every row must be the one the plain
    per-token rule gives (position p of a sequence: slot table[p // bs] * bs + p % bs), for
    chunks starting and ending anywhere in a block, verify chunks and a placeholder token."""
    import random

    from engine.overlap import PLACEHOLDER, LaunchedStep
    from engine.scheduler import ScheduledSeq
    from engine.sequence import Sequence
    from engine.step_inputs import build_inputs

    rng = random.Random(7)
    for trial in range(200):
        bs = rng.choice([1, 4, 16])
        entries, prev_rows = [], {}
        for j in range(rng.randint(1, 4)):
            n = rng.randint(1, 80)
            computed = rng.randint(0, n - 1)
            spec = [rng.randint(0, 9) for _ in range(rng.choice([0, 0, 2]))] if computed == n - 1 else []
            blocks = -(-(n + len(spec)) // bs)
            table = rng.sample(range(1000), blocks)
            tokens = [rng.randint(0, 50000) for _ in range(n)]
            placeholder = computed == n - 1 and rng.random() < 0.5
            if placeholder:
                tokens[-1] = PLACEHOLDER
            sq = Sequence(f"s{j}", tokens, n, SamplingParams(), num_computed_tokens=computed,
                          block_table=table, spec_token_ids=spec)
            if placeholder:
                prev_rows[id(sq)] = j
            new = n - computed if not spec else 1
            new = rng.randint(1, new) if not spec else new
            entries.append(ScheduledSeq(sq, new + len(spec), num_spec=len(spec)))
        prev = LaunchedStep([], [], [], prev_rows, None, None, None, None) if prev_rows else None
        inp = build_inputs(entries, bs, prev)
        want = dict(token_ids=[], positions=[], slots=[], sources=[], block_tables=[])
        for e in entries:
            sq, start = e.seq, e.seq.num_computed_tokens
            known = e.num_new_tokens - e.num_spec
            toks = sq.token_ids[start:start + known] + sq.spec_token_ids[:e.num_spec]
            for i, tok in enumerate(toks):
                p = start + i
                src = prev_rows.get(id(sq), -1) if tok == PLACEHOLDER and i == known - 1 else -1
                want["token_ids"].append(0 if src >= 0 else tok)
                want["sources"].append(src)
                want["positions"].append(p)
                want["slots"].append(sq.block_table[p // bs] * bs + p % bs)
                want["block_tables"].append(sq.block_table)
        for k, v in want.items():
            assert getattr(inp, k) == v, (trial, k)
        assert inp.has_placeholders is any(s >= 0 for s in want["sources"])


def test_dense_prefill_attention_gives_the_paged_kernels_tokens(make_engine):
    """EngineConfig.dense_prefill: fresh prompts attend over their own K/V (dense) or through
    the paged kernel; greedy tokens are the same, and later chunks and decodes (paged) read
    the K/V the dense path wrote to the cache."""
    prompts = [list(range(5, 5 + n)) for n in (40, 7, 90)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = {}
    for dense in (True, False):
        e = make_engine("random:tiny", dense_prefill=dense, max_num_batched_tokens=64)
        assert e.runner.dense_fresh_prefill is dense
        calls = []
        real = e.runner.ops.causal_prefill_attention
        e.runner.ops.causal_prefill_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
        for i, p in enumerate(prompts):
            e.add_request(f"r{i}", p, params)
        got[dense] = run_to_completion(e)
        assert bool(calls) is dense
    assert got[True] == got[False]


def test_dense_prefill_of_one_prompt_per_launch_serves_single_prompt_steps_only(make_engine):
    """Where the fused kernel takes one sequence per launch (the triton backend's cuDNN), a
    step of several fresh prompts keeps the paged kernel; a step with one takes the dense
    path. Tokens are the same either way."""
    prompts = [list(range(5, 5 + n)) for n in (40, 7, 30)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    e = make_engine("random:tiny", dense_prefill=True, max_num_batched_tokens=256, enable_prefix_caching=False)
    assert e.runner.dense_several_prompts   # a CPU backend: its paged reference is the slower one
    e.runner.dense_several_prompts = False   # as on the triton backend
    seqs_per_call = []
    real = e.runner.ops.causal_prefill_attention
    e.runner.ops.causal_prefill_attention = lambda q, k, v, lens, scale: seqs_per_call.append(len(lens)) or real(
        q, k, v, lens, scale)
    for i, p in enumerate(prompts):   # all three fit one step: no dense call
        e.add_request(f"r{i}", p, params)
    together = run_to_completion(e)
    assert seqs_per_call == []
    e.add_request("alone", prompts[0], params)   # one prompt in its step (nothing cached): dense
    alone = run_to_completion(e)
    assert seqs_per_call and set(seqs_per_call) == {1}
    assert alone["alone"] == together["r0"]


@pytest.mark.parametrize("value", ["false", 0, 1.0])
def test_dense_prefill_takes_only_true_false_or_null(value):
    from engine.config import EngineConfig
    with pytest.raises(ValueError, match="dense_prefill must be true, false or null"):
        EngineConfig(dense_prefill=value).validate()
    EngineConfig(dense_prefill=None).validate()
