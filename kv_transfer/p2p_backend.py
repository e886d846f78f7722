"""KV transfer over torch.distributed point-to-point: NCCL between GPUs, gloo on CPU.

The ``"nccl"`` backend of :mod:`kv_transfer`. Control and data travel apart:

* **control** -- ZeroMQ PUSH (prefill side) to PULL (decode side), msgpack only: every
  message is ``[envelope, header]`` where the header is exactly a :mod:`kv_transfer.wire`
  header (``kv`` / ``done`` / ``abort``, same validation) and the envelope names the *pair*
  it belongs to (below) and, for ``kv``, its sequence number on that pair;
* **data** -- one ``send`` per layer (a layer's blocks batched into one contiguous tensor:
  small NCCL messages are latency-bound) on a process group of exactly two ranks, the
  prefill worker's sender (rank 0) and the decode worker's receiver (rank 1).

Pairs, not a world. Pools change size, so there is no global ``init_process_group``: each
(sender, receiver) pair builds its own two-rank ``ProcessGroupNCCL`` (CUDA) or
``ProcessGroupGloo`` (CPU) directly from a store, when the sender first needs it, and
tears it down when either side leaves or the pair breaks.

Rendezvous, advertised through the receiver's endpoint::

    nccl://HOST:CTRL_PORT?store=STORE_PORT&pg=nccl|gloo

The decode worker's receiver binds the control PULL socket on ``CTRL_PORT`` and hosts a
``TCPStore`` on ``STORE_PORT``; ``pg`` says which process group its cache needs (``nccl``
when the cache is on a GPU, ``gloo`` otherwise). A sender makes a fresh random pair id,
sends ``hello(pair)`` on the control socket, connects to the store and builds the group
as rank 0 under ``PrefixStore("pdserve-kv/<pair>")``; the receiver builds rank 1 of the
same group (in a thread of that pair, so its engine loop never waits on a rendezvous).
Both then exchange one handshake tensor, which also brings NCCL's lazily created
communicator up before any KV moves. ``bye(pair)`` tears the pair down on close.

Ordering. NCCL matches a pair's sends and receives in the order they are posted (gloo by
tag: the tag is the ``kv`` sequence number). A receive can be posted only once its header
says the exact size, and the size is bounded before allocation: the header must describe
``layout.block_shape(n)`` blocks of the cache's dtype, block ids inside the cache. Data of
a ``kv`` header is *always* received -- into a staging buffer, never the cache -- even
when the request is no longer expected (late data, then dropped) or its header was
refused against the reservation: skipping it would leave the sender's send unmatched and
desynchronize every later message of the pair. A header whose size cannot be trusted, a
sequence gap or a failed receive breaks the pair instead: its group is aborted, the
transfers that used it fail (the decode worker prefills them in place), and the sender
builds a new pair for its next transfer.

Hangs. A peer that dies mid-transfer leaves a posted send/recv that never completes. Gloo
notices a closed TCP connection at once; NCCL does not, and a stuck NCCL kernel is the
classic hang. Every wait here is therefore bounded by ``op_timeout_s`` (the group's own
timeout, and a polling deadline on ``Work.is_completed()`` for NCCL); on expiry the group
is aborted (``ncclCommAbort`` releases the stuck kernels) and dropped, never reused, and
the next transfer makes a new pair. ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is set to 2
(clean up only) unless already set, so that PyTorch's NCCL watchdog aborts a timed-out
communicator instead of tearing the worker process down.

Trust. NCCL, gloo and ``TCPStore`` have no authentication and CurveZMQ does not cover
them: bind to a trusted cluster network only. A receiver admits at most ``max_pairs``
pairs; a hello that never rendezvouses expires after ``connect_timeout_s``.
"""
from __future__ import annotations

import datetime
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import torch
import zmq

from kv_transfer.base import KV_TIMEOUT_S, SEND_TIMEOUT_S, KVReceiver, KVSender, WriteLayer
from kv_transfer.wire import (KV, MAX_BLOCKS_PER_MESSAGE, MAX_HEADER_BYTES, MAX_LAYERS, PROTOCOL_VERSION,
                              KVHeader, KVLayout, KVMessage, UnknownRequestError, WireError, check_kv,
                              check_request_id, decode_header, dtype_name, encode_abort, encode_done,
                              split_endpoint)

log = logging.getLogger(__name__)

SCHEME = "nccl://"
PG_BACKENDS = ("nccl", "gloo")
MAX_ENVELOPE_BYTES = 256
MAX_PAIR_ID_LEN = 64
_PAIR_ID = re.compile(r"^[0-9a-zA-Z_-]{1,%d}$" % MAX_PAIR_ID_LEN)
_HANDSHAKE = 0x7064_6B76   # "pdkv": both ranks check the first tensor of a pair
_TAG_MOD = 1 << 31
_ENVELOPE_KEYS = {"hello": frozenset({"v", "type", "pair"}), "bye": frozenset({"v", "type", "pair"}),
                  "msg": frozenset({"v", "type", "pair", "seq"})}


def _timedelta(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(s))


# ---- endpoints ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class P2PEndpoint:
    host: str
    ctrl_port: int
    store_port: int
    pg: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}:{self.ctrl_port}?store={self.store_port}&pg={self.pg}"

    @property
    def ctrl(self) -> str:
        return f"tcp://{self.host}:{self.ctrl_port}"


def parse_endpoint(ep: str) -> P2PEndpoint:
    """``nccl://HOST:CTRL_PORT?store=STORE_PORT&pg=nccl|gloo`` -> its parts (ValueError if not)."""
    want = f"endpoint {ep!r}: want {SCHEME}HOST:CTRL_PORT?store=STORE_PORT&pg=nccl|gloo"
    host, ctrl, q = split_endpoint(ep, SCHEME, {"store", "pg"}, want)
    store, pg = q["store"], q["pg"]
    if not store.isdigit() or not 0 < int(store) < 65536 or pg not in PG_BACKENDS:
        raise ValueError(want)
    return P2PEndpoint(host, ctrl, int(store), pg)


# ---- control envelopes -------------------------------------------------------------------------------
def encode_envelope(kind: str, pair: str, seq: int | None = None) -> bytes:
    d = dict(v=PROTOCOL_VERSION, type=kind, pair=pair)
    if kind == "msg":
        d["seq"] = seq
    b = msgpack.packb(d, use_bin_type=True)
    decode_envelope(b)   # a sender must not emit what a receiver refuses
    return b


@dataclass(frozen=True)
class Envelope:
    type: str
    pair: str
    seq: int | None = None


def decode_envelope(buf) -> Envelope:
    """Schema-check one envelope frame; WireError on anything else."""
    try:
        n = len(buf)
    except TypeError:
        raise WireError("envelope: not a buffer") from None
    if not 0 < n <= MAX_ENVELOPE_BYTES:
        raise WireError(f"envelope: {n} bytes outside [1, {MAX_ENVELOPE_BYTES}]")
    try:
        d = msgpack.unpackb(buf, raw=False, strict_map_key=True, max_str_len=MAX_ENVELOPE_BYTES, max_bin_len=0,
                            max_ext_len=0, max_array_len=0, max_map_len=8)
    except Exception as e:
        raise WireError(f"envelope: not valid msgpack ({type(e).__name__})") from None
    if type(d) is not dict or type(d.get("type")) is not str or d["type"] not in _ENVELOPE_KEYS:
        raise WireError("envelope: not a map with a known type")
    if set(d) != _ENVELOPE_KEYS[d["type"]] or d["v"] != PROTOCOL_VERSION or type(d["v"]) is not int:
        raise WireError(f"envelope: wrong keys or version for {d['type']}")
    pair = d["pair"]
    if type(pair) is not str or not (_PAIR_ID.match(pair) or (pair == "" and d["type"] == "msg")):
        raise WireError("envelope: pair id must match [0-9a-zA-Z_-]{1,64}")
    seq = d.get("seq")
    if d["type"] == "msg" and (type(seq) is not int or not 0 <= seq < _TAG_MOD):
        raise WireError("envelope: seq must be an int in [0, 2**31)")
    return Envelope(d["type"], pair, seq)


def encode_kv_header(request_id: str, layer: int, block_ids: Sequence[int], dtype: str, shape) -> bytes:
    """A wire ``kv`` header without its data frame (the data goes over the process group)."""
    h = dict(version=PROTOCOL_VERSION, type=KV, request_id=request_id, layer=int(layer),
             block_ids=[int(b) for b in block_ids], dtype=dtype, shape=[int(s) for s in shape])
    b = msgpack.packb(h, use_bin_type=True)
    if len(b) > MAX_HEADER_BYTES:
        raise WireError(f"header: {len(b)} bytes > {MAX_HEADER_BYTES}", request_id)
    decode_header(b)
    return b


def layout_size_ok(h: KVHeader, layout: KVLayout) -> bool:
    """Whether a kv header's data size is one the receiving cache could hold (so receiving
    it into a scratch buffer is bounded), independently of any reservation."""
    n = len(h.block_ids)
    return (h.dtype == layout.dtype and 1 <= n <= layout.num_blocks and h.shape == layout.block_shape(n)
            and len(set(h.block_ids)) == n and all(b < layout.num_blocks for b in h.block_ids)
            and h.layer < layout.num_layers)


# ---- process groups ----------------------------------------------------------------------------------
def _prepare_nccl_env() -> None:
    # 2 = CleanUpOnly: on a timed-out or failed collective the watchdog aborts the
    # communicator and the waiting call raises; the defaults (3/1) tear the process down,
    # which would turn one dead peer into a dead decode worker.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def make_pair_group(pg: str, host: str, store_port: int, pair: str, rank: int, *, store=None,
                    connect_timeout_s: float, op_timeout_s: float):
    """A two-rank process group for one pair, from the receiver's TCPStore (``store`` on the
    receiver, which hosts it; a client connection on the sender)."""
    import torch.distributed as dist
    if store is None:
        store = dist.TCPStore(host, store_port, is_master=False, timeout=_timedelta(connect_timeout_s),
                              wait_for_workers=False)
    prefixed = dist.PrefixStore(f"pdserve-kv/{pair}", store)
    if pg == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, 2, _timedelta(op_timeout_s))
    _prepare_nccl_env()
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = _timedelta(op_timeout_s)
    return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)


def wait_work(work, pg: str, timeout_s: float) -> None:
    """Wait for one send/recv, at most timeout_s; raises on failure or timeout.

    Gloo's wait is bounded by the group's timeout and raises at once when the peer's
    connection closes. NCCL's wait only makes the current stream wait, and a stuck kernel
    would never finish: poll the work's completion event against our own deadline (the
    caller aborts the group on TimeoutError)."""
    if pg == "gloo":
        work.wait()
        return
    end = time.monotonic() + timeout_s
    pause = 20e-6
    while not work.is_completed():
        if time.monotonic() > end:
            raise TimeoutError(f"NCCL p2p operation did not complete in {timeout_s:.1f}s")
        time.sleep(pause)
        pause = min(pause * 2, 2e-3)
    work.wait()   # raises if the work failed; orders the current stream after it


def abort_group(group) -> None:
    """Abort a pair's group without waiting for its pending operations (ncclCommAbort on
    NCCL); a group is never reused after this."""
    if group is None:
        return
    for name in ("abort", "shutdown"):
        fn = getattr(group, name, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception as e:   # best effort: the group is dropped either way
                log.debug("kv p2p: %s() of a pair group failed: %s", name, e)


class PairBroken(RuntimeError):
    pass


# ---- decode side ---------------------------------------------------------------------------------------
_BYE = object()


@dataclass
class _RxPair:
    """One sender's pair on the receiver. Its thread builds the group, then posts the
    receives the loop hands it (in order) and reports each landed buffer back."""
    pair: str
    todo: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    next_seq: int = 0
    rids: set = field(default_factory=set)      # transfers that sent data over this pair
    group: object = None
    thread: threading.Thread | None = None
    broken: str | None = None
    closing: bool = False
    pending: int = 0                            # receives handed to the thread, not landed yet
    last_used: float = field(default_factory=time.monotonic)


class P2PKVReceiver(KVReceiver):
    """See the module docstring and :class:`kv_transfer.base.KVReceiver`.

    ``device``: where the staging buffers live (the cache's device): CUDA -> an NCCL pair
    group, CPU -> gloo (``pg`` overrides). ``write_layer`` gets the staging tensor on that
    device; the engine's ``write_kv_blocks`` index-copies it into the paged cache."""

    def __init__(self, layout: KVLayout, write_layer: WriteLayer, *, bind_host: str = "127.0.0.1",
                 advertise_host: str | None = None, device=None, pg: str | None = None,
                 default_timeout_s: float = KV_TIMEOUT_S, op_timeout_s: float = 10.0, connect_timeout_s: float = 60.0,
                 max_pairs: int = 64, max_messages_per_poll: int = 1024, context=None):
        super().__init__(layout, write_layer, default_timeout_s)
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        self.device = torch.device(device if device is not None else "cpu")
        self.pg = pg or ("nccl" if self.device.type == "cuda" else "gloo")
        if self.pg not in PG_BACKENDS:
            raise ValueError(f"pg must be one of {PG_BACKENDS}, got {self.pg!r}")
        if self.pg == "nccl" and (self.device.type != "cuda" or not dist.is_nccl_available()):
            raise RuntimeError("the nccl pair group needs a CUDA device and a torch build with NCCL")
        self.op_timeout_s = float(op_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.max_pairs = int(max_pairs)
        self.max_messages_per_poll = int(max_messages_per_poll)
        if context is not None:
            # The control socket also binds an inproc:// wake-up endpoint for the pair
            # threads, which must share its context; CurveZMQ contexts cannot serve that.
            log.warning("kv p2p receiver: ignoring the given zmq context (and its CurveZMQ); "
                        "this backend is unauthenticated, see kv_transfer/p2p_backend.py")
        self.stats.update(pairs_formed=0, pairs_closed=0, pairs_broken=0, pairs_refused=0, pairs_evicted=0)
        self._ctx = zmq.Context()
        self._wake_ep = f"inproc://pdserve-kv-wake-{secrets.token_hex(8)}"
        sock = self._ctx.socket(zmq.PULL)
        try:
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"tcp://{bind_host}:*")
            ctrl_port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
            sock.bind(self._wake_ep)
            # The receiver hosts its pairs' store; senders connect to it as clients.
            self._store = dist.TCPStore(bind_host, 0, is_master=True, wait_for_workers=False,
                                        timeout=_timedelta(self.connect_timeout_s))
        except Exception:
            sock.close(0)
            self._ctx.term()
            raise
        self._sock = sock   # the decode worker polls it (control messages and wake-ups)
        host = advertise_host or bind_host
        if host in ("0.0.0.0", "*", "::", "[::]"):
            log.warning("kv p2p receiver bound to %s: pass advertise_host so remote senders can reach it", host)
        self._endpoint = str(P2PEndpoint(host, ctrl_port, self._store.port, self.pg))
        self._pairs: dict[str, _RxPair] = {}
        # Every pair thread not yet finished, evicted ones included: a thread blocked in a
        # rendezvous ignores its bye until connect_timeout_s, so the table alone does not
        # bound the threads a flood of hellos could start.
        self._pair_threads: list[threading.Thread] = []
        self._landed: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        log.info("kv p2p receiver (%s) listening on %s", self.pg, self._endpoint)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def num_pairs(self) -> int:
        return len(self._pairs)

    # ---- the loop thread ---------------------------------------------------------------------------
    def _receive(self, timeout_ms: int) -> None:
        if self._closed:
            raise RuntimeError("receiver is closed")
        if timeout_ms > 0 and self._landed.empty():
            self._sock.poll(timeout_ms, zmq.POLLIN)
        for _ in range(self.max_messages_per_poll):
            try:
                frames = [self._sock.recv(zmq.NOBLOCK, copy=True)]
            except zmq.Again:
                break
            while self._sock.getsockopt(zmq.RCVMORE):
                f = self._sock.recv(copy=True)
                if len(frames) <= 3:
                    frames.append(f)
            self._on_control(frames)
        while True:
            try:
                item = self._landed.get_nowait()
            except queue.Empty:
                break
            self._on_landed(*item)

    def _on_control(self, frames: list) -> None:
        if frames == [b""]:
            return   # a pair thread's wake-up
        self.stats["messages"] += 1
        try:
            env = decode_envelope(frames[0])
            if env.type != "msg" and len(frames) != 1:
                raise WireError(f"message: a {env.type} message has 1 frame")
            if env.type == "msg" and len(frames) != 2:
                raise WireError("message: a msg has 2 frames (envelope, header)")
        except WireError as e:
            self._reject(e)
            return
        if env.type == "hello":
            self._on_hello(env.pair)
        elif env.type == "bye":
            p = self._pairs.get(env.pair)
            if p is not None and not p.closing:
                p.closing = True
                p.todo.put(_BYE)   # after the receives already handed to it
        else:
            self._on_msg(env, frames[1])

    def _on_hello(self, pair: str) -> None:
        if pair in self._pairs:
            self._reject(WireError(f"hello: pair {pair!r} exists"))
            return
        self._pair_threads = [t for t in self._pair_threads if t.is_alive()]
        if len(self._pair_threads) >= 2 * self.max_pairs:
            self.stats["pairs_refused"] += 1
            self._reject(WireError(f"hello: {len(self._pair_threads)} pair threads still running; "
                                   f"pair {pair!r} refused"))
            return
        if len(self._pairs) >= self.max_pairs:
            # A sender killed without its bye leaves an idle pair behind: evict the least
            # recently used idle one (if its sender is alive after all, its next send fails
            # and it builds a new pair). Refuse when every pair is busy. A pair still forming
            # (no group yet) is never idle: evicting it would not stop its thread.
            idle = [q for q in self._pairs.values() if q.pending == 0 and q.group is not None]
            if not idle:
                self.stats["pairs_refused"] += 1
                self._reject(WireError(f"hello: {self.max_pairs} busy pairs already; pair {pair!r} refused"))
                return
            victim = min(idle, key=lambda q: q.last_used)
            del self._pairs[victim.pair]
            victim.closing = True
            victim.todo.put(_BYE)
            self.stats["pairs_evicted"] += 1
        p = self._pairs[pair] = _RxPair(pair)
        p.thread = threading.Thread(target=self._pair_main, args=(p,), name=f"kv-pair-{pair}", daemon=True)
        p.thread.start()
        self._pair_threads.append(p.thread)

    def _on_msg(self, env: Envelope, header) -> None:
        try:
            h = decode_header(header)
        except WireError as e:
            self._reject(e)
            return
        if not isinstance(h, KVHeader):     # done / abort: no data, the base class applies them
            self.stats["messages"] -= 1      # counted again by _on_frames
            self._on_frames([header])
            return
        rid = h.request_id
        p = self._pairs.get(env.pair)
        if p is None or p.broken or p.closing:
            # No group to drain the data from: the sender's send times out and breaks its pair.
            self._reject(WireError(f"kv: pair {env.pair!r} is not open here", rid))
            return
        if env.seq != p.next_seq or not layout_size_ok(h, self.layout):
            why = (f"kv: seq {env.seq} but {p.next_seq} expected" if env.seq != p.next_seq
                   else "kv: header does not describe blocks of this cache")
            self._reject(WireError(why, rid))
            self._break(p, why + " (the pair's data stream cannot be trusted)")
            return
        p.next_seq = (p.next_seq + 1) % _TAG_MOD
        p.pending += 1
        p.last_used = time.monotonic()
        res = self._res.get(rid)
        if res is not None:
            p.rids.add(rid)
            try:
                check_kv(h, self.layout, res)
            except WireError as e:
                self._reject(e)   # fails the transfer; the data is still received, then dropped
        p.todo.put((h, env.seq))

    def _on_landed(self, p: _RxPair, h, data) -> None:
        if h is None:   # the pair thread reports a broken pair or a completed bye
            if data is None:
                self._pairs.pop(p.pair, None)
                self.stats["pairs_closed"] += 1
            else:
                self._break(p, data)
            return
        p.pending -= 1
        res = self._res.get(h.request_id)
        if res is None:
            self._drop_unknown(UnknownRequestError(f"request {h.request_id!r} is not expected here", h.request_id))
            return
        try:
            check_kv(h, self.layout, res)   # the reservation may differ from when the header came
        except WireError as e:
            self._reject(e)
            return
        self._on_message(KVMessage(h, data))
        if data.is_cuda:   # write_layer's copy runs on the loop's stream: keep the buffer until it has
            data.record_stream(torch.cuda.current_stream(data.device))

    def _break(self, p: _RxPair, reason: str) -> None:
        if self._pairs.get(p.pair) is p:
            del self._pairs[p.pair]
            self.stats["pairs_broken"] += 1
            log.warning("kv p2p pair %s broken: %s", p.pair, reason)
        if p.broken is None:
            p.broken = reason
            p.todo.put(_BYE)
        for rid in sorted(p.rids):
            if rid in self._xfers:
                self._fail(rid, f"pair broken: {reason}")

    # ---- a pair's thread ---------------------------------------------------------------------------------
    def _pair_main(self, p: _RxPair) -> None:
        wake = self._ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.setsockopt(zmq.SNDHWM, 4)
        wake.connect(self._wake_ep)

        def report(h, data) -> None:
            self._landed.put((p, h, data))
            try:
                wake.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass   # the loop is awake already (queue full) or closing

        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                # Receives (and their staging buffers) on a stream of this thread: NCCL's stream
                # waits on the caller's current stream, which must not be the engine's compute.
                torch.cuda.set_stream(torch.cuda.Stream(self.device))
            p.group = make_pair_group(self.pg, "", 0, p.pair, 1, store=self._store,
                                      connect_timeout_s=self.connect_timeout_s, op_timeout_s=self.op_timeout_s)
            hs = torch.zeros(1, dtype=torch.int64, device=self.device)
            wait_work(p.group.recv([hs], 0, _TAG_MOD - 1), self.pg, self.connect_timeout_s)
            if int(hs.item()) != _HANDSHAKE:
                raise PairBroken("bad handshake")
            self.stats["pairs_formed"] += 1
            log.info("kv p2p pair %s formed (%s)", p.pair, self.pg)
            while True:
                items = [p.todo.get()]
                while True:
                    try:
                        items.append(p.todo.get_nowait())
                    except queue.Empty:
                        break
                # Post every receive first (NCCL queues them on its stream back to back),
                # then wait for them in order.
                posted, bye = [], False
                for it in items:
                    if it is _BYE:
                        bye = True
                        break
                    h, seq = it
                    buf = torch.empty(h.shape, dtype=self.layout.torch_dtype, device=self.device)
                    posted.append((h, buf, p.group.recv([buf], 0, seq)))
                for h, buf, work in posted:
                    wait_work(work, self.pg, self.op_timeout_s)
                    report(h, buf)
                if bye or p.broken:
                    break
            if p.broken is None:
                report(None, None)
        except Exception as e:   # rendezvous failed, receive failed or timed out
            if p.broken is None and not self._closed:
                report(None, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            abort_group(p.group)
            p.group = None
            wake.close(0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in list(self._pairs.values()):
            p.broken = p.broken or "receiver closed"
            p.todo.put(_BYE)
            abort_group(p.group)
        self._pairs.clear()
        self._sock.close(0)
        # Pair threads end within op_timeout_s (a gloo wait is not interrupted by abort) and
        # close their wake sockets; the context is terminated once they have.
        threading.Thread(target=self._ctx.term, name="kv-p2p-ctx-term", daemon=True).start()
        self._store = None


# ---- prefill side ---------------------------------------------------------------------------------------
_STOP = object()


@dataclass
class _Item:
    rid: str
    kind: str                       # "kv", "ctl" (done/abort header), or "stop"
    header: bytes | None = None
    tensor: torch.Tensor | None = None
    event: object = None
    always: bool = False            # an abort goes out even for a failed request


class P2PKVSender(KVSender):
    """Sends to one receiver endpoint; one I/O thread owns the control socket and the
    pair group. ``send_layer`` validates in the caller's thread and, for a CUDA tensor,
    records an event on the current stream (the layer's compute); the I/O thread makes a
    side stream wait on it and posts the send there, so NCCL ships this layer while the
    engine computes the next one. At most ``max_in_flight`` sends are posted unfinished.
    A request whose message could not be sent is marked failed and its later messages
    are dropped (the receiver fails it too, by pair break or deadline)."""

    FAILED_KEPT = 4096

    def __init__(self, endpoint: str, *, context=None, send_timeout_s: float = SEND_TIMEOUT_S,
                 connect_timeout_s: float = 60.0, linger_s: float = 10.0, max_in_flight: int = 8,
                 sndhwm: int = 1024, device=None):
        self._ep = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self.send_timeout_s = float(send_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.linger_s = float(linger_s)
        self.max_in_flight = max(1, int(max_in_flight))
        self.device = torch.device(device) if device is not None else None
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.SNDHWM, int(sndhwm))
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
            sock.setsockopt(zmq.LINGER, int(self.linger_s * 1000))
            sock.connect(self._ep.ctrl)
        except Exception:
            sock.close(0)
            raise
        self._sock = sock
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self._busy = 0
        self._closed = False
        self._drop_after: float | None = None
        self._failed: OrderedDict[str, str] = OrderedDict()
        self._group = None
        self._pair: str | None = None
        self._seq = 0
        self._in_flight: deque = deque()       # (work, tensor, rid), oldest first
        self._streams: dict = {}
        self.stats = dict(messages=0, bytes=0, dropped=0, pairs_formed=0, pairs_broken=0)
        self._thread = threading.Thread(target=self._run, name=f"kv-p2p-sender->{endpoint}", daemon=True)
        self._thread.start()

    # ---- API ---------------------------------------------------------------------------------------
    def send_layer(self, request_id: str, layer: int, dst_block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        rid = check_request_id(request_id)
        if type(layer) is not int or not 0 <= layer < MAX_LAYERS:
            raise ValueError(f"layer must be an int in [0, {MAX_LAYERS}), got {layer!r}")
        ids = [int(b) for b in dst_block_ids]
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[1] != len(ids):
            raise ValueError(f"tensor must be [2, {len(ids)}, ...] (one entry per destination block on dim 1)")
        dt = dtype_name(tensor.dtype)
        if not ids:
            return
        self._check_open()
        for i in range(0, len(ids), MAX_BLOCKS_PER_MESSAGE):   # one send per layer unless enormous
            part = tensor if len(ids) <= MAX_BLOCKS_PER_MESSAGE else tensor[:, i:i + MAX_BLOCKS_PER_MESSAGE]
            part = part.detach().contiguous()
            chunk = ids[i:i + MAX_BLOCKS_PER_MESSAGE]
            event = None
            if part.is_cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(part.device))
            self._put(_Item(rid, "kv", encode_kv_header(rid, layer, chunk, dt, part.shape), part, event))

    def send_done(self, request_id: str, first_token: int, num_layers: int) -> None:
        self._check_open()
        self._put(_Item(request_id, "ctl", encode_done(request_id, first_token, num_layers)[0]))

    def send_abort(self, request_id: str, reason: str = "") -> None:
        self._check_open()
        header = encode_abort(request_id, reason)[0]
        with self._cv:
            self._failed.pop(request_id, None)
        self._put(_Item(request_id, "ctl", header, always=True))

    def flush(self, timeout_s: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._busy == 0, timeout_s)

    def failed_requests(self) -> set[str]:
        with self._cv:
            return set(self._failed)

    def close(self, linger_s: float | None = None) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            linger = self.linger_s if linger_s is None else float(linger_s)
            self._drop_after = time.monotonic() + linger
            self._queue.append(_Item("", "stop"))
            self._cv.notify_all()
        self._thread.join(linger + self.send_timeout_s + 5.0)
        if self._thread.is_alive():
            log.warning("kv p2p sender to %s: I/O thread did not stop", self.endpoint)

    # ---- internals -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("sender is closed")

    def _put(self, item: _Item) -> None:
        with self._cv:
            self._check_open()
            self._queue.append(item)
            self._busy += 1
            self._cv.notify_all()

    def _done_one(self, n: int = 1) -> None:
        with self._cv:
            self._busy -= n
            self._cv.notify_all()

    def _mark_failed(self, rid: str, why: str) -> None:
        with self._cv:
            if rid not in self._failed:
                log.error("kv p2p sender to %s: request %s failed: %s", self.endpoint, rid, why)
            self._failed[rid] = why
            self._failed.move_to_end(rid)
            while len(self._failed) > self.FAILED_KEPT:
                self._failed.popitem(last=False)

    def _form_pair(self) -> None:
        pair = secrets.token_hex(12)
        self._sock.send(encode_envelope("hello", pair))
        if self._ep.pg == "nccl" and self.device is not None:
            torch.cuda.set_device(self.device)
        group = make_pair_group(self._ep.pg, self._ep.host, self._ep.store_port, pair, 0,
                                connect_timeout_s=self.connect_timeout_s, op_timeout_s=self.send_timeout_s)
        try:
            dev = self._data_device()
            hs = torch.full((1,), _HANDSHAKE, dtype=torch.int64, device=dev)
            wait_work(group.send([hs], 1, _TAG_MOD - 1), self._ep.pg, self.connect_timeout_s)
        except Exception:
            abort_group(group)
            raise
        self._group, self._pair, self._seq = group, pair, 0
        self.stats["pairs_formed"] += 1
        log.info("kv p2p sender to %s: pair %s formed (%s)", self.endpoint, pair, self._ep.pg)

    def _data_device(self) -> torch.device:
        if self._ep.pg == "gloo":
            return torch.device("cpu")
        return self.device or torch.device("cuda", torch.cuda.current_device())

    def _break_pair(self, why: str) -> None:
        """Abort the group; every request with a send still in flight has failed."""
        self.stats["pairs_broken"] += 1
        log.warning("kv p2p sender to %s: pair %s broken: %s", self.endpoint, self._pair, why)
        abort_group(self._group)
        self._group, self._pair = None, None
        n = len(self._in_flight)
        for _, _, rid in self._in_flight:
            self._mark_failed(rid, f"pair broken: {why}")
        self._in_flight.clear()
        self._done_one(n)

    def _reap_oldest(self) -> None:
        work, t, rid = self._in_flight[0]
        try:
            wait_work(work, self._ep.pg, self.send_timeout_s)
        except Exception as e:
            self._break_pair(f"send failed: {type(e).__name__}: {str(e)[:200]}")
            return
        self._in_flight.popleft()
        self.stats["bytes"] += t.numel() * t.element_size()
        self._done_one()

    def _send_kv(self, it: _Item) -> None:
        if self._group is None:
            self._form_pair()
        t = it.tensor
        if self._ep.pg == "gloo" and t.is_cuda:     # gloo p2p moves host memory only
            it.event.synchronize()
            t, it.event = t.cpu(), None
        elif self._ep.pg == "nccl" and not t.is_cuda:
            t = t.to(self._data_device())
        seq = self._seq
        self._sock.send_multipart([encode_envelope("msg", self._pair, seq), it.header])
        self._seq = (seq + 1) % _TAG_MOD
        self.stats["messages"] += 1
        if it.event is not None:
            stream = self._streams.get(t.device)
            if stream is None:
                stream = self._streams[t.device] = torch.cuda.Stream(t.device)
            stream.wait_event(it.event)   # the layer's KV has been written
            with torch.cuda.stream(stream):
                work = self._group.send([t], 1, seq)
        else:
            work = self._group.send([t], 1, seq)
        self._in_flight.append((work, t, it.rid))

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._in_flight:
                        self._cv.wait()
                    it = self._queue.popleft() if self._queue else None
                if it is None or len(self._in_flight) >= self.max_in_flight:
                    if it is not None:
                        with self._cv:
                            self._queue.appendleft(it)
                    self._reap_oldest()
                    continue
                if it.kind == "stop":
                    while self._in_flight and (self._drop_after is None or time.monotonic() < self._drop_after):
                        self._reap_oldest()
                    return
                queued_kv = False
                try:
                    with self._cv:
                        skip = it.rid in self._failed and not it.always
                    if skip:
                        self.stats["dropped"] += 1
                        continue
                    if self._drop_after is not None and time.monotonic() > self._drop_after:
                        self.stats["dropped"] += 1
                        self._mark_failed(it.rid, "sender closed before it was sent")
                        continue
                    if it.kind == "kv":
                        self._send_kv(it)
                        queued_kv = True   # counted done when its send completes
                    else:
                        self._sock.send_multipart([encode_envelope("msg", self._pair or "", 0), it.header])
                        self.stats["messages"] += 1
                except zmq.Again:
                    self._mark_failed(it.rid, "control send timed out (receiver unreachable or not draining)")
                except Exception as e:   # rendezvous or send failed: this request fails, the pair is rebuilt
                    self._mark_failed(it.rid, f"{type(e).__name__}: {str(e)[:300]}")
                    if it.kind == "kv" and self._group is not None:
                        self._break_pair(f"{type(e).__name__}: {e}")
                finally:
                    if not queued_kv:
                        self._done_one()
        except Exception:
            log.exception("kv p2p sender to %s: I/O thread failed", self.endpoint)
        finally:
            with self._cv:
                for it in self._queue:
                    if it.kind != "stop":
                        self._busy -= 1
                        self._failed.setdefault(it.rid, "sender closed before it was sent")
                self._queue.clear()
                self._busy -= len(self._in_flight)
                self._closed = True
                self._cv.notify_all()
            for _, _, rid in self._in_flight:
                self._mark_failed(rid, "sender closed before its send completed")
            self._in_flight.clear()
            if self._pair is not None:
                try:
                    self._sock.send(encode_envelope("bye", self._pair), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            abort_group(self._group)
            self._group = None
            self._sock.close(linger=int(max(0.0, self.linger_s) * 1000))
