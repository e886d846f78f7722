"""The gRPC contract, proto/pdserve/v1/pdserve.proto: the committed stubs in pdserve_api/ are
exactly what scripts/gen_proto.sh makes, the contract's field numbers and enum values are
those clients were given, and an in-process grpc.aio server (a fake generator behind the
generated servicer, plus the standard health and reflection services) round-trips it."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from pdserve_api.v1 import pdserve_pb2 as pb
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "pdserve_api"
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


# ---- the stubs are not stale ----------------------------------------------------------------------

def _generated_files(api_root: Path) -> dict[str, bytes]:
    """The generated part of a pdserve_api tree: every file below its top level (the top-level
    __init__.py and py.typed are hand-written)."""
    return {p.relative_to(api_root).as_posix(): p.read_bytes()
            for p in sorted(api_root.rglob("*"))
            if p.is_file() and p.parent != api_root and "__pycache__" not in p.parts}


def test_stubs_are_up_to_date(tmp_path):
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        pytest.skip("grpcio-tools is not installed (it is in the test extras: pip install -e '.[test]'); "
                    "cannot regenerate the stubs to compare them")
    committed = _generated_files(API)
    assert "v1/pdserve_pb2.py" in committed, "no stubs in pdserve_api/v1: run scripts/gen_proto.sh"
    made_by = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed["v1/pdserve_pb2_grpc.py"].decode())
    installed = importlib.metadata.version("grpcio-tools")
    assert made_by and made_by.group(1) == installed, (
        f"the committed stubs were made by grpcio-tools {made_by and made_by.group(1)}, this environment has "
        f"{installed}: its output differs between versions. Install the version pinned in pyproject's test "
        f"extras, or (when changing that pin) run scripts/gen_proto.sh and commit pdserve_api/.")

    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert proc.returncode == 0, f"scripts/gen_proto.sh failed:\n{proc.stdout}\n{proc.stderr}"
    fresh = _generated_files(tmp_path / "pdserve_api")

    hint = "the stubs in pdserve_api/ are stale: run scripts/gen_proto.sh and commit the result"
    assert sorted(committed) == sorted(fresh), f"{hint} (files differ: committed {sorted(committed)}, " \
                                               f"generated {sorted(fresh)})"
    differ = [name for name in fresh if fresh[name] != committed[name]]
    assert not differ, f"{hint} (content differs: {differ})"


# ---- the contract's numbers -------------------------------------------------------------------------

def _describe(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, set[str]]:
    """message/enum/service name -> one string per field/value/method, e.g.
    'max_tokens=1 optional uint32' or 'text=2 string oneof=prompt'."""
    F = descriptor_pb2.FieldDescriptorProto
    out: dict[str, set[str]] = {}
    for m in fdp.message_type:
        items = set()
        for f in m.field:
            kind = f.type_name.lstrip(".") if f.type_name else F.Type.Name(f.type)[len("TYPE_"):].lower()
            words = [f"{f.name}={f.number}"]
            words += ["repeated"] if f.label == F.LABEL_REPEATED else []
            words += ["optional"] if f.proto3_optional else []
            words += [kind]
            if f.HasField("oneof_index") and not f.proto3_optional:
                words += [f"oneof={m.oneof_decl[f.oneof_index].name}"]
            items.add(" ".join(words))
        out[m.name] = items
    for e in fdp.enum_type:
        out[e.name] = {f"{v.name}={v.number}" for v in e.value}
    for s in fdp.service:
        out[s.name] = {f"{r.name}({r.input_type.lstrip('.')}) -> {'stream ' if r.server_streaming else ''}"
                       f"{r.output_type.lstrip('.')}" for r in s.method}
    return out


# What clients were given. New fields, values and methods may be added; none of these may
# change (a change is a new package, pdserve.v2).
CONTRACT_V1 = {
    "GenerateRequest": {"request_id=1 string", "text=2 string oneof=prompt",
                        "token_ids=3 pdserve.v1.TokenIds oneof=prompt", "sampling=4 pdserve.v1.SamplingParams",
                        "apply_chat_template=5 bool", "cache_salt=6 bytes"},
    "TokenIds": {"ids=1 repeated uint32"},
    "SamplingParams": {"max_tokens=1 optional uint32", "temperature=2 optional float", "top_p=3 optional float",
                       "top_k=4 optional int32", "seed=5 optional uint64", "stop=6 repeated string",
                       "stop_token_ids=7 repeated uint32", "logprobs=8 bool", "ignore_eos=9 bool"},
    "GenerateResponse": {"token_ids=1 repeated uint32", "text=2 string", "logprobs=3 repeated float",
                         "request_id=16 string", "finish_reason=17 pdserve.v1.FinishReason",
                         "usage=18 pdserve.v1.Usage", "route=19 pdserve.v1.Route"},
    "Usage": {"prompt_tokens=1 uint32", "cached_tokens=2 uint32", "completion_tokens=3 uint32"},
    "Route": {"kind=1 pdserve.v1.RouteKind", "reason=2 string", "detail=3 string", "decode_worker=4 string",
              "prefill_worker=5 string"},
    "GetModelInfoRequest": set(),
    "ModelInfo": {"model_name=1 string", "vocab_size=2 uint32", "max_model_len=3 uint32", "block_size=4 uint32",
                  "eos_token_ids=5 repeated uint32", "has_tokenizer=6 bool", "has_chat_template=7 bool"},
    "FinishReason": {"FINISH_REASON_UNSPECIFIED=0", "FINISH_REASON_STOP=1", "FINISH_REASON_LENGTH=2",
                     "FINISH_REASON_ABORT=3"},
    "RouteKind": {"ROUTE_KIND_UNSPECIFIED=0", "ROUTE_KIND_DIRECT=1", "ROUTE_KIND_DISAGGREGATED=2"},
    "Generation": {"Generate(pdserve.v1.GenerateRequest) -> stream pdserve.v1.GenerateResponse",
                   "GetModelInfo(pdserve.v1.GetModelInfoRequest) -> pdserve.v1.ModelInfo"},
}


def test_contract_is_stable():
    fdp = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert (fdp.name, fdp.package, fdp.syntax) == ("pdserve/v1/pdserve.proto", "pdserve.v1", "proto3")
    actual = _describe(fdp)
    for name, items in CONTRACT_V1.items():
        assert name in actual, f"{name} was removed from the contract"
        missing = items - actual[name]
        assert not missing, f"{name}: changed or removed {sorted(missing)}; now {sorted(actual[name])}"


def test_messages_presence_oneof_and_pickle():
    # proto3 `optional`: an explicit 0 is sent and seen; unset is absent.
    zero = pb.SamplingParams(temperature=0.0, top_k=0, seed=0, max_tokens=0)
    for f in ("temperature", "top_k", "seed", "max_tokens"):
        assert zero.HasField(f)
    assert zero.SerializeToString() != b""
    assert pb.SamplingParams().SerializeToString() == b""
    back = pb.SamplingParams.FromString(zero.SerializeToString())
    assert back.HasField("temperature") and back.temperature == 0.0 and not back.HasField("top_p")
    # The prompt oneof: setting one member clears the other.
    req = pb.GenerateRequest(text="hi")
    req.token_ids.ids.extend([1, 2])
    assert req.WhichOneof("prompt") == "token_ids" and req.text == ""
    assert pb.GenerateRequest().WhichOneof("prompt") is None
    # Messages belong to the importable module (pickle, Ray, cloudpickle find them there).
    assert pb.GenerateRequest.__module__ == "pdserve_api.v1.pdserve_pb2"
    assert pickle.loads(pickle.dumps(req)) == req


# ---- an in-process server ---------------------------------------------------------------------------

VOCAB, EOS, THRESHOLD = 512, 2, 8
INFO = pb.ModelInfo(model_name="fake-model", vocab_size=VOCAB, max_model_len=2048, block_size=16,
                    eos_token_ids=[EOS], has_tokenizer=True, has_chat_template=False)


class FakeGeneration(pb_grpc.GenerationServicer):
    """A stand-in for the router: tokenizes text as its UTF-8 bytes, 'generates' token
    prompt[-1]+1, +2, ..., two tokens per message, and routes prompts longer than THRESHOLD
    tokens to a (fake) prefill worker."""

    def __init__(self):
        self.requests: list[pb.GenerateRequest] = []

    async def Generate(self, request, context):
        self.requests.append(request)
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: one of text or token_ids must be set")
        prompt = list(request.text.encode()) if which == "text" else list(request.token_ids.ids)
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{which}: the prompt is empty")
        sp = request.sampling
        if sp.HasField("max_tokens") and sp.max_tokens < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: must be >= 1, got 0")
        if request.cache_salt:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "cache_salt: prefix-cache isolation is not supported")
        n = sp.max_tokens if sp.HasField("max_tokens") else 5
        out = [(prompt[-1] + 1 + i) % VOCAB for i in range(n)]
        disagg = len(prompt) > THRESHOLD
        for i in range(0, n, 2):
            chunk = out[i:i + 2]
            msg = pb.GenerateResponse(token_ids=chunk, text="".join(f"<{t}>" for t in chunk))
            if sp.logprobs:
                msg.logprobs.extend([-0.25] * len(chunk))
            if i == 0:
                msg.request_id = request.request_id or "srv-0001"
            if i + 2 >= n:
                msg.finish_reason = pb.FINISH_REASON_LENGTH
                msg.usage.CopyFrom(pb.Usage(prompt_tokens=len(prompt), cached_tokens=16 if disagg else 0,
                                            completion_tokens=n))
                msg.route.CopyFrom(pb.Route(
                    kind=pb.ROUTE_KIND_DISAGGREGATED if disagg else pb.ROUTE_KIND_DIRECT,
                    reason="long_prompt" if disagg else "short_prompt",
                    detail=f"uncached={len(prompt)} threshold={THRESHOLD}",
                    decode_worker="decode-0", prefill_worker="prefill-0" if disagg else ""))
            yield msg

    async def GetModelInfo(self, request, context):
        return INFO


@contextlib.asynccontextmanager
async def serving():
    """The fake servicer + grpc.health.v1 + reflection on a free local port; yields
    (channel, servicer, health servicer)."""
    server = grpc.aio.server()
    servicer = FakeGeneration()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, servicer, health
    finally:
        await server.stop(grace=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_generate_streams_tokens_then_usage_and_route():
    async def body():
        async with serving() as (channel, servicer, _):
            stub = pb_grpc.GenerationStub(channel)
            # Text prompt (5 tokens: direct), explicit temperature 0 and top_p unset.
            req = pb.GenerateRequest(request_id="req-1", text="hello",
                                     sampling=pb.SamplingParams(max_tokens=5, temperature=0.0, logprobs=True,
                                                                stop=["\n\n"], stop_token_ids=[EOS]))
            msgs = [m async for m in stub.Generate(req, timeout=10)]
            seen = servicer.requests[-1]
            assert seen == req and seen.WhichOneof("prompt") == "text"
            assert seen.sampling.HasField("temperature") and seen.sampling.temperature == 0.0
            assert seen.sampling.HasField("max_tokens") and not seen.sampling.HasField("top_p")
            assert not seen.sampling.HasField("seed") and not seen.sampling.HasField("top_k")

            assert [len(m.token_ids) for m in msgs] == [2, 2, 1]
            tokens = [t for m in msgs for t in m.token_ids]
            assert tokens == [ord("o") + 1 + i for i in range(5)]
            assert "".join(m.text for m in msgs) == "".join(f"<{t}>" for t in tokens)
            assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
            assert msgs[0].request_id == "req-1" and all(m.request_id == "" for m in msgs[1:])
            # Only the last message is final, and it carries usage and route.
            *body_msgs, last = msgs
            for m in body_msgs:
                assert m.finish_reason == pb.FINISH_REASON_UNSPECIFIED
                assert not m.HasField("usage") and not m.HasField("route")
            assert last.finish_reason == pb.FINISH_REASON_LENGTH
            assert pb.FinishReason.Name(last.finish_reason) == "FINISH_REASON_LENGTH"
            assert last.HasField("usage") and last.HasField("route")
            assert (last.usage.prompt_tokens, last.usage.cached_tokens, last.usage.completion_tokens) == (5, 0, 5)
            assert last.route.kind == pb.ROUTE_KIND_DIRECT and last.route.reason == "short_prompt"
            assert (last.route.decode_worker, last.route.prefill_worker) == ("decode-0", "")

            # Token-id prompt (20 tokens: disaggregated), default sampling, no request id.
            ids = list(range(100, 120))
            msgs = [m async for m in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids)))]
            seen = servicer.requests[-1]
            assert seen.WhichOneof("prompt") == "token_ids" and list(seen.token_ids.ids) == ids
            assert not seen.HasField("sampling") and not seen.sampling.HasField("max_tokens")
            assert msgs[0].request_id == "srv-0001"
            assert [t for m in msgs for t in m.token_ids] == [120, 121, 122, 123, 124]
            assert all(len(m.logprobs) == 0 for m in msgs)
            last = msgs[-1]
            assert last.usage == pb.Usage(prompt_tokens=20, cached_tokens=16, completion_tokens=5)
            assert last.route.kind == pb.ROUTE_KIND_DISAGGREGATED
            assert pb.RouteKind.Name(last.route.kind) == "ROUTE_KIND_DISAGGREGATED"
            assert (last.route.reason, last.route.decode_worker, last.route.prefill_worker) == \
                ("long_prompt", "decode-0", "prefill-0")
    run(body())


def test_generate_errors_are_status_codes():
    async def body():
        async with serving() as (channel, _, _h):
            stub = pb_grpc.GenerationStub(channel)
            cases = [
                (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
                (pb.GenerateRequest(token_ids=pb.TokenIds()), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
                (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(max_tokens=0)),
                 grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
                (pb.GenerateRequest(text="x", cache_salt=b"tenant-a"), grpc.StatusCode.UNIMPLEMENTED, "cache_salt"),
            ]
            for req, code, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in stub.Generate(req, timeout=10)]
                assert err.value.code() == code
                assert err.value.details().startswith(field)
    run(body())


def test_model_info_health_and_reflection():
    async def body():
        async with serving() as (channel, _, health):
            assert await pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10) == INFO

            hstub = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE):
                resp = await hstub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            await health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            resp = await hstub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await hstub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            rstub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask(**kw):
                call = rstub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kw)]), timeout=10)
                (resp,) = [r async for r in call]
                assert not resp.HasField("error_response"), resp.error_response
                return resp

            listed = {s.name for s in (await ask(list_services="")).list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed

            # A client with no copy of the .proto gets the whole contract, under its canonical name.
            resp = await ask(file_containing_symbol=SERVICE)
            fdps = [descriptor_pb2.FileDescriptorProto.FromString(b)
                    for b in resp.file_descriptor_response.file_descriptor_proto]
            (fdp,) = [f for f in fdps if f.name == "pdserve/v1/pdserve.proto"]
            assert fdp.package == "pdserve.v1"
            described = _describe(fdp)
            for name, items in CONTRACT_V1.items():
                assert items <= described[name], name
    run(body())
