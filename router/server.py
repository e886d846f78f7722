"""The gRPC front door (grpc.aio): validates and tokenizes requests, hands them to the
Router, streams tokens back, and aborts on every worker when the client goes away.

Edge limits (ServerLimits): message sizes, prompt length (characters and tokens),
max_tokens, n, request id and cache salt; every violation is INVALID_ARGUMENT naming the
field, an oversized message is RESOURCE_EXHAUSTED (gRPC's own check). Optional API keys
(router/auth.py) and TLS / mutual TLS (router/tls.py) are set up by start_grpc_server."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from planes.sampling_params import SamplingParams
from pdserve_api.v1 import pdserve_pb2 as pb
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
from router.core import Router
from router.frontend import (MAX_CACHE_SALT_BYTES, MAX_MESSAGE_BYTES, MAX_PROMPT_CHARS,  # noqa: F401 (re-exported)
                             MAX_REQUEST_ID_BYTES, Frontend, RequestError, SamplingFields, ServerLimits)

log = logging.getLogger(__name__)


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
# router/frontend.py RequestError codes -> gRPC statuses
_ERROR_CODES = {"invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
                "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
                "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
                "unavailable": grpc.StatusCode.UNAVAILABLE,
                "already_exists": grpc.StatusCode.ALREADY_EXISTS,
                "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
                "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
                "not_found": grpc.StatusCode.NOT_FOUND}


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


def _reject_unknown_fields(msg, path: str) -> None:
    # proto3 keeps fields it does not know; a client sending them expects them to matter.
    if len(unknown_fields.UnknownFieldSet(msg)):
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: unknown fields in the request")


class GenerationService(pb_grpc.GenerationServicer, Frontend):
    """The gRPC Generation service: proto <-> router/frontend.py (validation, admission,
    metrics and aborts are shared with the OpenAI HTTP API)."""

    def __init__(self, router: Router, model_info: dict, tokenizer=None, metrics=None,
                 limits: ServerLimits | None = None):
        Frontend.__init__(self, router, model_info, tokenizer, metrics, limits)

    # ---- request conversion --------------------------------------------------------------------
    def _prompt_ids(self, req: pb.GenerateRequest) -> list[int]:
        which = req.WhichOneof("prompt")
        if which is None:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: one of text or token_ids is required")
        if which == "text":
            if req.apply_chat_template:
                if not req.text:
                    raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: text must not be empty")
                ids = self.chat_ids([{"role": "user", "content": req.text}], "prompt")
            else:
                ids = self.text_ids(req.text, "prompt")
        else:
            _reject_unknown_fields(req.token_ids, "token_ids")
            ids = list(req.token_ids.ids)
            if req.apply_chat_template:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "apply_chat_template: needs a text prompt")
        return self.check_ids(ids, "prompt")

    def _params(self, s: pb.SamplingParams, prompt_len: int) -> SamplingParams:
        _reject_unknown_fields(s, "sampling")
        def opt(name):
            return getattr(s, name) if s.HasField(name) else None
        fields = SamplingFields(max_tokens=opt("max_tokens"), temperature=opt("temperature"), top_p=opt("top_p"),
                                top_k=opt("top_k"), seed=opt("seed"), stop=list(s.stop),
                                stop_token_ids=list(s.stop_token_ids), logprobs=s.logprobs,
                                ignore_eos=s.ignore_eos, n=opt("n"))
        return self.sampling(fields, prompt_len, prefix="sampling.")

    def parse(self, req: pb.GenerateRequest) -> tuple[str, list[int], SamplingParams, bytes]:
        if isinstance(req, _Undecodable):
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid GenerateRequest ({req.error})")
        _reject_unknown_fields(req, "request")
        try:
            self.check_request_id(req.request_id)
            salt = self.check_cache_salt(bytes(req.cache_salt))
            ids = self._prompt_ids(req)
            params = self._params(req.sampling, len(ids))
        except RequestError as e:
            raise BadRequest(_ERROR_CODES.get(e.code, grpc.StatusCode.INTERNAL), e.message) from None
        return req.request_id or self.new_request_id(), ids, params, salt

    # ---- RPCs ---------------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        try:
            rid, ids, params, salt = self.parse(request)
        except BadRequest as e:
            await context.abort(e.code, e.message)
        remaining = context.time_remaining()   # the client's deadline, carried to the router
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            gen = await self.start(rid, ids, params, salt, deadline=deadline)
        except RequestError as e:
            await context.abort(_ERROR_CODES.get(e.code, grpc.StatusCode.INTERNAL), e.message)
        first = True
        try:
            async for item in gen:
                resp = pb.GenerateResponse(token_ids=item.token_ids, text=item.text, logprobs=item.logprobs)
                if first:
                    resp.request_id, first = rid, False
                if item.finish_reason is not None:
                    resp.finish_reason = _FINISH.get(item.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
                    resp.usage.prompt_tokens = item.prompt_tokens
                    resp.usage.cached_tokens = item.cached_tokens
                    resp.usage.completion_tokens = item.completion_tokens
                    r = gen.route(item)
                    resp.route.kind = pb.ROUTE_KIND_DISAGGREGATED if r["kind"] == "disaggregated" \
                        else pb.ROUTE_KIND_DIRECT
                    resp.route.reason, resp.route.detail = r["reason"], r["detail"]
                    resp.route.decode_worker, resp.route.prefill_worker = r["decode_worker"], r["prefill_worker"]
                yield resp
        except RequestError as e:
            await context.abort(_ERROR_CODES.get(e.code, grpc.StatusCode.INTERNAL), e.message)
        finally:
            await gen.close()   # cancelled, deadline exceeded, or the stream broke: abort everywhere

    async def GetModelInfo(self, request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.error}")
        i = self.info
        return pb.ModelInfo(model_name=i["model"], vocab_size=i["vocab_size"], max_model_len=i["max_model_len"],
                            block_size=i["block_size"], eos_token_ids=i["eos_token_ids"],
                            has_tokenizer=self.tokenizer is not None,
                            has_chat_template=self.has_chat_template)


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
    service.health_names = ("", names[0])
    service.health = hs      # for set_health (drain at shutdown)
    await set_health(service, True)
    return server, bound


async def set_health(service: GenerationService, serving: bool) -> None:
    """The standard health check's answer for the server and the Generation service:
    NOT_SERVING when draining, so load balancers stop sending before the port closes."""
    hs = getattr(service, "health", None)
    if hs is None:
        return
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in service.health_names:
        r = hs.set(name, status)
        if asyncio.iscoroutine(r):
            await r
