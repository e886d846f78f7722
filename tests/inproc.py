"""A real pdserve server in one process, without Ray: the Router and the grpc.aio server on
an asyncio loop in a background thread, and plain DecodeWorker / PrefillWorker objects
running their own loop threads. What tests/test_bad_input.py and tests/test_security.py
talk to (gRPC over a real port, ZeroMQ planes over real loopback sockets)."""
from __future__ import annotations

import asyncio
import threading

import grpc

from decode_worker import DecodeWorker
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
from prefill_worker import PrefillWorker
from router.core import Router, RouterConfig
from router.policy import PolicyConfig
from router.server import GenerationService, start_grpc_server

MODEL = "random:tiny"
ENGINE = dict(block_size=16, num_kv_blocks=64, max_num_batched_tokens=256)


class InProcessServer:
    def __init__(self, *, prefill: bool = False, disagg_threshold: int = 32, limits=None, tls=None, api_keys=None,
                 curve=None, engine_kwargs: dict | None = None):
        from engine.llm_engine import default_tokenizer_or_none
        ekw = dict(ENGINE, **(engine_kwargs or {}))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.workers = []
        self.router = self.call(self._make_router(RouterConfig(PolicyConfig(disagg_threshold=disagg_threshold),
                                                               block_size=ekw["block_size"], curve=curve)))
        try:
            self.decode = DecodeWorker("decode-0", MODEL, self.router.token_endpoint, engine_kwargs=ekw,
                                       curve=curve)
            self.workers.append(self.decode)
            self.prefill = PrefillWorker("prefill-0", MODEL, engine_kwargs=ekw, curve=curve) if prefill else None
            if self.prefill is not None:
                self.workers.append(self.prefill)
            for w in self.workers:
                w.start()
            self.router.add_worker("decode", "decode-0", self.decode.endpoints()["request"])
            if self.prefill is not None:
                self.router.add_worker("prefill", "prefill-0", self.prefill.endpoints()["request"])
            self.service = GenerationService(self.router, self.decode.model_info(), default_tokenizer_or_none(),
                                             limits=limits)
            self.server, self.port = self.call(start_grpc_server(self.service, "127.0.0.1", 0, tls=tls,
                                                                 api_keys=api_keys, limits=limits))
        except BaseException:
            self.close()
            raise
        self.address = f"127.0.0.1:{self.port}"

    async def _make_router(self, cfg: RouterConfig) -> Router:
        r = Router(cfg)
        r.start()
        return r

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self, credentials: grpc.ChannelCredentials | None = None, **options) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, credentials, options=list(options.items()))

    def stub(self, channel: grpc.Channel) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(channel)

    def close(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            self.call(server.stop(grace=0.5))
        for w in self.workers:
            w.stop()
        self.call(self.router.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
