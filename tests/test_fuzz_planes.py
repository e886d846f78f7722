"""Property-based fuzzing of the ZeroMQ plane decoders (planes/messages.py: request plane and
token plane; kv_transfer/wire.py: KV headers). For random bytes, random msgpack values,
truncations and one-field mutations of valid messages, a decoder either returns a message
whose every field has the declared type and range, or raises its own error type
(PlaneError / WireError) -- never anything else. An accepted token batch is then fed to
the router's real consumers (prefix index, gRPC response builder), which must not fail.
Hostile buffers built to maximise allocation stay within the documented memory bound."""
from __future__ import annotations

import math
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_transfer import wire
from pdserve_api.v1 import pdserve_pb2 as pb
from planes import messages
from planes.sampling_params import SamplingParams
from router.prefix_index import PrefixIndex

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARAMS = SamplingParams(max_tokens=8, temperature=0.5, top_p=0.9, top_k=20, seed=3, stop=["\n\n"],
                        stop_token_ids=[2], logprobs=True)
VALID_REQUESTS = [
    messages.GenerateMsg("r1", [1, 2, 3, 4], PARAMS).encode(),
    messages.GenerateMsg("r2", list(range(40)), SamplingParams(), mode="disaggregated", prefill_endpoint="tcp://10.0.0.2:5000",
                         prefill_worker="prefill-0", cache_salt=b"tenant", kv_timeout_s=5.0).encode(),
    messages.PrefillMsg("r3", "r3#1", list(range(50)), PARAMS, "ipc:///tmp/kv.sock", [4, 5, 6, 7], 0,
                        "tcp://127.0.0.1:6000", b"s").encode(),
    messages.encode_abort("r4"),
    messages.encode_drain(),
    messages.encode_prefill_failed("r5#2"),
]
VALID_BATCH = messages.TokenBatch(
    "decode-0",
    [messages.TokenItem("a", [5, 6], "hi", logprobs=[-0.5, -1.0]),
     messages.TokenItem("b", [7], "", "length", [], 10, 0, 3, fallback="kv_timeout"),
     messages.TokenItem("c", [], "", "abort", error="bad", error_code="invalid_argument")],
    [("stored", b"\x01" * 16, None), ("stored", b"\x02" * 16, b"\x01" * 16), ("evicted", b"\x01" * 16, None),
     ("cleared", None, None)],
    {"running": 2, "waiting": 0, "free_blocks": 10, "num_blocks": 64, "draining": False,
     "endpoint": "tcp://127.0.0.1:7000", "epoch": None}).encode()

# Any msgpack value (what a confused or hostile peer can send).
_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
            | st.text(max_size=20) | st.binary(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)


def _pack(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def _check_request(msg) -> None:
    """What the workers rely on when a request-plane message is accepted."""
    if isinstance(msg, tuple):
        kind, arg = msg
        assert kind in ("abort", "drain", "prefill_failed")
        assert arg is None if kind == "drain" else (type(arg) is str and 0 < len(arg) <= messages.MAX_ID_CHARS)
        return
    assert isinstance(msg, (messages.GenerateMsg, messages.PrefillMsg))
    assert type(msg.rid) is str and 0 < len(msg.rid) <= messages.MAX_ID_CHARS
    assert type(msg.prompt_ids) is list and all(type(t) is int and 0 <= t < 2**31 for t in msg.prompt_ids)
    assert type(msg.cache_salt) is bytes and len(msg.cache_salt) <= 64
    p = msg.params
    p.validate()   # already valid: must not raise
    assert type(p.logprobs) is bool and type(p.ignore_eos) is bool
    assert type(p.stop) is list and type(p.stop_token_ids) is list
    if isinstance(msg, messages.GenerateMsg):
        assert msg.mode in ("direct", "disaggregated") and 0 < msg.kv_timeout_s <= 3600
    else:
        assert type(msg.dst_block_ids) is list and type(msg.first_block) is int


def _check_batch(b: messages.TokenBatch) -> None:
    """An accepted batch goes through the router's consumers without an exception."""
    assert type(b.worker) is str and b.worker
    idx = PrefixIndex()
    idx.apply(b.worker, b.kv_events)
    idx.overlap(b.worker, [b"\x01" * 16])
    assert type(b.load) is dict
    for it in b.items:
        assert type(it.token_ids) is list and type(it.logprobs) is list
        resp = pb.GenerateResponse(token_ids=it.token_ids, text=it.text, logprobs=it.logprobs)
        resp.usage.prompt_tokens, resp.usage.cached_tokens = it.prompt_tokens, it.cached_tokens
        resp.usage.completion_tokens = it.completion_tokens
        resp.route.reason = it.fallback or ""
        resp.SerializeToString()
        assert it.finish_reason in (None, "stop", "length", "abort")
        assert it.error is None or type(it.error) is str


def _request_or_error(buf) -> None:
    try:
        msg = messages.decode_request(buf)
    except messages.PlaneError:
        return
    _check_request(msg)


def _tokens_or_error(buf) -> None:
    try:
        b = messages.decode_tokens(buf)
    except messages.PlaneError:
        return
    _check_batch(b)


def _header_or_error(buf) -> None:
    try:
        h = wire.decode_header(buf)
    except wire.WireError:
        return
    assert type(h.request_id) is str and 0 < len(h.request_id) <= wire.MAX_REQUEST_ID_LEN


DECODERS = [_request_or_error, _tokens_or_error, _header_or_error]


# ---- properties -------------------------------------------------------------------------------------

def test_valid_messages_round_trip():
    g = messages.decode_request(VALID_REQUESTS[1])
    assert (g.rid, g.prompt_ids, g.mode, g.prefill_endpoint, g.cache_salt, g.kv_timeout_s) == \
        ("r2", list(range(40)), "disaggregated", "tcp://10.0.0.2:5000", b"tenant", 5.0)
    p = messages.decode_request(VALID_REQUESTS[2])
    assert (p.kv_key, p.dst_block_ids, p.reply_to, p.params) == ("r3#1", [4, 5, 6, 7], "tcp://127.0.0.1:6000", PARAMS)
    assert [messages.decode_request(b) for b in VALID_REQUESTS[3:]] == \
        [("abort", "r4"), ("drain", None), ("prefill_failed", "r5#2")]
    b = messages.decode_tokens(VALID_BATCH)
    assert [it.rid for it in b.items] == ["a", "b", "c"] and b.items[1].fallback == "kv_timeout"
    assert b.items[0].logprobs == [-0.5, -1.0] and b.kv_events[1] == ("stored", b"\x02" * 16, b"\x01" * 16)
    _check_batch(b)
    for buf in VALID_REQUESTS:
        _check_request(messages.decode_request(buf))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_decoder_errors(buf):
    for decode in DECODERS:
        decode(buf)


@FUZZ
@given(_values)
def test_random_msgpack_values_only_raise_decoder_errors(v):
    buf = _pack(v)
    for decode in DECODERS:
        decode(buf)
    # the same value wrapped in a plausible envelope gets past the version/type checks
    for t in ("generate", "prefill", "abort", "tokens", "prefill_failed"):
        _request_or_error(_pack({"v": 1, "type": t, "rid": v, "kv_key": v}))
        _tokens_or_error(_pack({"v": 1, "type": "tokens", "worker": "w", "items": v, "kv_events": v, "load": v}))


@pytest.mark.parametrize("buf", VALID_REQUESTS + [VALID_BATCH], ids=lambda b: str(len(b)))
def test_every_truncation_is_rejected(buf):
    for n in range(len(buf)):
        for decode, err in ((messages.decode_request, messages.PlaneError), (messages.decode_tokens, messages.PlaneError)):
            with pytest.raises(err):
                decode(buf[:n])


def _mutate(data, buf: bytes) -> bytes:
    """Replace, drop or add fields of a valid message, at the top level and one level down."""
    d = msgpack.unpackb(buf, raw=False)
    keys = sorted(d)
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.sampled_from(keys + ["extra"]))
        op = data.draw(st.integers(0, 3))
        if op == 0:
            d.pop(k, None)
        elif op == 1 and isinstance(d.get(k), (list, dict)) and d[k]:
            inner = d[k]
            if isinstance(inner, list):
                inner[data.draw(st.integers(0, len(inner) - 1))] = data.draw(_values)
            else:
                inner[data.draw(st.sampled_from(sorted(inner)))] = data.draw(_values)
        else:
            d[k] = data.draw(_values)
    return _pack(d)


@FUZZ
@given(st.data(), st.sampled_from(VALID_REQUESTS))
def test_mutated_request_messages(data, buf):
    _request_or_error(_mutate(data, buf))


@FUZZ
@given(st.data())
def test_mutated_token_batches(data):
    buf = VALID_BATCH
    if data.draw(st.booleans()):    # mutate one item's fields or one event instead
        d = msgpack.unpackb(buf, raw=False)
        which = data.draw(st.sampled_from(["items", "kv_events"]))
        row = d[which][data.draw(st.integers(0, len(d[which]) - 1))]
        row[data.draw(st.integers(0, len(row) - 1))] = data.draw(_values)
        buf = _pack(d)
    else:
        buf = _mutate(data, buf)
    _tokens_or_error(buf)


def test_wrong_typed_fields_are_named():
    base = msgpack.unpackb(VALID_BATCH, raw=False)
    cases = {("items", 0, 1): ["x"], ("items", 0, 3): "done", ("items", 0, 4): [1e0, "a"],
             ("items", 1, 5): -1, ("kv_events", 0, 1): [1, 2], ("kv_events", 0, 0): "moved"}
    for (key, row, col), bad in cases.items():
        d = msgpack.unpackb(VALID_BATCH, raw=False)
        d[key][row][col] = bad
        with pytest.raises(messages.PlaneError):
            messages.decode_tokens(_pack(d))
    assert messages.decode_tokens(_pack(base)).worker == "decode-0"
    gen = msgpack.unpackb(VALID_REQUESTS[0], raw=False)
    for field, bad, msg in [("params", {"logprobs": "yes"}, "params.logprobs"),
                            ("params", {"temperature": math.nan}, "params.temperature"),
                            ("params", {"bogus": 1}, "params: unknown"),
                            ("prompt_ids", [1, True], "prompt_ids"), ("cache_salt", "text", "cache_salt"),
                            ("kv_timeout_s", math.inf, "kv_timeout_s"), ("rid", "", "rid")]:
        d = dict(gen, **{field: bad})
        with pytest.raises(messages.PlaneError, match=msg):
            messages.decode_request(_pack(d))


def test_oversized_messages_are_rejected_before_unpacking():
    big = b"\x00" * (messages.MAX_MESSAGE_BYTES + 1)
    for decode in (messages.decode_request, messages.decode_tokens):
        with pytest.raises(messages.PlaneError, match="exceeds"):
            decode(big)
    with pytest.raises(wire.WireError, match="bytes >"):
        wire.decode_header(b"\x00" * (wire.MAX_HEADER_BYTES + 1))
    # a list longer than any message may carry is refused by msgpack's length limits
    with pytest.raises(messages.PlaneError):
        messages.decode_request(b"\xdf\x00\x00\x10\x00")   # a map claiming 4096 entries
    huge = _pack({"v": 1, "type": "tokens", "worker": "w", "items": [[]] * (messages.MAX_ITEMS + 1)})
    with pytest.raises(messages.PlaneError, match="items"):
        messages.decode_tokens(huge)


def _peak_bytes(fn, buf) -> int:
    tracemalloc.start()
    try:
        try:
            fn(buf)
        except (messages.PlaneError, wire.WireError):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("filler", [b"\x90", b"\x80", b"\x91\xc0", b"\x81\xa0\xc0", b"\xa1a"])
def test_hostile_buffers_stay_within_the_memory_bound(filler):
    """Dense containers are the worst case (one wire byte -> a whole Python object). The
    decoders unpack into tuples with a shared empty map, so the peak stays under ~45x the
    buffer (measured: 43x for one-entry maps, 16x for empty containers; plain lists and
    dicts are ~72x: at the 16 MiB cap, ~0.7 GB instead of ~1.2 GB)."""
    n = (1 << 20) // len(filler)
    arr = b"\xdd" + n.to_bytes(4, "big") + filler * n          # [filler, filler, ...]
    buf = b"\x83\xa1v\x01\xa4type\xa6tokens\xa5items" + arr     # {"v": 1, "type": "tokens", "items": [...]}
    for fn in (messages.decode_tokens, messages.decode_request):
        peak = _peak_bytes(fn, buf)
        assert peak < 48 * len(buf), (filler, fn.__name__, peak / len(buf))
    h = b"\x81\xa1x\xdc" + (len(filler) and (wire.MAX_BLOCKS_PER_MESSAGE - 1).to_bytes(2, "big")) + \
        filler * (wire.MAX_BLOCKS_PER_MESSAGE - 1)
    assert _peak_bytes(wire.decode_header, h) < 100 * (wire.MAX_HEADER_BYTES + 1)   # ~25 MiB at most
