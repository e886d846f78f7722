"""The gRPC front door (grpc.aio): validates and tokenizes requests, hands them to the
Router, streams tokens back, and aborts on every worker when the client goes away.

Edge limits (ServerLimits): message sizes, prompt length (characters and tokens),
max_tokens, n, request id and cache salt; every violation is INVALID_ARGUMENT naming the
field, an oversized message is RESOURCE_EXHAUSTED (gRPC's own check). Optional API keys
(router/auth.py) and TLS / mutual TLS (router/tls.py) are set up by start_grpc_server."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import grpc
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from pdserve_api.v1 import pdserve_pb2 as pb
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
from router.core import Overloaded, Router

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20
MAX_PROMPT_CHARS = 1 << 20
MAX_REQUEST_ID_BYTES = 256      # the contract's limit (UTF-8 bytes)
MAX_CACHE_SALT_BYTES = 64


@dataclass
class ServerLimits:
    """Per-request limits at the gRPC edge; a request over one gets INVALID_ARGUMENT naming
    the field. None: no limit beyond the model's context (max_model_len)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES     # gRPC receive/send cap (RESOURCE_EXHAUSTED past it)
    max_prompt_chars: int = MAX_PROMPT_CHARS       # checked before tokenizing
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None                  # sampling.max_tokens cap (unset max_tokens: capped too)
    max_concurrent_streams: int = 1024             # per HTTP/2 connection


class _Undecodable:
    """A request body that is not a valid GenerateRequest (e.g. bad UTF-8 in a string):
    handed to the servicer so it answers INVALID_ARGUMENT instead of gRPC's INTERNAL."""

    def __init__(self, error: str):
        self.error = error


def _lenient(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except pb_message.DecodeError as e:
            return _Undecodable(str(e))
    return deserialize

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_ERROR_CODES = {"invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
                "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
                "unavailable": grpc.StatusCode.UNAVAILABLE,
                "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED}


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


def _reject_unknown_fields(msg, path: str) -> None:
    # proto3 keeps fields it does not know; a client sending them expects them to matter.
    if len(unknown_fields.UnknownFieldSet(msg)):
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: unknown fields in the request")


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model_info: dict, tokenizer=None, metrics=None,
                 limits: ServerLimits | None = None):
        self.router, self.info, self.tokenizer = router, model_info, tokenizer
        self.limits = limits or ServerLimits()
        self.metrics = metrics     # router/metrics.RouterMetrics: TTFT/TPOT per request (optional)

    # ---- request conversion --------------------------------------------------------------------
    def _prompt_ids(self, req: pb.GenerateRequest) -> list[int]:
        which = req.WhichOneof("prompt")
        if which is None:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: one of text or token_ids is required")
        if which == "text":
            if not req.text:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: text must not be empty")
            if len(req.text) > self.limits.max_prompt_chars:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"prompt: text longer than {self.limits.max_prompt_chars} chars")
            if self.tokenizer is None:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: this model has no tokenizer; send token_ids")
            if req.apply_chat_template:
                try:
                    ids = self.tokenizer.apply_chat_template([{"role": "user", "content": req.text}])
                except ValueError as e:
                    raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"apply_chat_template: {e}")
            else:
                ids = self.tokenizer.encode(req.text)
        else:
            _reject_unknown_fields(req.token_ids, "token_ids")
            ids = list(req.token_ids.ids)
            if req.apply_chat_template:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "apply_chat_template: needs a text prompt")
        if not ids:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
        vocab, max_len = self.info["vocab_size"], self.info["max_model_len"]
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"prompt_token_ids: {bad} is not in [0, {vocab})")
        cap = self.limits.max_prompt_tokens
        if cap is not None and len(ids) > cap:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"prompt: {len(ids)} tokens; this server accepts at most {cap}")
        if len(ids) >= max_len:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"prompt: {len(ids)} tokens; the model's context is {max_len} tokens "
                             "and at least one must be left to generate")
        return ids

    def _params(self, s: pb.SamplingParams, prompt_len: int) -> SamplingParams:
        _reject_unknown_fields(s, "sampling")
        if s.HasField("n") and s.n != 1:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.n: only n=1 is supported, got {s.n}")
        cap = self.limits.max_tokens
        if cap is not None and s.HasField("max_tokens") and s.max_tokens > cap:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"sampling.max_tokens: at most {cap} on this server, got {s.max_tokens}")
        room = self.info["max_model_len"] - prompt_len
        if cap is not None:
            room = min(room, cap)
        p = SamplingParams(
            max_tokens=s.max_tokens if s.HasField("max_tokens") else room,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else -1,
            seed=s.seed if s.HasField("seed") else None,
            stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), logprobs=s.logprobs,
            ignore_eos=s.ignore_eos)
        if s.HasField("temperature") and not math.isfinite(s.temperature):
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature: must be a finite number")
        try:
            p.validate(self.info["vocab_size"])
        except InvalidRequestError as e:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
        if p.max_tokens > room:
            p.max_tokens = room  # generation stops at the context edge anyway ("length")
        return p

    def parse(self, req: pb.GenerateRequest) -> tuple[str, list[int], SamplingParams, bytes]:
        if isinstance(req, _Undecodable):
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid GenerateRequest ({req.error})")
        _reject_unknown_fields(req, "request")
        if len(req.request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: longer than {MAX_REQUEST_ID_BYTES} bytes")
        if not req.request_id.isprintable():   # it goes into logs and traces verbatim
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not hold control characters")
        if len(req.cache_salt) > MAX_CACHE_SALT_BYTES:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"cache_salt: at most {MAX_CACHE_SALT_BYTES} bytes")
        ids = self._prompt_ids(req)
        params = self._params(req.sampling, len(ids))
        return req.request_id or self.router.new_request_id(), ids, params, bytes(req.cache_salt)

    # ---- RPCs ---------------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        try:
            rid, ids, params, salt = self.parse(request)
        except BadRequest as e:
            await context.abort(e.code, e.message)
        try:
            remaining = context.time_remaining()   # the client's deadline, carried to the router
            deadline = None if remaining is None else time.monotonic() + remaining
            handle = await self.router.submit(rid, ids, params, salt, deadline=deadline)
        except Overloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded: {e}")
        except LookupError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no decode worker is available")
        except KeyError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in flight")
        d = handle.decision
        finished = False
        first = True
        timer = self.metrics.timer(d.kind) if self.metrics is not None else None
        try:
            while not finished:
                item = await handle.queue.get()
                if item.error is not None:
                    finished = True
                    code = _ERROR_CODES.get(item.error_code, grpc.StatusCode.INTERNAL)
                    await context.abort(code, item.error)
                resp = pb.GenerateResponse(token_ids=item.token_ids, text=item.text, logprobs=item.logprobs)
                if first:
                    resp.request_id, first = rid, False
                if item.finish_reason is not None:
                    finished = True
                    resp.finish_reason = _FINISH.get(item.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
                    resp.usage.prompt_tokens = item.prompt_tokens
                    resp.usage.cached_tokens = item.cached_tokens
                    resp.usage.completion_tokens = item.completion_tokens
                    disagg = d.kind == "disaggregated" and not item.fallback
                    resp.route.kind = pb.ROUTE_KIND_DISAGGREGATED if disagg else pb.ROUTE_KIND_DIRECT
                    resp.route.reason = d.reason if not item.fallback else f"fallback_{item.fallback}"
                    resp.route.detail = (f"uncached_tokens={d.uncached_tokens} "
                                         f"threshold={self.router.cfg.policy.disagg_threshold}")
                    resp.route.decode_worker = handle.decode_worker or d.decode_worker  # after a re-dispatch
                    resp.route.prefill_worker = d.prefill_worker or ""
                if timer is not None:
                    timer.on_tokens(len(item.token_ids), finished)
                yield resp
        finally:
            if not finished:  # cancelled, deadline exceeded, or the stream broke
                await self.router.abort(rid)

    async def GetModelInfo(self, request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.error}")
        i = self.info
        return pb.ModelInfo(model_name=i["model"], vocab_size=i["vocab_size"], max_model_len=i["max_model_len"],
                            block_size=i["block_size"], eos_token_ids=i["eos_token_ids"],
                            has_tokenizer=self.tokenizer is not None,
                            has_chat_template=bool(self.tokenizer is not None and self.tokenizer.hf.chat_template))


def _add_generation_service(service: GenerationService, server: grpc.aio.Server) -> None:
    """As the generated add_GenerationServicer_to_server, but a body that does not parse
    reaches the servicer (-> INVALID_ARGUMENT naming the problem) instead of failing as
    INTERNAL inside gRPC."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=_lenient(pb.GenerateRequest.FromString),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=_lenient(pb.GetModelInfoRequest.FromString),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


async def start_grpc_server(service: GenerationService, host: str, port: int, *, tls=None, api_keys=None,
                            limits: ServerLimits | None = None) -> tuple[grpc.aio.Server, int]:
    """tls: router.tls.TLSConfig (None: plaintext); api_keys: router.auth.APIKeys (None: no
    authentication); limits: message sizes and streams (default: service.limits)."""
    limits = limits or getattr(service, "limits", None) or ServerLimits()
    interceptors = []
    if api_keys is not None:
        from router.auth import APIKeyInterceptor
        interceptors.append(APIKeyInterceptor(api_keys))
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", limits.max_message_bytes),
                                      ("grpc.max_send_message_length", limits.max_message_bytes),
                                      ("grpc.max_concurrent_streams", limits.max_concurrent_streams)])
    _add_generation_service(service, server)
    hs = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = (pb.DESCRIPTOR.services_by_name["Generation"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
        if api_keys is not None and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("grpc: API keys are on but the port %s:%d has no TLS: keys travel in clear text", host, bound)
    await server.start()
    for name in ("", names[0]):
        r = hs.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(r):
            await r
    return server, bound
