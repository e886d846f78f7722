"""The "cuda_ipc" KV transfer backend (kv_transfer/ipc_backend.py). On CPU the same code
shares the decode cache through POSIX shared memory instead of a CUDA IPC handle, so the
protocol (claims, grants, revokes, fences, leases, stale instances, lost senders) and the
block copies run here, between this process and sender processes started from this file
(``python tests/test_kv_transfer_ipc.py sender ENDPOINT SEED``). GPU tests are marked
``gpu``: two processes on one GPU, the workers in fp32 against in-place prefill."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before Triton loads: the block-copy kernel runs interpreted

import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import zmq

import kv_transfer as kt
from kv_transfer import ipc_backend as ipc
from kv_transfer.block_copy import copy_blocks, copy_blocks_reference
from kv_transfer.wire import KVLayout, WireError

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
LAYOUT = dict(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32", vocab_size=1000)


def src_cache(seed: int, layout: KVLayout, num_blocks: int = 48) -> torch.Tensor:
    """The prefill side's cache: both processes build it the same way."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.num_layers, *layout.block_shape(num_blocks), generator=g).to(layout.torch_dtype)


def new_rx(layout: KVLayout, **kw):
    cache = torch.zeros(layout.num_layers, *layout.block_shape(layout.num_blocks), dtype=layout.torch_dtype)
    rx = kt.make_receiver("cuda_ipc", layout, None, cache=cache, **kw)
    return rx, cache


def poll_until(rx, cond, timeout_s: float = 20.0, out=None):
    out = out if out is not None else kt.PollResult()
    end = time.monotonic() + timeout_s
    while not cond(out):
        r = rx.poll(10)
        out.completed += r.completed
        out.failed += r.failed
        out.released += r.released
        assert time.monotonic() < end, f"timed out: {out} {rx.stats}"
    return out


@pytest.fixture
def pair():
    layout = KVLayout(**LAYOUT)
    made = []

    def make(rx_kw=None, tx_kw=None):
        rx, cache = new_rx(layout, **(rx_kw or {}))
        tx = kt.make_sender("cuda_ipc", rx.endpoint, **{**dict(send_timeout_s=5.0), **(tx_kw or {})})
        made.append((rx, tx))
        poll_until(rx, lambda _: rx.num_pairs() == 1)
        end = time.monotonic() + 10
        while tx._remote is None:   # the welcome handled on the sender's side too
            assert time.monotonic() < end and tx.broken is None
            time.sleep(0.001)
        return layout, rx, cache, tx

    yield make
    for rx, tx in made:
        tx.close(1.0)
        rx.close()


def rogue_sender(rx, pairs: int = 2):
    """A sender socket driven by hand, paired with rx (its hello answered; the welcome is
    its first message to read)."""
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(ipc.parse_endpoint(rx.endpoint).ctrl)
    rogue.send_multipart([b"c", ipc.encode_control("hello", inst=ipc.parse_endpoint(rx.endpoint).inst)])
    poll_until(rx, lambda _: rx.num_pairs() == pairs)
    return rogue


def fenced_until_failed(rogue):
    """A poll_until condition: answer every revoke as a sender must (a granted transfer's
    failure is reported once fenced); met once something failed."""
    def cond(o):
        while rogue.poll(0):
            d = ipc.decode_control(rogue.recv_multipart()[1], ipc._FROM_RECEIVER)
            if d["type"] == "revoke":
                rogue.send_multipart([b"c", ipc.encode_control("fenced", request_id=d["request_id"])])
        return o.failed
    return cond


def granted(rx, tx, rid):
    poll_until(rx, lambda _: rid in rx._claims)
    end = time.monotonic() + 10
    while rid not in tx._granted:
        rx.poll(5)
        assert time.monotonic() < end


# ---- the block copy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_copy_kernel_equals_the_torch_reference(dtype):
    import kv_transfer.block_copy as bc
    assert bc._kernel_ok(torch.empty(1), torch.empty(1)), "the kernel would not run (TRITON_INTERPRET unset?)"
    g = torch.Generator().manual_seed(1)
    src = torch.randn(2, 40, 4, 2, 6, generator=g).to(dtype)
    dst = torch.randn(2, 30, 4, 2, 6, generator=g).to(dtype)
    want = dst.clone()
    s = torch.tensor([3, 39, 0, 17], dtype=torch.long)
    d = torch.tensor([29, 1, 7, 2], dtype=torch.long)
    copy_blocks_reference(src, want, s, d)
    copy_blocks(src, dst, s, d)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(dst[:, 29], src[:, 3]) and not torch.equal(dst[:, 0], src[:, 0])
    with pytest.raises(ValueError):
        copy_blocks(src, dst.to(torch.float64), s, d)


def test_block_copy_of_several_layers_in_one_launch_equals_the_reference():
    g = torch.Generator().manual_seed(2)
    src = torch.randn(5, 2, 40, 4, 2, 6, generator=g)   # [layers, K/V, blocks, ...]
    dst = torch.randn(5, 2, 30, 4, 2, 6, generator=g)
    want = dst.clone()
    s = torch.tensor([3, 39, 0], dtype=torch.long)
    d = torch.tensor([29, 1, 7], dtype=torch.long)
    for layer in range(1, 4):
        copy_blocks_reference(src[layer], want[layer], s, d)
    copy_blocks(src[1:4].flatten(0, 1), dst[1:4].flatten(0, 1), s, d)   # views: the copy lands in dst
    assert torch.equal(dst, want) and not torch.equal(dst[0, :, 29], src[0, :, 3])
    with pytest.raises(ValueError):
        copy_blocks(src[1:4].flatten(0, 1), dst[1:3].flatten(0, 1), s, d)


def test_cache_copier_copies_any_run_of_layers_between_whole_caches():
    """CacheCopier (the cuda_ipc sender's hot path): each call lands exactly its layers'
    blocks, for caches of different block and layer counts; bad ranges are refused."""
    from kv_transfer.block_copy import CacheCopier
    g = torch.Generator().manual_seed(4)
    src = torch.randn(5, 2, 40, 4, 2, 6, generator=g).to(torch.bfloat16)   # [layers, K/V, blocks, ...]
    dst = torch.randn(4, 2, 30, 4, 2, 6, generator=g).to(torch.bfloat16)
    want = dst.clone()
    s = torch.tensor([3, 39, 0, 11], dtype=torch.long)
    d = torch.tensor([29, 1, 7, 0], dtype=torch.long)
    for layer in (0, 1, 3):
        copy_blocks_reference(src[layer], want[layer], s, d)
    c = CacheCopier(src, dst)
    c.copy(range(0, 2), s, d)
    c.copy(range(3, 4), s, d)
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16))
    assert not torch.equal(dst[2, :, 29], src[2, :, 3])   # layer 2 was not asked for
    for bad in (range(3, 5), range(2, 2), range(0, 4, 2)):   # past the smaller cache, empty, strided
        with pytest.raises(ValueError):
            c.copy(bad, s, d)
    with pytest.raises(ValueError):
        c.copy(range(0, 1), s, d[:3])
    with pytest.raises(ValueError):
        CacheCopier(src, dst.float())


def test_layers_due_groups_consecutive_layers_and_ships_the_last_partial_group():
    groups = [kt.layers_due(layer, 10, 4) for layer in range(10)]
    assert [g for g in groups if g is not None] == [range(0, 4), range(4, 8), range(8, 10)]
    assert [kt.layers_due(layer, 3, 1) for layer in range(3)] == [range(0, 1), range(1, 2), range(2, 3)]
    assert [kt.layers_due(layer, 3, 8) for layer in range(3)] == [None, None, range(0, 3)]


# ---- endpoints, control messages, handles ---------------------------------------------------------------
def test_endpoints_control_messages_and_cache_descriptions():
    ep = ipc.parse_endpoint("cudaipc://10.0.0.2:5555?inst=0123456789abcdef")
    assert ep == ipc.IpcEndpoint("10.0.0.2", 5555, "0123456789abcdef") and str(ep).startswith("cudaipc://10.0.0.2:5555")
    for bad in ["tcp://h:1", "cudaipc://h:1", "cudaipc://h?inst=0123456789abcdef", "cudaipc://h:1?inst=xyz",
                "cudaipc://h:1?inst=0123456789abcdef&x=1", "cudaipc://h:99999?inst=0123456789abcdef",
                "cudaipc://h:1/p?inst=0123456789abcdef", "cudaipc://h:1?inst=0123456789ABCDEF"]:
        with pytest.raises(ValueError):
            ipc.parse_endpoint(bad)
    assert kt.backend_of(str(ep)) == "cuda_ipc" and kt.backend_of("tcp://h:1") == "zmq"
    ok = ipc.encode_control("claim", request_id="r1")
    assert ipc.decode_control(ok, ipc._FROM_SENDER)["request_id"] == "r1"
    for bad in [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb(dict(v=1, type="nope")),
                msgpack.packb(dict(v=99, type="ping")), msgpack.packb(dict(v=1, type="claim")),
                msgpack.packb(dict(v=1, type="claim", request_id=7)), msgpack.packb(dict(v=1, type="ping", x=1)),
                b"x" * (ipc.MAX_CONTROL_BYTES + 1), ipc.encode_control("welcome", cache={}, layout={})]:
        with pytest.raises(WireError):
            ipc.decode_control(bad, ipc._FROM_SENDER)
    t = torch.arange(2 * 3 * 4 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 1, 2, 2)
    desc = ipc.export_cache(t)
    assert desc["kind"] == "cpu" and t.untyped_storage().is_shared()
    opened = ipc.open_cache(msgpack.unpackb(msgpack.packb(desc, use_bin_type=True), raw=False))
    opened[1, 0, 2] = -1.0
    assert torch.equal(t, opened) and t[1, 0, 2].eq(-1).all()   # one memory, two tensors
    for change in [dict(host="elsewhere/boot"), dict(shape=[2, 3]), dict(size=8), dict(kind="tpu"),
                   dict(dtype="int8"), dict(extra=1)]:
        with pytest.raises(ValueError):
            ipc.open_cache({**desc, **change})


def test_gpu_actors_see_their_own_gpu_first_and_the_hosts_others(monkeypatch):
    """CUDA IPC needs the peer GPU visible: GPU actors ask Ray not to mask devices and list
    their own first (so the engine's "cuda" is still their own)."""
    from worker_base.actor import NOSET_CUDA_VISIBLE_DEVICES, make_remote, own_gpu_first, visible_order
    assert visible_order(["1"], ["0", "1", "2", "3"]) == "1,0,2,3"
    assert visible_order(["2", "3"], ["2", "3", "4"]) == "2,3,4"
    assert visible_order(["0"], ["0"]) == "0"
    monkeypatch.delenv(NOSET_CUDA_VISIBLE_DEVICES, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    own_gpu_first()   # Ray masked this process itself: nothing to do
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    ray = pytest.importorskip("ray")

    class A:
        pass
    opts = make_remote(A, 1, 1, 0, 1)._default_options
    assert opts["runtime_env"]["env_vars"][NOSET_CUDA_VISIBLE_DEVICES] == "1"
    assert "runtime_env" not in make_remote(A, 0, 1, 0, 1)._default_options


# ---- one process: the protocol -------------------------------------------------------------------------------
def test_exact_transfer_block_to_block_and_from_gathered_tensors(pair):
    layout, rx, cache, tx = pair()
    src = src_cache(1, layout)
    rx.expect("a", [3, 5, 7], deadline=time.monotonic() + 20)
    tx.begin("a")
    granted(rx, tx, "a")
    for layer in range(layout.num_layers):
        tx.send_layer_blocks("a", layer, [3, 5, 7], src[layer], [10, 0, 47])
    tx.send_done("a", 42, layout.num_layers)
    out = poll_until(rx, lambda o: o.completed)
    assert [(c.request_id, c.first_token) for c in out.completed] == [("a", 42)]
    assert torch.equal(cache[:, :, [3, 5, 7]], src[:, :, [10, 0, 47]])
    assert tx.stats["copies"] == layout.num_layers and tx.stats["deferred_copies"] == 0
    # The generic send_layer (data already gathered), without begin(): claimed on first use.
    rx.expect("b", [8, 9], deadline=time.monotonic() + 20)
    for layer in range(layout.num_layers):
        tx.send_layer("b", layer, [8, 9], src[layer][:, [1, 2]])
    tx.send_done("b", 7, layout.num_layers)
    out = poll_until(rx, lambda o: o.completed)
    assert out.completed[0].request_id == "b" and torch.equal(cache[:, :, [8, 9]], src[:, :, [1, 2]])
    assert rx.stats["completed"] == 2 and not rx._claims and cache[:, :, 0].eq(0).all()


def test_several_layers_in_one_launch_land_exactly_with_one_report(pair):
    layout, rx, cache, tx = pair()
    src = src_cache(3, layout)
    rx.expect("m", [4, 1, 9], deadline=time.monotonic() + 20)
    tx.begin("m")
    granted(rx, tx, "m")
    copies, reports = tx.stats["copies"], tx.stats["reports"]
    tx.send_layers_blocks("m", range(0, 2), [4, 1, 9], src, [7, 30, 2])
    tx.send_layers_blocks("m", range(2, 3), [4, 1, 9], src, [7, 30, 2])
    tx.send_done("m", 5, layout.num_layers)
    out = poll_until(rx, lambda o: o.completed)
    assert tx.flush(5)   # the sender counts a report after sending it: the receiver may be faster
    assert [(c.request_id, c.first_token) for c in out.completed] == [("m", 5)]
    assert torch.equal(cache[:, :, [4, 1, 9]], src[:, :, [7, 30, 2]])
    assert tx.stats["copies"] - copies == 2                 # one launch per call, not per layer
    assert 1 <= tx.stats["reports"] - reports <= 2          # consecutive layers may share a report
    assert rx.stats["layers_written"] == layout.num_layers
    # Launched at once, so reported ahead of the copy with a doorbell number (on the CPU
    # the copy is synchronous and the bell has rung before the report leaves).
    assert rx.stats["reports_ahead"] == tx.stats["reports"] - reports
    for bad in (range(0, 0), range(0, 3, 2), range(2, 4), [0, 1]):
        with pytest.raises(ValueError):
            tx.send_layers_blocks("m", bad, [4], src, [7])
    # Not granted yet: the group is gathered at once and copied by the I/O thread, as one
    # item, once granted.
    deferred, reports = tx.stats["deferred_copies"], tx.stats["reports"]
    rx.expect("n", [2, 3], deadline=time.monotonic() + 20)
    tx.send_layers_blocks("n", range(0, 3), [2, 3], src, [5, 6])
    tx.send_done("n", 6, layout.num_layers)
    out = poll_until(rx, lambda o: o.completed)
    assert out.completed[0].request_id == "n" and torch.equal(cache[:, :, [2, 3]], src[:, :, [5, 6]])
    assert tx.stats["deferred_copies"] - deferred == 1 and tx.stats["reports"] - reports == 1
    # A layer the receiver's cache does not have fails that request (its done goes out as an
    # abort), not the sender's I/O thread.
    rx.expect("o", [5], deadline=time.monotonic() + 20)
    tx.send_layer("o", layout.num_layers, [5], src[0][:, [1]])
    tx.send_done("o", 1, layout.num_layers)
    out = poll_until(rx, lambda o: o.failed)
    assert out.failed[0].request_id == "o" and "o" in tx.failed_requests()
    rx.expect("p", [6], deadline=time.monotonic() + 20)
    tx.send_layers_blocks("p", range(0, 3), [6], src, [9])
    tx.send_done("p", 2, layout.num_layers)
    assert poll_until(rx, lambda o: o.completed).completed[0].request_id == "p"


def test_a_done_queued_behind_the_last_layers_goes_with_their_report(pair, monkeypatch):
    """The I/O thread finds the last group's copy and the done both queued (it is held
    until both are): one landed message carries both, no done message of its own
    follows, and the transfer completes exactly."""
    import threading
    from kv_transfer.ipc_backend import _LANDED, _WIRE, IpcKVSender
    layout, rx, cache, tx = pair()
    src = src_cache(3, layout)
    rx.expect("q", [4, 1], deadline=time.monotonic() + 20)
    tx.begin("q")
    granted(rx, tx, "q")
    kinds = []
    real_send, real_process = tx._send, IpcKVSender._process_queue
    gate = threading.Event()
    monkeypatch.setattr(tx, "_send", lambda kind, body: (kinds.append(kind), real_send(kind, body))[1])
    monkeypatch.setattr(IpcKVSender, "_process_queue", lambda self: real_process(self) if gate.is_set() else False)
    tx.send_layers_blocks("q", range(0, layout.num_layers), [4, 1], src, [7, 30])
    tx.send_done("q", 3, layout.num_layers)
    gate.set()
    tx._wake()
    out = poll_until(rx, lambda o: o.completed)
    assert [(c.request_id, c.first_token) for c in out.completed] == [("q", 3)]
    assert torch.equal(cache[:, :, [4, 1]], src[:, :, [7, 30]])
    assert tx.flush(5) and kinds.count(_LANDED) == 1 and kinds.count(_WIRE) == 0


@pytest.mark.parametrize("case", ["whole", "revoked", "send-fails"])
def test_a_merged_done_goes_only_for_a_request_that_landed_whole(pair, monkeypatch, case):
    """The last report and the queued done, as the I/O thread hands them over: merged when
    the request is whole; for a revoked request no report at all and an abort; when the
    merged message cannot be sent, an abort follows (the receiver falls back at once)."""
    from kv_transfer.ipc_backend import _LANDED, _WIRE, _Item
    layout, rx, cache, tx = pair()
    rx.expect("m1", [4], deadline=time.monotonic() + 20)
    tx.begin("m1")
    granted(rx, tx, "m1")
    sent = []

    def send(kind, body):
        if kind == _LANDED and case == "send-fails":
            raise zmq.Again()
        sent.append((kind, body))

    monkeypatch.setattr(tx, "_send", send)
    if case == "revoked":
        with tx._lock:
            tx._revoked.add("m1")
    landed = _Item("landed", "m1", 0, [4], num_layers=layout.num_layers)
    done = _Item("done", "m1", body=kt.wire.encode_done("m1", 3, layout.num_layers)[0])
    assert tx._report_landed([landed], done) == 1
    reports = [b for k, b in sent if k == _LANDED]
    finals = [kt.wire.decode_header(b) for k, b in sent if k == _WIRE]
    if case == "whole":
        assert len(reports) == 1 and ipc.decode_landed(reports[0])[4] == done.body and not finals
    else:
        assert not reports and len(finals) == 1 and isinstance(finals[0], kt.wire.AbortHeader)
    assert "m1" not in tx._begun and "m1" not in tx._revoked


def test_a_cancelled_granted_transfer_holds_its_blocks_until_the_sender_is_fenced(pair):
    layout, rx, cache, tx = pair()
    src = src_cache(2, layout)
    rx.expect("c", [1, 2], deadline=time.monotonic() + 20)
    tx.begin("c")
    granted(rx, tx, "c")
    tx.send_layer_blocks("c", 0, [1, 2], src[0], [4, 5])
    assert rx.cancel("c") and rx.write_pending("c")
    out = poll_until(rx, lambda o: o.released)
    assert out.released == ["c"] and not rx.write_pending("c") and rx.stats["fenced"] == 1
    # Once fenced, the sender writes nothing more of "c": later layers are dropped.
    before = cache.clone()
    tx.send_layer_blocks("c", 1, [1, 2], src[1], [4, 5])
    tx.send_layer("c", 2, [1, 2], src[2][:, [4, 5]])
    tx.send_done("c", 1, layout.num_layers)
    assert tx.flush(10)
    poll_until(rx, lambda o: True)
    assert torch.equal(cache, before) and rx.stats["completed"] == 0
    assert tx.stats["dones_as_aborts"] == 1   # its done went out as an abort (what a prefill worker counts)
    # An ungranted transfer needs no fence, and a claim after its cancel is denied.
    rx.expect("d", [3], deadline=time.monotonic() + 20)
    assert rx.cancel("d") and not rx.write_pending("d")
    tx.send_layer("d", 0, [3], src[0][:, [9]])
    poll_until(rx, lambda o: "d" in tx.failed_requests(), timeout_s=3)
    assert tx.flush(10)
    assert cache[:, :, 3].eq(0).all() and rx.stats["denials"] == 1


def test_a_deadline_on_a_granted_transfer_reports_failure_after_the_fence(pair):
    layout, rx, cache, tx = pair()
    rx.expect("e", [4], deadline=time.monotonic() + 0.5)
    tx.begin("e")
    granted(rx, tx, "e")
    out = poll_until(rx, lambda o: o.failed)
    assert out.failed[0].request_id == "e" and out.failed[0].reason.startswith("deadline")
    assert rx.stats["revokes"] == 1 and rx.stats["fenced"] == 1 and not rx._fences


def test_malformed_and_unauthorised_messages_fail_only_what_they_name(pair):
    layout, rx, cache, tx = pair()
    rx.expect("f", [6, 7], deadline=time.monotonic() + 20)
    tx.begin("f")
    granted(rx, tx, "f")
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(ipc.parse_endpoint(rx.endpoint).ctrl)
    try:
        # Garbage of every shape: counted and dropped; the receiver keeps serving.
        for frames in ([b"junk"], [b"c", b"\xc1"], [b"w", b"x", b"y"], [b"q", b"z"]):
            rogue.send_multipart(frames)
        # A sender of the previous protocol (layers reported as kv headers) is not a pair.
        rogue.send_multipart([b"c", msgpack.packb(dict(v=1, type="hello", inst=ipc.parse_endpoint(rx.endpoint).inst))])
        rogue.send_multipart([b"c", ipc.encode_control("hello", inst="f" * 16)])   # a stale instance
        poll_until(rx, lambda _: rx.stats["rejected"] >= 4 and rx.stats["pairs_refused"] == 1)
        assert rx.num_pairs() == 1
        reply = rogue.recv_multipart()
        assert ipc.decode_control(reply[1], ipc._FROM_RECEIVER)["type"] == "refuse"
        # A pair that was not granted "f" cannot report its layers.
        rogue.send_multipart([b"c", ipc.encode_control("hello", inst=ipc.parse_endpoint(rx.endpoint).inst)])
        poll_until(rx, lambda _: rx.num_pairs() == 2)
        rogue.send_multipart([b"c", ipc.encode_control("claim", request_id="f")])
        rogue.send_multipart([b"l", ipc.encode_landed("f", 0, 1, [6, 7])])
        out = poll_until(rx, lambda o: o.failed)
        assert out.failed[0].request_id == "f" and "not granted to this sender" in out.failed[0].reason
        assert rx.stats["denials"] == 1   # "claimed by another sender"
        # The granted sender was fenced before the failure was reported.
        assert rx.stats["fenced"] == 1
        # A header for blocks outside the reservation fails that transfer.
        rx.expect("g", [10], deadline=time.monotonic() + 20)
        rogue.send_multipart([b"c", ipc.encode_control("claim", request_id="g")])
        poll_until(rx, lambda _: "g" in rx._claims)
        rogue.send_multipart([b"l", ipc.encode_landed("g", 0, 1, [11])])
        out = poll_until(rx, lambda o: o.failed)
        assert "not reserved" in out.failed[0].reason
    finally:
        rogue.close(0)


def test_landed_reports_past_the_reservation_and_kv_headers_fail_their_transfer(pair):
    layout, rx, cache, tx = pair()
    rogue = rogue_sender(rx)
    try:
        # Layers past the reservation's, and a kv header (the data never travels on this
        # socket): each fails the transfer it names, nothing else.
        for i, frames in enumerate(([b"l", ipc.encode_landed("h0", 2, 2, [12])],
                                    [b"w", kt.wire.encode_kv("h1", 0, [13], torch.zeros(2, 1, 4, 2, 8))[0]],
                                    [b"l", b"\x81\xa1v\x01"],
                                    [b"l", ipc.encode_landed("h3", 0, 1, [15],   # another request's done
                                                             kt.wire.encode_done("h0", 1, 2)[0])],
                                    [b"l", ipc.encode_landed("h4", 0, 1, [16],   # a kv header naming another
                                                             kt.wire.encode_kv("h1", 0, [13],
                                                                               torch.zeros(2, 1, 4, 2, 8))[0])])):
            rx.expect(f"h{i}", [12 + i], deadline=time.monotonic() + 20)
            rogue.send_multipart([b"c", ipc.encode_control("claim", request_id=f"h{i}")])
            poll_until(rx, lambda _: f"h{i}" in rx._claims)
            rejected = rx.stats["rejected"]
            rogue.send_multipart(frames)
            if i == 2:   # malformed: names no transfer, so it is counted and dropped
                poll_until(rx, lambda _: rx.stats["rejected"] > rejected)
                assert f"h{i}" in rx._claims
                continue
            out = poll_until(rx, fenced_until_failed(rogue))
            assert out.failed[0].request_id == f"h{i}", out.failed
            assert {0: "layer: 3 outside", 1: "landed frames", 3: "riding along", 4: "riding along"}[i] \
                in out.failed[0].reason
        assert rx.stats["pairs_lost"] == 0
        with pytest.raises(WireError):
            ipc.decode_landed(ipc.encode_landed("x", 0, 0, [1]))
        with pytest.raises(WireError):
            ipc.decode_landed(ipc.encode_landed("x", 0, 1, []))
        assert ipc.decode_landed(ipc.encode_landed("x", 3, 2, [1, 5])) == ("x", 3, 2, (1, 5), None, 0)
        assert ipc.decode_landed(ipc.encode_landed("x", 3, 2, [1, 5], bell=7))[5] == 7
        for bell in (-1, 2 ** 32, "7", 1.0):   # a doorbell number is a 32-bit count
            with pytest.raises(WireError):
                ipc.decode_landed(msgpack.packb(dict(v=ipc.IPC_PROTOCOL_VERSION, request_id="x", first_layer=0,
                                                     num_layers=1, block_ids=[1], bell=bell)))
        done = kt.wire.encode_done("x", 7, 5)[0]
        assert ipc.decode_landed(ipc.encode_landed("x", 3, 2, [1, 5], done))[4] == done
        with pytest.raises(WireError):   # the done rides as the bytes of a header, nothing else
            ipc.decode_landed(msgpack.packb(dict(v=ipc.IPC_PROTOCOL_VERSION, request_id="x", first_layer=0,
                                                 num_layers=1, block_ids=[1], done="text")))
        # A last report carrying the done completes its transfer (the done checked as any).
        rx.expect("h9", [20, 21], deadline=time.monotonic() + 20)
        rogue.send_multipart([b"c", ipc.encode_control("claim", request_id="h9")])
        poll_until(rx, lambda _: "h9" in rx._claims)
        rogue.send_multipart([b"l", ipc.encode_landed("h9", 0, layout.num_layers, [20, 21],
                                                      kt.wire.encode_done("h9", 9, layout.num_layers)[0])])
        out = poll_until(rx, lambda o: o.completed)
        assert [(c.request_id, c.first_token) for c in out.completed] == [("h9", 9)] and "h9" not in rx._claims
    finally:
        rogue.close(0)


def test_a_report_ahead_of_its_copy_lands_only_once_its_pair_rings_the_bell(pair):
    """Reports name a doorbell number; the receiver marks their layers landed once the
    pair's bell (in its own memory, opened from the welcome as a sender does) reads at
    least that number under this pair's nonce: not before, not for another pair's nonce.
    A transfer failed while waiting is not revived by a later ring, and a pair that rang
    and said bye at once still completes what it rang."""
    layout, rx, cache, tx = pair()
    rogue = rogue_sender(rx)
    try:
        welcome = ipc.decode_control(rogue.recv_multipart()[1], ipc._FROM_RECEIVER)
        bell = welcome["bell"]
        bells = ipc.open_cache(bell["desc"], bells=True)
        slot, nonce = bell["slot"], bell["nonce"]
        assert bells.shape == (rx.max_pairs,) and slot != tx._bell[1] and nonce != tx._bell[2]

        def claim(rid, ids):
            rx.expect(rid, ids, deadline=time.monotonic() + 20)
            rogue.send_multipart([b"c", ipc.encode_control("claim", request_id=rid)])
            poll_until(rx, lambda _: rid in rx._claims)

        claim("b1", [20, 21])
        done = kt.wire.encode_done("b1", 4, layout.num_layers)[0]
        rogue.send_multipart([b"l", ipc.encode_landed("b1", 0, layout.num_layers, [20, 21], done, bell=2)])
        poll_until(rx, lambda _: rx.stats["reports_ahead"] == 1)
        for value in (0, ((nonce + 1) << 32) | 9, (nonce << 32) | 1):   # unrung, another pair's, too low
            bells[slot] = value
            r = rx.poll(5)
            assert not r.completed and not r.failed and rx.progress("b1")["layers_landed"] == []
            assert 0.0 <= rx.wake_within_s() <= rx.BELL_POLL_MAX_S
        bells[slot] = (nonce << 32) | 2
        out = poll_until(rx, lambda o: o.completed)
        assert [(c.request_id, c.first_token) for c in out.completed] == [("b1", 4)] and "b1" not in rx._claims
        assert rx.wake_within_s() is None

        claim("b2", [22])
        rogue.send_multipart([b"l", ipc.encode_landed("b2", 0, layout.num_layers, [22], bell=3)])
        poll_until(rx, lambda _: rx.stats["reports_ahead"] == 2)
        assert rx.cancel("b2")   # granted: held until the sender is fenced
        while ipc.decode_control(rogue.recv_multipart()[1], ipc._FROM_RECEIVER)["type"] != "revoke":
            pass   # the grants before it
        rogue.send_multipart([b"c", ipc.encode_control("fenced", request_id="b2")])
        assert poll_until(rx, lambda o: o.released).released == ["b2"]
        rx.poll(0)
        assert rx.wake_within_s() is None   # its report no longer waits for the bell
        bells[slot] = (nonce << 32) | 3
        r = rx.poll(5)
        assert not r.completed and not r.failed and rx.wake_within_s() is None

        claim("b3", [23])
        bells[slot] = (nonce << 32) | 4   # rung before the report: both wait in the socket
        rogue.send_multipart([b"l", ipc.encode_landed("b3", 0, layout.num_layers, [23],
                                                      kt.wire.encode_done("b3", 5, layout.num_layers)[0], bell=4)])
        rogue.send_multipart([b"c", ipc.encode_control("bye")])
        time.sleep(0.2)   # both messages there before the next poll: the bye drops the pair in it
        out = poll_until(rx, lambda o: o.completed or o.failed)
        assert [c.request_id for c in out.completed] == ["b3"] and not out.failed
        assert rx.num_pairs() == 1
        # The freed slot goes to the back of the line: a late ring of the pair that left
        # lands where no pair looks yet.
        rogue.close(0)
        rogue = rogue_sender(rx)
        again = ipc.decode_control(rogue.recv_multipart()[1], ipc._FROM_RECEIVER)["bell"]
        assert again["slot"] not in (slot, tx._bell[1]) and again["nonce"] > nonce
        # A peer that piles up reports waiting for its bell fails the transfer it names.
        nonce, slot = again["nonce"], again["slot"]
        rx.MAX_WAITING = 2
        claim("b4", [24])
        for bell_no in (1, 2, 3):
            rogue.send_multipart([b"l", ipc.encode_landed("b4", 0, 1, [24], bell=bell_no)])
        out = poll_until(rx, fenced_until_failed(rogue))
        assert out.failed[0].request_id == "b4" and "waiting for one bell" in out.failed[0].reason
    finally:
        rogue.close(0)


def test_an_abort_or_a_fence_waits_for_the_copies_and_a_done_does_not(pair):
    """Reports go out ahead of copies, so what lets the receiver reuse blocks at once waits
    for them first: an abort (or a done turned into one) for the request's last copy, a
    fence of a request whose done already went out for the whole side stream. A done
    need not wait (the receiver waits for the bell)."""
    from kv_transfer.ipc_backend import _Item
    layout, rx, cache, tx = pair()

    class Waits:   # a CUDA event or stream, as far as these paths use one
        waited = 0

        def synchronize(self):
            self.waited += 1

    for kind, failed, waits in (("done", False, 0), ("abort", False, 1), ("done", True, 1)):
        copy = Waits()
        with tx._lock:
            tx._last_copy["r"] = copy
            if failed:
                tx._failed["r"] = "lost"
        body = (kt.wire.encode_done("r", 1, 2) if kind == "done" else kt.wire.encode_abort("r", "x"))[0]
        sent = kt.wire.decode_header(tx._close_request(_Item(kind, "r", body=body)))
        assert copy.waited == waits and "r" not in tx._last_copy
        assert isinstance(sent, kt.wire.AbortHeader) == (kind == "abort" or failed)
        with tx._lock:
            tx._failed.pop("r", None)
    side, copy = Waits(), Waits()
    tx._side = side
    try:
        tx._on_revoke("r")                   # closed: no event of its own left
        assert side.waited == 1
        with tx._lock:
            tx._last_copy["s"] = copy
        tx._on_revoke("s")                   # still open: its last copy is enough
        assert copy.waited == 1 and side.waited == 1
    finally:
        tx._side = None


def test_a_cancel_while_a_failed_transfer_is_being_fenced_releases_its_blocks():
    """A granted transfer fails (deadline) and is revoked; the request is then aborted
    before the sender's fence arrives: the blocks must come back as released (the decode
    worker frees them then), not be reported as a failure nobody reads."""
    layout = KVLayout(**LAYOUT)
    rx, _ = new_rx(layout)
    sender = zmq.Context.instance().socket(zmq.DEALER)   # a sender that answers only when told
    sender.setsockopt(zmq.LINGER, 0)
    sender.connect(ipc.parse_endpoint(rx.endpoint).ctrl)
    try:
        sender.send_multipart([b"c", ipc.encode_control("hello", inst=ipc.parse_endpoint(rx.endpoint).inst)])
        poll_until(rx, lambda _: rx.num_pairs() == 1)
        rx.expect("k", [5], deadline=time.monotonic() + 0.3)
        sender.send_multipart([b"c", ipc.encode_control("claim", request_id="k")])
        poll_until(rx, lambda _: "k" in rx._claims)
        out = poll_until(rx, lambda _: rx.write_pending("k"))   # the deadline passed: revoked
        assert not out.failed
        assert rx.cancel("k") and rx.write_pending("k")
        sender.send_multipart([b"c", ipc.encode_control("fenced", request_id="k")])
        out = poll_until(rx, lambda o: o.released or o.failed)
        assert out.released == ["k"] and not out.failed and not rx.write_pending("k")
    finally:
        sender.close(0)
        rx.close()


def test_a_refused_sender_aborts_its_transfers_at_once():
    """A sender whose endpoint names a gone incarnation (the decode worker restarted on the
    same port) is refused; it aborts what it began instead of letting it time out."""
    layout = KVLayout(**LAYOUT)
    rx, cache = new_rx(layout)
    ep = ipc.parse_endpoint(rx.endpoint)
    stale = str(ipc.IpcEndpoint(ep.host, ep.port, "0" * 16))
    tx = kt.make_sender("cuda_ipc", stale, send_timeout_s=5.0)
    try:
        tx.begin("h")
        poll_until(rx, lambda _: tx.broken is not None)
        assert "stale endpoint" in tx.broken and "h" in tx.failed_requests()
        assert rx.num_pairs() == 0 and rx.stats["pairs_refused"] == 1 and cache.eq(0).all()
    finally:
        tx.close(1.0)
        rx.close()


# ---- two processes ----------------------------------------------------------------------------------------
def sender_main(endpoint: str, seed: int, device: str = "cpu") -> None:
    """Copy blocks as told on stdin (JSON lines); "hang" stops answering (a wedged worker).
    On a GPU, a send's ``stall_cycles`` holds the copies back behind a sleep kernel."""
    layout = KVLayout(**LAYOUT)
    src = src_cache(seed, layout).to(device)
    tx = kt.make_sender("cuda_ipc", endpoint, send_timeout_s=5.0, lease_s=0.5, ping_s=0.1, device=device)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "send":
            tx.begin(cmd["rid"])
            end = time.monotonic() + 20
            while cmd["rid"] not in tx._granted and time.monotonic() < end:
                time.sleep(0.005)
            if cmd.get("stall_cycles"):
                torch.cuda._sleep(cmd["stall_cycles"])   # the copies wait for the caller's stream
            for layer in cmd["layers"]:
                tx.send_layer_blocks(cmd["rid"], layer, cmd["dst"], src[layer], cmd["src"])
            if cmd.get("first_token") is not None:
                tx.send_done(cmd["rid"], cmd["first_token"], layout.num_layers)
            print(json.dumps(dict(flushed=tx.flush(20), failed=sorted(tx.failed_requests()))), flush=True)
        elif cmd["op"] == "close":
            tx.close()
            print(json.dumps(dict(closed=True)), flush=True)
            return


class SenderProc:
    def __init__(self, endpoint: str, seed: int, device: str = "cpu"):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, HERE, "sender", endpoint, str(seed), device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self, rx, out: kt.PollResult) -> dict:
        """The sender's answer, polling the receiver meanwhile (its results go to out)."""
        import select
        end = time.monotonic() + 60
        while not select.select([self.proc.stdout], [], [], 0)[0]:
            poll_until(rx, lambda _: True, out=out)
            rx_result = rx.poll(10)
            out.completed += rx_result.completed
            out.failed += rx_result.failed
            assert time.monotonic() < end and self.proc.poll() is None
        return json.loads(self.proc.stdout.readline())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def test_another_process_writes_the_cache_and_a_killed_one_is_declared_lost():
    layout = KVLayout(**LAYOUT)
    rx, cache = new_rx(layout, peer_timeout_s=1.0)
    p = SenderProc(rx.endpoint, seed=5)
    try:
        rx.expect("x", [2, 30], deadline=time.monotonic() + 60)
        p.send(dict(op="send", rid="x", layers=[0, 1, 2], dst=[2, 30], src=[7, 8], first_token=3))
        out = kt.PollResult()
        assert p.reply(rx, out)["flushed"]
        poll_until(rx, lambda o: o.completed, out=out)
        assert out.completed[0].request_id == "x"
        assert torch.equal(cache[:, :, [2, 30]], src_cache(5, layout)[:, :, [7, 8]])
        # Mid-transfer: one layer landed, then the process dies. The receiver fails the
        # transfer once the pair has been silent for peer_timeout_s, long before its deadline.
        rx.expect("y", [4], deadline=time.monotonic() + 60)
        p.send(dict(op="send", rid="y", layers=[0], dst=[4], src=[1]))
        assert p.reply(rx, out)["flushed"]
        poll_until(rx, lambda _: rx.progress("y")["layers_landed"] == [0])
        p.kill()
        t0 = time.monotonic()
        out = poll_until(rx, lambda o: o.failed)
        assert out.failed[0].request_id == "y" and "silent" in out.failed[0].reason
        assert time.monotonic() - t0 < 5 and rx.num_pairs() == 0 and rx.stats["pairs_lost"] == 1
    finally:
        p.kill()
        rx.close()


# ---- the workers ---------------------------------------------------------------------------------------------
def test_workers_disaggregate_over_cuda_ipc_and_abort_mid_transfer_without_leaks(monkeypatch):
    """A decode worker with kv_backend="cuda_ipc" (shared memory on CPU) advertises a
    cudaipc:// endpoint; the prefill worker copies straight into its cache, having handed
    the sender the request's blocks after the first layer (prepare_blocks); greedy tokens
    equal a single engine's; a request aborted while its transfer is granted keeps its
    blocks until the sender is fenced, then frees them."""
    from kv_transfer.ipc_backend import IpcKVSender
    from decode_worker import DecodeWorker
    from engine import LLM
    from helpers import EKW, MODEL, PARAMS, PROMPT, FakeRouter, assert_no_leaks, drive, gen
    from prefill_worker import PrefillWorker
    from planes import messages

    want = LLM(MODEL, **EKW).generate([list(PROMPT)], PARAMS)[0].token_ids
    prepared, sent = [], []
    real_prepare, real_send = IpcKVSender.prepare_blocks, IpcKVSender.send_layers_blocks

    def prepare(self, rid, dst, src):
        prepared.append((rid, list(dst), list(src), len(sent)))
        return real_prepare(self, rid, dst, src)

    def send(self, rid, layers, dst, cache, src):
        sent.append((rid, list(dst), list(src)))
        return real_send(self, rid, layers, dst, cache, src)

    monkeypatch.setattr(IpcKVSender, "prepare_blocks", prepare)
    monkeypatch.setattr(IpcKVSender, "send_layers_blocks", send)
    router = FakeRouter()
    dw = DecodeWorker("d0", MODEL, router.endpoint, engine_kwargs=EKW, kv_backend="cuda_ipc")
    pw = PrefillWorker("p0", MODEL, engine_kwargs=EKW)
    try:
        assert dw.endpoints()["kv"].startswith("cudaipc://")
        assert pw.engine.runner.decode_graphs is None
        router.send(dw.endpoints()["request"], gen("r1", mode="disaggregated", prefill_endpoint=pw.endpoints()["request"]))
        drive(router, dw, pw, lambda: "r1" in router.final, timeout_s=60)
        fin = router.final["r1"]
        assert router.tokens["r1"] == want and (fin.error, fin.fallback) == (None, None)
        kv = dw.stats()["kv"]
        assert kv["completed"] == 1 and kv["grants"] == 1 and kv["layers_written"] == dw.num_layers
        # random:tiny's 2 layers are one group: prepared after layer 0, before that group went
        assert len(prepared) == 1 and len(sent) == 1 and prepared[0] == (*sent[0], 0)
        # Abort once granted but before the prefill ran: blocks held, then released.
        router.send(dw.endpoints()["request"], gen("r2", mode="disaggregated", prefill_endpoint=pw.endpoints()["request"]))
        end = time.monotonic() + 30
        while not dw.receiver._claims:
            dw.run_once(5)
            pw._drain_requests()   # takes the prefill and claims it, without computing it
            assert time.monotonic() < end
        router.send(dw.endpoints()["request"], messages.encode_abort("r2"))
        drive(router, dw, pw, lambda: "r2" in router.final and not dw._held and pw.num_in_flight() == 0,
              timeout_s=30)
        assert router.final["r2"].finish_reason == "abort" and dw.stats()["kv"]["fenced"] == 1
        assert_no_leaks(dw.engine)
        assert_no_leaks(pw.engine)
    finally:
        pw.stop()
        dw.stop()
        router.close()


# ---- GPU: two processes on one GPU -------------------------------------------------------------------------
GPU_MODEL = "random:llama3-1b"
GPU_EKW = dict(num_kv_blocks=256)


def prefill_main(model: str, ekw_json: str) -> None:
    """A prefill worker on the GPU in its own process; stdin: "stats" or "stop"."""
    from prefill_worker import PrefillWorker
    pw = PrefillWorker("p-gpu", model, engine_kwargs=json.loads(ekw_json), device="cuda", dtype="float32")
    pw.start()
    print(json.dumps(pw.endpoints()), flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            e = pw.engine
            sch = e.scheduler
            idle = not (sch.running or sch.waiting or sch.awaiting_kv or sch.held)
            used = sum(1 for b in range(e.blocks.num_blocks) if e.blocks.ref_count[b] != 0)
            st = pw.stats()
            print(json.dumps(dict(in_flight=pw.num_in_flight(), idle=idle, blocks_in_use=used,
                                  completed=st["completed"], failed=st["transfers_failed"])), flush=True)
        else:
            break
    pw.stop()


def test_ipc_benchmark_runs_on_cpu_with_its_host_timer():
    """benchmarks/gpu_kv_ipc.py --cpu-smoke: the benchmark's own code (every transfer
    variant with its byte-exactness check, the host timer, TTFT both ways) on two CPU
    processes over shared memory, so it does not rot between GPU sessions."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_kv_ipc.py"), "--cpu-smoke", "--json",
                          "--repeat", "1", "--warmup", "1", "--decode-tokens", "4", "--host-timer"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    names = ("cuda_ipc", "cuda_ipc_ids_on_clock", "cuda_ipc_per_layer", "cuda_ipc_one_launch", "zmq")
    assert all(r[f"transfer_{n}"]["ms"] > 0 for n in names)
    assert [r[f"transfer_{n}"]["layers_per_call"] for n in names[2:4]] == [1, 2]   # random:tiny has 2 layers
    assert [r[f"transfer_{n}"]["ids_before_clock"] for n in names[:2]] == [True, False]
    host = r["transfer_cuda_ipc_per_layer"]["sender_stats"]["host_us"]
    assert host["copy_blocks"]["calls"] == 2 * 2 and host["_launch_group"]["us_per_call"] > 0   # 2 reps x 2 layers
    assert host["prepare_blocks"]["calls"] == 2
    assert "host_us" not in r["transfer_zmq"]["sender_stats"]
    assert r["ttft_48"]["cuda_ipc_tokens_equal"] is True and r["ttft_48"]["zmq_tokens_equal"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cache_copier_launches_the_compiled_kernel_directly_and_exactly():
    """On a GPU the copier's launches after the first skip Triton's launcher (the compiled
    kernel is kept per specialization and launched on the given stream): every group
    still lands exactly, including one at an odd first layer."""
    import kv_transfer.block_copy as bc
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(5)
    src = torch.randn(6, 2, 64, 16, 8, 128, generator=g).to(torch.bfloat16).to(dev)
    dst = torch.zeros(6, 2, 48, 16, 8, 128, dtype=torch.bfloat16, device=dev)
    s = torch.tensor([3, 63, 0, 17, 40], dtype=torch.long, device=dev)
    d = torch.tensor([47, 1, 7, 2, 30], dtype=torch.long, device=dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream())
    c = bc.CacheCopier(src, dst)
    bc._compiled.clear()
    c.copy(range(0, 2), s, d, stream=side)      # through Triton's launcher, which compiles and keeps it
    kept = len(bc._compiled)
    assert kept == 1 and bc._fast_launch
    c.copy(range(2, 5), s, d, stream=side)      # a direct launch, same specialization
    c.copy(range(5, 6), s, d, stream=side)
    assert len(bc._compiled) == kept and bc._fast_launch
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    want = torch.zeros_like(dst)
    for layer in range(6):
        bc.copy_blocks_reference(src[layer], want[layer], s, d)
    assert torch.equal(dst, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_ring_follows_the_work_before_it_on_its_stream():
    """The doorbell kernel writes the registered host array only once the stream's
    earlier work has finished, and after its first launch goes straight to the compiled
    kernel."""
    import kv_transfer.block_copy as bc
    dev = torch.device("cuda", torch.cuda.current_device())
    bells = torch.zeros(4, dtype=torch.int64).share_memory_()   # as the receiver exports them
    assert int(torch.cuda.cudart().cudaHostRegister(bells.data_ptr(), 32, ipc._HOST_REGISTER_PORTABLE_MAPPED)) == 0
    try:
        side = torch.cuda.Stream(dev)
        bc.ring(bells, 2, (5 << 32) | 1, stream=side, device=dev)
        side.synchronize()
        kept = len(bc._compiled)
        assert bells.tolist() == [0, 0, (5 << 32) | 1, 0]
        with torch.cuda.stream(side):
            torch.cuda._sleep(1_000_000_000)   # about half a second
        bc.ring(bells, 2, (5 << 32) | 2, stream=side, device=dev)
        assert bells.tolist()[2] == (5 << 32) | 1          # behind the sleep: not yet
        side.synchronize()
        assert bells.tolist()[2] == (5 << 32) | 2 and len(bc._compiled) == kept and bc._fast_launch
    finally:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(bells.data_ptr())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_report_ahead_of_a_stalled_copy_lands_only_when_the_copy_has():
    """Another process on this GPU copies behind a sleep on its stream: its report (and
    done) arrive at once, ahead of the copy; the transfer completes only after the copy
    finished, with exact data."""
    layout = KVLayout(**LAYOUT)
    cache = torch.zeros(layout.num_layers, *layout.block_shape(layout.num_blocks), dtype=layout.torch_dtype,
                        device="cuda")
    rx = kt.make_receiver("cuda_ipc", layout, None, cache=cache)
    p = SenderProc(rx.endpoint, seed=5, device="cuda")
    try:
        rx.expect("w", [5, 6], deadline=time.monotonic() + 60)   # compiles the sender's kernels
        p.send(dict(op="send", rid="w", layers=[0, 1, 2], dst=[5, 6], src=[1, 2], first_token=2))
        out = kt.PollResult()
        assert p.reply(rx, out)["flushed"]
        assert [c.request_id for c in poll_until(rx, lambda o: o.completed, out=out).completed] == ["w"]
        ahead = rx.stats["reports_ahead"]
        rx.expect("s", [2, 30], deadline=time.monotonic() + 60)
        p.send(dict(op="send", rid="s", layers=[0, 1, 2], dst=[2, 30], src=[7, 8], first_token=3,
                    stall_cycles=2_000_000_000))   # about a second
        out = kt.PollResult()
        assert p.reply(rx, out)["flushed"]
        t0 = time.monotonic()
        poll_until(rx, lambda _: rx.stats["reports_ahead"] > ahead)
        assert not out.completed and rx.progress("s")["layers_landed"] == []
        poll_until(rx, lambda o: o.completed, out=out)
        assert [c.request_id for c in out.completed] == ["s"] and time.monotonic() - t0 > 0.2
        assert torch.equal(cache[:, :, [2, 30]].cpu(), src_cache(5, layout)[:, :, [7, 8]])
        assert rx.stats["bell_reads"] > 1
    finally:
        p.kill()
        rx.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_index_stager_uploads_exact_ids_without_waiting_for_the_device():
    """Every upload lands its own ids: through free rows, through rows still busy (a fresh
    pinned tensor then), and after the buffer grows past its first capacity; and no
    upload waits for the work queued ahead of it on the stream."""
    from kv_transfer.block_copy import IndexStager
    dev = torch.device("cuda")
    stager = IndexStager(slots=2)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)   # about a second of device time queued ahead of every upload
    kept = []
    for i in range(7):
        n = 3 + 500 * i   # 3 .. 3003: grows past the first 1024-wide buffer
        a, b = list(range(i, i + n)), list(range(10 * n, 9 * n, -1))
        s_idx, d_idx = stager.upload([a, b], dev)
        kept.append((a, b, s_idx, d_idx))
    (e,) = stager.upload([[]], dev)
    # Still queued behind the sleep: nothing above waited for the device.
    assert not torch.cuda.current_stream().query()
    assert stager.fresh_uploads >= 1   # rows were reused while their copies were pending
    torch.cuda.synchronize()
    for a, b, s_idx, d_idx in kept:
        assert s_idx.dtype == torch.long and s_idx.device.type == "cuda"
        assert s_idx.tolist() == a and d_idx.tolist() == b
        assert s_idx.data_ptr() % 16 == 0 and d_idx.data_ptr() % 16 == 0   # one kernel specialization
    assert e.numel() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stall", [False, True], ids=["exact", "stalled-sender"])
def test_gpu_two_processes_on_one_gpu_equal_in_place_prefill(stall):
    """fp32 on one GPU: the decode worker here, the prefill worker in another process.
    Over cuda_ipc the disaggregated request's greedy tokens equal the in-place ones; a
    sender stopped (SIGSTOP) after its grant is declared lost and the decode worker
    prefills in place, with the same tokens; no block leaks on either side."""
    from decode_worker import DecodeWorker
    from engine import LLM, SamplingParams
    from helpers import FakeRouter, assert_no_leaks, drive, gen, wait_until

    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompt = [(i * 7919) % 30000 + 10 for i in range(700)]
    ref = LLM(GPU_MODEL, device="cuda", dtype="float32", **GPU_EKW)
    want = ref.generate([prompt], params)[0].token_ids
    del ref
    torch.cuda.empty_cache()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, HERE, "prefill", GPU_MODEL, json.dumps(GPU_EKW)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    router = FakeRouter()
    dw = DecodeWorker("d-gpu", GPU_MODEL, router.endpoint, engine_kwargs=GPU_EKW, device="cuda", dtype="float32",
                      kv_backend="auto")
    try:
        eps = json.loads(proc.stdout.readline())
        assert dw.endpoints()["kv"].startswith("cudaipc://")   # auto on a GPU, peer on this host
        router.send(dw.endpoints()["request"], gen("g1", prompt, params, mode="disaggregated",
                                                   prefill_endpoint=eps["request"]))
        if stall:
            drive(router, dw, None, lambda: bool(dw.receiver._claims), timeout_s=120)
            proc.send_signal(signal.SIGSTOP)
        drive(router, dw, None, lambda: "g1" in router.final, timeout_s=120)
        fin = router.final["g1"]
        assert router.tokens["g1"] == want and fin.error is None
        kv = dw.stats()["kv"]
        if stall:
            assert fin.fallback.startswith("kv_error") and "silent" in fin.fallback and kv["pairs_lost"] == 1
            proc.send_signal(signal.SIGCONT)
        else:
            assert fin.fallback is None and kv["completed"] == 1 and dw.stats()["disaggregated"] == 1
        assert_no_leaks(dw.engine)
        last = {}

        def prefill_idle():     # the prefill side lets go of its blocks too (after its done or its abort)
            proc.stdin.write("stats\n")
            proc.stdin.flush()
            st = last["st"] = json.loads(proc.stdout.readline())
            # A stopped sender can hand its done over when it runs again; the copies still
            # waiting for a lease then fail within its send timeout and the done goes out as
            # an abort, which it counts (transfers_failed).
            settled = st["completed"] - st["failed"] == (0 if stall else 1)
            return settled and st["idle"] and st["in_flight"] == 0 and st["blocks_in_use"] == 0
        wait_until(prefill_idle, 60, "the prefill process idle with no block in use and its transfer settled",
                   interval_s=0.2)
        st = last["st"]
        assert st["failed"] <= st["completed"] <= 1 and (stall or st["failed"] == 0), st
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        dw.stop()
        router.close()


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "sender":
    sender_main(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "cpu")
if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "prefill":
    prefill_main(sys.argv[2], sys.argv[3])


def test_report_cost_benchmark_runs():
    """benchmarks/ipc_report_cost.py (the receiver's host time per landed report) runs on
    the CPU and times both forms of the report."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ipc_report_cost.py"), "--layers", "4",
                          "--blocks", "16", "--repeat", "3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["layers"] == 4 and set(r["us_per_report"]) == {"landed_only", "with_done"}
    assert all(v > 0 for v in r["us_per_report"].values())
