"""Per-request sampling parameters, validated before anything is allocated.

Plain data with no engine dependency: the router builds and checks them, the request plane
carries them (planes/messages.py), the engine samples with them (re-exported as
``engine.SamplingParams`` and ``engine.sampling_params.SamplingParams``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from planes.errors import InvalidRequestError

# Bounds that keep one request from asking for unbounded work or memory.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# Temperatures below this sample greedily (SamplingParams.greedy).
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        # Below MIN_SAMPLING_TEMPERATURE the distribution is argmax to fp32 precision, and
        # logits / temperature would overflow (or the temperature round to 0) in fp32.
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field and its limit."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequestError("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise InvalidRequestError("temperature", f"must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise InvalidRequestError("top_k", f"must be an integer, got {self.top_k!r}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not (0 <= self.seed < 2**63)):
            raise InvalidRequestError("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError("stop", f"stop strings are limited to {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise InvalidRequestError("stop_token_ids", f"ids must be integers in [0, {vocab_size}), got {t!r}")
