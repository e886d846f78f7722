"""Shared fixtures only: engines that are checked for leaked KV blocks after every test,
and Hugging Face reference models (the correctness oracle). Helpers live in helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_no_leaks, save_random_hf

torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def random_hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: save_random_hf(str(root), k) for k in ("llama", "qwen2")}
