"""Malformed and hostile Generate requests against a real server (router + gRPC + a decode
worker, in process): each gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message that
names the field, and the server serves the next valid request. Raw bodies (invalid UTF-8,
unknown fields, garbage) go through a bytes-level call, as a hostile client would send them."""
from __future__ import annotations

import grpc
import pytest

from deploy.client import build_request, collect
from helpers import wait_until
from inproc import InProcessServer
from pdserve_api.v1 import pdserve_pb2 as pb
from router.server import ServerLimits

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
LIMITS = ServerLimits(max_message_bytes=1 << 20, max_prompt_chars=20_000, max_prompt_tokens=1500, max_tokens=64)
VOCAB = 49152
OK_PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def server():
    s = InProcessServer(limits=LIMITS)
    yield s
    s.close()


def req(prompt=OK_PROMPT, **sampling) -> pb.GenerateRequest:
    r = pb.GenerateRequest()
    if isinstance(prompt, str):
        r.text = prompt
    elif prompt is not None:
        r.token_ids.ids.extend(prompt)
    r.sampling.max_tokens = 2
    for k, v in sampling.items():
        if k in ("stop", "stop_token_ids"):
            getattr(r.sampling, k).extend(v)
        else:
            setattr(r.sampling, k, v)
    return r


def top(**fields) -> pb.GenerateRequest:
    r = req()
    for k, v in fields.items():
        setattr(r, k, v)
    return r


# ---- raw protobuf bodies ---------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:      # length-delimited field
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


GOOD_BODY = req().SerializeToString()
RAW = {
    "invalid UTF-8 text": _field(2, b"caf\xc3(\xff\xfe"),
    "invalid UTF-8 stop string": GOOD_BODY + _field(4, _field(6, b"\xed\xa0\x80")),   # a UTF-16 surrogate
    "invalid UTF-8 request id": GOOD_BODY + _field(1, b"id-\x80"),
    "unknown top-level field": GOOD_BODY + _varint(111 << 3 | 0) + _varint(1),
    "unknown sampling field": GOOD_BODY + _field(4, _varint(99 << 3 | 0) + _varint(7)),
    "garbage body": b"\xff\xff\xff\xff\x0f\x00garbage",
    "truncated body": GOOD_BODY[:-1] + _field(2, b"abc")[:-1],
}

CASES = [
    # (name, request or raw key, code, what the message names)
    ("no prompt", req(prompt=None), INVALID, "prompt"),
    ("empty text", req(prompt=""), INVALID, "prompt"),
    ("empty token list", req(prompt=[]), INVALID, "prompt"),
    ("huge text", req(prompt="x" * 20_001), INVALID, "prompt"),
    ("huge token list", req(prompt=[7] * 200_000), INVALID, "prompt"),
    ("prompt over the server's token limit", req(prompt=[7] * 1501), INVALID, "prompt"),
    ("prompt beyond the KV pool", req(prompt=[7] * 1200), EXHAUSTED, "block"),
    ("token id = vocab", req(prompt=[5, VOCAB]), INVALID, "prompt_token_ids"),
    ("token id 2^32-1", req(prompt=[2**32 - 1]), INVALID, "prompt_token_ids"),
    ("invalid UTF-8 text", "invalid UTF-8 text", INVALID, "request"),
    ("invalid UTF-8 stop string", "invalid UTF-8 stop string", INVALID, "request"),
    ("invalid UTF-8 request id", "invalid UTF-8 request id", INVALID, "request"),
    ("max_tokens 0", req(max_tokens=0), INVALID, "sampling.max_tokens"),
    ("max_tokens over the limit", req(max_tokens=65), INVALID, "sampling.max_tokens"),
    ("max_tokens 2^32-1", req(max_tokens=2**32 - 1), INVALID, "sampling.max_tokens"),
    ("negative temperature", req(temperature=-0.5), INVALID, "sampling.temperature"),
    ("NaN temperature", req(temperature=float("nan")), INVALID, "sampling.temperature"),
    ("inf temperature", req(temperature=float("inf")), INVALID, "sampling.temperature"),
    ("top_p 0", req(top_p=0.0), INVALID, "sampling.top_p"),
    ("top_p 1.5", req(top_p=1.5), INVALID, "sampling.top_p"),
    ("top_p NaN", req(top_p=float("nan")), INVALID, "sampling.top_p"),
    ("top_p -inf", req(top_p=float("-inf")), INVALID, "sampling.top_p"),
    ("top_k 0", req(top_k=0), INVALID, "sampling.top_k"),
    ("top_k -5", req(top_k=-5), INVALID, "sampling.top_k"),
    ("seed 2^63", req(seed=2**63), INVALID, "sampling.seed"),
    ("n = 2", req(n=2), INVALID, "sampling.n"),
    ("n = 0", req(n=0), INVALID, "sampling.n"),
    ("17 stop strings", req(stop=[f"s{i}" for i in range(17)]), INVALID, "sampling.stop"),
    ("stop string of 257 chars", req(stop=["y" * 257]), INVALID, "sampling.stop"),
    ("empty stop string", req(stop=[""]), INVALID, "sampling.stop"),
    ("65 stop token ids", req(stop_token_ids=list(range(65))), INVALID, "sampling.stop_token_ids"),
    ("stop token id = vocab", req(stop_token_ids=[VOCAB]), INVALID, "sampling.stop_token_ids"),
    ("request id of 257 bytes", top(request_id="r" * 257), INVALID, "request_id"),
    ("request id of 129 two-byte chars", top(request_id="é" * 129), INVALID, "request_id"),
    ("request id with a newline", top(request_id="evil\nINFO forged log line"), INVALID, "request_id"),
    ("request id with an escape", top(request_id="a\x1b[31m"), INVALID, "request_id"),
    ("cache_salt of 65 bytes", top(cache_salt=b"s" * 65), INVALID, "cache_salt"),
    ("chat template on token ids", top(apply_chat_template=True), INVALID, "apply_chat_template"),
    ("unknown top-level field", "unknown top-level field", INVALID, "request: unknown fields"),
    ("unknown sampling field", "unknown sampling field", INVALID, "sampling: unknown fields"),
    ("garbage body", "garbage body", INVALID, "request"),
    ("truncated body", "truncated body", INVALID, "request"),
    ("message over the size limit", req(prompt="z" * (1 << 20)), EXHAUSTED, "larger than max"),
]


def _raw_call(channel):
    return channel.unary_stream("/pdserve.v1.Generation/Generate", request_serializer=lambda b: b,
                                response_deserializer=pb.GenerateResponse.FromString)


def _serves_a_valid_request(server, stub):
    out = collect(stub.Generate(build_request(OK_PROMPT, 3, temperature=0.0), timeout=30))
    assert len(out["token_ids"]) == 3 and out["finish_reason"] == "length"


def test_table_has_at_least_25_hostile_requests():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,request_,code,field", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_with_a_status_naming_the_field(server, name, request_, code, field):
    with server.channel() as ch:
        stub = server.stub(ch)
        with pytest.raises(grpc.RpcError) as err:
            if isinstance(request_, str):
                list(_raw_call(ch)(RAW[request_], timeout=30))
            else:
                collect(stub.Generate(request_, timeout=30))
        assert err.value.code() == code, (name, err.value.code(), err.value.details())
        assert field in err.value.details(), (name, err.value.details())
        _serves_a_valid_request(server, stub)    # the next valid request is served
    assert server.decode.is_alive()


def test_worker_survives_the_table_and_holds_no_blocks(server):
    """Runs after the table (same module server): nothing leaked, nothing stuck."""
    def idle():
        s = server.decode.stats()
        return s["in_flight"] == 0 and s["num_free_blocks"] == s["num_blocks"]
    wait_until(idle, 10, f"an idle decode worker with every block free (now {server.decode.stats()})")
    assert server.router.stats()["inflight"] == 0
    assert server.router.bad_messages == 0          # no garbage reached the internal planes
