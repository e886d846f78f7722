"""KV transfer: the wire format, the ZeroMQ backend (tcp and ipc), a real prefill ->
decode handoff between two engines, deadlines with fallback to in-place prefill, and a
table of malformed messages plus a property test of the header decoder."""
from __future__ import annotations

import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kv_transfer as kt
from helpers import run_to_completion
from engine import SamplingParams
from kv_transfer import wire
from kv_transfer.wire import KVLayout, Reservation, UnknownRequestError, WireError


def small_layout(dtype="float32", **kw) -> KVLayout:
    return KVLayout(**{**dict(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8,
                              dtype=dtype, vocab_size=1000), **kw})


class Sink:
    """A stand-in KV cache: [layer, 2, block, slot, head, dim]; records every write."""

    def __init__(self, layout: KVLayout):
        self.cache = torch.zeros(layout.num_layers, *layout.block_shape(layout.num_blocks),
                                 dtype=layout.torch_dtype)
        self.writes = []

    def __call__(self, rid, layer, block_ids, tensor):
        assert tensor.dtype == self.cache.dtype and tensor.shape == self.cache[layer][:, block_ids].shape
        self.cache[layer][:, torch.tensor(block_ids)] = tensor
        self.writes.append((rid, layer, tuple(block_ids)))


def poll_until(rx, pred, timeout_s=5.0):
    """Poll, accumulating results, until pred(completed, failed) holds."""
    done, failed = [], []
    end = time.monotonic() + timeout_s
    while True:
        r = rx.poll(50)
        done += r.completed
        failed += r.failed
        if pred(done, failed):
            return done, failed
        if time.monotonic() > end:
            raise AssertionError(f"timed out: completed={done} failed={failed} stats={rx.stats}")


def wait_for(rx, cond, timeout_s=5.0):
    """Poll until cond() holds; no transfer may complete or fail meanwhile."""
    end = time.monotonic() + timeout_s
    while not cond():
        r = rx.poll(20)
        assert not r, f"unexpected {r}"
        assert time.monotonic() < end, f"timed out; stats={rx.stats}"


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def pair(request):
    made = []

    def make(layout, bind="tcp", sink=None, rx_kw=None, tx_kw=None):
        sink = sink or Sink(layout)
        rx = kt.make_receiver("zmq", layout, sink, bind=bind, **(rx_kw or {}))
        made.append(rx)
        tx = kt.make_sender("zmq", rx.endpoint, **(tx_kw or {}))
        made.append(tx)
        return rx, tx, sink

    yield make
    for x in reversed(made):
        x.close(0) if isinstance(x, kt.KVSender) else x.close()


# ---- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bind", ["tcp", "ipc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bytes_equal_and_completion_after_all_layers_and_done(pair, bind, dtype):
    layout = small_layout(dtype)
    rx, tx, sink = pair(layout, bind)
    assert rx.endpoint.startswith("tcp://127.0.0.1:" if bind == "tcp" else "ipc://")
    dst = [3, 5, 7, 9]
    rx.expect("r", dst, deadline=time.monotonic() + 10)
    sent = [torch.randn(layout.block_shape(len(dst))).to(layout.torch_dtype) for _ in range(layout.num_layers)]
    for layer in range(layout.num_layers - 1):
        tx.send_layer("r", layer, dst, sent[layer])
    tx.send_done("r", 7, layout.num_layers)     # done before the last layer: must still wait
    assert tx.flush(5)
    wait_for(rx, lambda: rx.progress("r")["layers_landed"] == [0, 1] and rx.progress("r")["done"])
    assert not rx.poll(100)
    tx.send_layer("r", layout.num_layers - 1, dst, sent[-1])
    done, failed = poll_until(rx, lambda d, f: d or f)
    assert done == [kt.Completed("r", 7)] and not failed
    for layer in range(layout.num_layers):
        assert raw_bytes(sink.cache[layer][:, dst]) == raw_bytes(sent[layer])
    untouched = [b for b in range(layout.num_blocks) if b not in dst]
    assert not sink.cache[:, :, untouched].any()
    assert rx.pending() == [] and rx.stats["rejected"] == 0


def test_done_first_then_layers_from_another_sender(pair):
    layout = small_layout()
    rx, tx, sink = pair(layout)
    rx.expect("r", [1, 2])
    tx.send_done("r", 3, layout.num_layers)
    assert tx.flush(5)
    wait_for(rx, lambda: rx.progress("r")["done"])
    with kt.make_sender("zmq", rx.endpoint) as tx2:
        for layer in range(layout.num_layers):
            tx2.send_layer("r", layer, [1, 2], torch.ones(layout.block_shape(2)))
        done, _ = poll_until(rx, lambda d, f: d)
    assert done == [kt.Completed("r", 3)] and len(sink.writes) == layout.num_layers


def test_large_layers_are_split_and_oversized_frames_are_refused(pair):
    """A sender splits a layer into messages of at most max_message_bytes; a peer that
    sends a bigger frame is cut off by libzmq (ZMQ_MAXMSGSIZE), and nothing reaches us."""
    layout = small_layout(num_blocks=512, head_dim=32)   # 2 KiB per block
    cap = 300 * 1024    # > the header cap (which the receiver must also admit), < the whole layer
    rx, tx, sink = pair(layout, "ipc", rx_kw=dict(max_message_bytes=cap), tx_kw=dict(max_message_bytes=cap))
    rogue = zmq.Context.instance().socket(zmq.PUSH)
    rogue.connect(rx.endpoint)
    rx.expect("big", list(range(1, 401)))
    bad = torch.zeros(layout.block_shape(400))
    rogue.send_multipart(wire.encode_kv("big", 0, range(1, 401), bad), copy=True)
    rx.poll(200)
    assert sink.writes == [] and rx.stats["messages"] == 0
    rogue.close(0)
    data = [torch.randn(layout.block_shape(400)) for _ in range(layout.num_layers)]
    tx.send_done("big", 1, layout.num_layers)
    for layer, t in enumerate(data[:-1]):
        tx.send_layer("big", layer, list(range(1, 401)), t)
    # Half of the last layer's blocks: that layer has not landed, so no completion yet.
    tx.send_layer("big", layout.num_layers - 1, list(range(1, 201)), data[-1][:, :200])
    assert tx.flush(5)
    wait_for(rx, lambda: rx.stats["layers_written"] == layout.num_layers * 3 - 1)   # 150 blocks a message
    assert rx.progress("big")["layers_landed"] == list(range(layout.num_layers - 1))
    assert not rx.poll(100)
    tx.send_layer("big", layout.num_layers - 1, list(range(201, 401)), data[-1][:, 200:])
    done, _ = poll_until(rx, lambda d, f: d)
    assert done == [kt.Completed("big", 1)]
    assert all(len(ids) * layout.bytes_per_block <= cap for _, _, ids in sink.writes)
    for layer, t in enumerate(data):
        assert torch.equal(sink.cache[layer][:, 1:401], t)


def test_sender_abort_fails_transfer_at_once(pair):
    layout = small_layout()
    rx, tx, _ = pair(layout)
    rx.expect("a", [1], deadline=time.monotonic() + 60)
    tx.send_layer("a", 0, [1], torch.ones(layout.block_shape(1)))
    tx.send_abort("a", "prefill worker preempted")
    _, failed = poll_until(rx, lambda d, f: f, timeout_s=5)
    assert failed[0].request_id == "a" and "prefill worker preempted" in failed[0].reason


def test_transfer_time_sums_count_completed_transfers_only(pair):
    """seconds: expect() to completion (the decode worker's whole wait); wire_seconds: the
    first message to completion. Failed and timed-out transfers add nothing to either."""
    layout = small_layout()
    rx, tx, _ = pair(layout)
    assert (rx.stats["seconds"], rx.stats["wire_seconds"]) == (0.0, 0.0)
    rx.expect("t", [2, 3], deadline=time.monotonic() + 10)
    time.sleep(0.1)     # (kept: the time is what is measured) the prefill runs: waiting, nothing on the wire
    for layer in range(layout.num_layers):
        tx.send_layer("t", layer, [2, 3], torch.ones(layout.block_shape(2)))
    tx.send_done("t", 1, layout.num_layers)
    done, _ = poll_until(rx, lambda d, f: d)
    assert done == [kt.Completed("t", 1)]
    secs, wire = rx.stats["seconds"], rx.stats["wire_seconds"]
    assert secs >= 0.1 and 0.0 <= wire <= secs - 0.1
    # An aborted transfer and one past its deadline (after some data landed) leave the sums be.
    rx.expect("a", [4], deadline=time.monotonic() + 10)
    tx.send_layer("a", 0, [4], torch.ones(layout.block_shape(1)))
    tx.send_abort("a", "gone")
    rx.expect("late", [5], deadline=time.monotonic() + 0.3)
    tx.send_layer("late", 0, [5], torch.ones(layout.block_shape(1)))
    _, failed = poll_until(rx, lambda d, f: len(f) == 2)
    assert sorted(f.request_id for f in failed) == ["a", "late"] and rx.stats["timed_out"] == 1
    assert (rx.stats["seconds"], rx.stats["wire_seconds"], rx.stats["completed"]) == (secs, wire, 1)


def test_sender_marks_request_failed_when_receiver_is_gone(tmp_path):
    tx = kt.make_sender("zmq", f"ipc://{tmp_path}/nobody.sock", sndhwm=1, send_timeout_s=0.2)
    try:
        layout = small_layout()
        for layer in range(layout.num_layers):
            tx.send_layer("lost", layer, [1], torch.ones(layout.block_shape(1)))
        tx.send_done("lost", 1, layout.num_layers)
        assert tx.flush(10)
        assert tx.failed_requests() == {"lost"}
    finally:
        tx.close(0)


def test_factories_and_argument_checks():
    layout = small_layout()
    with pytest.raises(ValueError, match="nccl://"):   # the nccl backend: tests/test_kv_transfer_p2p.py
        kt.make_sender("nccl", "tcp://127.0.0.1:5555")
    with pytest.raises(ValueError):
        kt.make_sender("carrier-pigeon", "tcp://127.0.0.1:5555")
    with pytest.raises(ValueError):
        kt.make_sender("zmq", "inproc://x")
    with pytest.raises(ValueError):
        kt.make_sender("zmq", "tcp://127.0.0.1:*")
    with kt.make_receiver("zmq", layout, Sink(layout)) as rx:
        with pytest.raises(ValueError):
            rx.expect("x", [1, 1])
        with pytest.raises(ValueError):
            rx.expect("x", [layout.num_blocks])
        with pytest.raises(ValueError):
            rx.expect("x", [1], num_layers=layout.num_layers + 1)
        rx.expect("x", [1])
        with pytest.raises(ValueError):
            rx.expect("x", [2])
        assert rx.cancel("x") and not rx.cancel("x")
        with kt.make_sender("zmq", rx.endpoint) as tx:
            with pytest.raises(ValueError):
                tx.send_layer("x", 0, [1, 2], torch.ones(layout.block_shape(1)))
            with pytest.raises(ValueError):
                tx.send_layer("x", 0, [1], torch.ones(layout.block_shape(1), dtype=torch.int64))
            with pytest.raises(ValueError):
                tx.send_done("", 1, 3)


# ---- two real engines ----------------------------------------------------------------------------------
PROMPT = [(i * 7919) % 49000 + 10 for i in range(75)]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture
def engines(make_engine):
    ref = make_engine("random:tiny", num_kv_blocks=64)
    ref.add_request("ref", PROMPT, PARAMS)
    expected = run_to_completion(ref)["ref"]
    return make_engine("random:tiny", num_kv_blocks=64), make_engine("random:tiny", num_kv_blocks=64), expected


class CountingWriter:
    def __init__(self, engine):
        self.write, self.calls = kt.engine_writer(engine), []

    def __call__(self, rid, layer, block_ids, tensor):
        self.calls.append((rid, layer))
        self.write(rid, layer, block_ids, tensor)


def run_prefill(prefill, rid, first_block, send):
    """Run a prefill-only request, calling send(layer, blocks) from on_layer_done."""
    prefill.add_request(rid, PROMPT, PARAMS, prefill_only=True)
    layers, outs = [], []

    def on_layer_done(layer):
        seq_p = prefill.scheduler.find(rid)
        layers.append(layer)
        send(layer, prefill.runner.read_kv_blocks(layer, seq_p.block_table[first_block:]))

    while prefill.has_unfinished():
        outs += prefill.step(on_layer_done=on_layer_done)
    assert layers == list(range(prefill.model_config.num_layers)), "prompt must prefill in one step here"
    assert outs[-1].finished and len(outs[-1].new_token_ids) == 1
    return outs[-1].new_token_ids[0]


@pytest.mark.parametrize("bind", ["tcp", "ipc"])
def test_engine_handoff_over_zmq_equals_single_engine(engines, bind):
    prefill, decode, expected = engines
    bs, L = decode.cfg.block_size, decode.model_config.num_layers
    decode.add_request("warm", PROMPT[:40], SamplingParams(max_tokens=1))
    run_to_completion(decode)
    seq_d = decode.add_remote_prefill("r1", PROMPT, PARAMS)
    assert seq_d is not None and seq_d.num_cached_tokens == 32
    first = seq_d.num_computed_tokens // bs
    dst = seq_d.block_table[first:]
    writer = CountingWriter(decode)
    with kt.make_receiver("zmq", KVLayout.from_engine(decode), writer, bind=bind) as rx, \
            kt.make_sender("zmq", rx.endpoint) as tx:
        rx.expect("r1", dst, L, time.monotonic() + 20)
        first_token = run_prefill(prefill, "r1", first, lambda layer, data: tx.send_layer("r1", layer, dst, data))
        assert tx.flush(5)
        wait_for(rx, lambda: rx.progress("r1")["layers_landed"] == list(range(L)))
        tx.send_done("r1", first_token, L)
        done, failed = poll_until(rx, lambda d, f: d or f)
        assert done == [kt.Completed("r1", first_token)] and not failed
        assert writer.calls == [("r1", 0), ("r1", 1)]
        src = prefill.scheduler.held["r1"].block_table[first:]
        assert torch.equal(decode.runner.kv_cache[:, :, dst], prefill.runner.kv_cache[:, :, src])
        assert prefill.release("r1")
        decode.remote_kv_landed("r1", first_token)
        assert [first_token] + run_to_completion(decode)["r1"] == expected


def test_engine_handoff_timeout_falls_back_and_drops_late_frames(engines):
    prefill, decode, expected = engines
    L = decode.model_config.num_layers
    seq_d = decode.add_remote_prefill("t1", PROMPT, PARAMS)
    dst = list(seq_d.block_table)
    writer = CountingWriter(decode)
    stash = {}
    with kt.make_receiver("zmq", KVLayout.from_engine(decode), writer, bind="ipc") as rx, \
            kt.make_sender("zmq", rx.endpoint) as tx:
        # The prefill runs; its "worker" then dies after shipping the first layer.
        first_token = run_prefill(prefill, "t1", 0, stash.__setitem__)
        t0 = time.monotonic()
        rx.expect("t1", dst, L, t0 + 0.5)
        tx.send_layer("t1", 0, dst, stash.pop(0))
        done, failed = poll_until(rx, lambda d, f: f, timeout_s=5)
        assert time.monotonic() - t0 >= 0.5
        assert not done and failed[0].request_id == "t1" and "deadline" in failed[0].reason
        assert writer.calls == [("t1", 0)]
        decode.remote_kv_failed("t1")
        got = [t for o in decode.step() for t in o.new_token_ids]   # prefilled in place
        assert len(got) == 1
        # The prefill worker comes back and finishes: every late frame is dropped, unwritten.
        for layer, data in stash.items():
            tx.send_layer("t1", layer, dst, data)
        tx.send_done("t1", first_token, L)
        assert tx.flush(5)
        wait_for(rx, lambda: rx.stats["dropped_late"] == L)
        assert writer.calls == [("t1", 0)] and rx.stats["rejected"] == 0
        assert prefill.release("t1")
    got += run_to_completion(decode)["t1"]
    assert got == expected


# ---- malformed input ------------------------------------------------------------------------------
RES = (1, 2, 3)


def _hdr(rid, drop=(), **over):
    d = dict(version=1, type="kv", request_id=rid, layer=0, block_ids=list(RES), dtype="float32",
             shape=[2, 3, 4, 2, 8])
    d.update(over)
    for k in drop:
        d.pop(k)
    return msgpack.packb(d, use_bin_type=True)


def _done(rid, **over):
    d = dict(version=1, type="done", request_id=rid, first_token=5, num_layers=3)
    d.update(over)
    return msgpack.packb(d, use_bin_type=True)


DATA = bytes(2 * 3 * 4 * 2 * 8 * 4)

BAD = {
    "bad msgpack": lambda r: [b"\xc1\xc1", DATA],
    "trailing bytes": lambda r: [_hdr(r) + b"\x00", DATA],
    "nested too deep": lambda r: [b"\x91" * 5000],
    "not a map": lambda r: [msgpack.packb([1, 2, 3])],
    "empty header": lambda r: [b"", DATA],
    "no frames": lambda r: [],
    "wrong version": lambda r: [_hdr(r, version=2), DATA],
    "version as str": lambda r: [_hdr(r, version="1"), DATA],
    "unknown type": lambda r: [_hdr(r, type="kv2"), DATA],
    "missing key": lambda r: [_hdr(r, drop=["dtype"]), DATA],
    "extra key": lambda r: [_hdr(r, extra=1), DATA],
    "int map key": lambda r: [msgpack.packb({1: 2}), DATA],
    "layer as str": lambda r: [_hdr(r, layer="0"), DATA],
    "layer as bool": lambda r: [_hdr(r, layer=True), DATA],
    "layer as float": lambda r: [_hdr(r, layer=0.0), DATA],
    "layer out of range": lambda r: [_hdr(r, layer=3), DATA],
    "request id too long": lambda r: [_hdr("x" * 300), DATA],
    "request id not str": lambda r: [_hdr(7), DATA],
    "request id as bin": lambda r: [_hdr(r.encode()), DATA],
    "dtype not allowed": lambda r: [_hdr(r, dtype="int64"), DATA],
    "dtype not the cache's": lambda r: [_hdr(r, dtype="float16"), DATA[:len(DATA) // 2]],
    "dtype as list": lambda r: [_hdr(r, dtype=["float32"]), DATA],
    "shape mismatch": lambda r: [_hdr(r, shape=[2, 3, 4, 8, 2]), DATA],
    "shape not ints": lambda r: [_hdr(r, shape=[2, 3, 4, 2, "8"]), DATA],
    "shape too many dims": lambda r: [_hdr(r, shape=[1] * 9), DATA],
    "block ids out of range": lambda r: [_hdr(r, block_ids=[1, 2, 99]), DATA],
    "negative block id": lambda r: [_hdr(r, block_ids=[-1, 2, 3]), DATA],
    "block id as str": lambda r: [_hdr(r, block_ids=[1, "2", 3]), DATA],
    "block ids not a list": lambda r: [_hdr(r, block_ids=1), DATA],
    "block ids not reserved": lambda r: [_hdr(r, block_ids=[4, 5, 6]), DATA],
    "duplicate block ids": lambda r: [_hdr(r, block_ids=[1, 1, 2]), DATA],
    "empty block ids": lambda r: [_hdr(r, block_ids=[], shape=[2, 0, 4, 2, 8]), b""],
    "bytes too short": lambda r: [_hdr(r), DATA[:-4]],
    "bytes too long": lambda r: [_hdr(r), DATA + b"\0" * 4],
    "truncated: no data frame": lambda r: [_hdr(r)],
    "too many frames": lambda r: [_hdr(r), DATA, b"extra"],
    "far too many frames": lambda r: [_hdr(r), DATA] + [b"x"] * 50,
    "done with a data frame": lambda r: [_done(r), DATA],
    "done wrong num_layers": lambda r: [_done(r, num_layers=2)],
    "done num_layers zero": lambda r: [_done(r, num_layers=0)],
    "done token out of vocab": lambda r: [_done(r, first_token=5000)],
    "done negative token": lambda r: [_done(r, first_token=-1)],
    "done token as float": lambda r: [_done(r, first_token=1.5)],
    "abort reason too long": lambda r: [msgpack.packb(dict(version=1, type="abort", request_id=r,
                                                           reason="y" * 5000))],
    "oversized header": lambda r: [msgpack.packb(dict(version=1, type="kv", request_id=r,
                                                      pad="z" * wire.MAX_HEADER_BYTES)), DATA],
    "unknown request": lambda r: [_hdr("nobody-expects-this"), DATA],
}


def test_malformed_messages_are_rejected_and_receiver_keeps_working(pair):
    layout = small_layout()
    rx, tx, sink = pair(layout)
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(rx.endpoint)
    try:
        for i, (name, build) in enumerate(BAD.items()):
            rid = f"bad{i}"
            frames = build(rid)
            with pytest.raises(WireError) as ei:
                wire.decode_message(frames, layout, {rid: Reservation(RES, 3)})
            if name == "unknown request":
                assert isinstance(ei.value, UnknownRequestError)
            if not frames:
                continue
            rx.expect(rid, list(RES), deadline=time.monotonic() + 60)
            before = dict(rx.stats)
            raw.send_multipart(frames)
            end = time.monotonic() + 5
            failed = []
            while rx.stats["messages"] == before["messages"]:
                failed += rx.poll(50).failed
                assert time.monotonic() < end, name
            counted = rx.stats["rejected"] - before["rejected"] + rx.stats["dropped_unknown"] - before["dropped_unknown"]
            assert counted == 1, name
            assert isinstance(rx.recent_errors[-1], WireError), name
            assert str(rx.recent_errors[-1]) == str(ei.value), name
            if ei.value.request_id == rid:      # a broken message names its transfer: fail it now
                assert [f.request_id for f in failed] == [rid], name
            else:
                assert failed == [] and rx.cancel(rid), name
        assert sink.writes == []
        # ... and the receiver still works.
        rx.expect("good", [4, 5], deadline=time.monotonic() + 10)
        data = [torch.randn(layout.block_shape(2)) for _ in range(layout.num_layers)]
        for layer, t in enumerate(data):
            tx.send_layer("good", layer, [4, 5], t)
        tx.send_done("good", 9, layout.num_layers)
        done, failed = poll_until(rx, lambda d, f: d or f)
        assert done == [kt.Completed("good", 9)] and not failed
        assert all(torch.equal(sink.cache[i][:, [4, 5]], t) for i, t in enumerate(data))
    finally:
        raw.close(0)


# ---- property tests --------------------------------------------------------------------------------------
_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20) \
    | st.binary(max_size=20)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=8)
_fields = ["version", "type", "request_id", "layer", "block_ids", "dtype", "shape", "first_token", "num_layers",
           "reason"]
_good = dict(version=1, type="kv", request_id="r", layer=0, block_ids=[1, 2, 3], dtype="float32",
             shape=[2, 3, 4, 2, 8])
_plausible = {
    "version": st.sampled_from([1, 0, 2, -1, True]) | _scalars,
    "type": st.sampled_from(["kv", "done", "abort", "KV", ""]) | _scalars,
    "request_id": st.text(max_size=300) | _scalars,
    "layer": st.integers(-3, 5000) | _scalars,
    "block_ids": st.lists(st.integers(-2, 20), max_size=6) | _values,
    "dtype": st.sampled_from(sorted(wire.DTYPES) + ["int8", "float"]) | _scalars,
    "shape": st.lists(st.integers(-1, 8), max_size=9) | _values,
    "first_token": st.integers(-2, 2000) | _scalars,
    "num_layers": st.integers(-1, 5000) | _scalars,
    "reason": st.text(max_size=50) | _scalars,
}


def _check_decoders(buf: bytes, data: bytes) -> None:
    try:
        h = wire.decode_header(buf)
    except WireError:
        h = None
    except Exception as e:   # anything else is a bug
        raise AssertionError(f"decode_header raised {type(e).__name__}: {e}") from e
    if h is not None:
        assert isinstance(h, (wire.KVHeader, wire.DoneHeader, wire.AbortHeader))
        assert type(h.request_id) is str and 0 < len(h.request_id) <= wire.MAX_REQUEST_ID_LEN
    layout = small_layout()
    for frames in ([buf], [buf, data]):
        try:
            m = wire.decode_message(frames, layout, {"r": Reservation(RES, 3)})
        except WireError:
            continue
        except Exception as e:
            raise AssertionError(f"decode_message raised {type(e).__name__}: {e}") from e
        if isinstance(m, wire.KVMessage):
            assert m.data.shape == layout.block_shape(len(m.header.block_ids)) and set(m.header.block_ids) <= set(RES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.binary(max_size=800))
def test_property_random_bytes_only_raise_wire_error(buf, data):
    _check_decoders(buf, data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_fields) | st.text(max_size=8), _values, max_size=10),
       st.sampled_from([DATA, b"", DATA[:-1]]))
def test_property_random_msgpack_maps_only_raise_wire_error(d, data):
    _check_decoders(msgpack.packb(d, use_bin_type=True), data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([DATA, DATA[:-4], DATA[: len(DATA) // 2]]))
def test_property_mutated_valid_headers_only_raise_wire_error(draw, data):
    d = dict(_good)
    if draw.draw(st.booleans()):
        d = dict(version=1, type=draw.draw(st.sampled_from(["done", "abort"])), request_id="r",
                 first_token=5, num_layers=3, reason="x")
        d.pop("reason" if d["type"] == "done" else "first_token")
        if d["type"] == "abort":
            d.pop("num_layers")
    for k in draw.draw(st.lists(st.sampled_from(_fields), max_size=3, unique=True)):
        if draw.draw(st.integers(0, 4)) == 0:
            d.pop(k, None)
        else:
            d[k] = draw.draw(_plausible[k])
    _check_decoders(msgpack.packb(d, use_bin_type=True), data)


def test_valid_headers_round_trip():
    t = torch.randn(2, 3, 4, 2, 8).to(torch.bfloat16)
    frames = wire.encode_kv("r", 2, [1, 2, 3], t)
    m = wire.decode_message(frames, small_layout("bfloat16"), {"r": Reservation(RES, 3)})
    assert m.header == wire.KVHeader("r", 2, (1, 2, 3), "bfloat16", (2, 3, 4, 2, 8))
    assert raw_bytes(m.data) == raw_bytes(t)
    assert wire.decode_header(wire.encode_done("r", 5, 3)[0]) == wire.DoneHeader("r", 5, 3)
    assert wire.decode_header(wire.encode_abort("r", "why")[0]) == wire.AbortHeader("r", "why")


# ---- GPU (device machine) ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_through_pinned_memory(pair):
    layout = small_layout("bfloat16", num_blocks=64)
    cache = torch.zeros(layout.num_layers, *layout.block_shape(layout.num_blocks), dtype=torch.bfloat16,
                        device="cuda")

    def write(rid, layer, block_ids, t):
        cache[layer][:, torch.tensor(block_ids, device="cuda")] = t.to("cuda")

    rx, tx, _ = pair(layout, "ipc", sink=write)
    dst = list(range(10, 40))
    rx.expect("g", dst)
    src = torch.randn(layout.num_layers, *layout.block_shape(30), device="cuda").to(torch.bfloat16)
    for layer in range(layout.num_layers):
        x = src[layer] * 1   # produced on the current stream just before the send, as in on_layer_done
        tx.send_layer("g", layer, dst, x)
        del x                # the sender must keep it alive until its copy ran
    tx.send_done("g", 1, layout.num_layers)
    done, _ = poll_until(rx, lambda d, f: d)
    assert done == [kt.Completed("g", 1)]
    assert torch.equal(cache[:, :, dst], src)
