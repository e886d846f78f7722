"""Optional CurveZMQ encryption and authentication of the internal ZeroMQ planes (request,
token and KV planes). Off by default; `security.zmq_curve` in the deployment config (`--zmq-curve`) turns it on.

One keypair per cluster, made when the cluster starts and handed to the router and to
every worker through Ray (actor arguments; Ray's own token authentication protects that
channel). Every listening socket is a CURVE server with the cluster's secret key; every
connecting socket is a CURVE client that uses the same keypair as its own identity. Each
server context runs a ZAP handler that admits only clients whose long-term public key is
the cluster's, which proves (CurveZMQ's INITIATE vouch) that the peer holds the cluster's
secret key. So a peer without the key can neither complete the handshake nor inject a
frame, and all internal traffic is encrypted. Rejected handshakes are logged by the ZAP
handler ("pdserve.zap" logger).

Server options must be on a socket before it binds, client options before it connects; the
KV backend makes its sockets itself, so the planes use contexts whose *default* socket
options carry the role (pyzmq applies a context's sockopts to every socket it creates).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq

log = logging.getLogger("pdserve.zap")


@dataclass(frozen=True)
class CurveKeys:
    public: bytes   # Z85, 40 bytes
    secret: bytes   # Z85, 40 bytes: the cluster's shared secret

    def __post_init__(self):
        for name in ("public", "secret"):
            v = getattr(self, name)
            if type(v) is not bytes or len(v) != 40:
                raise ValueError(f"CurveKeys.{name}: expected 40 bytes of Z85")
        if zmq.curve_public(self.secret) != self.public:
            raise ValueError("CurveKeys: the public key does not belong to the secret key")

    def __repr__(self) -> str:   # never print the secret into logs
        return f"CurveKeys(public={self.public.decode()!r}, secret=<hidden>)"

    @classmethod
    def generate(cls) -> "CurveKeys":
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support; zmq_curve cannot be enabled")
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    # ---- sockets -----------------------------------------------------------------------------
    def server_options(self) -> dict:
        return {zmq.CURVE_SERVER: 1, zmq.CURVE_SECRETKEY: self.secret, zmq.CURVE_PUBLICKEY: self.public}

    def client_options(self) -> dict:
        return {zmq.CURVE_SERVERKEY: self.public, zmq.CURVE_PUBLICKEY: self.public,
                zmq.CURVE_SECRETKEY: self.secret}

    def make_server(self, sock: zmq.Socket) -> zmq.Socket:
        """Before bind."""
        for opt, v in self.server_options().items():
            sock.setsockopt(opt, v)
        return sock

    def make_client(self, sock: zmq.Socket) -> zmq.Socket:
        """Before connect."""
        for opt, v in self.client_options().items():
            sock.setsockopt(opt, v)
        return sock

    # ---- contexts ----------------------------------------------------------------------------
    def client_context(self) -> zmq.Context:
        """A new context whose sockets are CURVE clients of the cluster's servers."""
        ctx = zmq.Context()
        for opt, v in self.client_options().items():
            ctx.setsockopt(opt, v)
        return ctx

    def server_context(self) -> tuple[zmq.Context, "ZapHandler"]:
        """A new context whose sockets are CURVE servers, with its ZAP handler running."""
        ctx = zmq.Context()
        for opt, v in self.server_options().items():
            ctx.setsockopt(opt, v)
        return ctx, ZapHandler(ctx, self)


class _OnlyClusterKey:
    def __init__(self, public: bytes):
        self.allowed = public          # pyzmq hands the callback the client's key in Z85
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key == self.allowed
        if not ok:
            self.denied += 1
            log.warning("zmq: refused a CURVE client with an unknown key (%d refused so far)", self.denied)
        return ok


class ZapHandler:
    """The ZAP handler (a thread) of one context: admits only the cluster's client key.
    Works for a zmq.asyncio.Context too (it shadows the same libzmq context)."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys):
        from zmq.auth.thread import ThreadAuthenticator
        sync = ctx if type(ctx) is zmq.Context else zmq.Context.shadow(ctx.underlying)
        self.policy = _OnlyClusterKey(keys.public)
        self.auth = ThreadAuthenticator(sync, log=log)
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self.policy)

    @property
    def denied(self) -> int:
        return self.policy.denied

    def stop(self) -> None:
        self.auth.stop()
