"""Start the cluster: Ray (local or an existing one), the decode and prefill pools as Ray
actors, the router and its gRPC server in this process."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from deploy.supervisor import Supervisor
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
    kv_backend: str = "zmq"           # "zmq", "nccl", or "auto": nccl iff both pools' workers have GPUs
                                      # (nccl is opt-in until measured on two GPUs; CI tests it via gloo)
    engine_kwargs: dict = field(default_factory=dict)
    dtype: str | None = None
    # Faults and overload (see deploy/supervisor.py and router/core.py).
    max_restarts: int = 4                  # Ray restarts a dead worker actor this many times
    dead_after_s: float = 5.0              # decode worker heartbeat silence -> lost
    orphan_timeout_s: float = 15.0         # decode workers drop requests of a router silent this long
    monitor_interval_s: float = 1.0        # supervisor ping period
    max_inflight_per_decode: int = 256
    max_queued_prefill_tokens: int = 1 << 20
    # Autoscaling (deploy/controller.py; schema in deploy/config.py). pools=None: fixed pools
    # of num_prefill/num_decode started here. Otherwise a controller actor owns both pools.
    pools: object | None = None            # deploy.config.PoolsSection
    controller: object | None = None       # deploy.config.ControllerSection
    metrics_host: str = "127.0.0.1"        # the router's Prometheus /metrics
    metrics_port: int | None = None        # None: no endpoint
    # Security (SECURITY.md). gRPC port: API keys (file and/or $PDSERVE_API_KEYS), TLS and,
    # with tls_client_ca, mutual TLS. Internal planes: bound to internal_host (None: loopback
    # for a local cluster, the node's Ray IP otherwise; never 0.0.0.0 by default), CurveZMQ
    # encryption + authentication with zmq_curve.
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    zmq_curve: bool = False
    internal_host: str | None = None       # the router's token-plane interface
    # Per-request limits at the gRPC edge (router/server.py ServerLimits); None: the context.
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None


def _gpus_per_worker() -> float:
    import ray
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _resolve_kv_backend(cfg: ClusterConfig, gpus_per_worker: float) -> str:
    """"auto" -> "nccl" only when the decode and the prefill workers both get a GPU (the
    decode worker's receiver then advertises an nccl:// endpoint and prefill workers follow
    it); "zmq" otherwise, which is what every CPU deployment (and CI) runs."""
    backend = cfg.kv_backend
    if backend == "auto":
        if cfg.pools is None:
            both = gpus_per_worker >= 1
        else:
            both = all((gpus_per_worker if p.num_gpus is None else p.num_gpus) >= 1
                       for p in (cfg.pools.prefill, cfg.pools.decode))
        backend = "nccl" if both else "zmq"
    if backend == "nccl" and cfg.zmq_curve:
        log.warning("pdserve: the nccl KV backend is not covered by CurveZMQ (NCCL/gloo/TCPStore have no "
                    "authentication): keep the workers on a trusted network")
    return backend


class Cluster:
    """Owns the actors and the router. `await start()`, then serve until `await stop()`."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.decode_actors: dict[str, object] = {}
        self.prefill_actors: dict[str, object] = {}
        self.router: Router | None = None
        self.server = None
        self.service = None
        self.supervisor: Supervisor | None = None
        self.port = None
        self.model_info: dict | None = None
        self.metrics = None                # router/metrics.py
        self.metrics_port = None
        self.controller = None             # the autoscaling controller actor (cfg.pools set)
        self.pool_sync = None

    async def start(self) -> None:
        import ray

        from decode_worker.actor import remote_class as decode_class
        from engine.llm_engine import default_tokenizer_or_none
        from engine.model import loader
        from engine.tokenizer import load_tokenizer
        from prefill_worker.actor import remote_class as prefill_class

        cfg = self.cfg
        # Security settings are read before anything starts: a bad file fails fast.
        from router.auth import APIKeys
        from router.curve import CurveKeys
        from router.server import ServerLimits
        from router.tls import TLSConfig
        api_keys = APIKeys.load(cfg.api_key_file)
        tls = TLSConfig.from_paths(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        if tls is not None:
            tls.server_credentials()
        limits = ServerLimits(max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens_limit)
        curve = CurveKeys.generate() if cfg.zmq_curve else None
        if not ray.is_initialized():
            if cfg.address:
                ray.init(address=cfg.address, logging_level=logging.WARNING)
            else:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
        bind_host = cfg.internal_host or ("127.0.0.1" if not cfg.address else ray.util.get_node_ip_address())
        block_size = cfg.engine_kwargs.get("block_size", 16)
        self.router = Router(RouterConfig(PolicyConfig(disagg_threshold=cfg.disagg_threshold),
                                          block_size=block_size, kv_timeout_s=cfg.kv_timeout_s, bind_host=bind_host,
                                          dead_after_s=cfg.dead_after_s,
                                          max_inflight_per_decode=cfg.max_inflight_per_decode,
                                          max_queued_prefill_tokens=cfg.max_queued_prefill_tokens,
                                          curve=curve))
        self.router.start()
        gpus = _gpus_per_worker()
        kv_backend = _resolve_kv_backend(cfg, gpus)
        D, P = decode_class(gpus, max_restarts=cfg.max_restarts), prefill_class(gpus, max_restarts=cfg.max_restarts)
        # Internal planes listen on loopback for a local cluster; on a real cluster each actor
        # binds its own node's IP (bind_host=None).
        common = dict(engine_kwargs=cfg.engine_kwargs, dtype=cfg.dtype,
                      bind_host="127.0.0.1" if not cfg.address else None)
        if curve is not None:
            common["curve"] = curve   # reaches the actors through Ray (token-authenticated)
        for i in range(cfg.num_decode if cfg.pools is None else 0):   # else: the controller's
            wid = f"decode-{i}"
            self.decode_actors[wid] = D.remote(wid, cfg.model, self.router.token_endpoint, **common,
                                               router_epoch=self.router.epoch, orphan_timeout_s=cfg.orphan_timeout_s,
                                               kv_backend=kv_backend)
        for i in range(cfg.num_prefill if cfg.pools is None else 0):
            wid = f"prefill-{i}"
            self.prefill_actors[wid] = P.remote(wid, cfg.model, **common)
        # Wait for every worker (model load) and register its endpoints with the router.
        for wid, a in self.decode_actors.items():
            eps = await a.endpoints.remote()
            self.router.add_worker("decode", wid, eps["request"])
        for wid, a in self.prefill_actors.items():
            eps = await a.endpoints.remote()
            self.router.add_worker("prefill", wid, eps["request"])
        from router.metrics import RouterMetrics
        window = cfg.controller.latency_window_s if cfg.controller is not None else 20.0
        self.metrics = RouterMetrics(lambda: self.router, window_s=window)   # follows a restarted router
        if cfg.pools is not None:
            await self._start_controller(common, dict(router_epoch=self.router.epoch,
                                                      orphan_timeout_s=cfg.orphan_timeout_s, kv_backend=kv_backend))
        first = next(iter(self.decode_actors.values()))
        self.model_info = await first.model_info.remote()
        if self.model_info["block_size"] != block_size:
            raise RuntimeError("router and workers disagree on the KV block size")
        source = loader.resolve(cfg.model)
        # The router tokenizes with the workers' tokenizer (random-weight models borrow SmolLM2's).
        tok = default_tokenizer_or_none() if source.kind == "random" else load_tokenizer(source.kind, source.path)
        service = self.service = GenerationService(self.router, self.model_info, tok, metrics=self.metrics,
                                                   limits=limits)
        self.server, self.port = await start_grpc_server(service, cfg.host, cfg.port, tls=tls, api_keys=api_keys)
        self.grpc_options = dict(tls=tls, api_keys=api_keys)   # for a router restart (deploy/supervisor.py)
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_host, cfg.metrics_port)
        self.supervisor = Supervisor(self, interval_s=cfg.monitor_interval_s)
        self.supervisor.start()
        log.info("pdserve: serving %s on %s:%d with %d prefill + %d decode workers",
                 cfg.model, cfg.host, self.port, cfg.num_prefill, cfg.num_decode)

    async def _start_controller(self, common: dict, decode_extra: dict) -> None:
        """The controller actor starts the pools at their min size; PoolSync then keeps the
        router's registry equal to its membership (see deploy/controller.py)."""
        from deploy.config import ControllerSection
        from deploy.controller import PoolSync, remote_controller
        cfg = self.cfg
        ctl_cfg = cfg.controller or ControllerSection()
        pools = {"prefill": cfg.pools.prefill, "decode": cfg.pools.decode}
        self.controller = remote_controller().remote(
            pools, ctl_cfg, cfg.model, self.router.token_endpoint,
            dict(common, max_restarts=cfg.max_restarts), decode_extra)
        membership = await self.controller.start.remote()
        self.pool_sync = PoolSync(self, self.metrics, self.controller, ctl_cfg.sync_s)
        self.pool_sync.apply(membership)
        self.pool_sync.start()

    async def worker_stats(self) -> dict:
        out = {}
        for wid, a in {**self.decode_actors, **self.prefill_actors}.items():
            out[wid] = await a.stats.remote()
        return out

    async def stop(self) -> None:
        import ray
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.router is not None:
            self.router.fail_all("unavailable", "server is shutting down")
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.pool_sync is not None:
            await self.pool_sync.stop()
        if self.controller is not None:
            try:
                await self.controller.shutdown.remote()   # stops every worker it started
            except Exception as e:
                log.warning("pdserve: controller shutdown: %s", e)
            ray.kill(self.controller)
        if self.metrics is not None:
            self.metrics.close()
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
