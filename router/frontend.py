"""What every client-facing protocol shares: prompt and sampling validation, the hand-over
to the Router (admission control, conditional disaggregation), the per-request metrics
clock, draining at shutdown, and aborting a request on every worker when its client goes
away. The gRPC service (router/server.py) and the OpenAI HTTP API (router/openai_api.py)
both build on it, so a request gets the same checks and the same route whichever door it
came through. No protocol code in here: errors are RequestError with a protocol-neutral
code that each front end maps to its own status."""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from planes.errors import InvalidRequestError
from planes.sampling_params import SamplingParams
from router.core import Overloaded, Router

MAX_MESSAGE_BYTES = 8 << 20
MAX_PROMPT_CHARS = 1 << 20
MAX_REQUEST_ID_BYTES = 256      # the contract's limit (UTF-8 bytes)
MAX_CACHE_SALT_BYTES = 64
MAX_CHAT_MESSAGES = 1024


@dataclass
class ServerLimits:
    """Per-request limits at the edge; a request over one gets INVALID_ARGUMENT (HTTP 400)
    naming the field. None: no limit beyond the model's context (max_model_len)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES     # gRPC message / HTTP body cap
    max_prompt_chars: int = MAX_PROMPT_CHARS       # checked before tokenizing
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None                  # sampling.max_tokens cap (unset max_tokens: capped too)
    max_concurrent_streams: int = 1024             # per HTTP/2 connection (gRPC)


class RequestError(Exception):
    """A request refused or failed. code: invalid_argument | overloaded (admission control:
    retry later) | resource_exhausted (it cannot fit a worker) | unavailable | already_exists
    | deadline_exceeded | unauthenticated | not_found | internal. param: the offending
    field, for protocols that report it separately (OpenAI's error.param)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def invalid(param: str, message: str) -> RequestError:
    """INVALID_ARGUMENT whose message starts with the field's name."""
    return RequestError("invalid_argument", f"{param}: {message}", param)


@dataclass
class SamplingFields:
    """Sampling as a client sent it (None: not given); each protocol fills it from its own
    request shape, and Frontend.sampling checks it the same way for all."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list | None = None
    stop_token_ids: list | None = None
    logprobs: bool = False
    ignore_eos: bool = False
    n: int | None = None


class Frontend:
    """The protocol-independent half of a client-facing server."""

    def __init__(self, router: Router, model_info: dict, tokenizer=None, metrics=None,
                 limits: ServerLimits | None = None):
        self.router, self.info, self.tokenizer = router, model_info, tokenizer
        self.limits = limits or ServerLimits()
        self.metrics = metrics     # router/metrics.RouterMetrics: TTFT/TPOT per request (optional)
        # Set when the server is shutting down: new requests are refused as unavailable,
        # those in flight finish (deploy/cluster.py Cluster.drain).
        self.draining = False

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer is not None and self.tokenizer.hf.chat_template)

    # ---- prompts ---------------------------------------------------------------------------------
    def text_ids(self, text: str, param: str = "prompt") -> list[int]:
        if not text:
            raise invalid(param, "text must not be empty")
        if len(text) > self.limits.max_prompt_chars:
            raise invalid(param, f"text longer than {self.limits.max_prompt_chars} chars")
        if self.tokenizer is None:
            raise invalid(param, "this model has no tokenizer; send token_ids")
        return self.tokenizer.encode(text)

    def chat_ids(self, messages: list[dict], param: str = "messages") -> list[int]:
        """messages: [{"role": ..., "content": str}], already checked for shape; the model's
        chat template turns them into the prompt (with the assistant's turn opened)."""
        if self.tokenizer is None:
            raise invalid(param, "this model has no tokenizer; send token_ids")
        if not messages:
            raise invalid(param, "must not be empty")
        if len(messages) > MAX_CHAT_MESSAGES:
            raise invalid(param, f"at most {MAX_CHAT_MESSAGES} messages")
        chars = sum(len(m["content"]) for m in messages)
        if chars > self.limits.max_prompt_chars:
            raise invalid(param, f"text longer than {self.limits.max_prompt_chars} chars")
        try:
            return self.tokenizer.apply_chat_template(messages)
        except ValueError as e:
            raise invalid("apply_chat_template" if param == "prompt" else param, str(e)) from None
        except Exception as e:   # a template that raises on these messages (e.g. jinja's raise_exception)
            raise invalid(param, f"the model's chat template refused them: {e}") from None

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise invalid(param, "must not be empty")
        vocab, max_len = self.info["vocab_size"], self.info["max_model_len"]
        bad = next((t for t in ids if t >= vocab or t < 0), None)
        if bad is not None:
            raise invalid(f"{param}_token_ids" if param == "prompt" else param, f"{bad} is not in [0, {vocab})")
        cap = self.limits.max_prompt_tokens
        if cap is not None and len(ids) > cap:
            raise invalid(param, f"{len(ids)} tokens; this server accepts at most {cap}")
        if len(ids) >= max_len:
            raise invalid(param, f"{len(ids)} tokens; the model's context is {max_len} tokens "
                                 "and at least one must be left to generate")
        return ids

    @staticmethod
    def check_cache_salt(salt: bytes, param: str = "cache_salt") -> bytes:
        if len(salt) > MAX_CACHE_SALT_BYTES:
            raise invalid(param, f"at most {MAX_CACHE_SALT_BYTES} bytes")
        return salt

    @staticmethod
    def check_request_id(rid: str, param: str = "request_id") -> str:
        if len(rid.encode()) > MAX_REQUEST_ID_BYTES:
            raise invalid(param, f"longer than {MAX_REQUEST_ID_BYTES} bytes")
        if not rid.isprintable():   # it goes into logs and traces verbatim
            raise invalid(param, "must not hold control characters")
        return rid

    # ---- sampling ----------------------------------------------------------------------------------
    def sampling(self, s: SamplingFields, prompt_len: int, prefix: str = "",
                 default_max_tokens: int | None = None) -> SamplingParams:
        """prefix: how this protocol names the sampling fields ("sampling." for gRPC).
        default_max_tokens: when the client gave none (None: up to the context edge)."""
        if s.n is not None and s.n != 1:
            raise invalid(f"{prefix}n", f"only n=1 is supported, got {s.n}")
        cap = self.limits.max_tokens
        if cap is not None and s.max_tokens is not None and s.max_tokens > cap:
            raise invalid(f"{prefix}max_tokens", f"at most {cap} on this server, got {s.max_tokens}")
        room = self.info["max_model_len"] - prompt_len
        if cap is not None:
            room = min(room, cap)
        max_tokens = s.max_tokens
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        if s.temperature is not None and not math.isfinite(s.temperature):
            raise invalid(f"{prefix}temperature", "must be a finite number")
        p = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if s.temperature is None else s.temperature,
            top_p=1.0 if s.top_p is None else s.top_p,
            top_k=-1 if s.top_k is None else s.top_k,
            seed=s.seed, stop=list(s.stop or []), stop_token_ids=list(s.stop_token_ids or []),
            logprobs=s.logprobs, ignore_eos=s.ignore_eos)
        try:
            p.validate(self.info["vocab_size"])
        except InvalidRequestError as e:
            raise RequestError("invalid_argument", f"{prefix}{e}", f"{prefix}{e.field}") from None
        if p.max_tokens > room:
            p.max_tokens = room  # generation stops at the context edge anyway ("length")
        return p

    # ---- running a request ---------------------------------------------------------------------------
    async def start(self, rid: str, ids: list[int], params: SamplingParams, cache_salt: bytes = b"",
                    deadline: float | None = None) -> "Generation":
        """Admit and dispatch (RequestError if refused). Iterate the result for its
        TokenItems; close() it when done (it aborts the request everywhere if unfinished)."""
        if self.draining:
            raise RequestError("unavailable", "server is shutting down")
        try:
            handle = await self.router.submit(rid, ids, params, cache_salt, deadline=deadline)
        except Overloaded as e:
            raise RequestError("overloaded", f"overloaded: {e}") from None
        except LookupError:
            raise RequestError("unavailable", "no decode worker is available") from None
        except KeyError:
            raise RequestError("already_exists", f"request_id: {rid!r} is already in flight", "request_id") from None
        timer = self.metrics.timer(handle.decision.kind) if self.metrics is not None else None
        return Generation(self.router, handle, timer)

    def new_request_id(self) -> str:
        return self.router.new_request_id()


class Generation:
    """One admitted request: `async for item in g` yields its TokenItems (the last has a
    finish_reason; a worker's error raises RequestError). `await g.close()` must follow,
    also when the client went away: an unfinished request is then aborted on every worker."""

    def __init__(self, router: Router, handle, timer=None):
        self.router, self.handle, self.timer = router, handle, timer
        self.rid = handle.rid
        self.finished = False
        self.started = time.monotonic()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self.handle.queue.get()
        if item.error is not None:
            self.finished = True
            raise RequestError(item.error_code or "internal", item.error)
        if item.finish_reason is not None:
            self.finished = True
        if self.timer is not None:
            self.timer.on_tokens(len(item.token_ids), self.finished)
        return item

    async def close(self) -> None:
        if self.finished:
            return
        self.finished = True
        # A task, shielded: close() often runs while the caller is being cancelled (a gRPC
        # cancel, an HTTP client that disconnected); the abort must reach the worker anyway.
        t = asyncio.ensure_future(self.router.abort(self.rid))
        await asyncio.shield(t)

    def route(self, item) -> dict:
        """Where the request ran, as known on its last item."""
        d, h = self.handle.decision, self.handle
        disagg = d.kind == "disaggregated" and not item.fallback
        return dict(kind="disaggregated" if disagg else "direct",
                    reason=d.reason if not item.fallback else f"fallback_{item.fallback}",
                    detail=f"uncached_tokens={d.uncached_tokens} threshold={self.router.cfg.policy.disagg_threshold}",
                    decode_worker=h.decode_worker or d.decode_worker, prefill_worker=d.prefill_worker or "")
