"""The correctness oracle: greedy tokens equal to Hugging Face transformers on the same
weights, under every scheduling path (staggered arrivals, chunked prefill, prefix-cache
hits, preemption by recompute)."""
from __future__ import annotations

import pytest
import torch

from helpers import hf_greedy, run_to_completion
from engine import SamplingParams

PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when movable type "
             "changed how books were made and who could read them. Before that, scribes copied every "
             "page by hand, which made books rare and expensive. ")

SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    PARAGRAPH + "In short, the press",
    "Q: What is 12 plus 30?\nA:",
    (PARAGRAPH * 3) + "Summarise the passage above in one sentence:",
    "Once upon a time",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smol_expected(hf_smollm2, smollm2_path):
    from engine.tokenizer import load_tokenizer
    tok = load_tokenizer("gguf", smollm2_path)
    ids = [tok.encode(p) for p in SMOL_PROMPTS]
    return ids, [hf_greedy(hf_smollm2, i, NEW_TOKENS) for i in ids]


def _params(n=NEW_TOKENS):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _submit_staggered(engine, prompts, params, every=2) -> dict[str, list[int]]:
    """Submit prompts a few at a time with engine steps in between (continuous batching)."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
        if i % every == every - 1:
            for _ in range(3):
                for o in engine.step():
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
    for rid, toks in run_to_completion(engine).items():
        out.setdefault(rid, []).extend(toks)
    return out


def _check(out, expected):
    for i, exp in enumerate(expected):
        assert out[f"r{i}"] == exp, f"prompt {i}: engine {out[f'r{i}']} != HF {exp}"


def test_smollm2_staggered_batch(make_engine, smol_expected):
    ids, expected = smol_expected
    engine = make_engine("smollm2")
    _check(_submit_staggered(engine, ids, _params()), expected)


def test_smollm2_chunked_prefill(make_engine, smol_expected):
    ids, expected = smol_expected
    # A 24-token budget splits every long prompt into chunks that straddle block edges,
    # and forces prefill chunks to share steps with decodes.
    engine = make_engine("smollm2", max_num_batched_tokens=24)
    _check(_submit_staggered(engine, ids, _params()), expected)
    assert max(len(i) for i in ids) > 24


def test_smollm2_prefix_cache_hits(make_engine, smol_expected):
    ids, expected = smol_expected
    engine = make_engine("smollm2")
    # First pass fills the prefix cache; the second pass must reuse it and agree.
    first = _submit_staggered(engine, ids, _params())
    _check(first, expected)
    cached = {}
    for i, p in enumerate(ids):
        seq = engine.add_request(f"again{i}", p, _params())
        cached[i] = seq
    out = run_to_completion(engine)
    for i, exp in enumerate(expected):
        assert out[f"again{i}"] == exp
    long_prompt = max(range(len(ids)), key=lambda i: len(ids[i]))
    assert cached[long_prompt].num_cached_tokens >= len(ids[long_prompt]) - 2 * engine.cfg.block_size
    assert cached[long_prompt].num_cached_tokens > 0


def test_smollm2_preemption_tiny_pool(make_engine, smol_expected):
    ids, expected = smol_expected
    # A pool that exactly fits the longest sequence cannot hold all six at once: the
    # scheduler must preempt (recompute) and still produce the same tokens.
    need = -(-(max(len(i) for i in ids) + NEW_TOKENS) // 16)
    engine = make_engine("smollm2", num_kv_blocks=need, block_size=16)
    out = run_to_completion_all(engine, ids, _params())
    _check(out, expected)
    assert engine.scheduler.num_preemptions > 0


def run_to_completion_all(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    return run_to_completion(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["staggered", "chunked", "prefix", "preempt"])
def test_random_models_match_hf(arch, mode, random_hf_models, make_engine):
    from transformers import AutoModelForCausalLM
    path = random_hf_models[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(7)
    lengths = [3, 17, 40, 64, 95, 130]
    if mode == "preempt":
        # Prompts just under a block boundary: every sequence needs a new block soon after
        # admission, so a pool that fits only the longest sequence must preempt.
        lengths = [31, 30, 29, 47, 15, 60]
    shared = torch.randint(3, 512, (48,), generator=gen).tolist()
    prompts = []
    for i, n in enumerate(lengths):
        tail = torch.randint(3, 512, (n,), generator=gen).tolist()
        prompts.append(shared + tail if (mode == "prefix" and i % 2) else tail)
    new_tokens = 12
    expected = [hf_greedy(hf, p, new_tokens) for p in prompts]
    kw = dict(dtype=torch.float64, block_size=16)
    if mode == "chunked":
        kw["max_num_batched_tokens"] = 20
    if mode == "preempt":
        kw["num_kv_blocks"] = -(-(max(map(len, prompts)) + new_tokens) // 16)  # fits the longest only
    engine = make_engine(path, **kw)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    if mode == "prefix":
        run_to_completion_all(engine, prompts[:2], params)  # warm the cache with the shared prefix
        run_to_completion(engine)
        engine.scheduler.waiting.clear()
        out = {}
        for i, p in enumerate(prompts):
            engine.add_request(f"p{i}", p, params)
        for rid, t in run_to_completion(engine).items():
            out["r" + rid[1:]] = t
        assert engine.blocks.num_cached_blocks > 0
    elif mode == "preempt":
        out = run_to_completion_all(engine, prompts, params)
        assert engine.scheduler.num_preemptions > 0
    else:
        out = _submit_staggered(engine, prompts, params)
    _check(out, expected)


def test_tokenizer_decode_equals_transformers(smollm2_path):
    """The engine decodes through the Rust tokenizer directly (engine/tokenizer.py): the text
    must be transformers' decode, special tokens, partial UTF-8 and all."""
    import random

    from engine.tokenizer import IncrementalDetokenizer, load_tokenizer
    tok = load_tokenizer("gguf", smollm2_path)
    assert tok._backend_decode is not None      # the direct path is the one under test
    rng = random.Random(0)
    specials = [i for i in (tok.hf.bos_token_id, tok.hf.eos_token_id, tok.hf.pad_token_id) if i is not None]
    text_ids = tok.encode("Straße, naïve café: 東京 🚀 -- done.\n  indented\tTab")
    cases = [text_ids, text_ids[:3], [], specials + text_ids + specials]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    for ids in cases:
        assert tok.decode(ids) == tok.hf.decode(ids, skip_special_tokens=True), ids
    # Streaming: the deltas add up to the whole decode.
    d = IncrementalDetokenizer(tok)
    streamed = "".join(d.step(text_ids[:n]) for n in range(1, len(text_ids) + 1))
    assert streamed == tok.hf.decode(text_ids, skip_special_tokens=True)
