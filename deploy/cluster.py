"""Start the cluster: Ray (local or an existing one), the decode and prefill pools as Ray
actors, the router and its gRPC server in this process."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import time
from dataclasses import dataclass, field

from deploy import placement
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
    kv_backend: str = "auto"          # "auto": cuda_ipc on one host, nccl across hosts when both pools have
                                      # GPUs, zmq otherwise; or one of "zmq", "nccl", "cuda_ipc" everywhere
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
    # The OpenAI-compatible HTTP API (router/openai_api.py), same keys, TLS and limits as gRPC.
    http_host: str = "127.0.0.1"
    http_port: int | None = None           # None: no HTTP API
    shutdown_grace_s: float = 30.0         # serve_forever: in-flight requests get this long after SIGTERM
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
    # A worker Ray has not placed after this long fails the start (deploy/placement.py).
    # None: 30 s on a local cluster; controller.start_timeout_s with an address (nodes may be starting).
    placement_timeout_s: float | None = None


@dataclass
class PoolPlan:
    """Per pool: what each actor asks Ray for, and engine settings placement adds (a KV size
    when engines share a GPU)."""
    asks: dict                  # pool -> placement.PoolAsk (pools with replicas at start only)
    engine: dict                # pool -> {EngineConfig field: value}
    timeout_s: float            # placement timeout


def _cuda_mem_get_info() -> tuple[int, int]:
    import torch
    return tuple(torch.cuda.mem_get_info())


def _model_config(model: str):
    """The model's shape without its weights."""
    from engine.model import loader
    source = loader.resolve(model)
    if source.kind == "hf":
        return loader.hf_config(source.path)
    if source.kind == "gguf":
        return loader.gguf_config(loader.open_gguf(source.path))
    return loader.random_config(source.path)


def _resolve_kv_backend(cfg: ClusterConfig, gpus_per_worker: float) -> str:
    """"auto" stays "auto" when the decode and the prefill workers both get a GPU (whole or a
    share): each decode worker then receives over cuda_ipc from prefill workers on its own
    host and over NCCL pairs from the others (decode_worker/worker.py), and prefill workers
    follow the endpoint they are handed. "zmq" otherwise, which is what every CPU deployment
    (and CI) runs."""
    backend = cfg.kv_backend
    if backend == "auto":
        if cfg.pools is None:
            both = gpus_per_worker > 0
        else:
            both = all((gpus_per_worker if p.num_gpus is None else p.num_gpus) > 0
                       for p in (cfg.pools.prefill, cfg.pools.decode))
        backend = "auto" if both else "zmq"
    if backend in ("nccl", "cuda_ipc", "auto") and cfg.zmq_curve:
        log.warning("pdserve: the %s KV backend is not covered by CurveZMQ (NCCL, TCPStore and shared device "
                    "memory have no authentication): keep the workers on a trusted network", backend)
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
        self.http = None                   # router/http_server.HTTPServer (cfg.http_port set)
        self.http_port = None

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
        plan = await self._plan_placement()    # PlacementError (a ValueError) if the pools cannot fit
        bind_host = cfg.internal_host or ("127.0.0.1" if not cfg.address else ray.util.get_node_ip_address())
        block_size = cfg.engine_kwargs.get("block_size", 16)
        self.router = Router(RouterConfig(PolicyConfig(disagg_threshold=cfg.disagg_threshold),
                                          block_size=block_size, kv_timeout_s=cfg.kv_timeout_s, bind_host=bind_host,
                                          dead_after_s=cfg.dead_after_s,
                                          max_inflight_per_decode=cfg.max_inflight_per_decode,
                                          max_queued_prefill_tokens=cfg.max_queued_prefill_tokens,
                                          curve=curve))
        self.router.start()
        # (Pools whose num_gpus is unset all get the same ask: that is what "auto" compares.)
        gpus = min((a.num_gpus for a in plan.asks.values()), default=0)
        kv_backend = _resolve_kv_backend(cfg, gpus)
        # Internal planes listen on loopback for a local cluster; on a real cluster each actor
        # binds its own node's IP (bind_host=None).
        common = dict(engine_kwargs=cfg.engine_kwargs, dtype=cfg.dtype,
                      bind_host="127.0.0.1" if not cfg.address else None)
        if curve is not None:
            common["curve"] = curve   # reaches the actors through Ray (token-authenticated)
        try:
            classes = {k: (decode_class if k == "decode" else prefill_class)(
                a.num_gpus, num_cpus=a.num_cpus, max_restarts=cfg.max_restarts) for k, a in plan.asks.items()}
            per_pool = {k: dict(common, engine_kwargs={**cfg.engine_kwargs, **plan.engine.get(k, {})})
                        for k in plan.asks}
            for i in range(cfg.num_decode if cfg.pools is None else 0):   # else: the controller's
                wid = f"decode-{i}"
                self.decode_actors[wid] = classes["decode"].remote(
                    wid, cfg.model, self.router.token_endpoint, **per_pool["decode"], router_epoch=self.router.epoch,
                    orphan_timeout_s=cfg.orphan_timeout_s, kv_backend=kv_backend)
            for i in range(cfg.num_prefill if cfg.pools is None else 0):
                wid = f"prefill-{i}"
                self.prefill_actors[wid] = classes["prefill"].remote(wid, cfg.model, **per_pool["prefill"])
            # Wait for every worker (model load; bounded while Ray has not placed it) and
            # register its endpoints with the router.
            started = [(k, wid, a) for k, actors in (("decode", self.decode_actors), ("prefill", self.prefill_actors))
                       for wid, a in actors.items()]
            eps = await asyncio.gather(*(self._started(wid, a, plan.asks[k], plan.timeout_s) for k, wid, a in started))
            for (k, wid, _), e in zip(started, eps):
                self.router.add_worker(k, wid, e["request"])
            from router.metrics import RouterMetrics
            window = cfg.controller.latency_window_s if cfg.controller is not None else 20.0
            self.metrics = RouterMetrics(lambda: self.router, window_s=window)   # follows a restarted router
            if cfg.pools is not None:
                await self._start_controller(common, dict(router_epoch=self.router.epoch,
                                                          orphan_timeout_s=cfg.orphan_timeout_s, kv_backend=kv_backend),
                                             plan)
        except BaseException:
            await self._abandon_start()
            raise
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
        if cfg.http_port is not None:
            await self._start_http(tls, api_keys, limits)
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_host, cfg.metrics_port)
        self.supervisor = Supervisor(self, interval_s=cfg.monitor_interval_s)
        self.supervisor.start()
        log.info("pdserve: serving %s on %s:%d with %d prefill + %d decode workers",
                 cfg.model, cfg.host, self.port, cfg.num_prefill, cfg.num_decode)

    async def _plan_placement(self) -> PoolPlan:
        """Each pool's per-actor ask, checked against the cluster before any actor exists; on
        a local cluster, shares of a GPU (with each engine's KV size) or of the cores when the
        pools ask more than there is. See deploy/placement.py."""
        from engine.config import EngineConfig
        cfg = self.cfg
        local = not cfg.address
        if cfg.pools is None:
            specs = {"prefill": placement.PoolSpec(cfg.num_prefill), "decode": placement.PoolSpec(cfg.num_decode)}
            engines = {k: dict(cfg.engine_kwargs) for k in specs}
        else:
            pools = {"prefill": cfg.pools.prefill, "decode": cfg.pools.decode}
            specs = {k: placement.PoolSpec(p.min_replicas, p.max_replicas, p.num_gpus, p.num_cpus, dict(p.resources))
                     for k, p in pools.items()}
            engines = {k: {**cfg.engine_kwargs, **p.engine} for k, p in pools.items()}
        timeout_s = cfg.placement_timeout_s
        if timeout_s is None:
            timeout_s = 30.0 if local else (cfg.controller.start_timeout_s if cfg.controller is not None else 900.0)
        total, nodes, _ = placement.cluster_view()
        asks, notes = placement.resolve_asks(specs, total, local)
        for line in notes:
            self._tell(f"pdserve: {line}")
        problems = placement.fit_problems(asks, total, nodes)
        if problems:
            msg = placement.unplaceable_message(problems, asks, total, nodes)
            if local:       # a local Ray instance never grows: waiting would be a silent hang
                raise placement.PlacementError(msg)
            log.warning("pdserve: %s; waiting up to %.0f s for Ray to place them (its autoscaler may add nodes)",
                        msg, timeout_s)
        shared = placement.kv_split_pools(asks, engines, local)   # engines on a shared GPU: explicit KV sizes
        extra: dict[str, dict] = {}
        if shared:
            free, total_mem = await self._gpu_memory(min(asks[k].num_gpus for k in shared), timeout_s)
            mcfg = _model_config(cfg.model)
            dtype_bytes = {"float32": 4, "float64": 8}.get(cfg.dtype, 2)   # the GPU default is bfloat16
            kv, weights = {}, 0
            for k in shared:
                tokens = engines[k].get("max_num_batched_tokens") or EngineConfig().max_num_batched_tokens
                weights, act = placement.engine_memory(mcfg, dtype_bytes, tokens)
                kv[k] = placement.kv_split_gib(free, total_mem, asks[k].num_gpus, weights, act, pool=k)
                extra[k] = {"kv_cache_memory_gb": kv[k]}
            self._tell(placement.split_line(asks, kv, free, total_mem, weights))
        return PoolPlan(asks, extra, timeout_s)

    @staticmethod
    def _tell(line: str) -> None:
        # Logged, and printed to stderr: the CLI logs at WARNING only, and stdout may carry JSON lines.
        log.info("%s", line)
        print(line, file=sys.stderr, flush=True)

    async def _gpu_memory(self, num_gpus: float, timeout_s: float) -> tuple[int, int]:
        """(free, total) bytes of a GPU Ray hands out, measured by a short task with the same
        GPU ask: this process never initialises CUDA (its context would hold GPU memory for
        the server's life), and max_calls=1 makes the task's process exit, releasing its
        own context, before the engines start."""
        import ray
        probe = ray.remote(num_gpus=num_gpus, num_cpus=0, max_calls=1)(_cuda_mem_get_info)
        ref = probe.remote()
        try:
            return tuple(await asyncio.wait_for(ref, timeout_s))
        except asyncio.TimeoutError:
            ray.cancel(ref, force=True)
            raise placement.PlacementError(f"a task asking num_gpus={num_gpus:g} (to measure the GPU's free memory) "
                                           f"was not placed within {timeout_s:g} s") from None

    async def _started(self, wid: str, actor, ask, timeout_s: float) -> dict:
        return await placement.wait_started(
            actor.endpoints.remote(), wid, timeout_s, lambda: placement.actor_placed(actor),
            lambda: placement.pending_message(ask, *placement.cluster_view(available=True)))

    async def _abandon_start(self) -> None:
        """A start that failed (a worker Ray could not place, a model that did not load):
        kill what was created and close the router, so no actor stays pending. stop() after
        this finds nothing of it left to stop."""
        import ray
        for a in [self.controller, *self.decode_actors.values(), *self.prefill_actors.values()]:
            if a is not None:
                try:
                    ray.kill(a)
                except Exception:   # already gone
                    pass
        self.controller = None
        self.decode_actors.clear()
        self.prefill_actors.clear()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.router is not None:
            await self.router.close()
            self.router = None

    async def _start_controller(self, common: dict, decode_extra: dict, plan: PoolPlan) -> None:
        """The controller actor starts the pools at their min size; PoolSync then keeps the
        router's registry equal to its membership (see deploy/controller.py)."""
        from deploy.config import ControllerSection
        from deploy.controller import PoolSync, remote_controller
        cfg = self.cfg
        ctl_cfg = cfg.controller or ControllerSection()
        # The pools as placed: concrete asks and the KV size chosen for a shared GPU (cfg.pools
        # stays as the user gave it).
        pools = {k: dataclasses.replace(p, num_gpus=plan.asks[k].num_gpus, num_cpus=plan.asks[k].num_cpus,
                                        engine={**p.engine, **plan.engine.get(k, {})})
                 for k, p in (("prefill", cfg.pools.prefill), ("decode", cfg.pools.decode))}
        self.controller = remote_controller().remote(
            pools, ctl_cfg, cfg.model, self.router.token_endpoint,
            dict(common, max_restarts=cfg.max_restarts), decode_extra, plan.timeout_s)
        try:
            membership = await self.controller.start.remote()
        except Exception as e:
            cause = getattr(e, "cause", None)    # Ray wraps the controller's exception
            if isinstance(cause, placement.PlacementError):
                raise placement.PlacementError(str(cause)) from None
            raise
        self.pool_sync = PoolSync(self, self.metrics, self.controller, ctl_cfg.sync_s)
        self.pool_sync.apply(membership)
        self.pool_sync.start()

    async def _start_http(self, tls, api_keys, limits) -> None:
        """The OpenAI API answers through whatever GenerationService is current (a router
        restart replaces it), so both doors always share one router."""
        from router.http_server import HTTPServer
        from router.openai_api import OpenAIAPI
        api = OpenAIAPI(lambda: self.service, self.cfg.model, api_keys=api_keys, limits=limits)
        self.http = HTTPServer(api.app(), self.cfg.http_host, self.cfg.http_port, tls=tls, api_keys=api_keys)
        self.http_port = await self.http.start()

    async def drain(self, grace_s: float) -> int:
        """Stop taking requests (gRPC health NOT_SERVING, HTTP /health 503, new requests
        refused as unavailable) and give those in flight up to grace_s to finish. Returns
        how many were still running at the deadline (stop() fails them)."""
        from router.server import set_health
        if self.service is not None:
            self.service.draining = True
            await set_health(self.service, False)
        deadline = time.monotonic() + grace_s
        while self.router is not None and self.router.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.router.requests) if self.router is not None else 0

    async def worker_stats(self) -> dict:
        out = {}
        for wid, a in {**self.decode_actors, **self.prefill_actors}.items():
            out[wid] = await a.stats.remote()
        return out

    async def stop(self) -> None:
        import ray
        if self.http is not None:
            await self.http.stop()
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
    """Serve until SIGTERM or SIGINT, then drain (cfg.shutdown_grace_s), stop the workers and
    the controller, and shut down the local Ray instance, so nothing is left running."""
    try:
        import uvloop  # noqa: F401  (the policy is installed by the caller)
    except ImportError:
        pass
    import ray
    quiet_ray_auth_notice()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    cluster = Cluster(cfg)
    _on_signals(loop, stop)
    # ray.init (inside start) installs a SIGTERM handler that calls sys.exit from whatever
    # frame the signal interrupts, which crashes inside the event loop: take the signals
    # back as soon as it has run, and again after start.
    watch = loop.create_task(_reclaim_signals_after_ray_init(loop, stop))
    starting = loop.create_task(cluster.start())
    try:
        await asyncio.wait({starting, loop.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():         # a signal while the models load: stop what started
            starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            print("pdserve: stopped while starting", flush=True)
            return
        _on_signals(loop, stop)
        http = f", OpenAI API on http://{cfg.http_host}:{cluster.http_port}/v1" if cluster.http is not None else ""
        print(f"pdserve: serving {cfg.model} on {cfg.host}:{cluster.port}{http} "
              f"({cfg.num_prefill} prefill + {cfg.num_decode} decode workers); Ctrl-C or SIGTERM to stop",
              flush=True)
        await stop.wait()
        print(f"pdserve: draining ({len(cluster.router.requests)} requests in flight, "
              f"grace {cfg.shutdown_grace_s:g}s)", flush=True)
        left = await cluster.drain(cfg.shutdown_grace_s)
        if left:
            log.warning("pdserve: %d requests still running after the %gs grace period are failed",
                        left, cfg.shutdown_grace_s)
    finally:
        watch.cancel()
        try:
            await cluster.stop()
        finally:
            ray.shutdown()     # a local instance: its raylet, GCS and agents exit with it
        print("pdserve: stopped", flush=True)


def quiet_ray_auth_notice() -> None:
    """Ray warns on every local start that it turned token authentication on (its default,
    and what SECURITY.md asks for): drop that one notice, keep its other warnings."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda r: not r.getMessage().startswith("Token authentication is enabled"))


def _on_signals(loop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):   # not the main thread (tests) or no signals
            return


async def _reclaim_signals_after_ray_init(loop, stop: asyncio.Event) -> None:
    import ray
    while not ray.is_initialized():
        await asyncio.sleep(0.05)
    _on_signals(loop, stop)
