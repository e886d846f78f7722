"""One request's state inside the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"                # queued for (re)prefill
    RUNNING = "running"                # holds blocks, scheduled every step
    WAITING_FOR_KV = "waiting_for_kv"  # blocks reserved; KV is being sent from a prefill worker
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # eos, stop token or stop string
    LENGTH = "length"    # max_tokens or the model's context
    ABORT = "abort"


@dataclass
class Sequence:
    seq_id: str
    token_ids: list[int]                 # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int = 0                     # admission order tie-breaker
    prefill_only: bool = False           # prefill pool: stop after the first token, keep KV
    cache_salt: bytes = b""
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0         # tokens whose KV is in the cache
    num_cached_tokens: int = 0           # of the prompt, served by the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of registered full blocks
    finish_reason: FinishReason | None = None
    logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    # Draft tokens proposed for this step (speculative decoding); never part of token_ids:
    # the verify step keeps the accepted ones by appending them like sampled tokens.
    spec_token_ids: list[int] = field(default_factory=list)
    # Overlapped scheduling (engine/overlap.py): how many launched steps that include this
    # sequence have not had their outputs processed yet (its blocks must outlive them), and
    # whether the token being sampled for it is certain to end it (max_tokens, the context,
    # prefill-only), so it is not scheduled again meanwhile.
    in_flight: int = 0
    finishing: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED
