"""Timing engine steps of chosen shapes through the engine's public interface.

Each measurement drives the engine into a steady run of identical steps and times the
interval between consecutive step() calls (median over `repeats`, after `warmup`):
  - prefill (new N, cached C): one request per step, its prompt a cached prefix of C tokens
    plus N fresh ones, max_tokens=1, added just before each step() call, so every step
    prefills exactly one chunk (a request that has sampled its only token is never
    scheduled again);
  - decode (batch B at context ~L): B running requests with prompts of L fresh tokens;
    batches are measured largest first and shrunk by aborting requests, so one set of
    prefills serves every B at that L;
  - mixed: the same decode batch plus one prefill request of N fresh tokens per step.
Long steps need fewer repeats: warm-up ends early after a step longer than LONG_STEP_S, and
the timed steps of a point stop after `max_point_s` once MIN_TIMED are in.
The interval between back-to-back step() calls is what a serving engine's step costs: with
overlapped scheduling (on a GPU) step() launches step n+1 and then waits for step n, so the
interval is max(host, device) as in serving, not their sum; a synchronous engine's step()
returns after its step, so the interval is that step. A CUDA engine is synchronized before
each timed run starts and after it ends.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine import SamplingParams
from planner.profile_format import step_entry

FIRST_TOKEN_ID = 3   # ids below are special in the named random shapes (bos, eos)
LONG_STEP_S = 0.5    # a step this long is warm: whatever was compiled or allocated is done
MIN_TIMED = 3        # the fewest timed steps a point's median is taken over


@dataclass
class DecodeSet:
    """Requests decoding side by side, with what is known of their lengths."""
    prompt_len: int
    rids: list[str]
    outputs: dict[str, int]   # rid -> output tokens reported so far


class StepProbe:
    def __init__(self, engine, warmup: int, repeats: int, seed: int = 0, max_point_s: float = float("inf")):
        self.engine = engine
        self.warmup, self.repeats = int(warmup), int(repeats)
        self.max_point_s = float(max_point_s)
        self.rng = np.random.default_rng(seed)
        self.vocab = engine.model_config.vocab_size
        self.cuda = engine.device.type == "cuda"
        self.lag = 1 if engine.overlap else 0   # outputs arrive one step() late with overlap
        self._ids = 0
        self.last_calls = 0   # step() calls of the last timed run
        self._prefixes: dict[int, list[int]] = {}   # cached length -> a prefix computed earlier

    # ---- helpers ------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.engine.device)

    def fresh(self, n: int) -> list[int]:
        """n random token ids: a prompt no earlier one shares blocks with."""
        return self.rng.integers(FIRST_TOKEN_ID, self.vocab, size=n).tolist()

    def rid(self, tag: str) -> str:
        self._ids += 1
        return f"profile-{tag}-{self._ids}"

    def drain(self) -> list:
        outs = []
        while self.engine.has_unfinished():
            outs += self.engine.step()
        return outs

    def _timed(self, n_steps: int, before_step=None, on_outputs=None) -> list[float]:
        """Intervals between consecutive step() calls, past the warm-up; at most n_steps
        calls (fewer for long steps, see the module docstring)."""
        self.sync()
        prev = time.perf_counter()
        times: list[float] = []
        warm_left = self.warmup
        for i in range(n_steps):
            if before_step is not None:
                before_step(i)
            outs = self.engine.step()
            now = time.perf_counter()
            dt, prev = now - prev, now
            if on_outputs is not None:
                on_outputs(outs)
            if warm_left > 0:
                warm_left -= 1
                # With overlap the first interval is only a launch: it says nothing.
                if dt > LONG_STEP_S and (i > 0 or not self.engine.overlap):
                    warm_left = 0
                continue
            times.append(dt)
            if len(times) >= self.repeats or (len(times) >= MIN_TIMED and sum(times) >= self.max_point_s):
                break
        self.sync()
        self.last_calls = i + 1 if n_steps else 0
        return times

    def _mid_offset(self, timed: int) -> float:
        """How many tokens a decoding request has gained, on average over the timed steps of
        the last run, since it started (call j of a run attends to j more tokens)."""
        return self.last_calls - (timed + 1) / 2

    # ---- prefill --------------------------------------------------------------------------------
    def warm_prefix(self, cached: int) -> list[int]:
        """A prefix of `cached` tokens (whole blocks), computed once so that later prompts
        starting with it find it in the prefix cache."""
        if cached == 0:
            return []
        prefix = self.fresh(cached)
        self.engine.add_request(self.rid("prefix"), prefix + self.fresh(1),
                                SamplingParams(max_tokens=1, ignore_eos=True))
        self.drain()
        return prefix

    def has_prefix(self, cached: int) -> bool:
        """A prefix of this length was computed for an earlier point (and not seen evicted)."""
        return cached in self._prefixes

    def prefill(self, new: int, cached: int) -> dict:
        prefix = self._prefixes.get(cached)
        if prefix is None:
            prefix = self._prefixes[cached] = self.warm_prefix(cached)
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        hits = []

        def add(i):
            self.engine.add_request(self.rid("prefill"), prefix + self.fresh(new), params)

        def seen(outs):
            hits.extend(o.num_cached_tokens for o in outs if o.finished)

        times = self._timed(self.warmup + self.repeats, add, seen)
        seen(self.drain())
        # The cache hit is what the engine reports (a prefix evicted meanwhile counts less).
        got = min(hits) if hits else cached
        if got < cached:   # evicted meanwhile: compute it again for the next point
            del self._prefixes[cached]
        total = cached + new
        return step_entry([(total - got, got)], [], statistics.median(times), "prefill")

    # ---- decode and mixed ------------------------------------------------------------------------
    def start_decodes(self, batch: int, prompt_len: int, max_tokens: int) -> DecodeSet:
        """`batch` requests of `prompt_len` fresh tokens, run until every one decodes."""
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        ds = DecodeSet(prompt_len, [], {})
        for _ in range(batch):
            rid = self.rid("decode")
            self.engine.add_request(rid, self.fresh(prompt_len), params)
            ds.rids.append(rid)
            ds.outputs[rid] = 0
        # Bound the prefill phase: a pool too small for the batch would preempt forever.
        limit = 4 * (batch * prompt_len // self.engine.cfg.max_num_batched_tokens + batch) + 64
        for _ in range(limit):
            self._record(ds, self.engine.step())
            q = self.engine.queue_stats()
            # Every prompt computed: each running request has one token left to compute
            # (its last sampled one), and none waits.
            if q["waiting"] == 0 and q["running"] == batch and q["queued_prompt_tokens"] == batch \
                    and all(n > 0 for n in ds.outputs.values()):
                return ds
        raise RuntimeError(f"{batch} requests of {prompt_len} tokens did not all reach decoding in {limit} steps "
                           f"(KV pool of {self.engine.num_blocks} blocks too small?)")

    @staticmethod
    def _record(ds: DecodeSet, outs) -> None:
        for o in outs:
            if o.request_id in ds.outputs:
                ds.outputs[o.request_id] = o.num_output_tokens

    def _contexts_now(self, ds: DecodeSet) -> list[int]:
        """Tokens each request attends to in the next step (prompt + outputs, the one being
        computed included; with overlap, one more output is in flight)."""
        return [ds.prompt_len + ds.outputs[r] + self.lag for r in ds.rids]

    def shrink(self, ds: DecodeSet, batch: int) -> None:
        for rid in ds.rids[batch:]:
            self.engine.abort(rid)
            del ds.outputs[rid]
        del ds.rids[batch:]

    def decode(self, ds: DecodeSet) -> dict:
        ctx0 = self._contexts_now(ds)
        times = self._timed(self.warmup + self.repeats, on_outputs=lambda outs: self._record(ds, outs))
        mid = self._mid_offset(len(times))
        ctx = [round(c + mid) for c in ctx0]
        return step_entry([], ctx, statistics.median(times), "decode")

    def mixed(self, ds: DecodeSet, new: int) -> dict:
        ctx0 = self._contexts_now(ds)
        params = SamplingParams(max_tokens=1, ignore_eos=True)

        def add(i):
            self.engine.add_request(self.rid("mixed"), self.fresh(new), params)

        times = self._timed(self.warmup + self.repeats, add, lambda outs: self._record(ds, outs))
        mid = self._mid_offset(len(times))
        ctx = [round(c + mid) for c in ctx0]
        return step_entry([(new, 0)], ctx, statistics.median(times), "mixed")

    def finish(self, ds: DecodeSet) -> None:
        for rid in ds.rids:
            self.engine.abort(rid)
        ds.rids.clear()
        self.drain()
