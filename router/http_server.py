"""Runs an ASGI app (router/openai_api.py) with uvicorn inside the router's own asyncio
loop, so HTTP requests reach the Router without crossing threads. TLS / mutual TLS use
the same files as the gRPC port (router/tls.py)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Server(uvicorn.Server):
    # The process's signals belong to `pdserve serve` (deploy/cluster.py drains on SIGTERM);
    # uvicorn's own handlers would replace them and re-raise the signal after its exit.
    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HTTPServer:
    def __init__(self, app, host: str, port: int, *, tls=None, api_keys=None, max_connections: int = 4096):
        """tls: router.tls.TLSConfig (None: plain HTTP). max_connections: past it uvicorn
        answers 503 at once instead of accepting more work."""
        self.app, self.host, self.port, self.tls = app, host, port, tls
        self.max_connections = max_connections
        self.api_keys = api_keys
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind (port 0: any free port), start serving; returns the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise ValueError(f"http: cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        kw = {}
        if self.tls is not None:
            kw = dict(ssl_certfile=self.tls.cert_file, ssl_keyfile=self.tls.key_file)
            if self.tls.client_ca_file:
                kw.update(ssl_ca_certs=self.tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        elif self.api_keys is not None and self.host not in LOOPBACK:
            log.warning("http: API keys are on but %s:%d has no TLS: keys travel in clear text", self.host, self.port)
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                limit_concurrency=self.max_connections, timeout_graceful_shutdown=2, **kw)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():       # e.g. a bad certificate: raise its error here
                self._task.result()
                raise RuntimeError("http: the server stopped while starting")
            await asyncio.sleep(0.02)
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 10)
        self._server = None
