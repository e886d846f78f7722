"""Optional API keys on the gRPC port.

A client sends ``authorization: Bearer <key>`` as call metadata. Keys come from a file
(one per line, ``#`` comments) and/or the environment variable ``PDSERVE_API_KEYS``
(comma-separated). Only SHA-256 digests are kept in memory, and a presented key is
compared with every digest in constant time (hmac.compare_digest, no early exit), so
neither the comparison nor the number of keys tried leaks which bytes matched.

Every RPC needs a key except the standard health service (grpc.health.v1.Health), which
load balancers and orchestrators probe without credentials; it reveals only
SERVING / NOT_SERVING. Server reflection is protected like Generate.

Keys travel in clear text unless the port uses TLS (router/tls.py): enable both.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import time
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

ENV_VAR = "PDSERVE_API_KEYS"
MIN_KEY_CHARS = 16          # a short key can be guessed; refuse it at start-up
MAX_KEY_CHARS = 512
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def _check_key(key: str, where: str) -> str:
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS:
        raise ValueError(f"{where}: an API key must have {MIN_KEY_CHARS} to {MAX_KEY_CHARS} characters")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{where}: an API key must be printable ASCII without spaces")
    return key


@dataclass(frozen=True)
class APIKeys:
    digests: tuple[bytes, ...]

    @classmethod
    def from_keys(cls, keys, where: str = "api keys") -> "APIKeys":
        keys = [_check_key(k, where) for k in keys]
        if not keys:
            raise ValueError(f"{where}: no API key given")
        return cls(tuple(_digest(k) for k in keys))

    @classmethod
    def load(cls, path: str | None = None, env_var: str | None = ENV_VAR) -> "APIKeys | None":
        """Keys from `path` and from the environment variable; None when neither has any
        (authentication off)."""
        keys: list[str] = []
        if path:
            try:
                mode = os.stat(path).st_mode
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise ValueError(f"api key file {path!r}: {e.strerror}") from None
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("api key file %s is readable by group/others; chmod 600 it", path)
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"api key file {path!r}: no keys in it")
        if env_var and os.environ.get(env_var, "").strip():
            keys += [k.strip() for k in os.environ[env_var].split(",") if k.strip()]
        return cls.from_keys(keys, path or env_var) if keys else None

    def check(self, presented: str | bytes | None) -> bool:
        if not presented:
            return False
        d = _digest(presented)
        ok = False
        for want in self.digests:          # no short-circuit: the time does not depend on which key
            ok |= hmac.compare_digest(want, d)
        return ok


def bearer_token(metadata) -> str | None:
    """The key of an ``authorization: Bearer <key>`` metadata entry, else None."""
    for k, v in metadata or ():
        if k == "authorization":
            if isinstance(v, bytes):
                v = v.decode("latin-1")
            scheme, _, token = v.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without
    parsing the request (request_deserializer None: the body stays raw bytes)."""
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_stream)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class APIKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: APIKeys, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES):
        self.keys, self.open_prefixes = keys, open_prefixes
        self.rejected = 0
        self._last_log = 0.0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if self.keys.check(token):
            return handler
        self.rejected += 1
        now = time.monotonic()
        if now - self._last_log > 10.0:   # a flood of bad keys must not flood the log
            self._last_log = now
            log.warning("grpc: unauthenticated call to %s refused (%d so far)", method, self.rejected)
        why = "missing API key" if token is None else "invalid API key"
        return _denying(handler, f"authorization: {why} (send metadata 'authorization: Bearer <key>')")
