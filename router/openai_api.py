"""The OpenAI-compatible HTTP API (an ASGI app on Starlette): POST /v1/completions and
/v1/chat/completions (JSON or server-sent events), GET /v1/models and GET /health.

It is a translation layer only: every request goes through router/frontend.py, the same
validation, admission control, metrics, conditional disaggregation and abort path as the
gRPC service. Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}})
with the HTTP status a client expects: 400 naming the field for bad input (never 500),
401 without a valid API key, 404 for another model, 429 when admission control refuses
(retry later), 503 while no worker can serve or the server drains.

Parameters: model, prompt (one string or one list of token ids) / messages (the model's
chat template is applied here), max_tokens / max_completion_tokens, temperature, top_p,
seed, stop, n (1 only), stream, stream_options.include_usage, logprobs (the sampled
token's log-probability: the engine keeps no top alternatives, so completions take
logprobs=0 and chat logprobs=true with top_logprobs 0), and the extra fields cache_salt
(the tenant's prefix-cache salt, as vLLM names it), top_k, ignore_eos, stop_token_ids.
Fields OpenAI defines that would change the output but are not implemented (penalties,
logit_bias, tools, best_of, echo, suffix, response_format other than text) are refused
unless they carry their neutral value; unknown fields are refused, like gRPC's."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from router.frontend import Frontend, RequestError, SamplingFields, ServerLimits, invalid

log = logging.getLogger(__name__)

# RequestError code -> (HTTP status, OpenAI error type)
_STATUS = {
    "invalid_argument": (400, "invalid_request_error"),
    # a request that can never fit a worker's KV pool: retrying does not help
    "resource_exhausted": (400, "invalid_request_error"),
    "unauthenticated": (401, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "already_exists": (409, "invalid_request_error"),
    "payload_too_large": (413, "invalid_request_error"),
    "overloaded": (429, "rate_limit_exceeded"),
    "unavailable": (503, "service_unavailable"),
    "deadline_exceeded": (504, "timeout"),
    "internal": (500, "internal_error"),
}

# Fields a client may send that change nothing here (bookkeeping on OpenAI's side).
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Fields accepted only with their neutral value (what they would change is not implemented).
_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
            "echo": (False,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
            "function_call": ("none",)}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
             "logprobs", "cache_salt", "top_k", "ignore_eos", "stop_token_ids"}
_COMPLETION_FIELDS = _SAMPLING | {"prompt"}
_CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {"stop": "stop", "length": "length", "abort": "stop"}
# OpenAI's default for /v1/completions when max_tokens is absent (chat: up to the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class _ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


def error_response(e: RequestError) -> JSONResponse:
    status, kind = _STATUS.get(e.code, (500, "internal_error"))
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# ---- field readers: each names the field in its error -------------------------------------------------
def _int(body: dict, key: str, lo: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(key, f"expected an integer, got {v!r:.40}")
    if lo is not None and v < lo:
        raise invalid(key, f"must be >= {lo}, got {v}")
    return v


def _num(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(key, f"expected a number, got {v!r:.40}")
    return float(v)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(key, f"expected true or false, got {v!r:.40}")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid("stop", "expected a string or a list of strings")
    return v


def _check_fields(body: dict, known: set[str]) -> None:
    for key, value in body.items():
        if key in _IGNORED:
            continue
        if key in _NEUTRAL:
            if value is not None and value not in _NEUTRAL[key]:
                raise invalid(key, "not supported by this server (only its default value is accepted)")
            continue
        if key not in known:
            raise invalid(str(key)[:64], "unknown field")


class OpenAIAPI:
    """get_frontend: returns the current router/frontend.Frontend (the gRPC service; it is
    replaced when the router restarts) or None while none serves. api_keys:
    router/auth.APIKeys (None: no authentication)."""

    def __init__(self, get_frontend, model_name: str, *, api_keys=None, limits: ServerLimits | None = None):
        self.get_frontend, self.model_name, self.api_keys = get_frontend, model_name, api_keys
        self.limits = limits or ServerLimits()
        self.created = int(time.time())
        self.rejected = 0
        self._last_log = 0.0

    def app(self) -> Starlette:
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                            Exception: self._internal_error})

    # ---- plumbing -------------------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "invalid_argument"}.get(exc.status_code, "invalid_argument")
        resp = error_response(RequestError(code, f"{request.method} {request.url.path}: {exc.detail}"))
        resp.status_code = exc.status_code
        return resp

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("openai api: %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(RequestError("internal", "internal server error"))

    def _authorize(self, request: Request) -> None:
        if self.api_keys is None:
            return
        header = request.headers.get("authorization")
        token = None
        if header:
            scheme, _, rest = header.strip().partition(" ")
            token = rest.strip() if scheme.lower() == "bearer" else None
        if self.api_keys.check(token):
            return
        self.rejected += 1
        now = time.monotonic()
        if now - self._last_log > 10.0:   # a flood of bad keys must not flood the log
            self._last_log = now
            log.warning("openai api: unauthenticated request to %s refused (%d so far)", request.url.path,
                        self.rejected)
        why = "missing API key" if token is None else "invalid API key"
        raise RequestError("unauthenticated", f"authorization: {why} (send the header 'Authorization: Bearer <key>')")

    def _frontend(self) -> Frontend:
        fe = self.get_frontend()
        if fe is None:
            raise RequestError("unavailable", "the server is starting")
        return fe

    async def _json_body(self, request: Request) -> dict:
        cap = self.limits.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise RequestError("payload_too_large", f"request body: larger than {cap} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():   # bounded before it is held in memory
            size += len(chunk)
            if size > cap:
                raise RequestError("payload_too_large", f"request body: larger than {cap} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise RequestError("invalid_argument", f"request body: not valid JSON ({str(e)[:120]})") from None
        if not isinstance(body, dict):
            raise RequestError("invalid_argument", "request body: expected a JSON object")
        return body

    def _model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return
        if not isinstance(model, str):
            raise invalid("model", "expected a string")
        if model != self.model_name:
            raise RequestError("not_found", f"model: {model[:200]!r} is not served here; "
                                            f"this server serves {self.model_name!r}", "model")

    # ---- endpoints ----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        fe = self.get_frontend()
        if fe is None or fe.draining:
            return JSONResponse({"status": "draining" if fe is not None else "starting"}, status_code=503)
        if not any(not w.draining for w in fe.router.decode.values()):
            return JSONResponse({"status": "no decode worker"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except RequestError as e:
            return error_response(e)
        fe = self.get_frontend()
        entry = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pdserve"}
        if fe is not None:
            entry["max_model_len"] = fe.info["max_model_len"]
        return JSONResponse({"object": "list", "data": [entry]})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        try:
            self._authorize(request)
            body = await self._json_body(request)
            fe = self._frontend()
            spec = self._parse(fe, body, chat)
            gen = await fe.start(spec.rid, spec.ids, spec.params, spec.cache_salt)
        except RequestError as e:
            return error_response(e)
        try:
            if spec.stream:
                # Wait for the first item before answering: an error that comes back at once
                # (e.g. the prompt cannot fit a worker) still gets its own HTTP status.
                first = await _unless_disconnected(request, gen.__anext__())
                return _Stream(self._chunks(fe, gen, spec, first), gen)
            return JSONResponse(await _unless_disconnected(request, self._collect(fe, gen, spec)))
        except StopAsyncIteration:
            return error_response(RequestError("internal", "the request ended without an answer"))
        except RequestError as e:
            await gen.close()
            return error_response(e)
        except _ClientGone:
            await gen.close()
            return Response(status_code=499)   # nobody reads it
        except BaseException:
            await gen.close()
            raise

    # ---- request -> frontend ------------------------------------------------------------------------------
    def _parse(self, fe: Frontend, body: dict, chat: bool) -> "_Spec":
        _check_fields(body, _CHAT_FIELDS if chat else _COMPLETION_FIELDS)
        self._model(body)
        stream = _bool(body, "stream")
        opts = body.get("stream_options")
        include_usage = False
        if opts is not None:
            if not stream:
                raise invalid("stream_options", "only allowed when stream is true")
            if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
                raise invalid("stream_options", "expected {\"include_usage\": true|false}")
            include_usage = _bool(opts, "include_usage")
        if chat:
            ids = fe.check_ids(fe.chat_ids(_messages(body.get("messages"))), "messages")
            fmt = body.get("response_format")
            if fmt is not None and fmt != {"type": "text"}:
                raise invalid("response_format", "only {\"type\": \"text\"} is supported")
            logprobs = _bool(body, "logprobs")
            top = _int(body, "top_logprobs", 0)
            if top:
                raise invalid("top_logprobs", "top alternatives are not available; this server returns the "
                                              "sampled token's logprob only (top_logprobs=0)")
            if top is not None and not logprobs:
                raise invalid("top_logprobs", "needs logprobs: true")
            max_tokens = _int(body, "max_completion_tokens")
            if max_tokens is None:
                max_tokens = _int(body, "max_tokens")
                param = "max_tokens"
            else:
                param = "max_completion_tokens"
        else:
            ids = fe.check_ids(_prompt(fe, body.get("prompt")), "prompt")
            n_logprobs = _int(body, "logprobs", 0)
            if n_logprobs:
                raise invalid("logprobs", "top alternatives are not available; this server returns the "
                                          "sampled token's logprob only (logprobs=0)")
            logprobs = n_logprobs is not None
            max_tokens, param = _int(body, "max_tokens"), "max_tokens"
        salt = body.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise invalid("cache_salt", "expected a string")
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and (not isinstance(stop_ids, list) or
                                     not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
            raise invalid("stop_token_ids", "expected a list of integers")
        fields = SamplingFields(max_tokens=max_tokens, temperature=_num(body, "temperature"),
                                top_p=_num(body, "top_p"), top_k=_int(body, "top_k"), seed=_int(body, "seed"),
                                stop=_stop(body), stop_token_ids=stop_ids, logprobs=logprobs,
                                ignore_eos=_bool(body, "ignore_eos"), n=_int(body, "n"))
        try:
            params = fe.sampling(fields, len(ids), default_max_tokens=None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS)
        except RequestError as e:
            if e.param == "max_tokens" and param != "max_tokens":   # name the field the client sent
                raise invalid(param, e.message.partition(": ")[2]) from None
            raise
        return _Spec(rid=fe.new_request_id(), ids=ids, params=params, stream=stream, chat=chat,
                     include_usage=include_usage, logprobs=logprobs,
                     cache_salt=fe.check_cache_salt((salt or "").encode()))

    # ---- frontend -> response -------------------------------------------------------------------------------
    def _head(self, spec: "_Spec", chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if spec.chat else "text_completion"
        return {"id": f"{'chatcmpl' if spec.chat else 'cmpl'}-{spec.rid}", "object": kind,
                "created": spec.created, "model": self.model_name}

    @staticmethod
    def _usage(item) -> dict:
        return {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                "total_tokens": item.prompt_tokens + item.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": item.cached_tokens}}

    def _logprobs(self, fe: Frontend, spec: "_Spec", items: list, offset: int = 0):
        """The sampled tokens' log-probabilities in the endpoint's shape; offset: characters
        of text before these tokens (completions' text_offset)."""
        if not spec.logprobs:
            return None
        ids = [t for it in items for t in it.token_ids]
        lps = [lp for it in items for lp in it.logprobs]
        tokens = [fe.tokenizer.decode([t]) if fe.tokenizer is not None else str(t) for t in ids]
        if spec.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                                for s, lp in zip(tokens, lps)]}
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}

    async def _collect(self, fe: Frontend, gen, spec: "_Spec") -> dict:
        items = [item async for item in gen]
        last = items[-1]
        text = "".join(it.text for it in items)
        choice = {"index": 0, "logprobs": self._logprobs(fe, spec, items),
                  "finish_reason": _FINISH.get(last.finish_reason, "stop")}
        if spec.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(spec, False), "choices": [choice], "usage": self._usage(last)}

    async def _chunks(self, fe: Frontend, gen, spec: "_Spec", first):
        """Server-sent events: one chunk per token batch, the finish reason on the last one,
        then the usage chunk if asked for, then [DONE]. A failure after the first byte is
        sent as an error event (the status line is gone by then)."""
        head = self._head(spec, True)
        usage = {"usage": None} if spec.include_usage else {}
        offset = 0
        try:
            if spec.chat:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **usage})
            item = first
            while True:
                finish = _FINISH.get(item.finish_reason, "stop") if item.finish_reason is not None else None
                if item.token_ids or item.text or finish is not None:
                    lp = self._logprobs(fe, spec, [item], offset) if item.token_ids else None
                    offset += len(item.text)
                    choice = {"index": 0, "logprobs": lp, "finish_reason": finish}
                    if spec.chat:
                        choice["delta"] = {"content": item.text} if item.text else {}
                    else:
                        choice["text"] = item.text
                    yield _sse({**head, "choices": [choice], **usage})
                if finish is not None:
                    if spec.include_usage:
                        yield _sse({**head, "choices": [], "usage": self._usage(item)})
                    break
                item = await gen.__anext__()
        except RequestError as e:
            status, kind = _STATUS.get(e.code, (500, "internal_error"))
            yield _sse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}})
        finally:
            await gen.close()   # a disconnect cancels this generator: abort on every worker
        yield b"data: [DONE]\n\n"


class _Spec:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.created = int(time.time())


class _Stream(StreamingResponse):
    """An SSE response that closes its Generation however the response ends: a client that
    disconnects before the body iterator ever ran must abort the request too."""

    def __init__(self, chunks, gen):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.close()


def _prompt(fe: Frontend, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]    # a batch of one
    if isinstance(prompt, str):
        return fe.text_ids(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if len(prompt) > fe.limits.max_prompt_chars:
            raise invalid("prompt", f"more than {fe.limits.max_prompt_chars} token ids")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt", "one prompt per request (send several requests for a batch)")
    if prompt is None:
        raise invalid("prompt", "required")
    raise invalid("prompt", "expected a string or a list of token ids")


def _messages(messages) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content": str}] for the chat template: text only."""
    if messages is None:
        raise invalid("messages", "required")
    if not isinstance(messages, list):
        raise invalid("messages", "expected a list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "expected an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise invalid(f"{where}.role", f"expected one of {sorted(_ROLES)}, got {str(role)[:40]!r}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"{where}.{sorted(extra)[0]}"[:80], "not supported (text messages only)")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise invalid(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...})")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise invalid(f"{where}.content", "expected a string or a list of text parts")
        out.append({"role": _ROLES[role], "content": content})
    return out


async def _unless_disconnected(request: Request, aw):
    """Await `aw`, unless the client disconnects first: then cancel it and raise _ClientGone
    (a non-streamed answer is only sent at the end, so silence cannot reveal the loss)."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.cancelled() and task.done():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise _ClientGone()


async def _disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
