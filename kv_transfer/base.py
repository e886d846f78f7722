"""The KV transfer interface both backends implement, and the receiver's bookkeeping.

Prefill side (one :class:`KVSender` per destination endpoint)::

    sender.send_layer(rid, layer, dst_block_ids, engine.runner.read_kv_blocks(layer, src_blocks))
    ...                                   # from the engine's on_layer_done, layer by layer
    sender.send_done(rid, first_token, num_layers)
    engine.release(rid)                   # read_kv_blocks returned copies: safe at once

Decode side (one :class:`KVReceiver` per worker, polled from its engine loop)::

    seq = engine.add_remote_prefill(rid, prompt, params)
    first = seq.num_computed_tokens // block_size
    receiver.expect(rid, seq.block_table[first:], num_layers, deadline)   # before the
    ...                                   # block ids are handed to the prefill side
    res = receiver.poll(timeout_ms)       # writes landed layers via write_layer(...)
    for c in res.completed: engine.remote_kv_landed(c.request_id, c.first_token)
    for f in res.failed:    engine.remote_kv_failed(f.request_id)     # prefill in place

A transfer completes when every expected layer has landed in every reserved block and
the ``done`` message has arrived; it fails on its deadline, on an ``abort`` from the
sender, on a malformed message that names it, or when ``write_layer`` raises. Data for a
request the receiver no longer (or never) expects is dropped and logged, never written.
Request ids are transfer keys: a retried transfer into new blocks should use a fresh key
(e.g. ``f"{request_id}#{attempt}"``) so late data of the old attempt cannot reach it.
"""
from __future__ import annotations

import abc
import logging
import math
import operator
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.wire import (AbortHeader, DoneHeader, KVHeader, KVLayout, KVMessage, Reservation, UnknownRequestError,
                              WireError, check_request_id, decode_message, MAX_LAYERS)
from planes.messages import KV_TIMEOUT_S

log = logging.getLogger(__name__)

# The defaults of every backend's timeouts (the workers pass theirs). A receiver fails a
# transfer not complete within KV_TIMEOUT_S (planes.messages: the decode worker then prefills
# in place); a sender fails a request whose message cannot be queued within SEND_TIMEOUT_S.
SEND_TIMEOUT_S = 10.0

# write_layer(request_id, layer, block_ids, tensor): tensor is [2, len(block_ids), block_size,
# num_kv_heads, head_dim] in the layout's dtype on the CPU; valid only during the call.
WriteLayer = Callable[[str, int, list, torch.Tensor], None]


@dataclass(frozen=True)
class Completed:
    request_id: str
    first_token: int


@dataclass(frozen=True)
class Failed:
    request_id: str
    reason: str


@dataclass
class PollResult:
    completed: list[Completed] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    # Cancelled transfers whose reserved blocks no sender can write any more (see
    # KVReceiver.write_pending): only backends that write into the cache from another
    # process (cuda_ipc) ever hold a cancelled transfer's blocks past cancel().
    released: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.completed or self.failed or self.released)


def layers_due(layer: int, num_layers: int, per_launch: int) -> range | None:
    """The layers to hand over once ``layer`` (of ``num_layers``, computed in order from 0)
    is done, when they go ``per_launch`` at a time: the group ``layer`` completes, or the
    last partial group at the model's last layer; None while a group is still filling."""
    per_launch = max(1, int(per_launch))
    if (layer + 1) % per_launch and layer != num_layers - 1:
        return None
    return range(layer - layer % per_launch, layer + 1)


class KVSender(abc.ABC):
    """Ships one request's KV, layer by layer, to one receiver endpoint. Calls return
    quickly: staging to host and sending happen in order, off the caller's thread where
    the backend can. The tensor given to send_layer belongs to the sender until sent."""

    endpoint: str
    # How many computed layers a prefill worker hands over in one send_layers_blocks call
    # (layers_due). 1 ships each layer as soon as it is computed; a backend whose per-call
    # host cost is what limits it (cuda_ipc copies on the device, no staging) takes several.
    layers_per_launch: int = 1

    @abc.abstractmethod
    def send_layer(self, request_id: str, layer: int, dst_block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        """Queue one layer's blocks: ``tensor`` is [2, len(dst_block_ids), ...] (as
        ``ModelRunner.read_kv_blocks`` returns), for the receiver's blocks ``dst_block_ids``."""

    @abc.abstractmethod
    def send_done(self, request_id: str, first_token: int, num_layers: int) -> None:
        """Every layer has been queued; ``first_token`` is the prefill's sampled token."""

    @abc.abstractmethod
    def send_abort(self, request_id: str, reason: str = "") -> None:
        """Give the transfer up; the receiver reports it failed without waiting its deadline."""

    def begin(self, request_id: str) -> None:
        """A transfer for ``request_id`` will follow (called when the prefill is accepted).
        Backends that must be granted a request before writing ask for it here, ahead
        of the first layer; the others need nothing."""

    def prepare_blocks(self, request_id: str, dst_block_ids: Sequence[int], src_block_ids: Sequence[int]) -> None:
        """The blocks a begun request's layers will go from and to, known before its first
        group of layers is due (the prefill worker calls this after the first layer). A
        backend with per-request set-up on the device (block ids uploaded) does it here,
        off the first launch's path; the others need nothing."""

    def send_layer_blocks(self, request_id: str, layer: int, dst_block_ids: Sequence[int],
                          src_layer: torch.Tensor, src_block_ids: Sequence[int]) -> None:
        """Like :meth:`send_layer`, for blocks ``src_block_ids`` of one layer of the sender's
        own cache (``src_layer`` is ``[2, num_blocks, ...]``). The default gathers them into
        a new tensor (so the sender's blocks are free to reuse at once); a backend that can
        copy block to block without it overrides this and keeps the sender's blocks
        ordered on the current stream behind its reads (see :meth:`send_done`)."""
        idx = torch.tensor(list(src_block_ids), dtype=torch.long, device=src_layer.device)
        self.send_layer(request_id, layer, dst_block_ids, src_layer[:, idx])

    def send_layers_blocks(self, request_id: str, layers: range, dst_block_ids: Sequence[int],
                           src_cache: torch.Tensor, src_block_ids: Sequence[int]) -> None:
        """:meth:`send_layer_blocks` for each of the consecutive ``layers`` of the sender's
        whole cache ``src_cache`` (``[num_layers, 2, num_blocks, ...]``). A backend that
        copies several layers in one launch overrides this (see ``layers_per_launch``)."""
        for layer in layers:
            self.send_layer_blocks(request_id, layer, dst_block_ids, src_cache[layer], src_block_ids)

    @abc.abstractmethod
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far has been handed to the transport. False on timeout."""

    @abc.abstractmethod
    def failed_requests(self) -> set[str]:
        """Requests whose messages could not be sent (the receiver will time them out)."""

    @abc.abstractmethod
    def close(self, linger_s: float | None = None) -> None:
        """Send what is queued (for at most ``linger_s``), then release the transport."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class _Transfer:
    res: Reservation
    deadline: float
    missing: list[set[int]]        # per layer: reserved blocks not landed yet
    layers_left: int               # layers with missing blocks
    done: DoneHeader | None = None
    bytes: int = 0
    expected_at: float = 0.0       # time.monotonic() of expect(): the decode worker's wait starts
    first_frame_at: float | None = None   # first message of this transfer applied here


class KVReceiver(abc.ABC):
    """Receives KV for the requests announced with :meth:`expect` and writes it through
    ``write_layer``. Single-threaded: all calls, and the writes, happen in the thread that
    calls :meth:`poll` (the decode worker's engine loop)."""

    TOMBSTONES = 4096   # recently finished request ids remembered to classify late data

    def __init__(self, layout: KVLayout, write_layer: WriteLayer, default_timeout_s: float = KV_TIMEOUT_S):
        if not isinstance(layout, KVLayout):
            raise TypeError("layout must be a KVLayout")
        self.layout = layout
        self._write_layer = write_layer
        self.default_timeout_s = float(default_timeout_s)
        self._res: dict[str, Reservation] = {}
        self._xfers: dict[str, _Transfer] = {}
        self._tomb: OrderedDict[str, str] = OrderedDict()
        self._completed: list[Completed] = []
        self._failed: list[Failed] = []
        self._released: list[str] = []
        self.recent_errors: deque[WireError] = deque(maxlen=64)
        # seconds / wire_seconds: summed over completed transfers only (a failed one has no
        # meaningful duration), so that seconds / completed is the mean wait per transfer.
        self.stats = dict(messages=0, bytes=0, layers_written=0, completed=0, failed=0, timed_out=0,
                          rejected=0, dropped_late=0, dropped_unknown=0, seconds=0.0, wire_seconds=0.0)

    # ---- the decode worker's calls --------------------------------------------------------------
    @property
    @abc.abstractmethod
    def endpoint(self) -> str:
        """Where senders send (what the router hands to prefill workers)."""

    def expect(self, request_id: str, block_ids: Sequence[int], num_layers: int | None = None,
               deadline: float | None = None) -> None:
        """Announce a transfer into ``block_ids`` (reserved by the engine) of layers
        ``0..num_layers-1``, due by ``deadline`` (``time.monotonic()`` seconds; default
        now + ``default_timeout_s``). Call it before the block ids reach the sender."""
        rid = check_request_id(request_id)
        if rid in self._res:
            raise ValueError(f"request {rid!r} is already expected")
        n = self.layout.num_layers if num_layers is None else num_layers
        if type(n) is not int or not 1 <= n <= min(self.layout.num_layers, MAX_LAYERS):
            raise ValueError(f"num_layers must be an int in [1, {self.layout.num_layers}], got {n!r}")
        try:
            given = list(block_ids)
            ids = tuple(operator.index(b) for b in given if not isinstance(b, bool))
        except TypeError:
            raise ValueError("block ids must be ints") from None
        if len(ids) != len(given) or any(not 0 <= b < self.layout.num_blocks for b in ids):
            raise ValueError(f"block ids must be ints in [0, {self.layout.num_blocks})")
        if len(set(ids)) != len(ids):
            raise ValueError("block ids must be distinct")
        if deadline is None:
            deadline = time.monotonic() + self.default_timeout_s
        res = Reservation(ids, n)
        self._tomb.pop(rid, None)
        self._res[rid] = res
        self._xfers[rid] = _Transfer(res, float(deadline), [set(ids) for _ in range(n)], n if ids else 0,
                                     expected_at=time.monotonic())

    def cancel(self, request_id: str) -> bool:
        """Forget a transfer (the request was aborted); later data for it is dropped."""
        if self._forget(request_id, "cancelled") is None:
            return False
        return True

    def write_pending(self, request_id: str) -> bool:
        """After :meth:`cancel`: whether a sender may still write into the transfer's
        blocks, so the caller must not reuse them until a poll lists ``request_id`` in
        ``released``. Backends that copy through this class's ``write_layer`` never do."""
        return False

    def wake_within_s(self) -> float | None:
        """How soon the caller should poll again even if no socket turns readable (work
        this receiver waits for that wakes nothing on the host: cuda_ipc's doorbells), or
        None when the socket's wake-up is enough."""
        return None

    def pending(self) -> list[str]:
        return list(self._res)

    def progress(self, request_id: str) -> dict | None:
        """Which layers have fully landed, whether ``done`` arrived, bytes received."""
        x = self._xfers.get(request_id)
        if x is None:
            return None
        return dict(layers_landed=[i for i, m in enumerate(x.missing) if not m], done=x.done is not None,
                    bytes=x.bytes, deadline=x.deadline)

    def poll(self, timeout_ms: int = 0) -> PollResult:
        """Receive what has arrived (waiting up to ``timeout_ms`` for the first message,
        less if a deadline is nearer), write landed layers, expire overdue transfers, and
        return the transfers that completed or failed since the last poll."""
        self._expire()
        wait = 0 if (self._completed or self._failed or self._released) else max(0, int(timeout_ms))
        if wait and self._xfers:
            nearest = min(x.deadline for x in self._xfers.values()) - time.monotonic()
            wait = max(0, min(wait, math.ceil(nearest * 1000)))
        self._receive(wait)
        self._expire()
        out = PollResult(self._completed, self._failed, self._released)
        self._completed, self._failed, self._released = [], [], []
        return out

    @property
    def waitable_socket(self):
        """A ZeroMQ socket that turns readable when there is something to receive (to sleep
        on it with the caller's other sockets), or None if there is none to wait on."""
        return getattr(self, "_sock", None)

    @abc.abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- for backends ----------------------------------------------------------------------------
    @abc.abstractmethod
    def _receive(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for data, then hand every message that is there to
        :meth:`_on_frames` (or :meth:`_on_message`)."""

    def _on_frames(self, frames: Sequence) -> None:
        """Validate and apply one message; never raises for bad input."""
        self.stats["messages"] += 1
        try:
            msg = decode_message(frames, self.layout, self._res)
        except UnknownRequestError as e:
            self._drop_unknown(e)
            return
        except WireError as e:
            self._reject(e)
            return
        self._on_message(msg)

    def _on_message(self, msg: KVMessage | DoneHeader | AbortHeader) -> None:
        if isinstance(msg, KVMessage):
            h = msg.header
            rid = h.request_id
            self._mark_first_frame(self._xfers[rid])
            try:
                self._write_layer(rid, h.layer, list(h.block_ids), msg.data)
            except Exception as e:   # the engine refused it: this transfer cannot complete
                log.exception("kv %s: writing layer %d failed", rid, h.layer)
                self._fail(rid, f"write_layer failed: {type(e).__name__}: {e}")
                return
            self._mark_landed(h)
        elif isinstance(msg, DoneHeader):
            x = self._xfers[msg.request_id]
            self._mark_first_frame(x)
            if x.done is not None:
                self._reject(WireError("done: received twice", msg.request_id))
                return
            x.done = msg
            self._maybe_complete(msg.request_id)
        else:
            self._fail(msg.request_id, f"sender aborted: {msg.reason}")

    def _mark_landed(self, h: KVHeader) -> None:
        """Blocks ``h.block_ids`` of layer ``h.layer`` are in the cache (written by
        ``write_layer``, or by the sender itself on backends that copy directly)."""
        self._mark_layers_landed(h.request_id, range(h.layer, h.layer + 1), h.block_ids, h.nbytes)

    def _mark_layers_landed(self, rid: str, layers: range, block_ids, nbytes_per_layer: int,
                            covers_reservation: bool = False) -> None:
        """The same blocks of several layers at once (a cuda_ipc report covers a group of
        layers): the ids are hashed once for all of them, not once per layer, and not at
        all when the caller has checked that they are the request's whole reservation
        (distinct, reserved, as many as reserved: each such layer is complete)."""
        x = self._xfers[rid]
        self._mark_first_frame(x)
        self.stats["layers_written"] += len(layers)
        self.stats["bytes"] += nbytes_per_layer * len(layers)
        x.bytes += nbytes_per_layer * len(layers)
        ids = None
        for layer in layers:
            missing = x.missing[layer]
            if missing:
                if covers_reservation:
                    missing.clear()
                else:
                    if ids is None:
                        ids = frozenset(block_ids)
                    missing -= ids
                if not missing:
                    x.layers_left -= 1
        self._maybe_complete(rid)

    # ---- internals --------------------------------------------------------------------------------
    @staticmethod
    def _mark_first_frame(x: _Transfer) -> None:
        # Where the wire time starts: the first message of the transfer that reaches this
        # class (a layer or the done). Before it, the decode worker waits on the prefill
        # itself; a backend that receives data before handing it over (p2p: the first layer
        # after it landed) starts this clock that much later.
        if x.first_frame_at is None:
            x.first_frame_at = time.monotonic()

    def _maybe_complete(self, rid: str) -> None:
        x = self._xfers[rid]
        if x.done is not None and x.layers_left == 0:
            self._forget(rid, "completed")
            self.stats["completed"] += 1
            self._add_durations(x)
            self._completed.append(Completed(rid, x.done.first_token))

    def _add_durations(self, x: _Transfer) -> None:
        now = time.monotonic()
        self.stats["seconds"] += now - x.expected_at
        # Completion needs the done message, which marked first_frame_at if no layer had.
        self.stats["wire_seconds"] += now - x.first_frame_at

    def _fail(self, rid: str, reason: str) -> None:
        if self._forget(rid, "failed") is not None:
            log.warning("kv %s: transfer failed: %s", rid, reason)
            self.stats["failed"] += 1
            self._failed.append(Failed(rid, reason))

    def _forget(self, rid: str, why: str) -> _Transfer | None:
        self._res.pop(rid, None)
        x = self._xfers.pop(rid, None)
        if x is not None:
            self._tomb[rid] = why
            self._tomb.move_to_end(rid)
            while len(self._tomb) > self.TOMBSTONES:
                self._tomb.popitem(last=False)
        return x

    def _expire(self) -> None:
        if not self._xfers:
            return
        now = time.monotonic()
        for rid in [r for r, x in self._xfers.items() if x.deadline <= now]:
            x = self._xfers[rid]
            landed = sum(1 for m in x.missing if not m)
            self.stats["timed_out"] += 1
            self._fail(rid, f"deadline passed ({landed}/{len(x.missing)} layers landed, "
                            f"done {'received' if x.done else 'not received'})")

    def _reject(self, e: WireError) -> None:
        self.stats["rejected"] += 1
        self.recent_errors.append(e)
        log.warning("kv: rejected message: %s", e)
        if e.request_id is not None and e.request_id in self._xfers:
            self._fail(e.request_id, f"malformed message: {e}")

    def _drop_unknown(self, e: UnknownRequestError) -> None:
        why = self._tomb.get(e.request_id)
        if why is not None:
            self.stats["dropped_late"] += 1
            log.info("kv %s: dropped late data (transfer %s)", e.request_id, why)
        else:
            self.stats["dropped_unknown"] += 1
            self.recent_errors.append(e)
            log.warning("kv %s: dropped data for a request not expected here", e.request_id)

