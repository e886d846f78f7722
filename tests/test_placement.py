"""Placement (deploy/placement.py): GPU and CPU shares on a local cluster, the KV split of a
shared GPU, the fit check's messages, the bounded wait for an actor Ray does not place, the
controller counting an unplaceable scale-up; and on a local Ray instance, a deployment that
cannot be placed fails with the message instead of hanging."""
from __future__ import annotations

import asyncio
import time

import pytest

from deploy.placement import (GIB, PlacementError, PoolAsk, PoolSpec, check_fits, engine_memory, fit_problems,
                              gpu_share, kv_split_gib, kv_split_pools, resolve_asks, split_line, wait_started)
from engine.model.loader import random_config

CPU16 = {"CPU": 16.0, "memory": 1e11, "object_store_memory": 1e10, "node:10.0.0.1": 1.0}


def one_one(**kw):
    return {"prefill": PoolSpec(1, **kw), "decode": PoolSpec(1, **kw)}


def test_one_gpu_is_shared_by_one_prefill_and_one_decode_with_a_kv_split_that_fits():
    total = {**CPU16, "GPU": 1.0}
    asks, notes = resolve_asks(one_one(), total, local=True)
    assert {k: a.num_gpus for k, a in asks.items()} == {"prefill": 0.5, "decode": 0.5}
    assert {a.num_cpus for a in asks.values()} == {1.0}
    assert len(notes) == 1 and "1 GPU for 2 GPU workers" in notes[0] and "num_gpus=0.5" in notes[0]
    assert fit_problems(asks, total, [total]) == []
    assert kv_split_pools(asks, {"prefill": {}, "decode": {}}, local=True) == ["prefill", "decode"]
    # One H100 (what torch.cuda.mem_get_info reports there), random:llama3-8b in bf16.
    free, whole = int(78.6 * GIB), int(79.2 * GIB)
    weights, act = engine_memory(random_config("llama3-8b"), 2, 2048)
    assert 14.9 * GIB < weights < 15.0 * GIB
    kv = kv_split_gib(free, whole, 0.5, weights, act, pool="decode")
    assert 15 < kv < 20
    used = 2 * (weights + act + 1 * GIB + kv * GIB)     # both engines, overhead included
    assert used <= free - 0.1 * whole
    line = split_line(asks, {"prefill": kv, "decode": kv}, free, whole, weights)
    assert line.startswith("pdserve: sharing the GPU: prefill num_gpus=0.5 KV ") and "decode num_gpus=0.5" in line


@pytest.mark.parametrize("gpus,prefill,decode,share", [
    (2, 1, 1, 1.0), (8, 1, 1, 1.0), (8, 2, 4, 1.0),
    (2, 1, 2, 0.5),          # 3 actors, 2 GPUs: 1/2 (not 2/3, which Ray could not pack)
    (1, 2, 2, 0.25), (1, 1, 2, 0.3333)])
def test_gpu_shares(gpus, prefill, decode, share):
    total = {**CPU16, "GPU": float(gpus)}
    asks, notes = resolve_asks({"prefill": PoolSpec(prefill), "decode": PoolSpec(decode)}, total, local=True)
    assert {a.num_gpus for a in asks.values()} == {share}
    assert bool(notes) == (share < 1)
    assert fit_problems(asks, total, [total]) == []


def test_no_sharing_on_an_address_cluster_or_without_gpus():
    asks, notes = resolve_asks(one_one(), {**CPU16, "GPU": 1.0}, local=False)   # it may grow
    assert {a.num_gpus for a in asks.values()} == {1.0} and notes == []
    assert "GPU: the pools ask prefill 1 x 1 + decode 1 x 1 = 2, the cluster has 1" in \
        fit_problems(asks, {**CPU16, "GPU": 1.0}, [{**CPU16, "GPU": 1.0}])
    asks, notes = resolve_asks(one_one(), CPU16, local=True)
    assert {a.num_gpus for a in asks.values()} == {0.0} and notes == []
    assert gpu_share(3, 0) == 0.0


def test_user_settings_win():
    total = {**CPU16, "GPU": 1.0}
    # The user's per-pool num_gpus is kept; the other pool shares what is left.
    asks, _ = resolve_asks({"prefill": PoolSpec(1, num_gpus=0.25), "decode": PoolSpec(1)}, total, local=True)
    assert (asks["prefill"].num_gpus, asks["decode"].num_gpus) == (0.25, 0.75)
    # Nothing left: the auto pool keeps a whole GPU and the check says why it cannot fit
    # (rather than quietly putting the pool on the CPU).
    asks, _ = resolve_asks({"prefill": PoolSpec(1, num_gpus=1), "decode": PoolSpec(1)}, total, local=True)
    assert asks["decode"].num_gpus == 1.0
    with pytest.raises(PlacementError, match="the pools ask prefill 1 x 1 \\+ decode 1 x 1 = 2"):
        check_fits(asks, total, [total])
    # Explicit fractions on both: no automatic choice, but their engines still get a KV split
    # unless the user sized the cache (shared or per pool).
    asks, notes = resolve_asks(one_one(num_gpus=0.5), total, local=True)
    assert notes == [] and {a.num_gpus for a in asks.values()} == {0.5}
    assert kv_split_pools(asks, {"prefill": {}, "decode": {"kv_cache_memory_gb": 12}}, True) == ["prefill"]
    assert kv_split_pools(asks, {"prefill": {"num_kv_blocks": 64}, "decode": {}}, True) == ["decode"]
    assert kv_split_pools(asks, {"prefill": {}, "decode": {}}, local=False) == []
    # The user's num_cpus is kept too.
    asks, notes = resolve_asks(one_one(num_cpus=4), {"CPU": 2.0}, local=False)
    assert {a.num_cpus for a in asks.values()} == {4.0}


def test_cpu_shares_on_a_local_cluster_sized_for_max_replicas():
    two = {"CPU": 2.0}
    specs = {"prefill": PoolSpec(1), "decode": PoolSpec(2)}        # `--decode 2` on a 2-core laptop
    asks, notes = resolve_asks(specs, two, local=True)
    assert {a.num_cpus for a in asks.values()} == {0.6666}
    assert "2 CPUs for up to 3 workers: num_cpus=0.6666 each" in notes[0]
    assert fit_problems(asks, two, [two]) == []
    # Autoscaled pools (deploy/pdserve-local.yaml: 1..3 each): a scale-up still fits.
    asks, _ = resolve_asks({"prefill": PoolSpec(1, 3), "decode": PoolSpec(1, 3)}, two, local=True)
    assert {a.num_cpus for a in asks.values()} == {0.3333}
    # Enough cores: 1 each, as before.
    asks, notes = resolve_asks(specs, CPU16, local=True)
    assert {a.num_cpus for a in asks.values()} == {1.0} and notes == []
    # An --address cluster: no share, a clear failure.
    asks, _ = resolve_asks(specs, two, local=False)
    with pytest.raises(PlacementError) as e:
        check_fits(asks, two, [two])
    msg = str(e.value)
    assert "CPU: the pools ask prefill 1 x 1 + decode 2 x 1 = 3, the cluster has 2" in msg
    assert "Each decode actor asks {CPU 1} (2 at start)" in msg and "the cluster offers {CPU 2} in all (1 node)" in msg


def test_impossible_asks_name_the_pool_the_ask_and_the_offer():
    node = {**CPU16, "GPU": 1.0}
    asks, _ = resolve_asks({"prefill": PoolSpec(1, resources={"pdserve_prefill": 1}), "decode": PoolSpec(1)},
                           node, local=True)
    with pytest.raises(PlacementError) as e:
        check_fits(asks, node, [node])
    msg = str(e.value)
    assert "pool prefill: each actor asks {CPU 1, GPU 0.5, pdserve_prefill 1}; no node has enough pdserve_prefill" in msg
    assert "the cluster has 0" not in msg           # the shortfall is said once
    assert "the cluster offers {CPU 16, GPU 1} in all (1 node)" in msg
    assert "memory" not in msg and "node:" not in msg


def test_per_node_fit_and_gpu_packing():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    total = {"CPU": 16.0, "GPU": 2.0}
    two_gpu = {"prefill": PoolAsk("prefill", 1, 2.0, 1.0), "decode": PoolAsk("decode", 0, 0.0, 1.0)}
    assert fit_problems(two_gpu, total, nodes) == ["pool prefill: each actor asks {CPU 1, GPU 2}; "
                                                   "no node has enough GPU"]
    # The sums allow 3 x 0.6 = 1.8 of 2 GPUs, but a fraction must sit on one GPU.
    odd = {"prefill": PoolAsk("prefill", 1, 0.6, 1.0), "decode": PoolAsk("decode", 2, 0.6, 1.0)}
    (problem,) = fit_problems(odd, total, nodes)
    assert "do not pack onto whole GPUs" in problem and "decode 2 x 0.6" in problem
    ok = {"prefill": PoolAsk("prefill", 1, 0.5, 1.0), "decode": PoolAsk("decode", 3, 0.5, 1.0)}
    assert fit_problems(ok, total, nodes) == []
    # A big enough node in a cluster of small ones is fine.
    assert fit_problems({"prefill": PoolAsk("prefill", 1, 2.0, 1.0)}, {"CPU": 24.0, "GPU": 3.0},
                        [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 2.0}]) == []


def test_kv_split_that_cannot_fit_is_a_clear_error():
    weights, act = engine_memory(random_config("llama3-8b"), 2, 2048)
    with pytest.raises(PlacementError, match=r"pool decode: the model does not fit with num_gpus=0.5: .* weights "
                                             r"take 15.0 GiB"):
        kv_split_gib(int(23 * GIB), int(24 * GIB), 0.5, weights, act, pool="decode")
    # A small model on the same GPU is fine.
    w, a = engine_memory(random_config("smollm2-135m"), 2, 2048)
    assert kv_split_gib(int(23 * GIB), int(24 * GIB), 0.5, w, a) > 5


def test_wait_started_fails_only_an_actor_that_is_not_placed():
    async def never():
        await asyncio.Event().wait()

    async def loads(t, value):
        await asyncio.sleep(t)
        return value

    async def scenario():
        t0 = time.monotonic()
        with pytest.raises(PlacementError, match="prefill-0 was not placed within 0.2 s: pool prefill: asks"):
            await wait_started(never(), "prefill-0", 0.2, lambda: False, lambda: "pool prefill: asks")
        assert time.monotonic() - t0 < 2
        # Placed, still loading its model past the timeout: keep waiting.
        assert await wait_started(loads(0.5, {"request": "x"}), "decode-0", 0.1, lambda: True, lambda: "",
                                  progress_s=0.1) == {"request": "x"}
        # Ray cannot say: keep waiting (with a warning), never a failure on a guess.
        assert await wait_started(loads(0.3, 1), "decode-1", 0.1, lambda: None, lambda: "", progress_s=0.1) == 1

    asyncio.run(scenario())


def test_controller_counts_an_unplaceable_scale_up_and_fails_an_unplaceable_start():
    from deploy.config import ControllerSection
    from deploy.controller import PoolController
    from helpers import FakeClock, FakeSpawner, decode_entry as _dw, pools_config as _pools, prefill_entry as _pw, pool_report as _report

    class Spawner(FakeSpawner):
        async def ready(self, w):
            if w.wid in self.fail:
                raise PlacementError(f"{w.wid} was not placed within 30 s: pool decode: each actor asks {{GPU 1}}")
            return await super().ready(w)

    async def scale_up():
        clock, spawner = FakeClock(), Spawner(fail={"decode-1"})
        ctl = PoolController(_pools(dmax=3), ControllerSection(), spawner, clock=clock)
        await ctl.start()
        rep = _report({"prefill-0": _pw()}, {"decode-0": _dw(running=20, free=40)})
        for _ in range(3):
            clock.t += 0.5
            ctl.report(rep)
            await ctl.tick()
            await asyncio.sleep(0.01)
        assert ctl.counts[("decode", "failed", "unplaceable")] == 1
        assert spawner.spawned[-1].stopped and "decode-1" not in ctl.members
        assert ctl.pool_sizes()["decode"]["active"] == 1       # still serving
        await ctl.shutdown()

    async def start():
        ctl = PoolController(_pools(), ControllerSection(), Spawner(fail={"decode-0"}), clock=FakeClock())
        with pytest.raises(PlacementError, match="decode-0 was not placed within 30 s: pool decode"):
            await ctl.start()

    asyncio.run(scale_up())
    asyncio.run(start())


def test_cluster_plan_on_a_one_gpu_host(monkeypatch, capsys):
    """Cluster._plan_placement with a fake 1-GPU cluster (no Ray, no GPU): both pools get half
    the GPU and a KV size, printed for the user; a pool whose KV size the user set keeps it."""
    from deploy import cluster as cl
    from deploy.config import from_dict
    gpu_node = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}
    monkeypatch.setattr(cl.placement, "cluster_view", lambda available=False: (dict(gpu_node), [dict(gpu_node)], None))
    probed = []

    async def gpu_memory(self, num_gpus, timeout_s):
        probed.append(num_gpus)
        return int(78.6 * GIB), int(79.2 * GIB)
    monkeypatch.setattr(cl.Cluster, "_gpu_memory", gpu_memory)

    plan = asyncio.run(cl.Cluster(from_dict({"model": "random:llama3-8b"}))._plan_placement())
    assert {k: a.num_gpus for k, a in plan.asks.items()} == {"prefill": 0.5, "decode": 0.5}
    kv = plan.engine["decode"]["kv_cache_memory_gb"]
    assert plan.engine == {"prefill": {"kv_cache_memory_gb": kv}, "decode": {"kv_cache_memory_gb": kv}}
    assert 15 < kv < 20 and probed == [0.5] and plan.timeout_s == 30
    err = capsys.readouterr().err.splitlines()
    assert err == ["pdserve: 1 GPU for 2 GPU workers: sharing, num_gpus=0.5 each (1 prefill, 1 decode)",
                   f"pdserve: sharing the GPU: prefill num_gpus=0.5 KV {kv:.2f} GiB, decode num_gpus=0.5 KV {kv:.2f} "
                   "GiB (GPU 78.6 of 79.2 GiB free, weights 14.96 GiB per engine; set engine.kv_cache_memory_gb "
                   "to choose)"]
    # --config: the user's per-pool KV size wins; the other pool is still sized.
    cfg = from_dict({"model": "random:llama3-8b", "pools": {"decode": {"engine": {"kv_cache_memory_gb": 12}}}})
    plan = asyncio.run(cl.Cluster(cfg)._plan_placement())
    assert list(plan.engine) == ["prefill"] and plan.asks["decode"].num_gpus == 0.5
    # An --address cluster: whole GPUs, no split; a shortfall waits (an autoscaler may add a node).
    far = from_dict({"model": "random:llama3-8b", "ray": {"address": "ray://head:10001"}})
    plan = asyncio.run(cl.Cluster(far)._plan_placement())
    assert {a.num_gpus for a in plan.asks.values()} == {1.0} and plan.engine == {} and plan.timeout_s == 900


# ---- a local Ray instance -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_slot():
    """Two CPUs and one `slot`, which a holder actor takes (as another job would)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, resources={"slot": 1}, include_dashboard=False, log_to_driver=False)

    class Holder:
        def ping(self):
            return 1

    holder = ray.remote(num_cpus=0, resources={"slot": 1})(Holder).remote()
    ray.get(holder.ping.remote(), timeout=60)
    yield ray
    ray.shutdown()


def _start(cluster, timeout_s):
    async def run():
        await asyncio.wait_for(cluster.start(), timeout_s)
    asyncio.run(run())


def test_unplaceable_deployments_fail_fast_with_the_message(ray_slot):
    """A pool asking a resource no node has fails before any actor starts; one asking a
    resource another actor holds (the sums allow it) fails after ray.placement_timeout_s,
    with the pool, its ask and the cluster's offer; nothing is left running."""
    from deploy.cluster import Cluster
    from deploy.config import from_dict
    base = {"model": "random:tiny", "dtype": "float32", "engine": {"num_kv_blocks": 64},
            "router": {"port": 0}}
    missing = from_dict({**base, "pools": {"prefill": {"resources": {"pdserve_missing": 1}}}})
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as e:
        _start(Cluster(missing), 60)
    assert time.monotonic() - t0 < 10
    assert "pool prefill: each actor asks {CPU 1, pdserve_missing 1}; no node has enough pdserve_missing" in str(e.value)
    assert "the cluster offers {CPU 2, slot 1} in all (1 node)" in str(e.value)

    held = from_dict({**base, "ray": {"placement_timeout_s": 3},
                      "pools": {"prefill": {"resources": {"slot": 1}}}})
    t0 = time.monotonic()
    cluster = Cluster(held)
    with pytest.raises(PlacementError) as e:
        _start(cluster, 90)
    assert time.monotonic() - t0 < 60       # the decode worker's model load included
    msg = str(e.value)
    assert "prefill-0 was not placed within 3 s: pool prefill: each actor asks {CPU 1, slot 1}" in msg
    assert "the cluster offers {CPU 2, slot 1} in all, {CPU" in msg and "free now" in msg
    assert cluster.router is None and cluster.controller is None
    deadline = time.monotonic() + 30           # the workers the controller started are gone
    while ray_slot.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_slot.available_resources().get("CPU", 0) == 2
