"""Start the cluster: Ray (local or an existing one), the decode and prefill pools as Ray
actors, the router and its gRPC server in this process."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from router.core import Router, RouterConfig
from router.policy import PolicyConfig
from router.server import GenerationService, start_grpc_server

log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    model: str = "smollm2"
    num_prefill: int = 1
    num_decode: int = 1
    address: str | None = None        # existing Ray cluster; None starts a local instance
    host: str = "127.0.0.1"           # gRPC listen address
    port: int = 50051
    disagg_threshold: int = 256
    kv_timeout_s: float = 30.0
    engine_kwargs: dict = field(default_factory=dict)
    dtype: str | None = None


def _gpus_per_worker() -> float:
    import ray
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


class Cluster:
    """Owns the actors and the router. `await start()`, then serve until `await stop()`."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.decode_actors: dict[str, object] = {}
        self.prefill_actors: dict[str, object] = {}
        self.router: Router | None = None
        self.server = None
        self.port = None
        self.model_info: dict | None = None

    async def start(self) -> None:
        import ray

        from decode_worker.actor import remote_class as decode_class
        from engine.llm_engine import default_tokenizer_or_none
        from engine.model import loader
        from engine.tokenizer import load_tokenizer
        from prefill_worker.actor import remote_class as prefill_class

        cfg = self.cfg
        if not ray.is_initialized():
            if cfg.address:
                ray.init(address=cfg.address, logging_level=logging.WARNING)
            else:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
        bind_host = "127.0.0.1" if not cfg.address else ray.util.get_node_ip_address()
        block_size = cfg.engine_kwargs.get("block_size", 16)
        self.router = Router(RouterConfig(PolicyConfig(disagg_threshold=cfg.disagg_threshold),
                                          block_size=block_size, kv_timeout_s=cfg.kv_timeout_s, bind_host=bind_host))
        self.router.start()
        gpus = _gpus_per_worker()
        D, P = decode_class(gpus), prefill_class(gpus)
        # Internal planes listen on loopback for a local cluster; on a real cluster each actor
        # binds its own node's IP (bind_host=None).
        common = dict(engine_kwargs=cfg.engine_kwargs, dtype=cfg.dtype,
                      bind_host="127.0.0.1" if not cfg.address else None)
        for i in range(cfg.num_decode):
            wid = f"decode-{i}"
            self.decode_actors[wid] = D.remote(wid, cfg.model, self.router.token_endpoint, **common)
        for i in range(cfg.num_prefill):
            wid = f"prefill-{i}"
            self.prefill_actors[wid] = P.remote(wid, cfg.model, **common)
        # Wait for every worker (model load) and register its endpoints with the router.
        for wid, a in self.decode_actors.items():
            eps = await a.endpoints.remote()
            self.router.add_worker("decode", wid, eps["request"])
        for wid, a in self.prefill_actors.items():
            eps = await a.endpoints.remote()
            self.router.add_worker("prefill", wid, eps["request"])
        first = next(iter(self.decode_actors.values()))
        self.model_info = await first.model_info.remote()
        if self.model_info["block_size"] != block_size:
            raise RuntimeError("router and workers disagree on the KV block size")
        source = loader.resolve(cfg.model)
        # The router tokenizes with the workers' tokenizer (random-weight models borrow SmolLM2's).
        tok = default_tokenizer_or_none() if source.kind == "random" else load_tokenizer(source.kind, source.path)
        service = GenerationService(self.router, self.model_info, tok)
        self.server, self.port = await start_grpc_server(service, cfg.host, cfg.port)
        log.info("pdserve: serving %s on %s:%d with %d prefill + %d decode workers",
                 cfg.model, cfg.host, self.port, cfg.num_prefill, cfg.num_decode)

    async def worker_stats(self) -> dict:
        out = {}
        for wid, a in {**self.decode_actors, **self.prefill_actors}.items():
            out[wid] = await a.stats.remote()
        return out

    async def stop(self) -> None:
        import ray
        if self.server is not None:
            await self.server.stop(grace=1.0)
        for a in list(self.decode_actors.values()) + list(self.prefill_actors.values()):
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        if self.router is not None:
            await self.router.close()


async def serve_forever(cfg: ClusterConfig) -> None:
    try:
        import uvloop  # noqa: F401  (the policy is installed by the caller)
    except ImportError:
        pass
    cluster = Cluster(cfg)
    await cluster.start()
    print(f"pdserve: serving {cfg.model} on {cfg.host}:{cluster.port} "
          f"({cfg.num_prefill} prefill + {cfg.num_decode} decode workers); Ctrl-C to stop", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await cluster.stop()
