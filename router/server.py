"""The gRPC front door (grpc.aio): validates and tokenizes requests, hands them to the
Router, streams tokens back, and aborts on every worker when the client goes away."""
from __future__ import annotations

import asyncio
import logging
import math

import grpc
from google.protobuf import unknown_fields
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from pdserve_api.v1 import pdserve_pb2 as pb
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
from router.core import Router

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20
MAX_PROMPT_CHARS = 1 << 20
MAX_REQUEST_ID_CHARS = 128

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_ERROR_CODES = {"invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
                "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
                "unavailable": grpc.StatusCode.UNAVAILABLE}


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


def _reject_unknown_fields(msg, path: str) -> None:
    # proto3 keeps fields it does not know; a client sending them expects them to matter.
    if len(unknown_fields.UnknownFieldSet(msg)):
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: unknown fields in the request")


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model_info: dict, tokenizer=None):
        self.router, self.info, self.tokenizer = router, model_info, tokenizer

    # ---- request conversion --------------------------------------------------------------------
    def _prompt_ids(self, req: pb.GenerateRequest) -> list[int]:
        which = req.WhichOneof("prompt")
        if which is None:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: one of text or token_ids is required")
        if which == "text":
            if not req.text:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt: text must not be empty")
            if len(req.text) > MAX_PROMPT_CHARS:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"prompt: text longer than {MAX_PROMPT_CHARS} chars")
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
        if len(ids) >= max_len:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"prompt: {len(ids)} tokens; the model's context is {max_len} tokens "
                             "and at least one must be left to generate")
        return ids

    def _params(self, s: pb.SamplingParams, prompt_len: int) -> SamplingParams:
        _reject_unknown_fields(s, "sampling")
        room = self.info["max_model_len"] - prompt_len
        p = SamplingParams(
            max_tokens=s.max_tokens if s.HasField("max_tokens") else room,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else -1,
            seed=s.seed if s.HasField("seed") else None,
            stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), logprobs=s.logprobs,
            ignore_eos=s.ignore_eos)
        if s.HasField("temperature") and not math.isfinite(s.temperature):
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be a finite number")
        try:
            p.validate(self.info["vocab_size"])
        except InvalidRequestError as e:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if p.max_tokens > room:
            p.max_tokens = room  # generation stops at the context edge anyway ("length")
        return p

    def parse(self, req: pb.GenerateRequest) -> tuple[str, list[int], SamplingParams, bytes]:
        _reject_unknown_fields(req, "request")
        if len(req.request_id) > MAX_REQUEST_ID_CHARS:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: longer than {MAX_REQUEST_ID_CHARS} chars")
        if len(req.cache_salt) > 64:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "cache_salt: at most 64 bytes")
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
            handle = await self.router.submit(rid, ids, params, salt)
        except LookupError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no decode worker is available")
        except KeyError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in flight")
        d = handle.decision
        finished = False
        first = True
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
                    resp.route.decode_worker = d.decode_worker
                    resp.route.prefill_worker = d.prefill_worker or ""
                yield resp
        finally:
            if not finished:  # cancelled, deadline exceeded, or the stream broke
                await self.router.abort(rid)

    async def GetModelInfo(self, request, context):
        i = self.info
        return pb.ModelInfo(model_name=i["model"], vocab_size=i["vocab_size"], max_model_len=i["max_model_len"],
                            block_size=i["block_size"], eos_token_ids=i["eos_token_ids"],
                            has_tokenizer=self.tokenizer is not None,
                            has_chat_template=bool(self.tokenizer is not None and self.tokenizer.hf.chat_template))


async def start_grpc_server(service: GenerationService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_GenerationServicer_to_server(service, server)
    hs = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = (pb.DESCRIPTOR.services_by_name["Generation"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", names[0]):
        r = hs.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(r):
            await r
    return server, bound
