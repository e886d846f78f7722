"""Autoscaling: the per-pool policy (snapshots + a fake clock), the controller's drain
protocol (fake workers, no Ray), the router side (draining honoured by route(), PoolSync),
the Prometheus endpoints, and the whole thing on a local Ray cluster under load."""
from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request

import pytest
import torch

from deploy.autoscale_policy import (DecodeTargets, PoolLoad, PoolPolicy, PrefillTargets, ScalingPolicyConfig,
                                     decode_load, prefill_load)
from deploy.config import ControllerSection, DecodePool, PoolsSection, PrefillPool, ScalingSection
# (test_placement.py imports these fakes through this module)
from helpers import (CLUSTER_ENGINE, MODEL, ClusterThread, FakeClock, FakeSpawner,  # noqa: F401
                     await_until, wait_until)
from helpers import decode_entry as _dw
from helpers import pool_report as _report
from helpers import pools_config as _pools
from helpers import prefill_entry as _pw

FAST = dict(up_stable_s=1.0, down_stable_s=2.0, up_cooldown_s=3.0, down_cooldown_s=5.0)


def load(replicas, ratio, ready=None, **more):
    return PoolLoad(replicas, replicas if ready is None else ready, {"queued_tokens": ratio, **more})


# ---- policy ---------------------------------------------------------------------------------------

def test_policy_grows_only_after_the_load_holds_and_stops_at_max():
    p = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=3, **FAST))
    assert p.decide(load(1, 3.0), 0.0) is None          # high, but not for up_stable_s yet
    assert p.decide(load(1, 3.0), 0.5) is None
    d = p.decide(load(1, 3.0), 1.0)
    assert d.delta == 1 and d.reason == "queued_tokens" and "3.00x" in d.detail
    # Cool-down: still overloaded, no second step before up_cooldown_s (and stability again).
    assert p.decide(load(2, 3.0), 2.0) is None
    assert p.decide(load(2, 3.0), 3.5) is None          # cooldown over, stability restarts here
    assert p.decide(load(2, 3.0), 4.5).delta == 1
    for t in (8, 9, 10, 20):                            # at max: nothing more, however loaded
        assert p.decide(load(3, 9.0), t) is None


def test_policy_step_follows_the_ratio_up_to_max_step():
    p = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=8, max_step_up=3, **FAST))
    p.decide(load(2, 1.6), 0)
    assert p.decide(load(2, 1.6), 1).delta == 2        # ceil(2 * 1.6) = 4 replicas
    q = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=8, max_step_up=3, **FAST))
    q.decide(load(2, 10.0), 0)
    assert q.decide(load(2, 10.0), 1).delta == 3        # capped by max_step_up


def test_policy_hysteresis_band_and_short_spikes_do_not_flap():
    p = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=4, **FAST))
    t = 0.0
    # Load wandering inside the band (0.5 .. 1.0) for a long time: no decision at all.
    for i in range(200):
        assert p.decide(load(2, 0.55 + 0.4 * (i % 2)), t) is None
        t += 0.25
    # Spikes above the line shorter than up_stable_s, dips below shorter than down_stable_s.
    for i in range(40):
        ratio = 2.0 if i % 4 == 0 else (0.1 if i % 4 == 2 else 0.7)
        assert p.decide(load(2, ratio), t) is None
        t += 0.25


def test_policy_shrinks_after_stable_idle_and_cooldown_but_never_below_min():
    p = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=3, **FAST))
    p.decide(load(1, 5.0), 0.0)
    assert p.decide(load(1, 5.0), 1.0).delta == 1      # grew at t=1
    # Idle right away: down_stable_s (2 s) holds by t=3.1, but the cool-down since the
    # last event (5 s) holds it until t=6.
    decisions = [(t, p.decide(load(2, 0.1), t)) for t in (1.1, 3.1, 5.9)]
    assert all(d is None for _, d in decisions)
    d = p.decide(load(2, 0.1), 6.0)
    assert d.delta == -1 and d.reason == "idle"
    for t in (20, 40, 60):
        assert p.decide(load(1, 0.0), t) is None        # at min


def test_policy_does_not_shrink_into_the_next_grow():
    # 2 replicas at 0.45 with the shrink line at 0.6: one replica would carry 0.9 < 1, shrink.
    p = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=4, scale_down_load=0.6, **FAST))
    assert [p.decide(load(2, 0.45), t) for t in (0, 1, 2)][-1].delta == -1
    # At 0.55 one replica would carry 1.1 > 1: it would grow again at once, so it stays.
    q = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=4, scale_down_load=0.6, **FAST))
    assert all(q.decide(load(2, 0.55), t) is None for t in range(0, 30))


def test_policy_waits_for_starting_replicas_and_repairs_min_at_once():
    p = PoolPolicy(ScalingPolicyConfig(min_replicas=2, max_replicas=4, **FAST))
    d = p.decide(load(0, 0.0), 0.0)
    assert (d.delta, d.reason) == (2, "below_min")
    for t in range(10):                                # a replica still loading: no decision
        assert p.decide(load(3, 5.0, ready=2), float(t)) is None
    e = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=2, **FAST)).decide(load(3, 0.0), 0.0)
    assert (e.delta, e.reason) == (-1, "above_max")


def test_signals_prefill_and_decode_and_latency_targets():
    pt = PrefillTargets(queued_tokens_per_replica=1000, ttft_s=0.5)
    pl = prefill_load(2, 2, queued_tokens=3000, ttft_p90_s=0.25, targets=pt)
    assert pl.ratios == {"queued_tokens": 1.5, "ttft": 0.5} and pl.dominant == "queued_tokens"
    pl = prefill_load(1, 1, queued_tokens=100, ttft_p90_s=2.0, targets=pt)
    assert pl.dominant == "ttft" and pl.load == 4.0
    # Samples left in the window from a burst that is over do not count for an idle pool.
    assert prefill_load(1, 1, queued_tokens=0, ttft_p90_s=2.0, targets=pt).ratios == {"queued_tokens": 0.0}
    assert "tpot" not in decode_load(1, 1, 0, 100, running=0, tpot_p90_s=9.0, targets=DecodeTargets()).ratios
    assert prefill_load(1, 1, 0, None, pt).ratios == {"queued_tokens": 0.0}   # no samples: signal absent
    assert prefill_load(1, 1, 5000, None, PrefillTargets(None, 1.0)).ratios == {}   # signal switched off
    dt = DecodeTargets(kv_use=0.8, running_per_replica=10, tpot_s=0.05)
    dl = decode_load(2, 2, used_blocks=400, total_blocks=1000, running=6, tpot_p90_s=0.1, targets=dt)
    assert dl.ratios == pytest.approx({"kv_use": 0.5, "running": 0.3, "tpot": 2.0})
    # A starting replica counts as capacity for KV use and batch (at the pool's average size).
    dl = decode_load(3, 2, used_blocks=400, total_blocks=1000, running=6, tpot_p90_s=None, targets=dt)
    assert dl.ratios == pytest.approx({"kv_use": 400 / 1500 / 0.8, "running": 0.2})
    p = PoolPolicy(ScalingPolicyConfig(min_replicas=1, max_replicas=2, **FAST))
    slow = decode_load(1, 1, 10, 1000, 1, tpot_p90_s=0.2, targets=dt)
    p.decide(slow, 0.0)
    assert p.decide(slow, 1.0).reason == "tpot"


# ---- controller (no Ray) ------------------------------------------------------------------------------

def test_controller_scale_up_drain_protocol_and_decision_log(caplog):
    from deploy.controller import ControllerMetrics, PoolController
    caplog.set_level("INFO", logger="pdserve.autoscale")

    async def scenario():
        clock, spawner = FakeClock(), FakeSpawner()
        ctl = PoolController(_pools(), ControllerSection(report_stale_s=5), spawner, clock=clock)
        m = await ctl.start()
        assert sorted(m["workers"]) == ["decode-0", "prefill-0"] and m["version"] == 2

        async def tick(rep, dt=0.5):
            clock.t += dt
            ctl.report(rep)
            await ctl.tick()
            await asyncio.sleep(0.01)   # let spawned/ready/retire tasks run

        busy = _report({"prefill-0": _pw(queued=4500, inflight=9)}, {"decode-0": _dw(running=3)})
        for _ in range(3):
            await tick(busy)
        m = ctl.membership()
        assert sorted(m["workers"]) == ["decode-0", "prefill-0", "prefill-1"]   # +1 (max_step_up 1)
        assert not m["workers"]["prefill-1"]["draining"]
        d = ctl.decision_log()[-1]
        assert (d["pool"], d["delta"], d["reason"], d["workers"]) == ("prefill", 1, "queued_tokens", ["prefill-1"])
        line = next(r.getMessage() for r in caplog.records if "scale up" in r.getMessage())
        assert "autoscale prefill: scale up +1 -> 2 replicas (queued_tokens: load 4.50" in line, line
        # The long-poll answers at once on a change, and after wait_s otherwise.
        v = m["version"]
        t0 = time.monotonic()
        assert (await ctl.wait_membership(v, 0.05))["version"] == v and time.monotonic() - t0 >= 0.04

        # Idle: after down_stable_s and the cool-down, the least busy prefill worker drains.
        idle = _report({"prefill-0": _pw(inflight=1, queued=10), "prefill-1": _pw()}, {"decode-0": _dw()})
        waiter = asyncio.ensure_future(ctl.wait_membership(ctl.version, 30))
        for _ in range(20):
            await tick(idle)
            if waiter.done():
                break
        m = waiter.result()
        assert m["workers"]["prefill-1"]["draining"] and not m["workers"]["prefill-0"]["draining"]
        assert ctl.decision_log()[-1]["reason"] == "idle"
        # The router has not confirmed the flag yet, then confirms it with requests still in flight:
        # the worker stays (in membership, not drained, not stopped).
        await tick(idle)
        await tick(_report({"prefill-0": _pw(), "prefill-1": _pw(inflight=2, draining=True)}, {"decode-0": _dw()}))
        w1 = spawner.spawned[-1]
        assert w1.wid == "prefill-1" and not w1.drained and not w1.stopped and "prefill-1" in ctl.membership()["workers"]
        # Nothing in flight any more: drained by the worker itself, then forgotten, then stopped.
        await tick(_report({"prefill-0": _pw(), "prefill-1": _pw(draining=True)}, {"decode-0": _dw()}))
        await await_until(lambda: spawner.log[-2:] == [("drain", "prefill-1"), ("stop", "prefill-1")], 5,
                          "prefill-1 drained, then stopped")
        assert "prefill-1" not in ctl.membership()["workers"]
        assert ctl.pool_sizes()["prefill"]["active"] == 1 and ctl.pool_sizes()["decode"]["active"] == 1
        # No decode decision at any point: only the prefill signal moved.
        assert {d["pool"] for d in ctl.decision_log()} == {"prefill"}
        text = ControllerMetrics(ctl).text().decode()
        assert 'pdserve_controller_scaling_decisions_total{direction="up",pool="prefill",reason="queued_tokens"} 1.0' in text
        assert 'pdserve_controller_scaling_decisions_total{direction="down",pool="prefill",reason="idle"} 1.0' in text
        assert 'pdserve_controller_pool_replicas{pool="prefill",state="active"} 1.0' in text
        # A stale report (router gone quiet) makes no decisions, however loaded it looked.
        ctl.report(busy)
        clock.t += 10
        n = len(ctl.decisions)
        await ctl.tick()
        assert len(ctl.decisions) == n
        await ctl.shutdown()
        assert all(w.stopped for w in spawner.spawned)

    asyncio.run(scenario())


def test_controller_decode_grows_on_batch_and_failed_start_is_recorded():
    from deploy.controller import PoolController

    async def scenario():
        clock, spawner = FakeClock(), FakeSpawner(fail={"decode-1"})
        ctl = PoolController(_pools(dmax=3), ControllerSection(), spawner, clock=clock)
        await ctl.start()
        rep = _report({"prefill-0": _pw()}, {"decode-0": _dw(running=20, free=40)})
        for _ in range(3):
            clock.t += 0.5
            ctl.report(rep)
            await ctl.tick()
            await asyncio.sleep(0.01)   # (kept) let the tasks this tick spawned run: the fake clock is the time
        log = ctl.decision_log()
        assert [(d["pool"], d["delta"], d["reason"]) for d in log] == [("decode", 1, "running"),
                                                                       ("decode", 0, "start_failed")]
        assert log[1]["replicas_before"] == 2     # decode-0 active + decode-1, which failed to start
        assert spawner.spawned[-1].stopped and "decode-1" not in ctl.members
        await ctl.shutdown()

    asyncio.run(scenario())


def test_ray_spawner_gives_each_pool_its_resources(monkeypatch):
    """Placement is Ray's, from the pool's options: custom resources (which node type),
    GPUs, CPUs, restarts; per-pool engine overrides merged over the shared ones."""
    import decode_worker.actor
    import prefill_worker.actor
    from deploy.controller import RaySpawner
    made = []

    class FakeRemote:
        def __init__(self, kind, gpus, options):
            self.kind, self.gpus, self.options = kind, gpus, options

        def remote(self, *args, **kwargs):
            made.append((self.kind, self.gpus, self.options, args, kwargs))
            return object()

    monkeypatch.setattr(decode_worker.actor, "remote_class", lambda g, **o: FakeRemote("decode", g, o))
    monkeypatch.setattr(prefill_worker.actor, "remote_class", lambda g, **o: FakeRemote("prefill", g, o))
    pools = {"prefill": PrefillPool(num_gpus=1, num_cpus=4, resources={"pdserve_prefill": 1}, engine={"max_num_seqs": 8}),
             "decode": DecodePool(num_gpus=0.5, num_cpus=2, resources={"pdserve_decode": 1})}
    sp = RaySpawner(pools, "m", "tcp://router:1", dict(engine_kwargs={"block_size": 16}, dtype="bfloat16",
                                                       max_restarts=3), decode_extra={"router_epoch": 7},
                    placement_timeout_s=30.0)
    sp.spawn("prefill", "prefill-4")
    sp.spawn("decode", "decode-2")
    (pk, pg, po, pa, pkw), (dk, dg, do, da, dkw) = made
    assert (pk, pg, po) == ("prefill", 1, dict(num_cpus=4, max_restarts=3, resources={"pdserve_prefill": 1}))
    assert pa == ("prefill-4", "m") and pkw["engine_kwargs"] == {"block_size": 16, "max_num_seqs": 8}
    assert "router_epoch" not in pkw and pkw["dtype"] == "bfloat16"
    assert (dk, dg, do) == ("decode", 0.5, dict(num_cpus=2, max_restarts=3, resources={"pdserve_decode": 1}))
    assert da == ("decode-2", "m", "tcp://router:1") and dkw["router_epoch"] == 7


def test_controller_gives_up_on_a_replica_that_never_starts():
    from deploy.controller import PoolController

    async def scenario():
        clock, spawner = FakeClock(), FakeSpawner(hang={"prefill-1"})
        ctl = PoolController(_pools(), ControllerSection(start_timeout_s=60), spawner, clock=clock)
        await ctl.start()
        busy = _report({"prefill-0": _pw(queued=5000)}, {"decode-0": _dw()})
        for _ in range(3):
            clock.t += 0.5
            ctl.report(busy)
            await ctl.tick()
            await asyncio.sleep(0.01)   # (kept) let the tasks this tick spawned run: the fake clock is the time
        assert ctl.pool_sizes()["prefill"]["starting"] == 1
        for _ in range(15):                      # still loaded, but waiting on the pending replica (75 s)
            clock.t += 5
            ctl.report(busy)
            await ctl.tick()
        reasons = [d["reason"] for d in ctl.decision_log()]
        assert reasons[:2] == ["queued_tokens", "start_timeout"], reasons
        assert spawner.spawned[2].wid == "prefill-1"
        await await_until(lambda: spawner.spawned[2].stopped, 5, "the replica that never started to be stopped")
        assert "prefill-1" not in ctl.members and ctl.pool_sizes()["prefill"]["starting"] in (0, 1)
        await ctl.shutdown()

    asyncio.run(scenario())


def _ticker(ctl, clock):
    async def tick(rep, dt=1.0):
        clock.t += dt
        if rep is not None:        # None: the router sent nothing
            ctl.report(rep)
        await ctl.tick()
        await asyncio.sleep(0.01)  # let spawned/ready/stop tasks run
    return tick


async def _started_controller(**section):
    """A started PoolController (1 prefill + 1 decode) on a fake clock and spawner, and
    tick(report, dt) to drive it."""
    from deploy.controller import PoolController
    clock, spawner = FakeClock(), FakeSpawner()
    ctl = PoolController(_pools(), ControllerSection(**section), spawner, clock=clock)
    await ctl.start()
    return ctl, spawner, _ticker(ctl, clock)


async def _grow_prefill_to_two(tick) -> None:
    """A prefill queue past the policy's threshold: the controller adds prefill-1."""
    busy = _report({"prefill-0": _pw(queued=4500)}, {"decode-0": _dw()})
    for _ in range(3):
        await tick(busy, 0.5)


def test_controller_replaces_a_worker_the_router_lost_for_good():
    from deploy.controller import ControllerMetrics

    async def scenario():
        ctl, spawner, tick = await _started_controller(lost_after_s=10)
        both = _report({"prefill-0": _pw()}, {"decode-0": _dw()})
        gone = _report({"prefill-0": _pw()}, {})        # decode-0 died; its restarts are used up
        await tick(both)
        for _ in range(11):                             # absent for 10 s: not yet
            await tick(gone)
        assert "decode-0" in ctl.membership()["workers"] and ctl.decision_log() == []
        v = ctl.version
        await tick(gone)                                # 11 s > lost_after_s
        log = [(d["pool"], d["delta"], d["reason"], d["workers"], d["replicas_before"]) for d in ctl.decision_log()]
        assert log == [("decode", 0, "lost", ["decode-0"], 1), ("decode", 1, "below_min", ["decode-1"], 0)]
        assert ctl.version > v and "decode-0" not in ctl.membership()["workers"]
        dead = spawner.spawned[1]
        assert dead.wid == "decode-0" and dead.stopped and dead.graceful is False and not dead.drained
        assert ctl.pool_sizes()["decode"] == dict(starting=0, active=1, draining=0, stopping=0)
        # The replacement is not judged on reports from before the router could list it: 4 s
        # with no new report (the last one is still fresh), then 8 s absent: 12 s since it
        # became active, 8 s of absence.
        for _ in range(4):
            await tick(None)
        for _ in range(8):
            await tick(gone)
        assert "decode-1" in ctl.membership()["workers"] and len(ctl.decision_log()) == 2
        await tick(_report({"prefill-0": _pw()}, {"decode-1": _dw()}))
        text = ControllerMetrics(ctl).text().decode()
        assert 'pdserve_controller_scaling_decisions_total{direction="failed",pool="decode",reason="lost"} 1.0' in text
        await ctl.shutdown()

    asyncio.run(scenario())


def test_controller_keeps_a_worker_whose_absence_is_not_continuous():
    async def scenario():
        ctl, spawner, tick = await _started_controller(lost_after_s=10, report_stale_s=5)
        both = _report({"prefill-0": _pw()}, {"decode-0": _dw()})
        gone = _report({"prefill-0": _pw()}, {})        # e.g. dropped while stalled, then re-registered
        for _ in range(2):
            for _ in range(9):
                await tick(gone)
            await tick(both)
        # Absent, then no router report at all (stale: nobody knows), then absent again:
        # 25 s in all, never 10 s seen in a row.
        for _ in range(8):
            await tick(gone)
        await tick(None, 10.0)
        for _ in range(7):
            await tick(gone)
        assert ctl.decision_log() == [] and [w.wid for w in spawner.spawned] == ["prefill-0", "decode-0"]
        assert ctl.pool_sizes()["decode"]["active"] == 1 and not spawner.spawned[1].stopped
        await ctl.shutdown()

    asyncio.run(scenario())


def test_controller_lost_rule_leaves_draining_workers_to_the_drain_timeout():
    async def scenario():
        ctl, spawner, tick = await _started_controller(lost_after_s=10, drain_timeout_s=60)
        await _grow_prefill_to_two(tick)
        idle = _report({"prefill-0": _pw(), "prefill-1": _pw()}, {"decode-0": _dw()})
        for _ in range(20):
            await tick(idle, 0.5)
            if "prefill-1" in ctl.members and ctl.members["prefill-1"].state == "draining":
                break
        assert ctl.members["prefill-1"].state == "draining"
        # The draining worker vanishes from the router's reports: it is not "lost" (the drain
        # has its own timeout), and the pool is not refilled for it.
        without = _report({"prefill-0": _pw()}, {"decode-0": _dw()})
        for _ in range(50):
            await tick(without)
        assert ctl.members["prefill-1"].state == "draining" and not spawner.spawned[-1].stopped
        assert "lost" not in [d["reason"] for d in ctl.decision_log()]
        for _ in range(15):
            await tick(without)
        assert "prefill-1" not in ctl.members and spawner.spawned[-1].stopped
        assert [d["reason"] for d in ctl.decision_log()] == ["queued_tokens", "idle"]
        await ctl.shutdown()

    asyncio.run(scenario())


# ---- router side (no Ray) ---------------------------------------------------------------------------------

def test_router_skips_draining_workers_and_pool_sync_follows_membership():
    from deploy.controller import PoolSync
    from router.core import Router, RouterConfig
    from router.metrics import RouterMetrics

    class Cl:
        decode_actors: dict = {}
        prefill_actors: dict = {}

    async def scenario():
        cl = Cl()
        cl.decode_actors, cl.prefill_actors = {}, {}
        cl.router = Router(RouterConfig(block_size=16))
        cl.router.start()
        metrics = RouterMetrics(cl.router)
        sync = PoolSync(cl, metrics, controller=None, sync_s=0.1)
        ep = "tcp://127.0.0.1:9"
        members = {"decode-0": dict(kind="decode", endpoint=ep, draining=False, handle="h0"),
                   "decode-1": dict(kind="decode", endpoint=ep, draining=False, handle="h1"),
                   "prefill-0": dict(kind="prefill", endpoint=ep, draining=False, handle="p0")}
        sync.apply(dict(version=1, workers=members))
        assert set(cl.router.decode) == {"decode-0", "decode-1"} and cl.decode_actors == {"decode-0": "h0",
                                                                                          "decode-1": "h1"}
        long_prompt = list(range(100, 500))
        seen = {cl.router.route(long_prompt).decode_worker for _ in range(4)}
        assert cl.router.route(long_prompt).kind == "disaggregated"
        members["decode-0"] = dict(members["decode-0"], draining=True)
        members["prefill-0"] = dict(members["prefill-0"], draining=True)
        sync.apply(dict(version=2, workers=members))
        for _ in range(5):
            d = cl.router.route(long_prompt)
            assert d.decode_worker == "decode-1" and d.kind == "direct" and d.reason == "no_prefill_workers"
        rep = metrics.load_report()
        assert rep["decode"]["decode-0"]["draining"] and not rep["decode"]["decode-1"]["draining"]
        text = metrics.text().decode()
        assert 'pdserve_pool_workers{pool="decode",state="draining"} 1.0' in text
        # Removed from membership while a request is still in flight on it: out of routing,
        # kept until the request is done, then forgotten.
        cl.router.decode["decode-0"].inflight.add("r1")
        del members["decode-0"]
        sync.apply(dict(version=3, workers=members))
        assert "decode-0" in cl.router.decode and cl.router.decode["decode-0"].draining
        cl.router.decode["decode-0"].inflight.clear()
        sync.apply(dict(version=3, workers=members))
        assert "decode-0" not in cl.router.decode and "decode-0" not in cl.decode_actors
        assert seen <= {"decode-0", "decode-1"}
        await cl.router.close()

    asyncio.run(scenario())


def test_router_metrics_latency_window_and_http_endpoint():
    from types import SimpleNamespace

    from decode_worker.worker import DecodeWorker
    from planes import messages
    from router.core import Router, RouterConfig
    from router.metrics import LatencyWindow, RouterMetrics

    clock = FakeClock()
    w = LatencyWindow(10.0, clock=clock)
    for v in range(1, 11):
        w.add(v / 10)
    assert w.quantile(0.9) == pytest.approx(1.0) and w.quantile(0.5) == pytest.approx(0.6)
    clock.t += 11
    assert w.quantile(0.9) is None                     # old samples leave the window

    async def scenario():
        router = Router(RouterConfig())
        router.start()
        m = RouterMetrics(router)
        router.decisions[("disaggregated", "long_uncached_prompt")] = 3
        t = m.timer("disaggregated")
        t.t0 -= 0.2                                     # the request was sent 200 ms ago
        t.on_tokens(1, False)
        t.on_tokens(4, True)
        # A decode worker's heartbeat carries its KV receiver's counters, through the token
        # plane's validation, to the router's exposition.
        router.add_worker("decode", "decode-0", "tcp://127.0.0.1:9")
        rx = SimpleNamespace(stats=dict(bytes=4096, completed=3, failed=1, timed_out=1, seconds=1.5,
                                        wire_seconds=0.25))
        load = DecodeWorker._kv_counters(SimpleNamespace(_kv_stats=lambda: dict(rx.stats)))
        router.handle_batch(messages.decode_tokens(messages.TokenBatch("decode-0", [], [], load).encode()))
        port = m.serve_http("127.0.0.1", 0)
        try:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                                          timeout=10).read().decode())
        finally:
            m.close()
            await router.close()
        assert 'pdserve_ttft_seconds_count{route="disaggregated"} 1.0' in body
        assert 'pdserve_ttft_seconds_bucket{le="0.25",route="disaggregated"} 1.0' in body
        assert 'pdserve_ttft_seconds_bucket{le="0.1",route="disaggregated"} 0.0' in body
        assert "pdserve_tpot_seconds_count 1.0" in body
        assert 'pdserve_route_decisions_total{reason="long_uncached_prompt",route="disaggregated"} 3.0' in body
        assert 'pdserve_kv_transfer_received_bytes_total{worker="decode-0"} 4096.0' in body
        assert 'pdserve_kv_transfers_total{outcome="completed",worker="decode-0"} 3.0' in body
        assert 'pdserve_kv_transfer_seconds_total{worker="decode-0"} 1.5' in body
        assert 'pdserve_kv_transfer_wire_seconds_total{worker="decode-0"} 0.25' in body
        assert m.load_report()["ttft_disagg_p90_s"] >= 0.2

    asyncio.run(scenario())


# ---- the whole cluster on local Ray ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class LoadGen:
    """Closed-loop clients over fixed prompt sets; every request is recorded (prompt,
    max_tokens, result) or as an error. Each request carries a fresh cache_salt, so a
    repeated prompt is never a prefix-cache hit (it loads the pools like a new one) while
    the single-engine reference needs only one generation per distinct prompt."""

    def __init__(self, cluster):
        self.c = cluster
        self.lock = threading.Lock()
        self.sent = 0
        self.results: list[tuple[int, int, dict]] = []     # (prompt index, max_tokens, result)
        self.errors: list[str] = []
        self.prompts: list[list[int]] = []

    def add_prompts(self, n: int, length, seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        first = len(self.prompts)
        for i in range(n):
            ln = length(i) if callable(length) else length
            self.prompts.append(torch.randint(100, 40000, (ln,), generator=gen).tolist())
        return list(range(first, len(self.prompts)))

    def client(self, k: int, stop: threading.Event, ids: list[int], max_tokens: int, pause_s: float):
        import os

        from deploy.client import build_request, collect
        i = k
        while not stop.is_set():
            pid = ids[i % len(ids)]
            req = build_request(self.prompts[pid], max_tokens, temperature=0.0)
            req.cache_salt = os.urandom(8)
            with self.lock:
                self.sent += 1
            try:
                r = collect(self.c.stub.Generate(req, timeout=120))
                with self.lock:
                    self.results.append((pid, max_tokens, r))
            except Exception as e:   # counted, and the test fails on it
                with self.lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
            i += 7
            if pause_s:
                time.sleep(pause_s)

    def start(self, n: int, ids: list[int], max_tokens: int, pause_s: float = 0.0):
        stop = threading.Event()
        threads = [threading.Thread(target=self.client, args=(k, stop, ids, max_tokens, pause_s), daemon=True)
                   for k in range(n)]
        for t in threads:
            t.start()
        return stop, threads


def _wait_for(cond, what: str, timeout: float, history):
    try:
        wait_until(cond, timeout, what, interval_s=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}; controller history tail: {history()[-8:]}") from None


def test_pools_scale_independently_under_load_and_lose_nothing(ray_local):
    """A prefill-heavy load (long prompts, 3 tokens each) grows only the prefill pool; a
    decode-heavy load (short prompts, long generations) grows only the decode pool; idle,
    each shrinks back to 1 after its cool-down. A trickle of long and short requests runs
    throughout, across every scale-up and drain. Every request completes with a single
    engine's greedy tokens. Latency targets are off here (on a shared 2-core box they would
    make the test depend on the machine); the policy tests cover them."""
    from engine import LLM, SamplingParams

    fast = ScalingSection(up_stable_s=1.0, down_stable_s=2.0, up_cooldown_s=2.0, down_cooldown_s=3.0)
    engine = {"num_kv_blocks": 2048}
    # Phase-1 load (12 clients) can never reach the decode batch line (16 per replica), and
    # the trickle alone stays below both shrink lines: each pool only sees its own load.
    pools = PoolsSection(
        prefill=PrefillPool(min_replicas=1, max_replicas=2, scaling=fast, engine=engine,
                            targets=PrefillTargets(queued_tokens_per_replica=600, ttft_s=None)),
        decode=DecodePool(min_replicas=1, max_replicas=2, scaling=fast, engine=engine,
                          targets=DecodeTargets(kv_use=0.9, running_per_replica=16, tpot_s=None)))
    c = ClusterThread(pools=pools, router={"metrics_port": 0},
                      controller=ControllerSection(enabled=True, interval_s=0.25, sync_s=0.2))
    ctl = c.cluster.controller
    sizes = lambda: ray_local.get(ctl.pool_sizes.remote())          # noqa: E731
    history = lambda: ray_local.get(ctl.history.remote())           # noqa: E731
    try:
        assert {k: v["active"] for k, v in sizes().items()} == {"prefill": 1, "decode": 1}
        load = LoadGen(c)
        long_ids = load.add_prompts(24, 400, seed=1)
        short_ids = load.add_prompts(24, 16, seed=2)
        trickle_ids = load.add_prompts(6, lambda i: 200 if i % 2 else 20, seed=3)
        stop_trickle, trickle = load.start(1, trickle_ids, max_tokens=6, pause_s=0.05)
        # Phase 1: a prefill queue builds.
        t1 = time.time()
        stop1, th1 = load.start(12, long_ids, max_tokens=3)
        _wait_for(lambda: sizes()["prefill"]["active"] == 2, "the prefill pool to grow", 90, history)
        time.sleep(2.0)     # (kept: time under load is the point) keep loading the grown pool
        stop1.set()
        [t.join() for t in th1]
        _wait_for(lambda: sizes()["prefill"] == dict(starting=0, active=1, draining=0, stopping=0),
                  "the prefill pool to shrink", 60, history)
        url = f"http://127.0.0.1:{c.cluster.metrics_port}/metrics"
        body1 = urllib.request.urlopen(url, timeout=10).read().decode()
        # Phase 2: many long generations on short prompts.
        t2 = time.time()
        stop2, th2 = load.start(28, short_ids, max_tokens=48)
        _wait_for(lambda: sizes()["decode"]["active"] == 2, "the decode pool to grow", 90, history)
        time.sleep(2.0)     # (kept: time under load is the point) keep loading the grown pool
        stop2.set()
        [t.join() for t in th2]
        _wait_for(lambda: sizes()["decode"] == dict(starting=0, active=1, draining=0, stopping=0),
                  "the decode pool to shrink", 60, history)
        stop_trickle.set()
        [t.join() for t in trickle]
        decisions = ray_local.get(ctl.decisions.remote())
        ctl_metrics = ray_local.get(ctl.metrics_text.remote()).decode()
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        c.wait_idle()
        assert set(c.cluster.router.decode) | set(c.cluster.router.prefill) == \
            set(c.cluster.decode_actors) | set(c.cluster.prefill_actors)
        assert len(c.cluster.router.decode) == 1 and len(c.cluster.router.prefill) == 1
    finally:
        c.close()

    # Nothing failed or went missing, across two scale-ups and two drains.
    assert load.errors == []
    assert load.sent == len(load.results) > 100
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == m for _, m, r in load.results)
    # Each pool grew under its own load only, and shrank after it.
    flow = [(d["pool"], "up" if d["delta"] > 0 else "down", d["reason"], d["time"]) for d in decisions]
    assert [f[:3] for f in flow] == [("prefill", "up", "queued_tokens"), ("prefill", "down", "idle"),
                                     ("decode", "up", "running"), ("decode", "down", "idle")], flow
    assert t1 < flow[0][3] < flow[1][3] < t2 < flow[2][3] < flow[3][3]
    assert 'pdserve_controller_scaling_decisions_total{direction="up",pool="decode",reason="running"} 1.0' in ctl_metrics
    # The new workers served: phase-1 long prompts on both prefill workers, phase-2 on both decode workers.
    p1 = [r for _, m, r in load.results if m == 3]
    p2 = [r for _, m, r in load.results if m == 48]
    assert {r["prefill_worker"] for r in p1 if r["route"] == "disaggregated"} == {"prefill-0", "prefill-1"}
    assert {r["decode_worker"] for r in p2} == {"decode-0", "decode-1"}
    assert 'pdserve_ttft_seconds_count{route="disaggregated"}' in body and "pdserve_tpot_seconds_count" in body
    assert 'pdserve_pool_workers{pool="decode",state="active"} 1.0' in body
    # KV bytes reach the router's metrics from the decode worker's heartbeats.
    kv = re.search(r'pdserve_kv_transfer_received_bytes_total\{worker="decode-0"\} (\S+)', body1)
    assert kv and float(kv.group(1)) > 0, body1
    wait = re.search(r'pdserve_kv_transfer_seconds_total\{worker="decode-0"\} (\S+)', body1)
    wire = re.search(r'pdserve_kv_transfer_wire_seconds_total\{worker="decode-0"\} (\S+)', body1)
    assert wait and wire and float(wait.group(1)) >= float(wire.group(1)) > 0, body1
    # Greedy tokens equal a single engine's, request by request.
    ref = LLM(MODEL, dtype="float64", **dict(CLUSTER_ENGINE, num_kv_blocks=2048))
    got: dict[tuple[int, int], set] = {}
    for pid, m, r in load.results:
        got.setdefault((pid, m), set()).add(tuple(r["token_ids"]))
    keys = sorted(got)
    for m in {m for _, m in keys}:
        pids = [pid for pid, mm in keys if mm == m]
        outs = ref.generate([load.prompts[pid] for pid in pids], SamplingParams(max_tokens=m, temperature=0.0))
        for pid, o in zip(pids, outs):
            assert got[(pid, m)] == {tuple(o.token_ids)}, (pid, m)


def test_controller_does_not_scale_down_while_a_worker_is_missing_from_the_report():
    async def scenario():
        ctl, spawner, tick = await _started_controller(lost_after_s=100)
        await _grow_prefill_to_two(tick)
        assert ctl.pool_sizes()["prefill"]["active"] == 2
        # Idle, but prefill-1 is missing from the router's reports (maybe dead): the pool is
        # not shrunk meanwhile (before this rule it would drain prefill-0, the only one seen).
        partial = _report({"prefill-0": _pw()}, {"decode-0": _dw()})
        for _ in range(40):
            await tick(partial, 0.5)
        assert [m.state for m in ctl.pool_members("prefill")] == ["active", "active"]
        assert [d["delta"] for d in ctl.decision_log() if d["pool"] == "prefill"] == [1]
        # Both listed again: the idle pool shrinks as usual.
        idle = _report({"prefill-0": _pw(), "prefill-1": _pw()}, {"decode-0": _dw()})
        for _ in range(40):
            await tick(idle, 0.5)
            if any(m.state != "active" for m in ctl.pool_members("prefill")):
                break
        assert any(m.state in ("draining", "stopping") for m in ctl.pool_members("prefill"))
        await ctl.shutdown()

    asyncio.run(scenario())
