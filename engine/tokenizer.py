"""Tokenizer wrapper over HF tokenizers (from an HF folder or a GGUF file's metadata),
plus incremental detokenization for streaming text deltas and stop strings."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from engine.errors import ModelLoadError


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        # Streaming decodes twice per generated token (IncrementalDetokenizer), on the step's
        # critical path. transformers' fast tokenizer decode is the Rust tokenizer's own decode
        # plus ~15 us of Python around it (argument conversion, optional space clean-up):
        # half of the engine step's host time at batch 32 on a small model. Call the Rust
        # decode directly where that wrapper would not change the text (no clean-up).
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        direct = (getattr(hf_tokenizer, "is_fast", False) and backend is not None
                  and not getattr(hf_tokenizer, "clean_up_tokenization_spaces", True))
        self._backend_decode = backend.decode if direct else None

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=True)
        return self.hf.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("chat: this model's tokenizer has no chat template")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.hf.encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=8)
def load_tokenizer(kind: str, path: str) -> Tokenizer | None:
    """kind: "hf" (folder) or "gguf" (file). Returns None for an HF folder without one."""
    import logging

    from transformers import AutoTokenizer
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if kind == "gguf":
            folder, name = os.path.split(os.path.abspath(path))
            return Tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
        if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return None
        return Tokenizer(AutoTokenizer.from_pretrained(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer from {path!r}: {e}") from e


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-emitting text.

    Decodes a short window (from `prefix_offset`) so multi-token characters and
    merges that change earlier text are handled; a trailing U+FFFD means the last token
    ends mid-character, so its text is held back until the next token completes it."""
    tokenizer: Tokenizer
    prefix_offset: int = 0
    read_offset: int = 0

    def step(self, ids: list[int]) -> str:
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return full[len(prefix):]
        return ""
