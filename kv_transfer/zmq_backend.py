"""Host-staged KV transfer over ZeroMQ: PUSH (prefill side) to PULL (decode side).

Endpoints: ``tcp://HOST:PORT`` (``tcp://127.0.0.1:*`` binds a random loopback port, the
default) or ``ipc://PATH`` (processes on one host; much faster than TCP loopback for KV:
use it whenever both ends share a host). ``"ipc"`` / ``"ipc://*"`` bind a fresh socket
file in the temp directory. The receiver binds, the senders connect; the receiver's
:attr:`ZmqKVReceiver.endpoint` is what the router hands to prefill workers.

Memory bounds on the receiver: ZMQ_MAXMSGSIZE (``max_message_bytes``) caps every frame --
a peer that sends more is disconnected by libzmq before anything reaches Python -- and
ZMQ_RCVHWM caps whole messages queued per connected sender. Senders split a layer into
messages of at most ``max_message_bytes`` (both ends must agree on it). There is no
authentication: bind to loopback, an ipc path, or a trusted cluster network only.
"""
from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch
import zmq

from kv_transfer.base import KV_TIMEOUT_S, SEND_TIMEOUT_S, KVReceiver, KVSender, WriteLayer
from kv_transfer.wire import (DEFAULT_MAX_MESSAGE_BYTES, MAX_BLOCKS_PER_MESSAGE, MAX_FRAMES, MAX_HEADER_BYTES,
                              MAX_LAYERS, KVLayout, check_request_id, dtype_name, encode_abort, encode_done,
                              encode_kv)

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:*"
_IPC_PATH_MAX = 100   # sun_path is 108 bytes on Linux, 104 on macOS


def resolve_bind(bind: str) -> str:
    """``"tcp"`` -> loopback random port; ``"ipc"``/``"ipc://*"`` -> a fresh socket path."""
    if bind == "tcp":
        return DEFAULT_BIND
    if bind in ("ipc", "ipc://", "ipc://*"):
        path = os.path.join(tempfile.gettempdir(), f"pdserve-kv-{os.getpid()}-{secrets.token_hex(6)}.sock")
        bind = "ipc://" + path
    _check_endpoint(bind, binding=True)
    return bind


def _check_endpoint(ep: str, binding: bool) -> None:
    if not isinstance(ep, str):
        raise TypeError(f"endpoint must be a str, got {type(ep).__name__}")
    if ep.startswith("tcp://"):
        host, sep, port = ep[len("tcp://"):].rpartition(":")
        if not sep or not host or not (port.isdigit() or (binding and port == "*")):
            raise ValueError(f"endpoint {ep!r}: want tcp://HOST:PORT" + (" or tcp://HOST:*" if binding else ""))
    elif ep.startswith("ipc://"):
        path = ep[len("ipc://"):]
        if not path or path == "*" or len(path) > _IPC_PATH_MAX:
            raise ValueError(f"endpoint {ep!r}: want ipc://PATH with a path of at most {_IPC_PATH_MAX} chars")
    else:
        raise ValueError(f"endpoint {ep!r}: only tcp:// and ipc:// are supported")


# ---- decode side ------------------------------------------------------------------------------------
class ZmqKVReceiver(KVReceiver):
    """PULL socket bound to ``bind``; see :class:`kv_transfer.base.KVReceiver`."""

    def __init__(self, layout: KVLayout, write_layer: WriteLayer, *, bind: str = DEFAULT_BIND,
                 advertise_host: str | None = None, context: zmq.Context | None = None, rcvhwm: int = 32,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, default_timeout_s: float = KV_TIMEOUT_S,
                 max_messages_per_poll: int = 1024):
        super().__init__(layout, write_layer, default_timeout_s)
        if max_message_bytes < layout.bytes_per_block:
            raise ValueError(f"max_message_bytes {max_message_bytes} < one block ({layout.bytes_per_block} bytes)")
        self.max_message_bytes = int(max_message_bytes)
        self.max_messages_per_poll = int(max_messages_per_poll)
        bind = resolve_bind(bind)
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.PULL)
        try:
            # Per frame: the data frame is at most max_message_bytes, a header at most MAX_HEADER_BYTES.
            sock.setsockopt(zmq.MAXMSGSIZE, max(self.max_message_bytes, MAX_HEADER_BYTES))
            sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(bind)
        except Exception:
            sock.close(0)
            raise
        self._sock = sock
        ep = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._ipc_path = ep[len("ipc://"):] if ep.startswith("ipc://") else None
        if ep.startswith("tcp://"):
            host, _, port = ep[len("tcp://"):].rpartition(":")
            if advertise_host:
                ep = f"tcp://{advertise_host}:{port}"
            elif host in ("0.0.0.0", "*", "[::]", "::"):
                log.warning("kv receiver bound to %s: pass advertise_host so remote senders can reach it", ep)
        self._endpoint = ep
        self._closed = False
        log.info("kv receiver listening on %s", ep)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def _receive(self, timeout_ms: int) -> None:
        if self._closed:
            raise RuntimeError("receiver is closed")
        sock = self._sock
        if timeout_ms > 0 and not sock.poll(timeout_ms, zmq.POLLIN):
            return
        for _ in range(self.max_messages_per_poll):
            try:
                frames = [sock.recv(flags=zmq.NOBLOCK, copy=False)]
            except zmq.Again:
                return
            # The rest of a multipart message is already here (ZeroMQ delivers messages
            # whole). Keep one frame beyond the most any message has, so the decoder sees
            # "too many frames"; drop the others at once.
            while sock.getsockopt(zmq.RCVMORE):
                f = sock.recv(copy=False)
                if len(frames) <= MAX_FRAMES:
                    frames.append(f)
            self._on_frames(frames)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(0)
        if self._ipc_path and os.path.exists(self._ipc_path):
            try:
                os.unlink(self._ipc_path)
            except OSError:
                pass


# ---- prefill side ------------------------------------------------------------------------------------
_STOP = object()


class ZmqKVSender(KVSender):
    """PUSH socket connected to one receiver endpoint, owned by one I/O thread.

    ``send_layer`` validates and encodes in the caller's thread and stages the data to
    host: a CPU tensor is sent as is if contiguous (so the caller must not modify it
    afterwards; ``read_kv_blocks`` returns a fresh copy), a CUDA tensor is copied into
    pinned memory on a side stream that waits for the current stream (the layer's
    compute), so the engine's thread never blocks. The I/O thread waits for that copy
    and sends, in call order. A message that cannot be queued within ``send_timeout_s``
    (receiver gone or not draining) marks its request failed; its later messages are
    dropped (the receiver times the transfer out)."""

    FAILED_KEPT = 4096

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None, sndhwm: int = 32,
                 send_timeout_s: float = SEND_TIMEOUT_S, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 linger_s: float = 10.0):
        _check_endpoint(endpoint, binding=False)
        self.endpoint = endpoint
        self.max_message_bytes = int(max_message_bytes)
        self.linger_s = float(linger_s)
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.SNDHWM, int(sndhwm))
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
            sock.connect(endpoint)
        except Exception:
            sock.close(0)
            raise
        self._sock = sock
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self._busy = 0                    # queued + in flight
        self._closed = False
        self._drop_after: float | None = None
        self._close_linger_ms = int(self.linger_s * 1000)
        self._failed: OrderedDict[str, str] = OrderedDict()
        self._streams: dict = {}
        self.stats = dict(messages=0, bytes=0, dropped=0)
        self._thread = threading.Thread(target=self._run, name=f"kv-sender->{endpoint}", daemon=True)
        self._thread.start()

    # ---- API -----------------------------------------------------------------------------------
    def send_layer(self, request_id: str, layer: int, dst_block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        rid = check_request_id(request_id)
        if type(layer) is not int or not 0 <= layer < MAX_LAYERS:
            raise ValueError(f"layer must be an int in [0, {MAX_LAYERS}), got {layer!r}")
        ids = [int(b) for b in dst_block_ids]
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[1] != len(ids):
            raise ValueError(f"tensor must be [2, {len(ids)}, ...] (one entry per destination block on dim 1)")
        itemsize = torch.empty((), dtype=tensor.dtype).element_size()
        dtype_name(tensor.dtype)
        if not ids:
            return
        per_block = tensor.numel() // len(ids) * itemsize
        if per_block > self.max_message_bytes:
            raise ValueError(f"one block is {per_block} bytes > max_message_bytes {self.max_message_bytes}")
        step = max(1, min(MAX_BLOCKS_PER_MESSAGE, self.max_message_bytes // per_block))
        self._check_open()
        for i in range(0, len(ids), step):
            part = tensor if step >= len(ids) else tensor[:, i:i + step]
            host, event = self._stage(part)
            self._put(rid, encode_kv(rid, layer, ids[i:i + step], host), event, host.numel() * itemsize)

    def send_done(self, request_id: str, first_token: int, num_layers: int) -> None:
        self._check_open()
        self._put(request_id, encode_done(request_id, first_token, num_layers), None, 0)

    def send_abort(self, request_id: str, reason: str = "") -> None:
        self._check_open()
        frames = encode_abort(request_id, reason)
        with self._cv:
            self._failed.pop(request_id, None)   # an abort goes out even after a failed send
        self._put(request_id, frames, None, 0, always=True)

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
            self._close_linger_ms = int(linger * 1000)
            self._queue.append((None, _STOP, None, 0, True))
            self._cv.notify_all()
        self._thread.join(linger + 5.0)
        if self._thread.is_alive():
            log.warning("kv sender to %s: I/O thread did not stop", self.endpoint)

    # ---- internals ---------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("sender is closed")

    def _stage(self, t: torch.Tensor):
        t = t.detach()
        if t.device.type == "cpu":
            return t.contiguous(), None
        if t.device.type == "cuda":
            dev = t.device
            stream = self._streams.get(dev)
            if stream is None:
                stream = self._streams[dev] = torch.cuda.Stream(dev)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(dev))   # the layer's KV is written
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
            return host, event
        return t.to("cpu").contiguous(), None

    def _put(self, rid: str, frames: list, event, nbytes: int, always: bool = False) -> None:
        with self._cv:
            self._check_open()
            self._queue.append((rid, frames, event, nbytes, always))
            self._busy += 1
            self._cv.notify_all()

    def _mark_failed(self, rid: str, why: str) -> None:
        with self._cv:
            if rid not in self._failed:
                log.error("kv sender to %s: request %s failed: %s", self.endpoint, rid, why)
            self._failed[rid] = why
            self._failed.move_to_end(rid)
            while len(self._failed) > self.FAILED_KEPT:
                self._failed.popitem(last=False)

    def _run(self) -> None:
        sock = self._sock
        try:
            while True:
                with self._cv:
                    while not self._queue:
                        self._cv.wait()
                    rid, frames, event, nbytes, always = self._queue.popleft()
                if frames is _STOP:
                    return
                try:
                    with self._cv:
                        skip = rid in self._failed and not always
                    if skip:
                        self.stats["dropped"] += 1
                        continue
                    if event is not None:
                        event.synchronize()
                    if self._drop_after is not None and time.monotonic() > self._drop_after:
                        self.stats["dropped"] += 1
                        self._mark_failed(rid, "sender closed before it was sent")
                        continue
                    sock.send_multipart(frames, copy=False)
                    self.stats["messages"] += 1
                    self.stats["bytes"] += nbytes
                except zmq.Again:
                    self._mark_failed(rid, "send timed out (receiver unreachable or not draining)")
                except zmq.ZMQError as e:
                    self._mark_failed(rid, f"zmq error: {e}")
                    if e.errno == zmq.ETERM:
                        return
                except Exception as e:   # never let the I/O thread die silently
                    log.exception("kv sender to %s: sending %s failed", self.endpoint, rid)
                    self._mark_failed(rid, f"{type(e).__name__}: {e}")
                finally:
                    with self._cv:
                        self._busy -= 1
                        self._cv.notify_all()
        finally:
            with self._cv:
                # Anything still queued (stop requested, or the thread is dying) is dropped.
                for rid, frames, _, _, _ in self._queue:
                    if frames is not _STOP:
                        self._busy -= 1
                        self._failed.setdefault(rid, "sender closed before it was sent")
                self._queue.clear()
                self._closed = True
                self._cv.notify_all()
            try:
                sock.close(linger=self._close_linger_ms)
            except Exception:
                pass
