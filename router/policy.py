"""Conditional disaggregation: where each request goes, and why.

Baseline rule (as in Dynamo; see docs/ARCHITECTURE.md, "A request's life"): prefill
remotely iff the prompt's uncached tokens on the chosen decode worker exceed a threshold
and the prefill pool is not saturated. The decision and its reason are returned so they
can be recorded per request.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PolicyConfig:
    disagg_threshold: int = 256          # uncached prompt tokens above which prefill goes remote
    max_prefill_queue_tokens: int = 65536  # per prefill worker: beyond it the pool is saturated
    load_penalty_tokens: int = 16        # cache overlap worth giving up per in-flight request


@dataclass
class WorkerLoad:
    worker_id: str
    inflight: int = 0
    queued_tokens: int = 0               # prefill workers: prompt tokens dispatched, not yet done
    overlap_blocks: int = 0              # decode workers: this prompt's cached leading blocks


@dataclass
class Decision:
    kind: str                            # "direct" | "disaggregated"
    reason: str
    decode_worker: str
    prefill_worker: str | None
    cached_tokens: int
    uncached_tokens: int


def decide(prompt_len: int, block_size: int, decode: list[WorkerLoad], prefill: list[WorkerLoad],
           cfg: PolicyConfig) -> Decision:
    if not decode:
        raise LookupError("no decode workers")
    # Decode worker: most cached prefix, traded against load.
    best = max(decode, key=lambda w: (w.overlap_blocks * block_size - cfg.load_penalty_tokens * w.inflight,
                                      -w.inflight))
    cached = min(best.overlap_blocks * block_size, prompt_len)
    uncached = prompt_len - cached

    def direct(reason: str) -> Decision:
        return Decision("direct", reason, best.worker_id, None, cached, uncached)

    if uncached <= cfg.disagg_threshold:
        return direct("cached_prefix" if cached and prompt_len > cfg.disagg_threshold else "short_prompt")
    if not prefill:
        return direct("no_prefill_workers")
    pw = min(prefill, key=lambda w: (w.queued_tokens, w.inflight))
    if pw.queued_tokens + uncached > cfg.max_prefill_queue_tokens:
        return direct("prefill_saturated")
    return Decision("disaggregated", "long_uncached_prompt", best.worker_id, pw.worker_id, cached, uncached)
