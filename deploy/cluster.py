"""Start the cluster: Ray (local or an existing one), the decode and prefill pools as Ray
actors, the router and its gRPC server in this process. `Cluster` takes the deployment
config as loaded (deploy/config.py ServeConfig: the one schema, every default there)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import time
from dataclasses import dataclass

from deploy import placement
from deploy.config import ServeConfig
from deploy.supervisor import Supervisor
from router.core import Router, RouterConfig
from router.policy import PolicyConfig
from router.server import GenerationService, start_grpc_server

log = logging.getLogger(__name__)


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


def _resolve_kv_backend(cfg: ServeConfig, gpus_per_worker: float) -> str:
    """"auto" stays "auto" when the decode and the prefill workers both get a GPU (whole or a
    share): each decode worker then receives over cuda_ipc from prefill workers on its own
    host and over NCCL pairs from the others (decode_worker/worker.py), and prefill workers
    follow the endpoint they are handed. "zmq" otherwise, which is what every CPU deployment
    (and CI) runs."""
    backend = cfg.transfer.backend
    if backend == "auto":
        both = all((gpus_per_worker if p.num_gpus is None else p.num_gpus) > 0
                   for p in (cfg.pools.prefill, cfg.pools.decode))
        backend = "auto" if both else "zmq"
    if backend in ("nccl", "cuda_ipc", "auto") and cfg.security.zmq_curve:
        log.warning("pdserve: the %s KV backend is not covered by CurveZMQ (NCCL, TCPStore and shared device "
                    "memory have no authentication): keep the workers on a trusted network", backend)
    return backend


class Cluster:
    """Owns the actors and the router. `await start()`, then serve until `await stop()`."""

    def __init__(self, cfg: ServeConfig):
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
        self.controller = None             # the autoscaling controller actor (cfg.controller.enabled)
        self.pool_sync = None
        self.http = None                   # router/http_server.HTTPServer (cfg.router.http_port set)
        self.http_port = None
        self.pool_plan: PoolPlan | None = None   # the pools as placed (asks per actor); bench records it

    async def start(self) -> None:
        import ray

        from decode_worker.actor import remote_class as decode_class
        from engine.llm_engine import default_tokenizer_or_none
        from engine.model import loader
        from engine.tokenizer import load_tokenizer
        from prefill_worker.actor import remote_class as prefill_class

        cfg = self.cfg
        sec, rt, faults, pools = cfg.security, cfg.router, cfg.faults, cfg.pools
        autoscaled = cfg.controller.enabled     # else fixed pools at min_replicas, started here
        # Security settings are read before anything starts: a bad file fails fast.
        from router.auth import APIKeys
        from router.curve import CurveKeys
        from router.server import ServerLimits
        from router.tls import TLSConfig
        api_keys = APIKeys.load(sec.api_key_file)
        tls = TLSConfig.from_paths(sec.tls_cert, sec.tls_key, sec.tls_client_ca)
        if tls is not None:
            tls.server_credentials()
        limits = ServerLimits(max_prompt_tokens=rt.max_prompt_tokens, max_tokens=rt.max_tokens_limit)
        curve = CurveKeys.generate() if sec.zmq_curve else None
        # Planned pool floors too (controller.plan): a plan no split can meet fails before
        # Ray starts. Simulating takes seconds, off the loop.
        from deploy.planned_pools import planned_floors
        floors = await asyncio.to_thread(planned_floors, cfg.controller.plan) if autoscaled else None
        address = cfg.ray.address
        if not ray.is_initialized():
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
        plan = self.pool_plan = await self._plan_placement()    # PlacementError (a ValueError) if the pools cannot fit
        bind_host = sec.internal_host or ("127.0.0.1" if not address else ray.util.get_node_ip_address())
        block_size = cfg.block_size
        # Every setting is passed: RouterConfig's and PolicyConfig's own defaults are not used.
        self.router = Router(RouterConfig(PolicyConfig(disagg_threshold=rt.disagg_threshold),
                                          block_size=block_size, kv_timeout_s=cfg.transfer.timeout_s,
                                          bind_host=bind_host, dead_after_s=faults.dead_after_s,
                                          max_inflight_per_decode=rt.max_inflight_per_decode,
                                          max_queued_prefill_tokens=rt.max_queued_prefill_tokens,
                                          curve=curve, record_trace=rt.record_trace))
        self.router.start()
        # (Pools whose num_gpus is unset all get the same ask: that is what "auto" compares.)
        gpus = min((a.num_gpus for a in plan.asks.values()), default=0)
        kv_backend = _resolve_kv_backend(cfg, gpus)
        # Internal planes listen on loopback for a local cluster; on a real cluster each actor
        # binds its own node's IP (bind_host=None).
        common = dict(engine_kwargs=dict(cfg.engine), dtype=cfg.dtype,
                      bind_host="127.0.0.1" if not address else None)
        if curve is not None:
            common["curve"] = curve   # reaches the actors through Ray (token-authenticated)
        # The decode worker's own settings (its orphan_timeout_s defaults to off, for a
        # worker no router watches over: the schema's value is passed).
        decode_extra = dict(router_epoch=self.router.epoch, orphan_timeout_s=faults.orphan_timeout_s,
                            kv_timeout_s=cfg.transfer.timeout_s, kv_backend=kv_backend)
        try:
            classes = {k: (decode_class if k == "decode" else prefill_class)(
                a.num_gpus, num_cpus=a.num_cpus, max_restarts=faults.max_restarts) for k, a in plan.asks.items()}
            per_pool = {k: dict(common, engine_kwargs={**cfg.engine, **getattr(pools, k).engine,
                                                       **plan.engine.get(k, {})})
                        for k in plan.asks}
            for i in range(0 if autoscaled else pools.decode.min_replicas):   # autoscaled: the controller's
                wid = f"decode-{i}"
                self.decode_actors[wid] = classes["decode"].remote(
                    wid, cfg.model, self.router.token_endpoint, **per_pool["decode"], **decode_extra)
            for i in range(0 if autoscaled else pools.prefill.min_replicas):
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
            self.metrics = RouterMetrics(lambda: self.router,                # follows a restarted router
                                         window_s=cfg.controller.latency_window_s)
            if autoscaled:
                await self._start_controller(common, decode_extra, plan, floors)
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
        self.server, self.port = await start_grpc_server(service, rt.host, rt.port, tls=tls, api_keys=api_keys)
        self.grpc_options = dict(tls=tls, api_keys=api_keys)   # for a router restart (deploy/supervisor.py)
        if rt.http_port is not None:
            await self._start_http(tls, api_keys, limits)
        if rt.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(rt.metrics_host, rt.metrics_port)
        self.supervisor = Supervisor(self, interval_s=faults.monitor_interval_s)
        self.supervisor.start()
        log.info("pdserve: serving %s on %s:%d with %d prefill + %d decode workers",
                 cfg.model, rt.host, self.port, pools.prefill.min_replicas, pools.decode.min_replicas)

    async def _plan_placement(self) -> PoolPlan:
        """Each pool's per-actor ask, checked against the cluster before any actor exists; on
        a local cluster, shares of a GPU (with each engine's KV size) or of the cores when the
        pools ask more than there is. See deploy/placement.py."""
        from engine.config import EngineConfig
        cfg = self.cfg
        local = not cfg.ray.address
        pools = {"prefill": cfg.pools.prefill, "decode": cfg.pools.decode}
        # Fixed pools (no controller) never grow past min_replicas.
        specs = {k: placement.PoolSpec(p.min_replicas, p.max_replicas if cfg.controller.enabled else p.min_replicas,
                                       p.num_gpus, p.num_cpus, dict(p.resources))
                 for k, p in pools.items()}
        engines = {k: {**cfg.engine, **p.engine} for k, p in pools.items()}
        timeout_s = cfg.ray.placement_timeout_s
        if timeout_s is None:     # the meaning of null (deploy/config.py RaySection)
            timeout_s = 30.0 if local else cfg.controller.start_timeout_s
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

    async def _start_controller(self, common: dict, decode_extra: dict, plan: PoolPlan,
                                floors: dict[str, int] | None) -> None:
        """The controller actor starts the pools at their min size; PoolSync then keeps the
        router's registry equal to its membership (see deploy/controller.py)."""
        from deploy.controller import PoolSync, remote_controller
        cfg = self.cfg
        ctl_cfg = cfg.controller
        # The pools as placed: concrete asks and the KV size chosen for a shared GPU (cfg.pools
        # stays as the user gave it).
        pools = {k: dataclasses.replace(p, num_gpus=plan.asks[k].num_gpus, num_cpus=plan.asks[k].num_cpus,
                                        engine={**p.engine, **plan.engine.get(k, {})})
                 for k, p in (("prefill", cfg.pools.prefill), ("decode", cfg.pools.decode))}
        self.controller = remote_controller().remote(
            pools, ctl_cfg, cfg.model, self.router.token_endpoint,
            dict(common, max_restarts=cfg.faults.max_restarts), decode_extra, plan.timeout_s)
        try:
            membership = await self.controller.start.remote()
        except Exception as e:
            cause = getattr(e, "cause", None)    # Ray wraps the controller's exception
            if isinstance(cause, placement.PlacementError):
                raise placement.PlacementError(str(cause)) from None
            raise
        if floors:
            applied = await self.controller.apply_targets.remote(floors)
            print(f"pdserve: planned pools at {ctl_cfg.plan.rate:g} req/s from {ctl_cfg.plan.profile}: "
                  f"prefill {floors['prefill']}, decode {floors['decode']} (floors, within max_replicas: "
                  f"prefill {applied['prefill']}, decode {applied['decode']})", flush=True)
        self.pool_sync = PoolSync(self, self.metrics, self.controller, ctl_cfg.sync_s)
        self.pool_sync.apply(membership)
        self.pool_sync.start()

    async def _start_http(self, tls, api_keys, limits) -> None:
        """The OpenAI API answers through whatever GenerationService is current (a router
        restart replaces it), so both doors always share one router."""
        from router.http_server import HTTPServer
        from router.openai_api import OpenAIAPI
        api = OpenAIAPI(lambda: self.service, self.cfg.model, api_keys=api_keys, limits=limits)
        self.http = HTTPServer(api.app(), self.cfg.router.http_host, self.cfg.router.http_port, tls=tls,
                               api_keys=api_keys)
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


async def serve_forever(cfg: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain (cfg.router.shutdown_grace_s), stop the workers and
    the controller, and shut down the local Ray instance, so nothing is left running."""
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
        rt, grace = cfg.router, cfg.router.shutdown_grace_s
        http = f", OpenAI API on http://{rt.http_host}:{cluster.http_port}/v1" if cluster.http is not None else ""
        print(f"pdserve: serving {cfg.model} on {rt.host}:{cluster.port}{http} "
              f"({cfg.pools.prefill.min_replicas} prefill + {cfg.pools.decode.min_replicas} decode workers); "
              "Ctrl-C or SIGTERM to stop", flush=True)
        await stop.wait()
        print(f"pdserve: draining ({len(cluster.router.requests)} requests in flight, "
              f"grace {grace:g}s)", flush=True)
        left = await cluster.drain(grace)
        if left:
            log.warning("pdserve: %d requests still running after the %gs grace period are failed", left, grace)
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
