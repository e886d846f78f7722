"""ZeroMQ socket helpers both worker pools use on the request plane (and the decode
worker's PUSH sockets to prefill workers, the prefill worker's replies).

Every socket belongs to the thread that runs the worker's loop. CurveZMQ (router/curve.py,
passed in as an object with ``client_context()`` / ``server_context()``) encrypts and
authenticates every plane when on.
"""
from __future__ import annotations

import socket

import zmq

from planes.messages import MAX_MESSAGE_BYTES


def advertised_host(bind_host: str, advertise_host: str | None) -> str:
    if advertise_host:
        return advertise_host
    if bind_host in ("0.0.0.0", "*", "::", "[::]"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return bind_host


def bind_pull(ctx: zmq.Context, bind_host: str, advertise_host: str | None) -> tuple[zmq.Socket, str]:
    """A PULL socket on a random tcp port of bind_host; returns it and its advertised endpoint."""
    sock = ctx.socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://{bind_host}:*")
    except Exception:
        sock.close(0)
        raise
    ep = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    port = ep.rpartition(":")[2]
    return sock, f"tcp://{advertised_host(bind_host, advertise_host)}:{port}"


def recv_one(sock: zmq.Socket) -> bytes | None:
    """One single-frame message without blocking; None if there is none. A multipart
    message (never sent by a well-behaved peer) is consumed whole and returned as b"" so
    the decoder rejects it."""
    try:
        first = sock.recv(zmq.NOBLOCK)
    except zmq.Again:
        return None
    extra = False
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv()
        extra = True
    return b"" if extra else first


def open_contexts(curve, context: zmq.Context | None):
    """(client context, server context, ZAP handler or None) for a worker's sockets.

    CurveZMQ (router/curve.py): connecting sockets come from a context of CURVE clients,
    listening ones (request plane, KV plane) from a context of CURVE servers with a ZAP
    handler that admits only the cluster's key. Off: one plain context for both."""
    if curve is None:
        ctx = context or zmq.Context.instance()
        return ctx, ctx, None
    srv_ctx, zap = curve.server_context()
    return curve.client_context(), srv_ctx, zap


def close_curve_contexts(worker) -> None:
    """Stop the ZAP handler and end the contexts a worker made for CurveZMQ (none when off)."""
    if worker._curve_zap is not None:
        worker._curve_zap.stop()
        for c in (worker._ctx, worker._srv_ctx):
            c.destroy(linger=0)


class PushPool:
    """Lazily connected PUSH sockets, one per endpoint; sends never block."""

    def __init__(self, ctx: zmq.Context, sndhwm: int = 10_000):
        self._ctx, self._hwm = ctx, sndhwm
        self._socks: dict[str, zmq.Socket] = {}

    def send(self, endpoint: str, data: bytes) -> None:
        """Raises zmq.ZMQError (zmq.Again when the peer's queue is full)."""
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            try:
                sock.setsockopt(zmq.SNDHWM, self._hwm)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(endpoint)
            except Exception:
                sock.close(0)
                raise
            self._socks[endpoint] = sock
        sock.send(data, zmq.NOBLOCK)

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()
