"""The engine: requests in, one scheduled forward per step(), token outputs out.

Knows nothing of Ray, gRPC or sockets; the offline LLM class and both worker pools
drive it through add_request / step / abort (and the remote-prefill calls)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager, KVEvent
from engine.config import EngineConfig
from engine.errors import CapacityError, InvalidRequestError
from engine.model import loader
from engine.model_runner import ModelRunner
from engine.overlap import PLACEHOLDER, LaunchedStep
from engine.runner_output import RunnerOutput
from engine.sampler import sample, sample_on_device
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence, SeqStatus
from engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    new_logprobs: list[float] = field(default_factory=list)


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    text: str = ""      # decoded output so far (cut at a stop string)
    emitted: int = 0    # chars of text already returned as deltas
    searched: int = 0   # chars of text already searched for stop strings


def resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: unknown {dtype!r}; one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    return device, dtype


class LLMEngine:
    def __init__(self, model: str = "smollm2", device=None, dtype=None,
                 config: EngineConfig | None = None, **overrides):
        cfg = config or EngineConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown engine option {k!r}")
            setattr(cfg, k, v)
        cfg.validate()
        self.cfg = cfg
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        source = loader.resolve(model)
        if source.kind == "hf":
            self.model_config = loader.hf_config(source.path)
            self.tokenizer = load_tokenizer("hf", source.path)
        elif source.kind == "gguf":
            self.model_config = loader.gguf_config(loader.open_gguf(source.path))
            self.tokenizer = load_tokenizer("gguf", source.path)
        else:
            self.model_config = loader.random_config(source.path)
            self.tokenizer = default_tokenizer_or_none()
        mc = self.model_config
        self.model_name = source.name
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.runner = ModelRunner(source, mc, cfg, self.device, self.dtype, self.max_model_len)
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.blocks)
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and source.kind != "random":
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self._seqs: dict[str, Sequence] = {}
        self._text: dict[str, _TextState] = {}
        self._arrivals = itertools.count()
        self.current_step: list = []   # this step's ScheduledSeqs, for on_layer_done callbacks
        self.spec = None               # speculative decoding (engine/spec_decode), off by default
        if cfg.speculative is not None:
            from engine.spec_decode import SpecDecoder
            self.spec = SpecDecoder(cfg, mc, self.runner.num_blocks, self.device, self.dtype, self.max_model_len)
        # Overlapped scheduling (engine/overlap.py). Auto: on with CUDA, where the device
        # runs a step while the host prepares the next; on CPU the host runs the forward
        # itself, so there is nothing to overlap. Speculative steps stay synchronous (the
        # proposer needs the tokens on the host before it can schedule a verify).
        want = cfg.async_scheduling if cfg.async_scheduling is not None else self.device.type == "cuda"
        self.overlap = bool(want) and self.spec is None
        self._launched: LaunchedStep | None = None   # the step on the device, outputs not processed

    # ---- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """InvalidRequestError naming the field if ids/params cannot be served here."""
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        V = self.model_config.vocab_size
        # The common case checked with C-level passes (a long prompt's per-token Python
        # checks are host time before its prefill starts); the slow loop only names the culprit.
        if not (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < V):
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                    raise InvalidRequestError("prompt_token_ids",
                                              f"token ids must be integers in [0, {V}), got {t!r}")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens; the model's context is {self.max_model_len} tokens "
                          "and at least one must be left to generate")
        params.validate(V)
        # A sequence that could never fit in the whole KV pool would preempt itself forever.
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        need = self.blocks.blocks_for(longest)
        if need > self.blocks.num_blocks:
            raise CapacityError(f"max_tokens: prompt + max_tokens needs {need} KV blocks; "
                                f"this worker has {self.blocks.num_blocks}")

    def _new_sequence(self, request_id: str, prompt, params: SamplingParams | None,
                      prefill_only: bool, cache_salt: bytes) -> Sequence:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if request_id in self._seqs:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        self.validate_prompt(ids, params)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, ids, len(ids), params, arrival=next(self._arrivals),
                       prefill_only=prefill_only, cache_salt=cache_salt, generator=gen)
        if self.tokenizer is not None and not prefill_only:
            self._text[request_id] = _TextState(IncrementalDetokenizer(self.tokenizer))
        self._seqs[request_id] = seq
        return seq

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    *, prefill_only: bool = False, cache_salt: bytes = b"") -> Sequence:
        """Queue a request. Raises InvalidRequestError / CapacityError before allocating."""
        seq = self._new_sequence(request_id, prompt, params, prefill_only, cache_salt)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if unknown."""
        seq = self._seqs.pop(request_id, None)
        self._text.pop(request_id, None)
        if self.spec is not None:
            self.spec.forget(request_id)
        if seq is None:
            return self.scheduler.release_held(request_id)
        if not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.ABORT)
        else:
            self.scheduler.release_held(request_id)
        if seq.in_flight:
            # A launched step still uses its blocks: wait for the device (at most one
            # step), so they are free when abort returns, as without overlap.
            self._settle_launched()
        return True

    def _settle_launched(self) -> None:
        """Wait for the launched step on the device; then every deferred free is safe. If
        none of its sequences is still unfinished, its outputs are not wanted: drop it."""
        launched = self._launched
        if launched is None:
            return
        launched.wait()
        self.scheduler.release_deferred()
        if not launched.live():
            self._launched = None
            self.scheduler.step_done([s.seq for s in launched.scheduled])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._launched is not None

    # ---- the step -------------------------------------------------------------------------------
    def step(self, on_layer_done=None) -> list[RequestOutput]:
        """Run one step; returns the outputs (at most one new token per request, several
        for an accepted speculative run) that became known. With overlapped scheduling
        these are the previous launch's: a request's outputs come in the same sequence as
        without overlap, one step() later."""
        self.current_step = []   # set once this step has scheduled (see step_request_ids)
        if self.overlap and on_layer_done is None:
            return self._step_overlapped()
        outputs = self._drain_launched()
        return outputs + self._step_sync(on_layer_done)

    # ---- overlapped steps (engine/overlap.py) --------------------------------------------------------
    def _step_overlapped(self) -> list[RequestOutput]:
        prev = self._launched
        scheduled = self.scheduler.schedule()
        if scheduled:
            self.current_step = scheduled
            self._launched = self._launch(scheduled, prev)
        else:
            self._launched = None
        outputs = self._process(prev) if prev is not None else []
        if self._launched is not None:
            # The new step's tokens are all known now (its inputs' placeholders were prev's):
            # register the blocks it fills, as a synchronous step would at its end.
            for s in self._launched.scheduled:
                if s.seq.status == SeqStatus.RUNNING:
                    self.scheduler.commit_full_blocks(s.seq)
        return outputs

    def _launch(self, scheduled, prev: LaunchedStep | None) -> LaunchedStep:
        """Queue the forward and sampling of `scheduled` on the device and advance the
        sequences as if their tokens were known (placeholders stand in for them)."""
        out = self.runner.execute(scheduled, None, prev)
        sampling = out.sampling
        tokens = logprobs = None
        if sampling:
            tokens, logprobs = sample_on_device(out.logits, [s.seq.params for s in sampling],
                                                [s.seq.generator for s in sampling], out.greedy_ids)
        # (Its blocks are committed once its placeholder inputs are known: _step_overlapped.)
        self._advance(scheduled, commit=False)
        for s in scheduled:
            s.seq.in_flight += 1
        positions, rows = [], {}
        for i, s in enumerate(sampling):
            seq = s.seq
            rows[id(seq)] = i
            positions.append(seq.num_tokens)
            seq.token_ids.append(PLACEHOLDER)
            # Set only here and never cleared: the placeholder that makes it certain is the
            # last one this sequence gets, and processing it finishes the sequence.
            p = seq.params
            seq.finishing = (seq.prefill_only or seq.num_output_tokens >= p.max_tokens
                             or seq.num_tokens >= self.max_model_len)
        return LaunchedStep.start(scheduled, sampling, positions, rows, tokens, logprobs, self.device)

    def _process(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Read back a launched step's tokens, put them in place of the placeholders and
        run the stop checks. Sequences finished (or aborted) meanwhile are skipped: what
        was computed for them past their end is discarded."""
        tokens, logprobs = launched.results()
        self.scheduler.step_done([s.seq for s in launched.scheduled])
        outputs = []
        for i, s in enumerate(launched.sampling):
            seq = s.seq
            if seq.is_finished:
                continue
            seq.token_ids[launched.positions[i]] = tokens[i]
            outputs.append(self._check_token(seq, launched.positions[i], logprobs[i] if logprobs else None))
        return outputs

    def _drain_launched(self) -> list[RequestOutput]:
        launched, self._launched = self._launched, None
        return self._process(launched) if launched is not None else []

    # ---- synchronous steps ------------------------------------------------------------------------------
    def _step_sync(self, on_layer_done=None) -> list[RequestOutput]:
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.current_step = scheduled
        out = self.runner.execute(scheduled, on_layer_done)
        if any(s.num_spec for s in out.sampling):
            return self._step_spec(scheduled, out)
        sampling = out.sampling
        tokens, logprobs = ([], None)
        if sampling:
            tokens, logprobs = sample(out.logits, [s.seq.params for s in sampling],
                                      [s.seq.generator for s in sampling], out.greedy_ids)
        self._advance(scheduled)
        outputs = []
        for i, s in enumerate(sampling):
            outputs.append(self._append_token(s.seq, tokens[i], logprobs[i] if logprobs else None))
        return outputs

    def _step_spec(self, scheduled, out: RunnerOutput) -> list[RequestOutput]:
        """A step with verify chunks: a verify entry owns 1 + num_spec logit rows; the rest
        are sampled as usual. Accepted drafts keep their KV, rejected ones are rolled back."""
        sampling, logits = out.sampling, out.logits
        plain = [i for i, s in enumerate(sampling) if not s.num_spec]
        tokens, logprobs = [], None
        if plain:
            tokens, logprobs = sample(logits[[out.first_rows[i] for i in plain]],
                                      [sampling[i].seq.params for i in plain],
                                      [sampling[i].seq.generator for i in plain])
        want_lp = any(s.seq.params.logprobs for s in sampling if s.num_spec)
        all_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
        # (A verify chunk's computed tokens are set by rollback_spec below.)
        self._advance([s for s in scheduled if not s.num_spec])
        outputs, j = [], 0
        for i, s in enumerate(sampling):
            seq = s.seq
            if not s.num_spec:
                outputs.append(self._append_token(seq, tokens[j], logprobs[j] if logprobs else None))
                j += 1
                continue
            emit = self.spec.verify(seq, s.num_spec, logits[out.rows(i)])
            lps = None
            if all_lp is not None and seq.params.logprobs:
                r = all_lp[out.first_rows[i]:out.first_rows[i] + len(emit)]
                lps = r.gather(-1, torch.tensor(emit, device=r.device)[:, None]).squeeze(-1).tolist()
            # The verified token and the accepted drafts have valid KV; the tokens go back
            # out of token_ids only to be appended (and stop-checked) one by one below.
            last = seq.num_tokens
            seq.token_ids.extend(emit[:-1])
            seq.spec_token_ids = []
            self.scheduler.rollback_spec(seq, seq.num_tokens)
            del seq.token_ids[last:]
            outputs.append(self._append_tokens(seq, emit, lps))
        return outputs

    def _advance(self, entries, commit: bool = True) -> None:
        """The entries' scheduled tokens are computed (or, overlapped, queued on the
        device): advance them and, unless told not to, register the blocks they filled
        with the prefix cache."""
        for s in entries:
            s.seq.num_computed_tokens += s.num_new_tokens
            if commit:
                self.scheduler.commit_full_blocks(s.seq)

    def _append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list[float] | None) -> RequestOutput:
        """Several tokens of one sequence in one step, as one output; stops at the first
        token that finishes it (later ones are dropped)."""
        outs = []
        for n, tok in enumerate(tokens):
            outs.append(self._append_token(seq, tok, logprobs[n] if logprobs else None))
            if outs[-1].finished:
                break
        out = outs[-1]
        if len(outs) > 1:
            out.new_token_ids = [t for o in outs for t in o.new_token_ids]
            out.text_delta = "".join(o.text_delta for o in outs)
            out.new_logprobs = [lp for o in outs for lp in o.new_logprobs]
        return out

    def _append_token(self, seq: Sequence, token: int, logprob: float | None) -> RequestOutput:
        seq.token_ids.append(token)
        return self._check_token(seq, seq.num_tokens - 1, logprob)

    def _check_token(self, seq: Sequence, index: int, logprob: float | None) -> RequestOutput:
        """The token at token_ids[index] is new: stop checks, text, the output. Anything
        after it is a placeholder of an overlapped step; if the token ends the sequence
        that goes (the step's result for it is discarded)."""
        token = seq.token_ids[index]
        num_tokens = index + 1
        num_output = num_tokens - seq.num_prompt_tokens
        if logprob is not None and seq.params.logprobs:
            seq.logprobs.append(logprob)
        p = seq.params
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = FinishReason.STOP
        elif num_output >= p.max_tokens or num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        elif seq.prefill_only:
            reason = FinishReason.LENGTH
        delta = ""
        ts = self._text.get(seq.seq_id)
        if ts is not None:
            ts.text += ts.detok.step(seq.token_ids[seq.num_prompt_tokens:num_tokens])
            if p.stop and self._truncate_at_stop(ts, p.stop):
                reason = FinishReason.STOP
            # With stop strings, hold back a tail that could still turn into one, so no
            # streamed text ever has to be taken back.
            hold = 0 if reason is not None or not p.stop else max(map(len, p.stop)) - 1
            upto = max(ts.emitted, len(ts.text) - hold)
            delta, ts.emitted = ts.text[ts.emitted:upto], upto
        if reason is not None:
            del seq.token_ids[num_tokens:]
            self.scheduler.finish(seq, reason)
            if self.spec is not None:
                self.spec.forget(seq.seq_id)
            if not seq.prefill_only:
                self._seqs.pop(seq.seq_id, None)
                self._text.pop(seq.seq_id, None)
        return RequestOutput(seq.seq_id, [token], delta, reason is not None,
                             reason.value if reason else None, seq.num_prompt_tokens,
                             seq.num_cached_tokens, num_output,
                             [logprob] if (logprob is not None and p.logprobs) else [])

    @staticmethod
    def _truncate_at_stop(ts: "_TextState", stops: list[str]) -> bool:
        """Cut the text at the earliest stop string (which is not part of the output).
        Only the part that could hold a new match is searched."""
        start = max(0, ts.searched - max(map(len, stops)) + 1)
        hits = [i for i in (ts.text.find(s, start) for s in stops) if i != -1]
        ts.searched = len(ts.text)
        if not hits:
            return False
        ts.text = ts.text[:min(hits)]
        return True

    # ---- disaggregation -------------------------------------------------------------------------------
    def add_remote_prefill(self, request_id: str, prompt: str | list[int],
                           params: SamplingParams | None = None, cache_salt: bytes = b"") -> Sequence | None:
        """Decode pool: reserve blocks for a prompt whose KV will be written from elsewhere.
        Returns the sequence (its block_table and num_computed_tokens say which blocks the
        sender must fill), or None if the blocks are not available now."""
        seq = self._new_sequence(request_id, prompt, params, False, cache_salt)
        if not self.scheduler.reserve_for_remote(seq):
            del self._seqs[request_id]
            self._text.pop(request_id, None)
            return None
        return seq

    def remote_kv_landed(self, request_id: str, first_token: int) -> RequestOutput:
        seq = self.scheduler.remote_kv_landed(request_id)
        return self._append_token(seq, first_token, None)

    def remote_kv_failed(self, request_id: str) -> None:
        self.scheduler.remote_kv_failed(request_id)

    def release(self, request_id: str) -> bool:
        """Prefill pool: the KV of a finished prefill-only request has been shipped."""
        self._seqs.pop(request_id, None)
        return self.scheduler.release_held(request_id)

    # ---- introspection --------------------------------------------------------------------------------
    # What the workers read of the engine: these, never the scheduler or runner directly.
    def step_request_ids(self) -> list[str]:
        """The requests the current (or last) step scheduled; empty if it failed before."""
        return [s.seq.seq_id for s in self.current_step]

    def step_finishing_prompts(self) -> list[tuple[str, list[int]]]:
        """During a step (e.g. from on_layer_done): the requests whose prompt this step
        completes (they sample), with their block tables, whose KV the layer just wrote."""
        return [(s.seq.seq_id, s.seq.block_table) for s in self.current_step if s.samples]

    def unfinished_request_ids(self) -> list[str]:
        sch = self.scheduler
        return [s.seq_id for s in list(sch.running) + list(sch.waiting)]

    def queue_stats(self) -> dict:
        """Running / waiting / awaiting-KV sequences and the prompt tokens not computed yet."""
        sch = self.scheduler
        return dict(running=len(sch.running), waiting=len(sch.waiting), awaiting_kv=len(sch.awaiting_kv),
                    queued_prompt_tokens=sum(s.num_tokens - s.num_computed_tokens
                                             for s in list(sch.waiting) + list(sch.running)))

    @property
    def kv_cache(self):
        """The whole paged KV cache: [layer, k/v, block, slot, kv_head, head_dim]."""
        return self.runner.kv_cache

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return self.blocks.blocks_for(num_tokens)

    def write_kv_blocks(self, layer: int, block_ids: list[int], data) -> None:
        """Write KV that arrived from elsewhere ([2, len(block_ids), ...]) into blocks of one layer."""
        self.runner.write_kv_blocks(layer, block_ids, data)

    def take_kv_events(self) -> list[KVEvent]:
        return self.blocks.take_events()

    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def stats(self) -> dict:
        return dict(num_blocks=self.blocks.num_blocks, num_free_blocks=self.blocks.num_free_blocks,
                    num_cached_blocks=self.blocks.num_cached_blocks, num_running=len(self.scheduler.running),
                    num_waiting=len(self.scheduler.waiting), num_awaiting_kv=len(self.scheduler.awaiting_kv),
                    num_preemptions=self.scheduler.num_preemptions,
                    **({} if self.spec is None else dict(
                        spec_num_proposed=self.spec.stats.num_proposed,
                        spec_num_accepted=self.spec.stats.num_accepted,
                        spec_num_verify=self.spec.stats.num_verify)))


def default_tokenizer_or_none() -> Tokenizer | None:
    """Random-weight models borrow SmolLM2's tokenizer (all its ids are in range for every
    named shape) when it is installed, so text prompts work in benchmarks."""
    try:
        return load_tokenizer("gguf", loader.smollm2_gguf_path())
    except Exception:
        return None
