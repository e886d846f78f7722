"""Keeps the router's view of the pools true while worker actors die and come back.

Ray restarts a dead actor (``max_restarts``), but the new incarnation binds fresh ports
and, being built from the original constructor arguments, streams to the router (epoch)
the cluster started with. Nothing on the data plane can fix that: a ZeroMQ PUSH to a dead
peer fails silently. So a :class:`Supervisor` task in the router's process pings every
actor over Ray's control plane (never per token) and, per actor:

  - Ray says it is dead  -> the router takes it out of routing (decode: its requests are
    re-dispatched or failed, see Router.worker_lost);
  - its endpoints changed (restarted) -> the old incarnation is lost, the new one is
    attached to this router (token endpoint + epoch) and registered;
  - it is not registered but answers (it came back, or was dropped for heartbeat silence
    while stalled) -> registered again;
  - no answer within ping_timeout_s -> a prefill worker leaves routing until it answers
    (a stalled prefill worker would make every disaggregated request wait out its KV
    timeout); a decode worker is judged by the router's heartbeat watch instead.

The pings double as the router's sign of life to decode workers, which drop their
requests after ``orphan_timeout_s`` without one (DecodeWorker.router_contact).

:func:`start_router` builds a new router and gRPC server in place of a dead one, keeping
the actors: what a restarted router process looks like to the workers (new epoch).
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, cluster, interval_s: float, ping_timeout_s: float = 2.0):
        self.cluster = cluster
        self.interval_s = interval_s
        self.ping_timeout_s = ping_timeout_s
        self._pings: dict[str, asyncio.Future] = {}   # worker id -> a ping still unanswered
        self._task: asyncio.Task | None = None
        self.events: list[tuple[str, str]] = []       # (worker id, what happened), for tests and logs

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for f in self._pings.values():
            f.cancel()
        self._pings.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("supervisor: check failed")
            await asyncio.sleep(self.interval_s)

    async def check_once(self) -> None:
        c = self.cluster
        checks = [self._check("decode", wid, a) for wid, a in list(c.decode_actors.items())]
        checks += [self._check("prefill", wid, a) for wid, a in list(c.prefill_actors.items())]
        await asyncio.gather(*checks)

    def _note(self, wid: str, what: str) -> None:
        self.events.append((wid, what))
        del self.events[:-256]

    async def _check(self, kind: str, wid: str, actor) -> None:
        router = self.cluster.router
        fut = self._pings.get(wid)
        if fut is None:   # at most one ping in flight per actor (a restarting actor queues them)
            fut = self._pings[wid] = asyncio.wrap_future(actor.ping.remote(router.epoch).future())
        try:
            info = await asyncio.wait_for(asyncio.shield(fut), self.ping_timeout_s)
        except asyncio.TimeoutError:
            if kind == "prefill" and router.endpoint_of(wid) is not None:
                self._note(wid, "unresponsive")
                await router.worker_lost(wid, f"no answer to a ping within {self.ping_timeout_s}s")
            return
        except Exception as e:   # RayActorError and friends: the actor (or its loop) is gone
            self._pings.pop(wid, None)
            if router.endpoint_of(wid) is not None:
                self._note(wid, "dead")
                await router.worker_lost(wid, f"ray: {type(e).__name__}")
            return
        self._pings.pop(wid, None)
        pool = self.cluster.decode_actors if kind == "decode" else self.cluster.prefill_actors
        if pool.get(wid) is not actor:
            return   # scaled down (drained and forgotten) while the ping was in flight: keep it out
        endpoint = info["endpoints"]["request"]
        if kind == "decode" and info.get("epoch") != router.epoch:
            # Before it is registered: requests of this router must find it streaming here.
            try:
                await actor.attach_router.remote(router.token_endpoint, router.epoch)
            except Exception as e:   # died in between: the next round sees it dead
                log.warning("supervisor: attaching %s failed: %s", wid, e)
                return
            self._note(wid, "attached")
        registered = router.endpoint_of(wid)
        if registered == endpoint:
            return
        if registered is not None:
            self._note(wid, "restarted")
            await router.worker_lost(wid, "restarted with new endpoints")
        router.add_worker(kind, wid, endpoint)
        self._note(wid, "registered")
        log.info("supervisor: %s %s registered at %s (token plane: %s)", kind, wid, endpoint, info.get("token_plane"))


async def start_router(cluster) -> None:
    """A new router (new epoch) and gRPC server on the same port, after the old one died;
    the supervisor attaches and registers every live worker before it serves."""
    from router.core import Router
    from router.server import start_grpc_server

    old = cluster.router
    router = Router(dataclasses.replace(old.cfg))
    router.start()
    service = copy.copy(cluster.service)
    service.router = router
    cluster.router, cluster.service = router, service
    prev = cluster.supervisor
    sup = cluster.supervisor = Supervisor(cluster, prev.interval_s, prev.ping_timeout_s) if prev is not None \
        else Supervisor(cluster, cluster.cfg.faults.monitor_interval_s)
    await sup.check_once()     # attach and register every live worker before serving
    cluster.server, _ = await start_grpc_server(service, cluster.cfg.router.host, cluster.port,
                                                **getattr(cluster, "grpc_options", {}))
    sup.start()
    log.info("pdserve: router restarted (epoch %s) with %d decode + %d prefill workers", router.epoch,
             len(router.decode), len(router.prefill))
