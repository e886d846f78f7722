"""The autoscaling controller: one per deployment, owns both worker pools.

Design (the simplest that keeps "controller = Ray actor" true):

  * :class:`PoolController` is plain asyncio Python: pool membership, one
    :class:`~deploy.autoscale_policy.PoolPolicy` per pool, the drain protocol, the decision
    log. It starts and stops workers through a *spawner* (duck-typed: spawn / ready / drain /
    stop), so tests drive it with fake workers and a fake clock, without Ray.
  * :class:`ControllerActor` is the thin Ray actor over it, with :class:`RaySpawner`: scale-up
    creates worker actors with the pool's resources and Ray places them (on a cloud cluster
    a pending actor makes Ray's autoscaler add a GPU node of the type that offers them).
  * The router stays in the `pdserve serve` process. :class:`PoolSync` (a task in that
    process, next to the router) talks to the controller over one Ray call in a loop:
    ``sync(load_report, known_version, wait_s)`` hands over the router's latest load report
    and long-polls membership; the call returns as soon as membership changes, so the router
    sees a new worker or a drain at once, and reports arrive every `sync_s` otherwise.
    No per-token traffic crosses Ray.

Drain protocol for a scale-down (nothing in flight is lost):
  1. the controller marks the worker `draining` (membership version bump);
  2. PoolSync flags it in the router, whose route() stops choosing it;
  3. the controller waits for a router report that shows the flag *and* zero in-flight
     requests on that worker (for a prefill worker: none awaiting its first token, so its
     KV has landed), then asks the worker to drain itself (a second guard) and
  4. drops it from membership (the router forgets it and its prefix-index entries) and
     stops the actor.

A worker that dies for good (Ray's restarts exhausted) or that the router dropped and the
supervisor never brings back would otherwise count as an active replica forever: an active
member missing from every router report for `lost_after_s` is declared lost, dropped from
membership and killed, and the policy replaces it like any missing replica.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

from deploy.autoscale_policy import PoolLoad, PoolPolicy, ScaleDecision, decode_load, prefill_load
from deploy import placement
from deploy.placement import PlacementError

log = logging.getLogger("pdserve.autoscale")

POOLS = ("prefill", "decode")
MAX_DECISIONS = 1000
MAX_HISTORY = 20000


@dataclass
class Member:
    worker_id: str
    kind: str
    state: str                      # starting | active | draining | stopping (| lost, once removed)
    handle: object = None
    endpoint: str | None = None
    since: float = 0.0              # when it entered `state` (controller clock)
    task: asyncio.Task | None = None
    absent_since: float | None = None   # active, but missing from the router's reports since then


@dataclass
class ScalingEvent:
    """One scaling decision or pool event, as logged and reported (decision_log)."""
    time: float                     # wall clock, for logs and plots
    pool: str
    delta: int
    reason: str
    detail: str
    replicas_before: int
    workers: list[str] = field(default_factory=list)


class PoolController:
    def __init__(self, pools, cfg, spawner, clock=time.monotonic, wall=time.time):
        """pools: {"prefill": PrefillPool, "decode": DecodePool} (deploy.config);
        cfg: deploy.config.ControllerSection."""
        self.pools, self.cfg, self.spawner, self.clock, self.wall = pools, cfg, spawner, clock, wall
        self.policies = {k: PoolPolicy(pools[k].policy_config()) for k in POOLS}
        self.members: dict[str, Member] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self._ids = {k: itertools.count() for k in POOLS}
        self._report: dict | None = None
        self._report_at = -1e18
        self.decisions: collections.deque[ScalingEvent] = collections.deque(maxlen=MAX_DECISIONS)
        self.history: collections.deque[dict] = collections.deque(maxlen=MAX_HISTORY)
        self.last_load: dict[str, PoolLoad] = {}
        self.counts: dict[tuple[str, str, str], int] = {}   # (pool, direction, reason) -> n, for metrics
        self.placement_errors: list[str] = []                # why a replica could not be placed (start)
        self._task: asyncio.Task | None = None

    # ---- membership ---------------------------------------------------------------------------
    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def membership(self) -> dict:
        """What the router should hold: workers with endpoints (starting ones have none yet)."""
        workers = {m.worker_id: dict(kind=m.kind, endpoint=m.endpoint, draining=m.state != "active", handle=m.handle)
                   for m in self.members.values() if m.state in ("active", "draining", "stopping")}
        return dict(version=self.version, workers=workers)

    async def wait_membership(self, known_version: int, wait_s: float) -> dict:
        """Membership as soon as it is newer than `known_version`, else after wait_s (the
        router reconciles with it every time, see PoolSync.apply)."""
        if self.version <= known_version:
            try:
                await asyncio.wait_for(self._changed.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return self.membership()

    def report(self, rep: dict | None) -> None:
        if rep is not None:
            self._report, self._report_at = rep, self.clock()

    def pool_members(self, kind: str, *states: str) -> list[Member]:
        return [m for m in self.members.values() if m.kind == kind and (not states or m.state in states)]

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> dict:
        """Start every pool at its min size and wait until all are ready."""
        for kind in POOLS:
            for _ in range(self.pools[kind].min_replicas):
                self._spawn(kind)
        await asyncio.gather(*(m.task for m in self.members.values() if m.task is not None))
        failed = [k for k in POOLS if len(self.pool_members(k, "active")) < self.pools[k].min_replicas]
        if failed:
            await self.shutdown()
            if self.placement_errors:   # the message names the pool, its ask and the cluster's offer
                raise PlacementError(self.placement_errors[0])
            raise RuntimeError(f"autoscale: could not start the minimum {', '.join(failed)} pool(s)")
        return self.membership()

    def run_in_background(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug in one tick must not stop the controller
                log.exception("autoscale: tick failed")
            await asyncio.sleep(self.cfg.interval_s)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for m in list(self.members.values()):
            if m.task is not None:
                m.task.cancel()
        await asyncio.gather(*(self._stop(m) for m in list(self.members.values())), return_exceptions=True)
        self.members.clear()
        self._bump()

    # ---- one control step ---------------------------------------------------------------------------
    async def tick(self) -> None:
        now = self.clock()
        rep = self._report
        fresh = rep is not None and now - self._report_at <= self.cfg.report_stale_s
        self._expire_starting(now)
        # Before the policies look: a lost worker counts as a missing replica in this tick.
        self._expire_lost(rep if fresh else None, now)
        sample = dict(time=self.wall())
        for kind in POOLS:
            load = self._pool_load(kind, rep if fresh else None)
            self.last_load[kind] = load
            sample[kind] = dict(active=load.ready, starting=load.replicas - load.ready,
                                draining=len(self.pool_members(kind, "draining", "stopping")),
                                load=load.load, **load.values)
            if not fresh:
                continue   # no decisions without a current view of the router (below_min still waits too)
            d = self.policies[kind].decide(load, now)
            if d is not None:
                self._apply(kind, d, load, rep)
        self.history.append(sample)
        if fresh:
            self._progress_drains(rep, now)

    def _pool_load(self, kind: str, rep: dict | None) -> PoolLoad:
        active = self.pool_members(kind, "active")
        replicas = len(active) + len(self.pool_members(kind, "starting"))
        view = (rep or {}).get(kind, {})
        seen = [view[m.worker_id] for m in active if m.worker_id in view]
        targets = self.pools[kind].targets
        if kind == "prefill":
            return prefill_load(replicas, len(active), sum(w.get("queued_tokens", 0) for w in seen),
                                (rep or {}).get("ttft_disagg_p90_s"), targets)
        used = sum(w.get("num_blocks", 0) - w.get("free_blocks", 0) for w in seen)
        total = sum(w.get("num_blocks", 0) for w in seen)
        running = sum(w.get("running", 0) for w in seen)
        return decode_load(replicas, len(active), used, total, running, (rep or {}).get("tpot_p90_s"), targets)

    def _apply(self, kind: str, d: ScaleDecision, load: PoolLoad, rep: dict) -> None:
        before = load.replicas
        if d.delta > 0:
            workers = [self._spawn(kind).worker_id for _ in range(d.delta)]
        else:
            view = rep.get(kind, {})
            active = self.pool_members(kind, "active")
            if len(active) <= 1:
                return   # never drain the last serving worker (replicas > min counted starting ones)
            if any(m.worker_id not in view for m in active):
                # A member missing from the router's report may be dead (the lost rule is
                # timing it): draining a live one now could leave the pool with none serving,
                # and the missing one's in-flight count, which picks the victim, is unknown.
                return
            # The least busy worker drains fastest; among equals, the newest goes first.
            victim = min(active, key=lambda m: (view.get(m.worker_id, {}).get("inflight", 0),
                                                -int(m.worker_id.rsplit("-", 1)[-1])))
            victim.state, victim.since = "draining", self.clock()
            self._bump()
            workers = [victim.worker_id]
        rec = ScalingEvent(self.wall(), kind, d.delta, d.reason, d.detail, before, workers)
        self.decisions.append(rec)
        direction = "up" if d.delta > 0 else "down"
        key = (kind, direction, d.reason)
        self.counts[key] = self.counts.get(key, 0) + 1
        log.info("autoscale %s: scale %s %+d -> %d replicas (%s: %s) workers=%s", kind, direction, d.delta,
                 before + d.delta, d.reason, d.detail, ",".join(workers))

    # ---- scale-up ------------------------------------------------------------------------------------
    def _spawn(self, kind: str) -> Member:
        wid = f"{kind}-{next(self._ids[kind])}"       # never reused: the router never confuses two lives
        m = Member(wid, kind, "starting", since=self.clock())
        self.members[wid] = m
        m.handle = self.spawner.spawn(kind, wid)
        m.task = asyncio.get_running_loop().create_task(self._await_ready(m))
        return m

    async def _await_ready(self, m: Member) -> None:
        try:
            eps = await self.spawner.ready(m.handle)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Unplaceable (PlacementError, after the spawner's bounded wait): counted apart from
            # a worker that crashed while starting; the policy may try again after its cool-down.
            reason = "unplaceable" if isinstance(e, PlacementError) else "start_failed"
            if reason == "unplaceable":
                self.placement_errors.append(str(e))
            log.error("autoscale %s: worker %s failed to start: %s: %s", m.kind, m.worker_id, type(e).__name__, e)
            self._record_failure(m, reason)
            await self._stop(m)
            self.members.pop(m.worker_id, None)
            return
        finally:
            m.task = None
        if m.state == "starting":
            m.state, m.endpoint, m.since = "active", eps["request"], self.clock()
            self._bump()
            log.info("autoscale %s: worker %s ready at %s", m.kind, m.worker_id, m.endpoint)

    def _expire_starting(self, now: float) -> None:
        # A replica waiting on a node that never comes (cloud quota, no capacity) is given up
        # so the policy may try again later instead of counting it forever.
        for m in self.pool_members("prefill", "starting") + self.pool_members("decode", "starting"):
            if now - m.since > self.cfg.start_timeout_s:
                log.error("autoscale %s: worker %s not ready after %.0fs; giving up on it",
                          m.kind, m.worker_id, now - m.since)
                if m.task is not None:
                    m.task.cancel()
                self.members.pop(m.worker_id, None)
                self._record_failure(m, "start_timeout")
                asyncio.get_running_loop().create_task(self._stop(m))

    def _expire_lost(self, rep: dict | None, now: float) -> None:
        """Drop active members the router has not listed for lost_after_s in a row."""
        for m in self.pool_members("prefill", "active") + self.pool_members("decode", "active"):
            if rep is None:
                # No current view (the router restarting, say): whether it stayed absent
                # meanwhile is unknown, so absence counts afresh from the next report, by
                # which time a restarted router is registering its workers again.
                m.absent_since = None
            elif m.worker_id in rep.get(m.kind, {}):
                m.absent_since = None
            elif self._report_at > m.since:
                # Reports from before it became active could not list it, so absence counts
                # from then at the earliest (and PoolSync registers it one sync round later,
                # well within lost_after_s).
                if m.absent_since is None:
                    m.absent_since = now
                if now - m.absent_since > self.cfg.lost_after_s:
                    self._declare_lost(m, now)

    def _declare_lost(self, m: Member, now: float) -> None:
        log.error("autoscale %s: worker %s missing from the router for %.0fs; replacing it",
                  m.kind, m.worker_id, now - m.absent_since)
        self.members.pop(m.worker_id, None)
        self._bump()                       # PoolSync drops it (and its actor handle) from the router
        self._record_failure(m, "lost")
        m.state, m.since = "lost", now     # _stop: dead or unreachable, no graceful call to wait out
        asyncio.get_running_loop().create_task(self._stop(m))

    def _record_failure(self, m: Member, reason: str) -> None:
        # Not a scaling decision (delta 0), but a change of the pool: replicas_before counts
        # its starting + active members with the failed one (the caller may have removed it).
        live = self.pool_members(m.kind, "starting") + self.pool_members(m.kind, "active")
        before = len(live) + all(x is not m for x in live)
        self.decisions.append(ScalingEvent(self.wall(), m.kind, 0, reason, f"worker {m.worker_id}", before,
                                       [m.worker_id]))
        key = (m.kind, "failed", reason)
        self.counts[key] = self.counts.get(key, 0) + 1

    # ---- scale-down -----------------------------------------------------------------------------------
    def _progress_drains(self, rep: dict, now: float) -> None:
        for m in list(self.members.values()):
            if m.state != "draining":
                continue
            seen = rep.get(m.kind, {}).get(m.worker_id)
            quiet = seen is not None and seen.get("draining") and seen.get("inflight", 1) == 0
            overdue = now - m.since > self.cfg.drain_timeout_s
            if quiet or overdue:
                if overdue and not quiet:
                    log.warning("autoscale %s: worker %s still busy after %.0fs of draining; stopping it",
                                m.kind, m.worker_id, now - m.since)
                m.state, m.since = "stopping", now
                m.task = asyncio.get_running_loop().create_task(self._retire(m, force=not quiet))

    async def _retire(self, m: Member, force: bool) -> None:
        if not force:
            try:   # the worker's own drain: refuses new work, waits out anything the router never saw
                await self.spawner.drain(m.handle, 30.0)
            except Exception as e:
                log.warning("autoscale %s: drain of %s failed: %s", m.kind, m.worker_id, e)
        self.members.pop(m.worker_id, None)
        self._bump()                       # the router forgets it now
        await self._stop(m)
        log.info("autoscale %s: worker %s drained and stopped", m.kind, m.worker_id)

    async def _stop(self, m: Member) -> None:
        if m.handle is None:
            return
        try:
            # A replica still loading has nothing to wind down, and a lost one cannot answer:
            # no graceful stop call that would wait for its constructor or its timeout.
            await self.spawner.stop(m.handle, graceful=m.state not in ("starting", "lost"))
        except Exception as e:
            log.warning("autoscale %s: stopping %s: %s", m.kind, m.worker_id, e)

    def apply_targets(self, targets: dict[str, int]) -> dict[str, int]:
        """Planned pool sizes ({"prefill": P, "decode": D}, e.g. planner.plan.controller_targets
        from a profile and an expected load) become the pools' floors: the next tick starts
        what is missing (reason below_min), load still grows a pool up to max_replicas, and
        idle shrinks stop at the floor. Each is clamped to [the configured min_replicas,
        max_replicas]; returns the floors set."""
        floors = {}
        for kind, n in targets.items():
            if kind not in POOLS:
                raise ValueError(f"targets: unknown pool {kind!r}; expected {' or '.join(POOLS)}")
            cfg = self.policies[kind].cfg
            cfg.min_replicas = floors[kind] = max(self.pools[kind].min_replicas, min(int(n), cfg.max_replicas))
            log.info("autoscale %s: floor set to %d replicas (planned %d)", kind, cfg.min_replicas, n)
        return floors

    # ---- introspection ----------------------------------------------------------------------------------
    def pool_sizes(self) -> dict:
        return {k: {s: len(self.pool_members(k, s)) for s in ("starting", "active", "draining", "stopping")}
                for k in POOLS}

    def decision_log(self) -> list[dict]:
        return [vars(d).copy() for d in self.decisions]


# ---- Ray -------------------------------------------------------------------------------------------------

class RaySpawner:
    """Workers as Ray actors with each pool's resources; Ray places them."""

    def __init__(self, pools, model: str, token_endpoint: str, worker_kwargs: dict, decode_extra: dict | None = None,
                 *, placement_timeout_s: float):
        self.pools, self.model, self.token_endpoint = pools, model, token_endpoint
        self.placement_timeout_s = placement_timeout_s   # see ready()
        self._names: dict[int, tuple[str, str]] = {}     # id(handle) -> (pool, worker id)
        self._asks = {}                                  # pool -> placement.PoolAsk (what ready() reports)
        kw = dict(worker_kwargs)                  # engine_kwargs, dtype, bind_host, ...
        self.max_restarts = kw.pop("max_restarts")   # faults.max_restarts: an actor option, not a constructor argument
        self.worker_kwargs, self.decode_extra = kw, dict(decode_extra or {})
        self._classes = {}

    def _class(self, kind: str):
        if kind not in self._classes:
            import ray
            pool = self.pools[kind]
            gpus = pool.num_gpus
            if gpus is None:
                gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            options = dict(num_cpus=1 if pool.num_cpus is None else pool.num_cpus, max_restarts=self.max_restarts)
            if pool.resources:
                options["resources"] = dict(pool.resources)
            self._asks[kind] = placement.PoolAsk(kind, 1, gpus, options["num_cpus"], dict(pool.resources))
            if kind == "decode":
                from decode_worker.actor import remote_class
            else:
                from prefill_worker.actor import remote_class
            self._classes[kind] = remote_class(gpus, **options)
        return self._classes[kind]

    def spawn(self, kind: str, worker_id: str):
        kw = dict(self.worker_kwargs)
        kw["engine_kwargs"] = {**kw.get("engine_kwargs", {}), **self.pools[kind].engine}
        if kind == "decode":
            h = self._class(kind).remote(worker_id, self.model, self.token_endpoint, **kw, **self.decode_extra)
        else:
            h = self._class(kind).remote(worker_id, self.model, **kw)
        self._names[id(h)] = (kind, worker_id)
        return h

    async def ready(self, handle) -> dict:
        """The worker's endpoints once it has started; PlacementError if Ray has not placed it
        within placement_timeout_s (a scale-up past what the cluster has must not stay
        pending forever: the controller logs and counts it)."""
        kind, wid = self._names.get(id(handle), ("?", "worker"))

        def describe():
            return placement.pending_message(self._asks[kind], *placement.cluster_view(available=True))

        return await placement.wait_started(handle.endpoints.remote(), wid, self.placement_timeout_s,
                                            lambda: placement.actor_placed(handle), describe)

    async def drain(self, handle, timeout_s: float) -> dict:
        return await handle.drain.remote(timeout_s)

    async def stop(self, handle, graceful: bool = True) -> None:
        import ray
        if graceful:
            try:
                await asyncio.wait_for(handle.stop.remote(), 30)
            except Exception:      # gone already, or stuck: the kill below settles it
                pass
        self._names.pop(id(handle), None)
        ray.kill(handle, no_restart=True)


class ControllerMetrics:
    """Prometheus view of the controller: pool sizes by state, the policy's load per
    signal, and decisions by pool, direction and reason."""

    def __init__(self, ctl: PoolController):
        from prometheus_client import CollectorRegistry
        self.ctl = ctl
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._http = None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        ctl = self.ctl
        sizes = GaugeMetricFamily("pdserve_controller_pool_replicas", "Replicas by pool and state",
                                  labels=["pool", "state"])
        for pool, states in ctl.pool_sizes().items():
            for state, n in states.items():
                sizes.add_metric([pool, state], n)
        yield sizes
        limits = GaugeMetricFamily("pdserve_controller_pool_limit", "Configured min/max replicas",
                                   labels=["pool", "bound"])
        for pool in POOLS:
            limits.add_metric([pool, "min"], ctl.pools[pool].min_replicas)
            limits.add_metric([pool, "max"], ctl.pools[pool].max_replicas)
        yield limits
        load = GaugeMetricFamily("pdserve_controller_pool_load", "Load ratio (observed/target) by signal",
                                 labels=["pool", "signal"])
        for pool, pl in list(ctl.last_load.items()):
            for sig, r in pl.ratios.items():
                load.add_metric([pool, sig], r)
        yield load
        dec = CounterMetricFamily("pdserve_controller_scaling_decisions", "Scaling decisions",
                                  labels=["pool", "direction", "reason"])
        for (pool, direction, reason), n in list(ctl.counts.items()):
            dec.add_metric([pool, direction, reason], n)
        yield dec

    def serve_http(self, host: str, port: int) -> int:
        from prometheus_client import start_http_server
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class ControllerActor:
    """The Ray actor (async: every method runs on one event loop, so PoolController needs
    no locks). Created by :func:`remote_controller`."""

    def __init__(self, pools, cfg, model: str, token_endpoint: str, worker_kwargs: dict,
                 decode_extra: dict | None, placement_timeout_s: float):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = cfg
        self.ctl = PoolController(pools, cfg, RaySpawner(pools, model, token_endpoint, worker_kwargs, decode_extra,
                                                         placement_timeout_s=placement_timeout_s))
        self.metrics = ControllerMetrics(self.ctl)
        self.metrics_port = None

    async def start(self) -> dict:
        membership = await self.ctl.start()
        self.ctl.run_in_background()
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.cfg.metrics_host, self.cfg.metrics_port)
        return membership

    async def sync(self, report: dict | None, known_version: int, wait_s: float) -> dict:
        self.ctl.report(report)
        return await self.ctl.wait_membership(known_version, wait_s)

    async def decisions(self) -> list[dict]:
        return self.ctl.decision_log()

    async def apply_targets(self, targets: dict[str, int]) -> dict[str, int]:
        return self.ctl.apply_targets(targets)

    async def history(self) -> list[dict]:
        return list(self.ctl.history)

    async def pool_sizes(self) -> dict:
        return self.ctl.pool_sizes()

    async def metrics_text(self) -> bytes:
        return self.metrics.text()

    async def metrics_address(self) -> int | None:
        return self.metrics_port

    async def shutdown(self) -> None:
        await self.ctl.shutdown()


def remote_controller():
    import ray
    # No resources of its own: it must be schedulable on the head node of any cluster.
    return ray.remote(num_cpus=0, max_concurrency=64)(ControllerActor)


# ---- the router side (runs in the `pdserve serve` process) ----------------------------------------------

class PoolSync:
    """Keeps the router's worker registry (and the cluster's actor handles) equal to the
    controller's membership, and feeds the controller the router's load reports. `cluster`
    needs .router, .decode_actors, .prefill_actors; `apply` is plain (tests call it)."""

    def __init__(self, cluster, metrics, controller, sync_s: float):
        self.cluster, self.metrics, self.controller, self.sync_s = cluster, metrics, controller, sync_s
        self.version = -1
        self._added: set[str] = set()   # joined through us; liveness after that is the supervisor's
        self._task: asyncio.Task | None = None

    def apply(self, membership: dict) -> None:
        router, want = self.cluster.router, membership["workers"]
        pools = {"decode": router.decode, "prefill": router.prefill}
        actors = {"decode": self.cluster.decode_actors, "prefill": self.cluster.prefill_actors}
        for wid, w in want.items():
            pool = pools[w["kind"]]
            if wid not in self._added:
                # Handle first: a supervisor that sees a registered worker must find its actor.
                actors[w["kind"]][wid] = w["handle"]
                if wid not in pool:
                    router.add_worker(w["kind"], wid, w["endpoint"])
                self._added.add(wid)
            if wid in pool:   # (absent: lost, and the supervisor re-registers it if it comes back)
                pool[wid].draining = bool(w["draining"])
        # A registered worker the controller no longer lists leaves routing at once and the
        # registry once nothing is in flight on it: the normal drain got there already; a
        # forced stop (drain timeout) leaves its requests to the router's dead-worker path;
        # and a worker someone else re-registered (e.g. a supervisor's ping that raced the
        # removal) is taken out again on the next sync.
        for kind, pool in pools.items():
            for wid in [wid for wid in pool if wid not in want]:
                pool[wid].draining = True
                if not pool[wid].inflight:
                    router.remove_worker(wid)
                    log.info("router: %s worker %s left the pool", kind, wid)
            for wid in [wid for wid in actors[kind] if wid not in want and wid not in pool]:
                actors[kind].pop(wid, None)
                self._added.discard(wid)
        self.version = membership["version"]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                m = await self.controller.sync.remote(self.metrics.load_report(), self.version, self.sync_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("router: controller sync failed: %s: %s", type(e).__name__, e)
                await asyncio.sleep(1.0)
                continue
            self.apply(m)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
