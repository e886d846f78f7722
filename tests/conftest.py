"""Shared fixtures: engines that are checked for leaked KV blocks after every test, and
Hugging Face reference models (the correctness oracle)."""
from __future__ import annotations

import os

import pytest
import torch

torch.manual_seed(0)


def assert_no_leaks(engine) -> None:
    """Every block that is not a cached prefix is free once no request is in flight."""
    sch = engine.scheduler
    assert not sch.running and not sch.waiting and not sch.awaiting_kv and not sch.held, "requests left in flight"
    engine.blocks.check_invariants()
    in_use = [b for b in range(engine.blocks.num_blocks) if engine.blocks.ref_count[b] != 0]
    assert not in_use, f"{len(in_use)} KV blocks still referenced"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.fixture
def make_engine():
    """LLMEngine factory; every engine it made is checked for leaks when the test ends."""
    from engine import LLMEngine
    made = []

    def make(model="smollm2", **kw):
        e = LLMEngine(model, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        assert_no_leaks(e)


def run_to_completion(engine, max_steps=100_000) -> dict[str, list[int]]:
    """Step until idle; returns request id -> generated token ids."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("engine did not finish")


@pytest.fixture(scope="session")
def smollm2_path():
    from engine.model.loader import smollm2_gguf_path
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loading (dequantize + un-permute), independent of engine/."""
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: bool = False) -> list[int]:
    """Unpadded single-sequence greedy decode with transformers (the oracle)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=0 if eos else max_new_tokens, do_sample=False,
                         eos_token_id=model.config.eos_token_id if eos else None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def _save_random_hf(tmp_root, kind: str) -> str:
    """A small random HF checkpoint (config.json + safetensors) in float64, so greedy ties
    between implementations are practically impossible."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1234)
    if kind == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, rope_theta=1e6, use_sliding_window=False)
        model = Qwen2ForCausalLM(cfg)
    # Larger weights than the default init make the logits peaked, like a trained model's.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
    path = os.path.join(tmp_root, kind)
    model.to(torch.float64).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def random_hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: _save_random_hf(str(root), k) for k in ("llama", "qwen2")}
