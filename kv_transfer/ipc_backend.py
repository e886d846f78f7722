"""KV transfer on one host through shared device memory: CUDA IPC between GPUs (or two
processes on one GPU), POSIX shared memory between CPU processes.

The ``"cuda_ipc"`` backend of :mod:`kv_transfer`. No host staging: the decode worker's
receiver exports its whole paged cache once, and a prefill worker's sender opens it and
copies the prompt's blocks, layer by layer as the prefill computes them, straight from
its own cache into the blocks the decode worker reserved (push). Control travels over
one ZeroMQ DEALER (sender) -> ROUTER (receiver) connection, msgpack only.

Endpoint: ``cudaipc://HOST:PORT?inst=INSTANCE`` -- the receiver's ROUTER socket and a
random id of this receiver incarnation (a decode worker that restarts has a new one).

Per pair (one sender, one receiver)::

    sender                                   receiver (decode worker's engine loop)
    hello(inst)                    ------>   inst must be this incarnation's, else refuse
                                   <------   welcome(cache handle, layout, bell)   [once]
    claim(rid)                     ------>   rid expected and unclaimed -> grant, else deny
                                   <------   grant(rid, ok)
    [copy the blocks of layers l..l+n-1 into the decode cache on a side stream, then ring
     the pair's doorbell with number s behind the copy on the same stream; no wait]
    landed(rid, l, n, blocks, s)   ------>   validated against the reservation; landed once
                                             the pair's bell reads >= s
    done(rid, first token)         ------>   complete when every layer landed
    ping                           ------>   liveness; answered with pong (the sender's lease)
                                   <------   revoke(rid): the transfer failed or was cancelled
    fenced(rid)                    ------>   every copy of rid has finished; none will follow

Why claims and fences. The sender writes into memory the receiver owns, so "late data is
dropped" cannot be done by the receiver ignoring a message: the bytes are already there.
Instead, the receiver never lets a transfer's blocks go (to in-place prefill or back to the
engine) while a sender may still write them. A sender writes only requests it was granted;
when the receiver fails or cancels a granted transfer it sends ``revoke`` and holds the
blocks until ``fenced`` (the sender stops launching copies for it and waits for the ones in
flight) or until the pair is declared lost: silent for ``peer_timeout_s``. A sender only
launches copies while it holds a lease (a pong within ``lease_s`` of the ping that asked for
it, ``lease_s`` < ``peer_timeout_s``), so a sender the receiver gave up on has stopped
writing by then. A transfer that was never granted needs no fence: its tombstone makes any
later claim fail. Cancelled transfers appear in ``PollResult.released`` once their blocks
are safe to reuse (:meth:`KVReceiver.write_pending` says whether to wait).

Ordering with the engines' streams. The sender records an event on the prefill engine's
stream after a layer's attention wrote its KV; a side stream waits on it and runs the block
copy (one Triton kernel: :mod:`kv_transfer.block_copy`), so the copy overlaps the next
layers. A prefill worker hands layers over ``layers_per_launch`` at a time (one launch, one
report for the group): the per-call host work, not the copy, is what a transfer of KV that
is already computed waits on. Before the prefill worker releases the request's blocks (after
``send_done`` or ``send_abort``), the engine's stream is made to wait for the last copy, so a
later step that reuses those blocks cannot overwrite them under the copy.

Doorbells: when the decode engine may read. Waiting for a copy on the sender's host and
then telling the receiver puts a wake-up and a socket hop after the copy's end; instead the
receiver exports an int64 array of shared host memory, one slot per pair, which a GPU sender
registers with CUDA (mapped) and rings on the side stream right behind each launch (a
one-thread kernel writing ``nonce << 32 | n``, n counting up); it reports the launch at once,
naming n. The receiver validates the report while the copy runs and marks its layers landed
once it reads the bell at >= n (a load from host memory, in a loop while reports wait):
stream order puts the copy's writes before the ring, so the decode engine reads finished
data. The bell lives in the receiver's memory, so a sender that dies leaves it unrung (its
transfers fail as below), never dangling; the nonce, new for each pair, keeps a slot's
previous pair from ringing for the next. A sender whose ring does not work here (the
registration or a probe ring fails) reports each copy after waiting for it.
Because reports now go ahead of copies, everything that lets the receiver reuse blocks at
once waits for the copies first: an abort (the sender's I/O thread synchronizes the
request's last copy before sending it), ``fenced`` (that copy, or the whole side stream for
a request whose done already went out) and ``bye`` (every copy and ring). Copies deferred
until the grant (launched by the I/O thread) ring no bell and are reported once finished.
On a CPU the copy is synchronous, so the bell has rung before the report leaves.

Faults. A prefill worker killed mid-transfer goes silent: after ``peer_timeout_s`` its
transfers fail (the decode worker prefills in place) without waiting for their deadlines. A
decode worker that restarts has a new endpoint and instance: old handles are never reused,
and a hello for an old instance is refused. Handles that cannot be opened (another host, a
GPU this process cannot see) make the sender abort its transfers at once (in-place prefill).

Trust: as with NCCL, a sender writes into the receiver's memory; bind to loopback or a
trusted host network only. The receiver checks every message (sizes bounded, msgpack only)
and never lets a sender write blocks it did not grant, but it cannot stop a malicious
process that holds the handle.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack
import torch
import zmq

from kv_transfer.base import KV_TIMEOUT_S, SEND_TIMEOUT_S, Failed, KVReceiver, KVSender, WriteLayer
from kv_transfer.block_copy import CacheCopier, IndexStager, copy_blocks, ring
from kv_transfer.wire import (DTYPES, MAX_BLOCKS_PER_MESSAGE, MAX_HEADER_BYTES, MAX_LAYERS, MAX_REASON_LEN,
                              AbortHeader, DoneHeader, KVHeader, KVLayout, UnknownRequestError,
                              WireError, check_kv, check_request_id, decode_header, decode_message, dtype_name,
                              encode_abort, encode_done, split_endpoint)

log = logging.getLogger(__name__)

SCHEME = "cudaipc://"
MAX_CONTROL_BYTES = 4096
_INST_LEN = 16
# The cuda_ipc control and landed messages' own version (the done/abort headers keep
# kv_transfer.wire's): 2 since layers are reported as ranges (landed) instead of kv headers,
# 3 since the last landed report may carry the done, 4 since reports go out before their
# copies finish and name the doorbell value that says they have (welcome gives the bell);
# a sender and receiver of different releases fail at hello instead of per transfer.
IPC_PROTOCOL_VERSION = 4
# A doorbell value is (pair nonce << 32) | sequence number: a pair's rings never match
# another pair's that had its slot before, and the value is always an int64.
_SEQ_BITS = 32
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_HOST_REGISTER_PORTABLE_MAPPED = 1 | 2   # cudaHostRegisterPortable | cudaHostRegisterMapped
# First payload frame: a control map, a kv_transfer.wire header (done / abort), or a landed
# report (copies of some layers' blocks have finished, or will have once a bell rings; see
# encode_landed).
_CTRL, _WIRE, _LANDED = b"c", b"w", b"l"
_FROM_SENDER = {"hello": {"inst"}, "claim": {"request_id"}, "fenced": {"request_id"}, "ping": {"t"}, "bye": set()}
_FROM_RECEIVER = {"welcome": {"cache", "layout", "bell"}, "refuse": {"reason"}, "grant": {"request_id", "ok", "reason"},
                  "revoke": {"request_id"}, "pong": {"t"}}


# ---- endpoints -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IpcEndpoint:
    host: str
    port: int
    inst: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}:{self.port}?inst={self.inst}"

    @property
    def ctrl(self) -> str:
        return f"tcp://{self.host}:{self.port}"


def parse_endpoint(ep: str) -> IpcEndpoint:
    want = f"endpoint {ep!r}: want {SCHEME}HOST:PORT?inst=HEX"
    host, port, q = split_endpoint(ep, SCHEME, {"inst"}, want)
    inst = q["inst"]
    if len(inst) != _INST_LEN or any(c not in "0123456789abcdef" for c in inst):
        raise ValueError(want)
    return IpcEndpoint(host, port, inst)


# ---- control messages ----------------------------------------------------------------------------------
def encode_control(kind: str, **fields) -> bytes:
    return msgpack.packb(dict(v=IPC_PROTOCOL_VERSION, type=kind, **fields), use_bin_type=True)


def _unpack_bounded(buf, what: str, max_bytes: int, **limits):
    """One msgpack frame of at most max_bytes, its containers bounded by ``limits`` (no ext
    types) before anything is allocated; WireError naming ``what`` otherwise."""
    try:
        n = len(buf)
    except TypeError:
        raise WireError(f"{what}: not a buffer") from None
    if not 0 < n <= max_bytes:
        raise WireError(f"{what}: {n} bytes outside [1, {max_bytes}]")
    try:
        return msgpack.unpackb(buf, raw=False, strict_map_key=True, max_str_len=max_bytes, max_ext_len=0, **limits)
    except Exception as e:
        raise WireError(f"{what}: not valid msgpack ({type(e).__name__})") from None


def decode_control(buf, allowed: dict, max_bytes: int = MAX_CONTROL_BYTES) -> dict:
    """Schema-check one control map: size, msgpack, version, type, exact keys, the
    request id. WireError on anything else (values beyond those are checked by the user)."""
    d = _unpack_bounded(buf, "control", max_bytes, max_bin_len=max_bytes, max_array_len=64, max_map_len=32)
    if type(d) is not dict or type(d.get("type")) is not str or d["type"] not in allowed:
        raise WireError("control: not a map with a known type")
    if d.get("v") != IPC_PROTOCOL_VERSION or type(d["v"]) is not int or set(d) != allowed[d["type"]] | {"v", "type"}:
        raise WireError(f"control: wrong keys or version for {d['type']}")
    if "request_id" in d:
        check_request_id(d["request_id"])
    return d


# ---- sharing a cache between processes -------------------------------------------------------------------
def host_id() -> str:
    """This machine (this boot of it): shared memory handles mean nothing elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"[:256]


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


# What can be shared: a cache (a KV dtype) or a doorbell array (int64).
_SHARED_DTYPES = {**DTYPES, "int64": torch.int64}
_SHARED_NAMES = {v: k for k, v in _SHARED_DTYPES.items()}


def export_cache(cache: torch.Tensor) -> dict:
    """A msgpack-able description of ``cache`` (a paged cache, or the receiver's doorbells)
    that another process on this host can open with :func:`open_cache`. A CPU tensor is
    moved into shared memory in place (its views stay valid); a CUDA one is shared through
    a CUDA IPC handle of its allocation."""
    if not cache.is_contiguous():
        raise ValueError("the cache must be contiguous to be shared")
    st = cache.untyped_storage()
    if cache.dtype not in _SHARED_NAMES:
        dtype_name(cache.dtype)   # raises, naming the dtypes a cache may have
    desc = dict(host=host_id(), dtype=_SHARED_NAMES[cache.dtype], shape=list(cache.shape),
                offset=int(cache.storage_offset()))
    if cache.is_cuda:
        _dev, handle, size, off, ref_h, ref_off, ev_h, ev_sync = st._share_cuda_()
        desc.update(kind="cuda", device_uuid=device_uuid(cache.device), handle=bytes(handle), size=int(size),
                    storage_offset=int(off), ref_handle=bytes(ref_h or b""), ref_offset=int(ref_off),
                    event_handle=bytes(ev_h or b""), event_sync=bool(ev_sync))
    elif cache.device.type == "cpu":
        manager, name, size = st._share_filename_cpu_()
        desc.update(kind="cpu", manager=bytes(manager), name=bytes(name), size=int(size))
    else:
        raise ValueError(f"cannot share a cache on {cache.device}")
    return desc


_DESC_KEYS = {"cuda": {"host", "dtype", "shape", "offset", "kind", "device_uuid", "handle", "size", "storage_offset",
                       "ref_handle", "ref_offset", "event_handle", "event_sync"},
              "cpu": {"host", "dtype", "shape", "offset", "kind", "manager", "name", "size"}}


def _local_cuda_index(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", i)) == uuid:
            return i
    return None


def open_cache(desc, *, bells: bool = False) -> torch.Tensor:
    """The tensor a peer exported with :func:`export_cache`: a paged cache (6 dims, a KV
    dtype), or with ``bells`` a doorbell array (1 dim, int64); ValueError naming what is
    wrong (a bad description, another host, a GPU this process cannot see)."""
    if type(desc) is not dict or desc.get("kind") not in _DESC_KEYS or set(desc) != _DESC_KEYS[desc["kind"]]:
        raise ValueError("cache description: wrong keys")
    if desc["host"] != host_id():
        raise ValueError(f"the cache is on another host ({desc['host']!r}); cuda_ipc works on one host only")
    ndim, dtypes = (1, ("int64",)) if bells else (6, DTYPES)
    if type(desc["dtype"]) is not str or desc["dtype"] not in dtypes:
        raise ValueError(f"cache description: dtype {desc['dtype']!r}")
    dtype = _SHARED_DTYPES[desc["dtype"]]
    shape = desc["shape"]
    if (type(shape) is not list or len(shape) != ndim or any(type(s) is not int or s < 1 for s in shape)
            or type(desc["offset"]) is not int or desc["offset"] < 0):
        raise ValueError(f"cache description: shape must be {ndim} positive ints, offset an int >= 0")
    numel = 1
    for s in shape:
        numel *= s
    need = (desc["offset"] + numel) * dtype.itemsize
    if type(desc["size"]) is not int or desc["size"] < need:
        raise ValueError(f"cache description: {desc['size']} bytes cannot hold {shape}")
    if desc["kind"] == "cpu":
        st = torch.UntypedStorage._new_shared_filename_cpu(desc["manager"], desc["name"], desc["size"])
    else:
        if not torch.cuda.is_available():
            raise ValueError("the cache is on a GPU and this process has no CUDA device")
        idx = _local_cuda_index(desc["device_uuid"])
        if idx is None:
            raise ValueError(f"GPU {desc['device_uuid']} is not visible to this process "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        torch.cuda._lazy_init()
        st = torch.UntypedStorage._new_shared_cuda(
            idx, desc["handle"], desc["size"], desc["storage_offset"], desc["ref_handle"] or None,
            desc["ref_offset"], desc["event_handle"] or None, desc["event_sync"])
    t = torch.empty(0, dtype=dtype, device=st.device)
    t.set_(st, desc["offset"], shape)
    return t


def _layout_dict(layout: KVLayout) -> dict:
    return dict(num_layers=layout.num_layers, num_blocks=layout.num_blocks, block_size=layout.block_size,
                num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype)


_LANDED_KEYS = {"v", "request_id", "first_layer", "num_layers", "block_ids"}
_LANDED_OPTIONAL = {"done", "bell"}


def encode_landed(request_id: str, first_layer: int, num_layers: int, block_ids: Sequence[int],
                  done: bytes | None = None, bell: int = 0) -> bytes:
    """Layers ``first_layer .. first_layer + num_layers - 1`` of blocks ``block_ids`` are in
    the receiver's cache, or (``bell`` > 0) will be once the pair's doorbell has reached
    that sequence number: the copies were queued, and the doorbell is rung behind them on
    the device. The ids were checked when the sender made its index for them.
    ``done``: the request's done header, when these are its last layers and the done was
    already queued: it rides along instead of following in a message of its own (one hop
    less on a transfer's critical path); the receiver handles it as if it came next."""
    d = dict(v=IPC_PROTOCOL_VERSION, request_id=request_id, first_layer=first_layer, num_layers=num_layers,
             block_ids=block_ids)
    if done is not None:
        d["done"] = done
    if bell:
        d["bell"] = bell
    return msgpack.packb(d, use_bin_type=True)


def decode_landed(buf) -> tuple[str, int, int, tuple[int, ...], bytes | None, int]:
    """Schema-check a landed report: (request id, first layer, layer count, block ids, the
    done header riding along or None, the doorbell sequence number to wait for or 0).
    WireError on anything else; the ids are checked against the reservation by the
    caller, the done header as any wire message."""
    d = _unpack_bounded(buf, "landed", MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES,
                        max_array_len=MAX_BLOCKS_PER_MESSAGE, max_map_len=8)
    if (type(d) is not dict or not _LANDED_KEYS <= set(d) <= _LANDED_KEYS | _LANDED_OPTIONAL
            or type(d["v"]) is not int or d["v"] != IPC_PROTOCOL_VERSION):
        raise WireError("landed: wrong keys or version")
    done = d.get("done")
    if done is not None and type(done) is not bytes:
        raise WireError("landed: done must be the bytes of a done header")
    bell = d.get("bell", 0)
    if type(bell) is not int or not 0 <= bell <= _SEQ_MASK:
        raise WireError(f"landed: bell must be a sequence number in [0, {_SEQ_MASK}]")
    rid = check_request_id(d["request_id"])
    first, count, ids = d["first_layer"], d["num_layers"], d["block_ids"]
    if type(first) is not int or type(count) is not int or not (0 <= first and 0 < count and first + count <= MAX_LAYERS):
        raise WireError(f"landed: layers {first!r} + {count!r} outside [0, {MAX_LAYERS})", rid)
    if type(ids) is not list or not ids or set(map(type, ids)) != {int} or min(ids) < 0:
        raise WireError("landed: block_ids must be a non-empty list of block ids", rid)
    return rid, first, count, tuple(ids), done, bell


# ---- decode side -----------------------------------------------------------------------------------------
class _Waiting(NamedTuple):
    """A landed report whose copies were queued but not yet seen finished."""
    bell: int            # the sequence number its pair's doorbell must reach
    rid: str
    layers: range
    ids: tuple
    nbytes: int          # per layer
    covers: bool         # the ids are the whole reservation


@dataclass
class _Pair:
    ident: bytes
    last_seen: float
    slot: int           # its doorbell is bells[slot]
    nonce: int          # the high half of every value it rings
    claims: set = field(default_factory=set)
    ringing: deque = field(default_factory=deque)   # _Waiting reports, in the order they came


@dataclass
class _Fence:
    pair: bytes
    kind: str           # "failed" (report Failed once fenced) or "cancelled" (report released)
    reason: str
    since: float


class IpcKVReceiver(KVReceiver):
    """See the module docstring and :class:`kv_transfer.base.KVReceiver`. ``cache`` is the
    engine's whole paged cache, ``[num_layers, 2, num_blocks, block_size, heads, head_dim]``;
    senders write it directly (``write_layer`` is never called)."""

    FENCE_CAP_S = 120.0   # a live pair that never answers a revoke (a bug) cannot hold blocks forever
    # While reports wait for their doorbells, the bells are read in a loop (a load from
    # host memory; a GPU ringing them wakes nothing on the host): yielding the core for the
    # first BELL_SPIN_S of a wait, then sleeping between reads, longer the longer it waits
    # (BELL_POLL_S at first, at most BELL_POLL_MAX_S: a copy queued behind a long prefill
    # step takes milliseconds, a bell that never rings waits for its transfer's deadline).
    BELL_SPIN_S = 0.002
    BELL_POLL_S = 50e-6
    BELL_POLL_MAX_S = 1e-3
    MAX_WAITING = 4 * MAX_LAYERS   # reports of one pair waiting for its bell: more is a broken peer

    def __init__(self, layout: KVLayout, write_layer: WriteLayer | None = None, *, cache: torch.Tensor,
                 bind_host: str = "127.0.0.1", advertise_host: str | None = None, context=None,
                 default_timeout_s: float = KV_TIMEOUT_S, peer_timeout_s: float = 5.0, max_pairs: int = 64,
                 max_messages_per_poll: int = 1024):
        super().__init__(layout, write_layer or _no_write, default_timeout_s)
        want = (layout.num_layers, 2, layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        if tuple(cache.shape) != want or dtype_name(cache.dtype) != layout.dtype:
            raise ValueError(f"cache {tuple(cache.shape)} {cache.dtype} does not match the layout {want} {layout.dtype}")
        self.peer_timeout_s = float(peer_timeout_s)
        self.max_pairs = int(max_pairs)
        self.max_messages_per_poll = int(max_messages_per_poll)
        self._desc = export_cache(cache)
        # One doorbell per pair, in this receiver's (shared, host) memory: a pair that dies
        # leaves it unrung, never dangling. A sender reports copies as soon as they are
        # queued and rings its bell behind them (a GPU sender writes it through its own
        # mapping of this memory); a report counts once the bell has reached its number
        # (_answer_bells), so no host hop waits for the copies to end.
        self._bells = torch.zeros(self.max_pairs, dtype=torch.int64)
        self._bell_desc = export_cache(self._bells)
        # After export_cache, which moves the storage into shared memory: a view taken before
        # would read this process's old private copy. numpy reads without torch's per-op cost.
        self._bells_view = self._bells.numpy()
        self._ringing_since: float | None = None   # since when reports have waited with no bell ringing
        self._nonces = itertools.count(1)
        # Slots are handed out least recently freed first: a dropped pair's rings still
        # queued on its GPU land in a slot nobody uses yet (they would not match the next
        # pair's nonce, but could overwrite its value).
        self._free_slots = deque(range(self.max_pairs))
        self._inst = secrets.token_hex(_INST_LEN // 2)
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.bind(f"tcp://{bind_host}:*")
            port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
        except Exception:
            sock.close(0)
            raise
        self._sock = sock   # the decode worker polls it to sleep on both planes
        self._endpoint = str(IpcEndpoint(advertise_host or bind_host, port, self._inst))
        self._pairs: dict[bytes, _Pair] = {}
        self._claims: dict[str, bytes] = {}        # request id -> the pair granted it
        self._fences: dict[str, _Fence] = {}       # revoked, waiting for fenced
        self._closed = False
        self.stats.update(pairs_formed=0, pairs_lost=0, pairs_refused=0, grants=0, denials=0, revokes=0,
                          fenced=0, fence_timeouts=0, reports_ahead=0, bell_reads=0)
        log.info("kv cuda_ipc receiver (%s cache) listening on %s", self._desc["kind"], self._endpoint)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def num_pairs(self) -> int:
        return len(self._pairs)

    def cancel(self, request_id: str) -> bool:
        f = self._fences.get(request_id)
        if f is not None:   # failed and revoked, not reported yet: now it ends as a cancel (released)
            f.kind = "cancelled"
            return True
        pair = self._claims.pop(request_id, None)
        if self._forget(request_id, "cancelled") is None:
            return False
        if pair is not None:
            self._fence(request_id, pair, "cancelled", "cancelled")
        return True

    def write_pending(self, request_id: str) -> bool:
        return request_id in self._fences

    def wake_within_s(self) -> float | None:
        if not self._ringing():
            return None
        waited = time.monotonic() - self._ringing_since
        if waited < self.BELL_SPIN_S:
            return 0.0
        return min(self.BELL_POLL_MAX_S, self.BELL_POLL_S * waited / self.BELL_SPIN_S)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(0)

    # ---- the loop thread -------------------------------------------------------------------------------
    def _receive(self, timeout_ms: int) -> None:
        """Messages as they come; while reports wait for their doorbells, the bells read
        in a loop until they have rung or ``timeout_ms`` is up."""
        if self._closed:
            raise RuntimeError("receiver is closed")
        end = time.monotonic() + timeout_ms / 1000
        while True:
            if timeout_ms > 0 and not self._ringing():
                self._sock.poll(max(0, math.ceil((end - time.monotonic()) * 1000)), zmq.POLLIN)
            for _ in range(self.max_messages_per_poll):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._on_frames_from(frames)
            self._check_pairs()
            if not self._ringing():
                return
            self._answer_bells()
            if not self._ringing() or time.monotonic() >= end or self._completed or self._failed or self._released:
                return
            time.sleep(self.wake_within_s())

    def _ringing(self) -> bool:
        return self._ringing_since is not None

    def _stop_ringing_if_idle(self) -> None:
        """After reports stopped waiting (answered, pruned, their pair dropped)."""
        if not any(p.ringing for p in self._pairs.values()):
            self._ringing_since = None

    def _answer_bells(self, only: _Pair | None = None) -> None:
        """Mark landed every waiting report whose pair's doorbell has reached its number.
        A sender rings after its copies on the same stream, and reports in launch order, so
        a bell at n means every copy it reported up to n has finished."""
        pairs = [only] if only is not None else [p for p in self._pairs.values() if p.ringing]
        if not any(p.ringing for p in pairs):
            return
        self.stats["bell_reads"] += 1
        rang = False
        for p in pairs:
            value = int(self._bells_view[p.slot])
            if value >> _SEQ_BITS == p.nonce:   # else not rung since this pair got the slot
                seq = value & _SEQ_MASK
                while p.ringing and p.ringing[0].bell <= seq:
                    rang = True
                    w = p.ringing.popleft()
                    if w.rid in self._xfers and self._claims.get(w.rid) == p.ident:   # else failed or cancelled since
                        self._mark_layers_landed(w.rid, w.layers, w.ids, w.nbytes, covers_reservation=w.covers)
            # A transfer that ended waits for no bell (one that never rings would keep the
            # receiver polling until the pair goes).
            if any(w.rid not in self._xfers for w in p.ringing):
                p.ringing = deque(w for w in p.ringing if w.rid in self._xfers)
        self._stop_ringing_if_idle()
        if rang and self._ringing_since is not None:
            # Bells still ring: the wait that is left is new (a pair whose copies keep
            # landing must not be polled at the slow rate of one that hangs).
            self._ringing_since = time.monotonic()


    def _send(self, ident: bytes, kind: str, **fields) -> None:
        try:
            self._sock.send_multipart([ident, _CTRL, encode_control(kind, **fields)], zmq.NOBLOCK)
        except zmq.ZMQError as e:   # the peer is gone (ROUTER_MANDATORY) or not draining
            log.info("kv cuda_ipc: %s to a sender not delivered: %s", kind, e)

    def _on_frames_from(self, frames: list) -> None:
        self.stats["messages"] += 1
        if len(frames) != 3 or frames[1] not in (_CTRL, _WIRE, _LANDED):
            self._reject(WireError(f"message: {len(frames)} frames, want [identity, kind, body]"))
            return
        ident, kind, body = frames
        pair = self._pairs.get(ident)
        if pair is not None:
            pair.last_seen = time.monotonic()
        if kind != _CTRL:
            if pair is None:
                self.stats["dropped_unknown"] += 1   # a pair this receiver gave up on
                return
            if kind == _WIRE:
                self._on_wire(pair, body)
            else:
                self._on_landed(pair, body)
            return
        try:
            d = decode_control(body, _FROM_SENDER)
        except WireError as e:
            self._reject(e)
            return
        t = d["type"]
        if t == "hello":
            self._on_hello(ident, d["inst"])
        elif pair is None:
            self._send(ident, "refuse", reason="unknown pair: say hello first")
        elif t == "claim":
            self._on_claim(pair, d["request_id"])
        elif t == "fenced":
            self._on_fenced(pair, d["request_id"])
        elif t == "ping":   # echo the sender's clock: its lease runs from when it asked
            self._send(ident, "pong", t=d["t"])
        elif t == "bye":   # the sender's copies are all finished
            self._drop_pair(pair, "said bye", lost=False)

    def _on_hello(self, ident: bytes, inst) -> None:
        if inst != self._inst:
            self.stats["pairs_refused"] += 1
            self._send(ident, "refuse", reason=f"stale endpoint: instance {str(inst)[:32]!r} is gone "
                                              f"(this receiver is {self._inst})")
            return
        if ident in self._pairs:
            self._reject(WireError("hello: pair exists"))
            return
        if len(self._pairs) >= self.max_pairs:
            self.stats["pairs_refused"] += 1
            self._send(ident, "refuse", reason=f"{len(self._pairs)} pairs already")
            return
        pair = _Pair(ident, time.monotonic(), slot=self._free_slots.popleft(), nonce=next(self._nonces))
        self._pairs[ident] = pair
        self.stats["pairs_formed"] += 1
        self._send(ident, "welcome", cache=self._desc, layout=_layout_dict(self.layout),
                   bell=dict(desc=self._bell_desc, slot=pair.slot, nonce=pair.nonce))

    def _on_claim(self, pair: _Pair, rid: str) -> None:
        if rid not in self._xfers:
            why = self._tomb.get(rid)
            ok, reason = False, f"transfer {why}" if why else "transfer not expected here"
        elif rid in self._claims:
            ok, reason = False, "claimed by another sender"
        else:
            ok, reason = True, ""
            self._claims[rid] = pair.ident
            pair.claims.add(rid)
        self.stats["grants" if ok else "denials"] += 1
        self._send(pair.ident, "grant", request_id=rid, ok=ok, reason=reason)

    def _on_landed(self, pair: _Pair, body) -> None:
        try:
            rid, first, count, ids, done, bell = decode_landed(body)
            res = self._res.get(rid)
            if res is None:
                raise UnknownRequestError(f"request {rid!r} is not expected here", rid)
            shape = self.layout.block_shape(len(ids))
            # Every layer of the report names the same blocks: checking the last layer checks
            # the range's end, the ids and the shape for all of them.
            check_kv(KVHeader(rid, first + count - 1, ids, self.layout.dtype, shape), self.layout, res)
        except UnknownRequestError as e:
            self._drop_unknown(e)
            return
        except WireError as e:
            self._reject(e)
            return
        if self._claims.get(rid) != pair.ident:   # only the granted sender writes a transfer
            self._reject(WireError(f"landed: {rid!r} was not granted to this sender", rid))
            return
        if rid not in self._xfers:
            return
        nbytes = KVHeader(rid, first, ids, self.layout.dtype, shape).nbytes
        # check_kv found the ids distinct and reserved: as many as reserved means all of them
        covers = len(ids) == len(res.block_set)
        if bell:   # queued, maybe still copying: it counts once the pair's bell reaches it
            if len(pair.ringing) >= self.MAX_WAITING:
                self._reject(WireError(f"landed: more than {self.MAX_WAITING} reports waiting for one bell", rid))
                return
            self.stats["reports_ahead"] += 1
            if self._ringing_since is None:
                self._ringing_since = time.monotonic()
            pair.ringing.append(_Waiting(bell, rid, range(first, first + count), ids, nbytes, covers))
        else:
            self._mark_layers_landed(rid, range(first, first + count), ids, nbytes, covers_reservation=covers)
        if done is not None:
            self._on_wire(pair, done, riding_with=rid)

    def _on_wire(self, pair: _Pair, body, riding_with: str | None = None) -> None:
        """A done or abort header; ``riding_with``: it came inside that request's landed
        report, where only that request's done may ride."""
        try:
            h = decode_header(body)
            # First: a wrong header inside rid's report fails rid, not the request it names.
            if riding_with is not None and (not isinstance(h, DoneHeader) or h.request_id != riding_with):
                raise WireError(f"landed: the header riding along is not {riding_with!r}'s done", riding_with)
            if isinstance(h, KVHeader):   # the data is never on this socket: copies report with landed
                raise WireError("kv: cuda_ipc senders report copies with landed frames, not kv headers",
                                h.request_id)
            h = decode_message([body], self.layout, self._res)
        except UnknownRequestError as e:
            self._drop_unknown(e)
            return
        except WireError as e:
            self._reject(e)
            return
        rid = h.request_id
        if self._claims.get(rid) != pair.ident and not (isinstance(h, AbortHeader) and rid not in self._claims):
            # Only the granted sender ends a transfer; an abort may come from a sender that
            # refused the prefill before claiming it.
            self._reject(WireError(f"{type(h).__name__}: {rid!r} was not granted to this sender", rid))
            return
        if isinstance(h, DoneHeader):
            self._on_message(h)
        else:
            # The sender waits for its copies before it aborts: no fence needed.
            self._release_claim(rid)
            self._on_message(h)

    def _maybe_complete(self, rid: str) -> None:
        super()._maybe_complete(rid)
        if rid not in self._xfers:           # completed: done follows the last copy
            self._release_claim(rid)

    def _release_claim(self, rid: str) -> None:
        ident = self._claims.pop(rid, None)
        p = self._pairs.get(ident) if ident is not None else None
        if p is not None:
            p.claims.discard(rid)

    def _fail(self, rid: str, reason: str) -> None:
        pair = self._claims.pop(rid, None)
        if pair is None or rid not in self._xfers:
            super()._fail(rid, reason)
            return
        # Granted: the blocks stay out of use (and the failure unreported) until the sender
        # is fenced; a late kv header is dropped as late data meanwhile.
        self._forget(rid, "failed")
        self._fence(rid, pair, "failed", reason)

    def _fence(self, rid: str, ident: bytes, kind: str, reason: str) -> None:
        p = self._pairs.get(ident)
        if p is None:   # the pair is gone: nothing can write any more
            self._finish_fence(rid, _Fence(ident, kind, reason, time.monotonic()))
            return
        self._fences[rid] = _Fence(ident, kind, reason, time.monotonic())
        self.stats["revokes"] += 1
        self._send(ident, "revoke", request_id=rid)

    def _on_fenced(self, pair: _Pair, rid: str) -> None:
        f = self._fences.get(rid)
        if f is None or f.pair != pair.ident:
            return   # nothing revoked there (a fence after the pair was dropped, say)
        self.stats["fenced"] += 1
        self._finish_fence(rid, self._fences.pop(rid))

    def _finish_fence(self, rid: str, f: _Fence) -> None:
        p = self._pairs.get(f.pair)
        if p is not None:
            p.claims.discard(rid)
        self._fences.pop(rid, None)
        if f.kind == "failed":
            log.warning("kv %s: transfer failed: %s", rid, f.reason)
            self.stats["failed"] += 1
            self._failed.append(Failed(rid, f.reason))
        else:
            self._released.append(rid)

    def _drop_pair(self, pair: _Pair, why: str, lost: bool) -> None:
        # What it rang before it left has landed (a bye comes after its copies finished).
        self._answer_bells(only=pair)
        if self._pairs.pop(pair.ident, None) is not None:
            self._free_slots.append(pair.slot)
        self._stop_ringing_if_idle()
        if lost:
            self.stats["pairs_lost"] += 1
            log.warning("kv cuda_ipc: sender pair lost (%s); failing its %d transfers", why, len(pair.claims))
        for rid in list(pair.claims):
            self._claims.pop(rid, None)
            f = self._fences.get(rid)
            if f is not None:
                self._finish_fence(rid, f)
            elif rid in self._xfers:
                super()._fail(rid, f"sender {why}")
        pair.claims.clear()

    def _check_pairs(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pairs.values() if now - p.last_seen > self.peer_timeout_s]:
            self._drop_pair(p, f"silent for {now - p.last_seen:.1f}s", lost=True)
        for rid, f in list(self._fences.items()):
            if now - f.since > self.FENCE_CAP_S:
                self.stats["fence_timeouts"] += 1
                log.error("kv %s: sender answered no revoke in %.0fs; releasing its blocks", rid, self.FENCE_CAP_S)
                self._finish_fence(rid, f)


def _no_write(request_id, layer, block_ids, tensor) -> None:
    raise RuntimeError("cuda_ipc senders write the cache themselves")


# ---- prefill side ----------------------------------------------------------------------------------------
@dataclass
class _Item:
    kind: str                        # "claim", "copy" (data to copy once granted), "landed", "done", "abort", "stop"
    rid: str = ""
    layer: int = 0                   # "copy"/"landed": the first layer, of num_layers
    dst: list = field(default_factory=list)
    num_layers: int = 1
    tensor: torch.Tensor | None = None   # "copy": the gathered blocks [2 * num_layers, n, ...]
    event: object = None                 # "copy": its data is ready; "landed": its copy's end
    body: bytes = b""                    # "done"/"abort": the wire header
    bell: int = 0                        # "landed": the doorbell number rung behind its copy (0: none)
    queued_at: float = field(default_factory=time.monotonic)


def _check_in_cache(dst_ids: list[int], num_blocks: int) -> None:
    if min(dst_ids) < 0 or max(dst_ids) >= num_blocks:
        raise ValueError(f"block ids outside the receiver's cache of {num_blocks} blocks")


class IpcKVSender(KVSender):
    """Copies into one receiver's cache. The caller's thread (the prefill engine loop)
    launches a copy itself when it may (pair up, request granted, lease held), else it
    gathers the blocks into a private tensor that the I/O thread copies once it may. One
    I/O thread owns the socket: it forms the pair, claims requests and reports copies (at
    once when a doorbell rings behind them, else once they finished), in the order the
    caller queued them."""

    KEPT = 4096   # failed / begun request ids remembered
    # Layers per launch for a prefill worker (kv_transfer.base.layers_due): a group's copies
    # start once its last layer is computed and the last group's are what the prefill's end
    # waits for, so a group stays a small part of the model; the launches and reports it
    # saves are host time the caller and the I/O thread would otherwise spend per layer.
    layers_per_launch = 8

    def __init__(self, endpoint: str, *, context=None, send_timeout_s: float = SEND_TIMEOUT_S,
                 connect_timeout_s: float = 30.0, linger_s: float = 10.0, ping_s: float = 0.5, lease_s: float = 2.5, device=None):
        self._ep = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self.send_timeout_s = float(send_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.linger_s = float(linger_s)
        self.ping_s = float(ping_s)
        self.lease_s = float(lease_s)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._ctx = context or zmq.Context.instance()
        pair = secrets.token_hex(12).encode()
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.ROUTING_ID, pair)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.LINGER, int(self.linger_s * 1000))
            sock.connect(self._ep.ctrl)
        except Exception:
            sock.close(0)
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Shared by the caller and the I/O thread; a copy is launched only while holding it,
        # so a revoke sees every copy launched before it.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: deque[_Item] = deque()
        self._busy = 0
        self._remote: torch.Tensor | None = None   # the receiver's cache, opened
        self.broken: str | None = None             # why the pair cannot be used, once it cannot
        self._lease_until = 0.0
        self._ping_sent = 0.0
        self._begun: OrderedDict[str, None] = OrderedDict()
        self._granted: set[str] = set()
        self._revoked: set[str] = set()
        self._last_copy: dict[str, torch.cuda.Event] = {}   # rid -> its last copy's event (CUDA)
        # rid -> (src ids, dst ids, their device tensors): every layer of a request copies the
        # same blocks, so the index tensors are made once per request, not once per layer.
        self._indices: dict[str, tuple[list[int] | None, list[int], torch.Tensor | None, torch.Tensor]] = {}
        self._gather_ids: dict[str, tuple[list[int], torch.Tensor]] = {}   # rid -> its source index, caller's stream
        self._failed: OrderedDict[str, str] = OrderedDict()
        self._side = None
        self._ready = None             # the caller's stream, recorded for the side stream to wait on
        self._bell: tuple[torch.Tensor, int, int] | None = None   # the receiver's bells, our slot, our nonce
        self._rung = 0                 # the last number rung
        self._registered: torch.Tensor | None = None   # the bells, while registered with CUDA
        self._copier: CacheCopier | None = None   # the caller's cache -> the receiver's
        self._stager = IndexStager()   # used holding the lock, on the side stream
        self._closed = False
        self._drop_after: float | None = None
        self.stats = dict(messages=0, bytes=0, copies=0, deferred_copies=0, dropped=0, revoked=0, dones_as_aborts=0,
                          reports=0)
        self._thread = threading.Thread(target=self._run, name=f"kv-ipc-sender->{endpoint}", daemon=True)
        self._thread.start()

    # ---- API (the caller's thread) -----------------------------------------------------------------------
    def begin(self, request_id: str) -> None:
        rid = check_request_id(request_id)
        with self._lock:
            if rid in self._begun:
                return
            self._begun[rid] = None
            while len(self._begun) > self.KEPT:
                self._begun.popitem(last=False)
        self._put(_Item("claim", rid))

    def send_layer(self, request_id: str, layer: int, dst_block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        rid, ids = self._check(request_id, layer, dst_block_ids)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[1] != len(ids):
            raise ValueError(f"tensor must be [2, {len(ids)}, ...] (one entry per destination block on dim 1)")
        if ids:
            self.begin(rid)
            self._queue_copy(rid, layer, ids, tensor.detach())

    def send_layer_blocks(self, request_id: str, layer: int, dst_block_ids: Sequence[int],
                          src_layer: torch.Tensor, src_block_ids: Sequence[int]) -> None:
        rid, ids = self._check(request_id, layer, dst_block_ids)
        self._send_blocks(rid, layer, 1, ids, src_layer, src_block_ids)

    def send_layers_blocks(self, request_id: str, layers: range, dst_block_ids: Sequence[int],
                           src_cache: torch.Tensor, src_block_ids: Sequence[int]) -> None:
        if type(layers) is not range or layers.step != 1 or not layers:
            raise ValueError(f"layers must be a non-empty range of consecutive layers, got {layers!r}")
        rid, ids = self._check(request_id, layers.start, dst_block_ids)
        if layers.stop > min(MAX_LAYERS, src_cache.shape[0]):
            raise ValueError(f"layers {layers.start}..{layers.stop - 1} outside the cache's {src_cache.shape[0]}")
        src_ids = self._source_ids(src_block_ids, ids)
        self._ship(rid, layers.start, len(layers), ids, src_ids, src_cache.device,
                   lambda: self._launch_group(rid, src_cache, layers, ids, src_ids),
                   lambda: src_cache[layers.start:layers.stop].flatten(0, 1))

    def prepare_blocks(self, request_id: str, dst_block_ids: Sequence[int], src_block_ids: Sequence[int]) -> None:
        """Upload a begun request's block ids to the device now (the prefill worker calls
        this after its first layer, while the rest of the first group computes), so its
        first launch finds them there."""
        rid, ids = self._check(request_id, 0, dst_block_ids)
        src_ids = self._source_ids(src_block_ids, ids)
        with self._lock:
            remote = self._remote
            if not ids or rid not in self._begun or remote is None or not remote.is_cuda or self.broken is not None:
                return
            self._device_indices(rid, src_ids, ids, remote.device, remote.shape[2])

    def send_done(self, request_id: str, first_token: int, num_layers: int) -> None:
        body = encode_done(request_id, first_token, num_layers)[0]
        self._order_after_copies(request_id)
        self._put(_Item("done", request_id, body=body))

    def send_abort(self, request_id: str, reason: str = "") -> None:
        body = encode_abort(request_id, reason)[0]
        self._order_after_copies(request_id)
        self._put(_Item("abort", request_id, body=body))

    def flush(self, timeout_s: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout_s)

    def failed_requests(self) -> set[str]:
        with self._lock:
            return set(self._failed)

    def close(self, linger_s: float | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            linger = self.linger_s if linger_s is None else float(linger_s)
            self._drop_after = time.monotonic() + linger
            self._enqueue(_Item("stop"))
        self._wake()
        self._thread.join(linger + self.send_timeout_s + 5.0)
        if self._thread.is_alive():
            log.warning("kv cuda_ipc sender to %s: I/O thread did not stop", self.endpoint)
            return
        with self._lock:   # no caller writes to the pipe once it is closed (its fds may be reused)
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
        for fd in fds:
            os.close(fd)

    # ---- internals: the caller's side ----------------------------------------------------------------------
    def _check(self, request_id, layer, dst_block_ids) -> tuple[str, list[int]]:
        rid = check_request_id(request_id)
        if type(layer) is not int or not 0 <= layer < MAX_LAYERS:
            raise ValueError(f"layer must be an int in [0, {MAX_LAYERS}), got {layer!r}")
        ids = list(map(int, dst_block_ids))
        if len(ids) > MAX_BLOCKS_PER_MESSAGE:
            raise ValueError(f"at most {MAX_BLOCKS_PER_MESSAGE} blocks per layer")
        if self._closed:
            raise RuntimeError("sender is closed")
        return rid, ids

    def _send_blocks(self, rid: str, first: int, num_layers: int, ids: list[int], planes: torch.Tensor,
                     src_block_ids: Sequence[int]) -> None:
        """Blocks ``src_block_ids`` of ``planes`` (K and V of ``num_layers`` layers from
        ``first``) to blocks ``ids`` of the receiver's same layers: one launch now when it
        may, else each layer gathered for the I/O thread to copy once granted."""
        src_ids = self._source_ids(src_block_ids, ids)
        if planes.shape[0] != 2 * num_layers:
            raise ValueError(f"{planes.shape[0]} planes of source cache for {num_layers} layers (want K and V each)")
        self._ship(rid, first, num_layers, ids, src_ids, planes.device,
                   lambda: self._launch(rid, planes, self._remote[first:first + num_layers].flatten(0, 1), ids,
                                        src_ids=src_ids),
                   lambda: planes)

    def _ship(self, rid: str, first: int, num_layers: int, ids: list[int], src_ids: list[int], device,
              launch, planes) -> None:
        """A group's copy: ``launch()`` now, holding the lock, when it may (granted, lease
        held, the receiver's cache on ``device``), then its landed report queued; else the
        group's ``planes()`` (K and V of its layers in the caller's cache) gathered at once
        for the I/O thread to copy as one item once granted."""
        if not ids:
            return
        if rid not in self._begun:   # a plain read first: every group of a request after its first skips the lock
            self.begin(rid)
        with self._lock:
            launched = self._can_write(rid) and device == self._remote.device
            if launched:
                launch()
                wake = self._enqueue(_Item("landed", rid, first, ids, event=self._last_copy.get(rid),
                                           num_layers=num_layers, bell=self._ring()))
        if launched:
            if wake:
                self._wake()
            return
        self._queue_copy(rid, first, ids, self._gather(rid, planes(), src_ids), num_layers)

    @staticmethod
    def _source_ids(src_block_ids: Sequence[int], ids: list[int]) -> list[int]:
        src_ids = list(map(int, src_block_ids))
        if len(src_ids) != len(ids):
            raise ValueError(f"{len(src_ids)} source blocks for {len(ids)} destination blocks")
        return src_ids

    def _side_stream(self, dev: torch.device):
        if self._side is None:
            self._side = torch.cuda.Stream(dev)
        return self._side

    def _launch_group(self, rid: str, src_cache: torch.Tensor, layers: range, dst_ids: list[int],
                      src_ids: list[int]) -> None:
        """Holding the lock: copy ``layers`` of blocks ``src_ids`` of the caller's whole cache
        into blocks ``dst_ids`` of the receiver's, in one launch. The hot path of a prefill
        worker (a call per group of layers as they are computed), so it does only what a
        group needs: the copier (word views, checks) is made once per source cache and the
        request's ids go up once (or ahead, by prepare_blocks)."""
        self.stats["copies"] += 1
        remote = self._remote
        copier = self._copier
        if copier is None or copier.src_cache is not src_cache or copier.dst_cache is not remote:
            copier = self._copier = CacheCopier(src_cache, remote)
        if not remote.is_cuda:
            _check_in_cache(dst_ids, remote.shape[2])
            copier.copy(layers, torch.tensor(src_ids, dtype=torch.long), torch.tensor(dst_ids, dtype=torch.long))
            return
        side = self._side_stream(remote.device)
        if self._ready is None:
            self._ready = torch.cuda.Event()
        # A reused event: each wait is on the record made just before it.
        self._ready.record(torch.cuda.current_stream(src_cache.device))
        side.wait_event(self._ready)
        s_idx, d_idx = self._device_indices(rid, src_ids, dst_ids, remote.device, remote.shape[2])
        copier.copy(layers, s_idx, d_idx, stream=side)
        done = torch.cuda.Event()
        done.record(side)
        self._last_copy[rid] = done

    def _ring(self) -> int:
        """Holding the lock, after a launch: ring the next number of our doorbell behind
        it (on the side stream, where every copy goes); the number, or 0 without a bell."""
        if self._bell is None or self._rung >= _SEQ_MASK:
            return 0
        bells, slot, nonce = self._bell
        self._rung += 1
        on_gpu = self._remote.is_cuda
        ring(bells, slot, (nonce << _SEQ_BITS) | self._rung, stream=self._side if on_gpu else None,
             device=self._remote.device if on_gpu else None)
        return self._rung

    def _can_write(self, rid: str) -> bool:
        """Holding the lock: may a copy for rid be launched now?"""
        return (self._remote is not None and not self._closed and self.broken is None and rid in self._granted
                and rid not in self._revoked and rid not in self._failed and time.monotonic() < self._lease_until)

    def _launch(self, rid: str, src: torch.Tensor, dst: torch.Tensor, dst_ids: list[int], *,
                src_ids: list[int] | None = None, ready=None) -> None:
        """Holding the lock: copy one layer's blocks into the receiver's cache ``dst``, from
        blocks ``src_ids`` of the caller's cache layer ``src``, or (``src_ids`` None) from
        the gathered tensor ``src``. On CUDA on the side stream, after the current stream's
        work (or the event ``ready``), recording the copy's event as rid's last. The caller
        launches one per layer as the prefill computes: the per-layer work is kept small
        (ids checked once per request, one wait on the caller's stream)."""
        self.stats["copies"] += 1
        if not dst.is_cuda:
            _check_in_cache(dst_ids, dst.shape[1])
            d_idx = torch.tensor(dst_ids, dtype=torch.long)
            if src_ids is not None:
                copy_blocks(src, dst, torch.tensor(src_ids, dtype=torch.long), d_idx)
            else:
                dst[:, d_idx] = src.to("cpu", dst.dtype)
            return
        dev = dst.device
        self._side_stream(dev)
        if ready is None:
            self._side.wait_stream(torch.cuda.current_stream(src.device))
        else:
            self._side.wait_event(ready)
        with torch.cuda.stream(self._side):
            s_idx, d_idx = self._device_indices(rid, src_ids, dst_ids, dev, dst.shape[1])
            if src_ids is not None:
                copy_blocks(src, dst, s_idx, d_idx)
            else:
                dst[:, d_idx] = src.to(dev, dst.dtype, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side)
        if src_ids is None and src.is_cuda:
            src.record_stream(self._side)   # the gathered tensor is read there, not on its own stream
        self._last_copy[rid] = done

    def _device_indices(self, rid: str, src_ids: list[int] | None, dst_ids: list[int], dev: torch.device,
                        num_blocks: int):
        """Holding the lock: rid's index tensors on ``dev`` (the destination ids checked
        against the receiver's ``num_blocks`` when made), uploaded on the side stream that
        uses them. Built from
        pinned memory without blocking: a plain ``torch.tensor(..., device=)`` would wait for
        the side stream, i.e. for this layer's compute on the engine's stream, and so stall
        the engine loop that calls the sender once per layer (IndexStager: reused pinned
        rows, never a wait for the device)."""
        have = self._indices.get(rid)
        if have is not None and have[0] == src_ids and have[1] == dst_ids:
            return have[2], have[3]
        _check_in_cache(dst_ids, num_blocks)
        with torch.cuda.stream(self._side_stream(dev)):
            if src_ids is not None:
                s_idx, d_idx = self._stager.upload([src_ids, dst_ids], dev)
            else:
                s_idx, (d_idx,) = None, self._stager.upload([dst_ids], dev)
        self._indices[rid] = (src_ids, dst_ids, s_idx, d_idx)
        return s_idx, d_idx

    def _gather(self, rid: str, src_layer: torch.Tensor, src_ids: list[int]) -> torch.Tensor:
        """Not granted yet (the claim is answered while the prefill runs): the blocks of the
        planes ``src_layer`` (one layer's K and V, or a group's) gathered into a private
        tensor on the caller's stream, for the I/O thread to copy
        once granted. Nothing here waits for the device: the prefill's layers must keep
        launching ahead of it, and an index tensor built with ``torch.tensor(..., device=)``
        would wait for this layer's compute. The source index is made once per request."""
        dev = src_layer.device
        with self._lock:
            have = self._gather_ids.get(rid)
        if have is None or have[0] != src_ids or have[1].device != dev:
            idx = torch.tensor(src_ids, dtype=torch.long)
            if dev.type == "cuda":
                idx = idx.pin_memory().to(dev, non_blocking=True)
            have = (src_ids, idx)
            with self._lock:
                self._gather_ids[rid] = have
        return src_layer[:, have[1]]

    def _queue_copy(self, rid: str, layer: int, ids: list[int], tensor: torch.Tensor, num_layers: int = 1) -> None:
        ready = None
        if tensor.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(tensor.device))
        self.stats["deferred_copies"] += 1
        self._put(_Item("copy", rid, layer, ids, tensor=tensor, event=ready, num_layers=num_layers))

    def _order_after_copies(self, rid: str) -> None:
        # The prefill worker releases the request's blocks next: later work on its stream
        # (which may reuse them) must wait for the copies that read them.
        with self._lock:
            ev = self._last_copy.get(rid)
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)

    def _enqueue(self, it: _Item) -> bool:
        """Holding the lock: queue ``it``; True if the I/O thread must be woken for it. It
        drains the queue to the end (or to an item that cannot go yet, which only a reply
        or its timer unblocks), so only an item that finds the queue empty needs a wake-up:
        one per burst of layers instead of one per layer."""
        was_empty = not self._queue
        self._queue.append(it)
        self._busy += 1
        return was_empty

    def _put(self, it: _Item) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            wake = self._enqueue(it)
        if wake:
            self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._wake_w is None:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass   # the pipe is full: the I/O thread is awake anyway

    def _mark_failed(self, rid: str, why: str) -> None:
        """Holding the lock."""
        if rid not in self._failed:
            log.error("kv cuda_ipc sender to %s: request %s failed: %s", self.endpoint, rid, why)
        self._failed[rid] = why
        self._failed.move_to_end(rid)
        while len(self._failed) > self.KEPT:
            self._failed.popitem(last=False)

    # ---- internals: the I/O thread ------------------------------------------------------------------------
    def _send(self, kind: bytes, body: bytes) -> None:
        self._sock.send_multipart([kind, body], zmq.NOBLOCK)
        self.stats["messages"] += 1

    def _try_send(self, kind: bytes, body: bytes, rid: str | None = None) -> bool:
        """Send without letting a full or dead peer end the I/O thread; a message of rid
        that cannot go fails rid (the receiver then fails it too, by deadline or loss)."""
        try:
            self._send(kind, body)
            return True
        except zmq.ZMQError as e:
            if rid is not None:
                with self._lock:
                    self._mark_failed(rid, f"control send failed: {e}")
            return False

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        hello_at = ping_at = self._ping_sent = time.monotonic()
        try:
            self._send(_CTRL, encode_control("hello", inst=self._ep.inst))
            while True:
                for sock, _ in poller.poll(max(1, int(self.ping_s * 1000))):
                    if sock == self._wake_r:
                        os.read(self._wake_r, 4096)
                self._read_replies()
                now = time.monotonic()
                if self._remote is None and self.broken is None and now - hello_at > self.connect_timeout_s:
                    self._break(f"no welcome from the receiver in {self.connect_timeout_s:.0f}s")
                if now - ping_at >= self.ping_s and self.broken is None:
                    self._ping_sent = ping_at = now
                    self._try_send(_CTRL, encode_control("ping", t=now))
                if self._process_queue():
                    return
        except Exception:
            log.exception("kv cuda_ipc sender to %s: I/O thread failed", self.endpoint)
        finally:
            self._shutdown()

    def _read_replies(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 2 or frames[0] != _CTRL:
                    raise WireError(f"reply: {len(frames)} frames, want [kind, body]")
                d = decode_control(frames[1], _FROM_RECEIVER)
                self._on_reply(d)
            except (WireError, KeyError, TypeError) as e:
                log.warning("kv cuda_ipc sender to %s: dropped a malformed reply: %s", self.endpoint, e)

    def _on_reply(self, d: dict) -> None:
        t = d["type"]
        if t == "welcome":
            try:
                remote = open_cache(d["cache"])
                lay = d["layout"]
                want = (lay["num_layers"], 2, lay["num_blocks"], lay["block_size"], lay["num_kv_heads"],
                        lay["head_dim"])
                if tuple(remote.shape) != want:
                    raise ValueError(f"cache shape {tuple(remote.shape)} is not the layout's {want}")
                if remote.device.type != self.device.type:
                    raise ValueError(f"the receiver's cache is on {remote.device.type}, this sender's on "
                                     f"{self.device.type}: both must be on GPUs or both on the CPU")
                bell = d["bell"]
                if type(bell) is not dict or set(bell) != {"desc", "slot", "nonce"}:
                    raise ValueError("bell: want desc, slot and nonce")
                bells, slot, nonce = open_cache(bell["desc"], bells=True), bell["slot"], bell["nonce"]
                if (type(slot) is not int or not 0 <= slot < bells.shape[0] or type(nonce) is not int
                        or not 0 < nonce < 2 ** 31 or bells.device.type != "cpu"):
                    raise ValueError("bell: slot or nonce out of range, or not in host memory")
            except Exception as e:
                self._break(f"cannot use the receiver's cache: {type(e).__name__}: {e}")
                return
            asked = self._ping_sent   # the welcome answers it (the probe below sends a ping of its own)
            rings = self._bell_rings(bells, slot, nonce, remote.device)
            with self._lock:
                self._remote = remote
                self._bell = (bells, slot, nonce) if rings else None
                self._block_bytes = 2 * remote[0, 0, 0].numel() * remote.element_size()   # K and V of a block
                self._lease_until = asked + self.lease_s
            log.info("kv cuda_ipc sender to %s: pair formed (%s)", self.endpoint, remote.device)
        elif t == "refuse":
            self._break(f"receiver refused: {str(d['reason'])[:MAX_REASON_LEN]}")
        elif t == "pong":
            asked = d["t"]
            if type(asked) is float and asked <= time.monotonic():
                with self._lock:
                    self._lease_until = max(self._lease_until, asked + self.lease_s)
        elif t == "grant":
            rid = d["request_id"]
            with self._lock:
                if d["ok"] is True:
                    self._granted.add(rid)
                else:
                    self._mark_failed(rid, f"not granted: {str(d['reason'])[:MAX_REASON_LEN]}")
        elif t == "revoke":
            self._on_revoke(d["request_id"])

    def _bell_rings(self, bells: torch.Tensor, slot: int, nonce: int, device: torch.device) -> bool:
        """Can copies on ``device`` ring this doorbell? On a GPU the bells' host memory is
        registered (mapped) with CUDA and one ring is tried on a stream of its own and
        looked for; if anything fails, no bell: each report then waits for its copy."""
        if device.type != "cuda":
            return True
        try:
            err = int(torch.cuda.cudart().cudaHostRegister(bells.data_ptr(), bells.numel() * bells.element_size(),
                                                           _HOST_REGISTER_PORTABLE_MAPPED))
            if err:
                raise RuntimeError(f"cudaHostRegister failed with CUDA error {err}")
            self._registered = bells   # kept (its mapping with it) until unregistered
            probe, stream = nonce << _SEQ_BITS, torch.cuda.Stream(device)
            ring(bells, slot, probe, stream=stream, device=device)
            stream.synchronize()
            if int(bells[slot]) != probe:
                raise RuntimeError("a probe ring was not seen in host memory")
            return True
        except Exception as e:
            log.warning("kv cuda_ipc sender to %s: no doorbell (%s: %s); each report waits for its copy",
                        self.endpoint, type(e).__name__, e)
            self._unregister()
            return False
        finally:
            # The probe's first ring compiled a kernel: ask for a lease now, not at the next ping.
            self._ping_sent = time.monotonic()
            self._try_send(_CTRL, encode_control("ping", t=self._ping_sent))

    def _unregister(self) -> None:
        if self._registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered.data_ptr())
            self._registered = None

    def _on_revoke(self, rid: str) -> None:
        with self._lock:
            self._revoked.add(rid)
            self._granted.discard(rid)
            ev = self._last_copy.pop(rid, None)
            self._indices.pop(rid, None)
            self._gather_ids.pop(rid, None)
            side = self._side
        self.stats["revoked"] += 1
        if ev is not None:
            ev.synchronize()   # every copy of rid launched before the revoke has finished
        elif side is not None:
            # rid is closed here (its done went out, reported ahead of its copies) or never
            # copied: its copies, if any, are somewhere on the side stream.
            side.synchronize()
        self._try_send(_CTRL, encode_control("fenced", request_id=rid))

    def _break(self, why: str) -> None:
        """The pair is unusable: abort every transfer this sender knows of, so the receiver
        falls back at once instead of at its deadlines."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = why
            rids = list(self._begun)
            for rid in rids:
                self._mark_failed(rid, why)
            copies = list(self._last_copy.values())
        log.error("kv cuda_ipc sender to %s: %s", self.endpoint, why)
        for ev in copies:   # an abort lets the receiver reuse the blocks at once (reports went ahead of copies)
            ev.synchronize()
        for rid in rids:
            try:
                self._send(_WIRE, encode_abort(rid, why)[0])
            except zmq.ZMQError:
                pass

    def _process_queue(self) -> bool:
        """Handle queued items in order while they can go; True once told to stop."""
        while True:
            with self._lock:
                if not self._queue:
                    return False
                it = self._queue[0]
                landed = list(itertools.takewhile(lambda x: x.kind == "landed", self._queue))
            if it.kind == "stop":
                return True
            if landed:
                handled = len(landed) + self._report_landed(landed, self._done_after(len(landed)))
            elif self._handle(it):
                handled = 1
            else:
                return False   # it cannot go yet: the next reply or wake-up tries again
            with self._idle:
                for _ in range(handled):
                    self._queue.popleft()
                self._busy -= handled
                self._idle.notify_all()

    def _done_after(self, i: int) -> _Item | None:
        """The done queued right after the first ``i`` items, if it ends the request of the
        i-th (its report can carry it)."""
        with self._lock:
            if len(self._queue) > i and self._queue[i].kind == "done" and self._queue[i].rid == self._queue[i - 1].rid:
                return self._queue[i]
        return None

    def _report_landed(self, items: list[_Item], done: _Item | None = None) -> int:
        """Copies launched by the caller, in launch order on one side stream: reported at
        once when each rang a doorbell, else once the newest has finished (then all have).
        That rests on two invariants of this class: every copy, the caller's and the I/O
        thread's deferred ones, goes to ``self._side``, and a copy is launched (and its bell
        rung) and queued under ``self._lock`` in one step (queue order is launch order, and
        bell order). One report per run of one request's consecutive layers into the
        same blocks; ``done`` (queued right after them, for the last run's request) goes
        with the last report. Returns how many items beyond ``items`` it handled (1 for the
        done, else 0)."""
        if not all(x.bell for x in items):   # without a doorbell a report waits for its copy
            last = next((x.event for x in reversed(items) if x.event is not None), None)
            if last is not None:
                last.synchronize()
        run = items[0]
        count, bell = run.num_layers, run.bell
        for x in items[1:]:
            if x.rid == run.rid and x.layer == run.layer + count and x.dst == run.dst:
                count, bell = count + x.num_layers, x.bell
                continue
            self._report(run.rid, run.layer, count, run.dst, bell=bell)
            run, count, bell = x, x.num_layers, x.bell
        if done is None:
            self._report(run.rid, run.layer, count, run.dst, bell=bell)
            return 0
        # Closing the request forgets a revoke, so the report goes first: with the done in
        # it when all of the request landed and is still wanted, else on its own (it is
        # skipped for a revoked or failed request) and the done closes as usual (turned
        # into an abort if the request failed, the merged send included).
        with self._lock:
            whole = done.rid not in self._failed and done.rid not in self._revoked
        if whole and self._report(run.rid, run.layer, count, run.dst, done=done.body, bell=bell):
            self._close_request(done)
            return 1
        self._report(run.rid, run.layer, count, run.dst, bell=bell)
        self._send_final(done.rid, self._close_request(done))
        return 1

    def _handle(self, it: _Item) -> bool:
        """Handle one item; False leaves it at the head of the queue (it cannot go yet)."""
        rid = it.rid
        now = time.monotonic()
        closing = self._drop_after is not None and now > self._drop_after
        if it.kind == "claim":
            if self._remote is None and self.broken is None and not closing:
                return False   # the pair is forming
            if self._remote is None or self.broken is not None or closing:
                with self._lock:
                    self._mark_failed(rid, self.broken or "sender closed")
                return True
            self._try_send(_CTRL, encode_control("claim", request_id=rid), rid)
            return True
        if it.kind == "copy":
            with self._lock:
                settled = rid in self._failed or rid in self._revoked or self.broken is not None or closing
                if not settled and not self._can_write(rid):
                    if now - it.queued_at < self.send_timeout_s:
                        return False   # waiting for the grant (or a lease renewal)
                    self._mark_failed(rid, f"no grant or lease in {self.send_timeout_s:.0f}s")
                    settled = True
                if settled:
                    if closing:   # so its done goes out as an abort: the receiver falls back now
                        self._mark_failed(rid, "sender closed before the copy")
                    self.stats["dropped"] += 1
                    return True
                dst = self._remote[it.layer:it.layer + it.num_layers].flatten(0, 1)
                if dst.shape[0] != it.tensor.shape[0]:
                    self._mark_failed(rid, f"layers {it.layer}..{it.layer + it.num_layers - 1} outside the "
                                           f"receiver's {self._remote.shape[0]}")
                    self.stats["dropped"] += 1
                    return True
                self._launch(rid, it.tensor, dst, it.dst, ready=it.event)
                ev = self._last_copy.get(rid)
            if ev is not None:
                ev.synchronize()
            self._report(rid, it.layer, it.num_layers, it.dst)
            return True
        # done / abort: every earlier item of rid has been handled (the queue is in order)
        self._send_final(rid, self._close_request(it))
        return True

    def _close_request(self, it: _Item) -> bytes:
        """A done or abort of ``it.rid`` is going out: forget the request, and return the
        header to send (a done turned into an abort if not all of it landed)."""
        rid = it.rid
        with self._lock:
            failed = rid in self._failed or rid in self._revoked
            self._granted.discard(rid)
            self._revoked.discard(rid)
            last = self._last_copy.pop(rid, None)
            self._indices.pop(rid, None)
            self._gather_ids.pop(rid, None)
            self._begun.pop(rid, None)
        if last is not None and (failed or it.kind == "abort"):
            # An abort lets the receiver reuse the blocks at once, and reports went out
            # ahead of their copies: none may still be writing.
            last.synchronize()
        if it.kind == "done" and failed:   # not all of it landed: let the receiver fall back now
            self.stats["dones_as_aborts"] += 1
            with self._lock:
                why = self._failed.get(rid, "revoked")
            return encode_abort(rid, why)[0]
        return it.body

    def _send_final(self, rid: str, body: bytes) -> None:
        try:
            self._send(_WIRE, body)
        except zmq.ZMQError as e:
            with self._lock:
                self._mark_failed(rid, f"control send failed: {e}")

    def _report(self, rid: str, first: int, num_layers: int, dst: list[int], done: bytes | None = None,
                bell: int = 0) -> bool:
        """Tell the receiver that layers' copies have landed, or will have once our bell
        reaches ``bell`` (unless rid was revoked or failed), with rid's done header if
        given; True if it went."""
        with self._lock:
            skip = rid in self._revoked or rid in self._failed
            remote = self._remote
        if skip or remote is None:
            return False
        if not self._try_send(_LANDED, encode_landed(rid, first, num_layers, dst, done, bell), rid):
            return False
        self.stats["reports"] += 1
        self.stats["bytes"] += self._block_bytes * len(dst) * num_layers
        return True

    def _shutdown(self) -> None:
        with self._idle:
            for it in self._queue:
                if it.rid:
                    self._failed.setdefault(it.rid, "sender closed before it was sent")
            self._busy = 0
            self._queue.clear()
            self._closed = True
            events = list(self._last_copy.values())
            self._last_copy.clear()
            self._indices.clear()
            self._gather_ids.clear()
            self._idle.notify_all()
        for ev in events:
            ev.synchronize()   # bye promises that nothing of ours still writes
        if self._side is not None:
            # Closed requests' copies (their dones went out ahead of them) and every ring;
            # no launch follows: _closed is set, and copies launch only holding the lock.
            self._side.synchronize()
        try:
            self._send(_CTRL, encode_control("bye"))
        except zmq.ZMQError:
            pass
        self._sock.close(linger=int(max(0.0, self.linger_s) * 1000))
        self._remote = None
        self._unregister()
