"""Where the pools' actors can go, decided before Ray is asked, and a bounded wait after.

Ray never says "this actor cannot be placed": it keeps it pending (on a cloud cluster that
is how a node gets added). So `pdserve` checks first and waits with a deadline:

* :func:`resolve_asks` turns each pool's settings into a per-actor ask. On a local Ray
  instance (which cannot grow) pools whose `num_gpus` / `num_cpus` the user left unset share
  what the machine has: one GPU for a prefill and a decode worker gives each
  ``num_gpus=0.5``; two cores for three workers give each ``num_cpus=0.6666``.
* :func:`kv_split_gib` sizes each GPU-sharing engine's KV cache from the model's shape, so
  two engines on one GPU fit (an engine left alone would take most of the GPU's free memory
  for its own cache, see engine/model_runner.py _decide_num_blocks).
* :func:`fit_problems` says whether the asks can be placed on the cluster's nodes, and
  :func:`wait_started` bounds the wait for an actor that the sums allowed but Ray still has
  not placed (other jobs holding resources, a node that never comes).

The functions take numbers (ray.cluster_resources(), ray.nodes(), torch.cuda.mem_get_info())
from their callers; only :func:`cluster_view` and :func:`actor_placed` talk to Ray.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

GIB = 1 << 30
# Ray accepts resource quantities in steps of 1/10000; a share is rounded down to one.
_RAY_STEP = 10000
# Kept free on a shared GPU besides each engine's own estimate: allocator fragmentation and
# whatever else runs there (the engine's own default keeps 15%).
GPU_HEADROOM = 0.10
# Per engine process on a GPU: the CUDA context, cuBLAS/Triton workspaces, CUDA graph pools.
ENGINE_OVERHEAD_BYTES = 1 * GIB
MIN_KV_GIB = 0.1
MIN_GPU_SHARE = 0.01
_HIDDEN = ("memory", "object_store_memory")


class PlacementError(ValueError):
    """The pools' actors cannot be placed on this Ray cluster (a ValueError, so the CLI prints
    one line and exits 2)."""


@dataclass
class PoolSpec:
    """What the user asked of one pool. None: not set (pdserve picks)."""
    replicas: int                       # at start
    max_replicas: int | None = None     # None: = replicas
    num_gpus: float | None = None
    num_cpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class PoolAsk:
    """What each actor of a pool asks Ray for."""
    pool: str
    replicas: int
    num_gpus: float
    num_cpus: float
    resources: dict[str, float] = field(default_factory=dict)

    def per_actor(self) -> dict[str, float]:
        out = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in out.items() if v}


def floor_share(x: float) -> float:
    """Round down to a quantity Ray accepts (so n shares never sum past the whole)."""
    return math.floor(x * _RAY_STEP) / _RAY_STEP


def gpu_share(free_gpus: float, actors: int) -> float:
    """num_gpus per actor for `actors` actors sharing `free_gpus` GPUs. Ray puts a fractional
    ask on one GPU, so the share is 1/k with k actors per GPU (2 GPUs, 3 actors: 0.5 each,
    not 0.6666, which would leave the third actor no GPU with room)."""
    if actors <= 0:
        return 0.0
    whole = math.floor(free_gpus + 1e-9)
    if whole >= actors:
        return 1.0
    if whole >= 1:
        return floor_share(1 / math.ceil(actors / whole))
    return floor_share(free_gpus / actors)   # a partly taken single GPU


def resolve_asks(specs: dict[str, PoolSpec], total: dict[str, float], local: bool) -> tuple[dict[str, PoolAsk], list[str]]:
    """Per-actor asks, and one line per sharing decision (for the log and the user).

    Unset num_gpus: 1 when the cluster has a GPU, else 0; on a local cluster, when the pools'
    actors at start outnumber the GPUs left by explicit asks, a share (gpu_share) instead.
    Unset num_cpus: 1; on a local cluster a share of the cores when the pools at their max
    size would ask more than the machine has. The CPU share is Ray's bookkeeping only (a
    worker's threads are not limited by it; Ray sets OMP_NUM_THREADS=1 for any ask <= 1), so
    it is sized for max_replicas and a scale-up still fits; a GPU share comes with a KV split,
    so it is sized for the replicas at start. An --address cluster may grow (its autoscaler
    adds nodes for pending actors), so nothing is shared there."""
    specs = {k: s for k, s in specs.items() if s.replicas > 0}
    notes = []
    gpus = float(total.get("GPU", 0))
    auto_gpu = [k for k, s in specs.items() if s.num_gpus is None]
    gpu = 1.0 if gpus >= 1 else 0.0
    if local and gpu and auto_gpu:
        left = gpus - sum(s.num_gpus * s.replicas for s in specs.values() if s.num_gpus is not None)
        n = sum(specs[k].replicas for k in auto_gpu)
        # Nothing left by the explicit asks: keep the ask whole, and fit_problems says why it
        # cannot be placed (a share of nothing would quietly put the pool on the CPU).
        gpu = gpu_share(left, n) if left >= MIN_GPU_SHARE * n else 1.0
        if gpu < 1:
            notes.append(f"{_n(gpus, 'GPU')} for {_n(n, 'GPU worker')}: sharing, num_gpus={gpu:g} each "
                         f"({', '.join(f'{specs[k].replicas} {k}' for k in auto_gpu)})")
    cpus = float(total.get("CPU", 0))
    auto_cpu = [k for k, s in specs.items() if s.num_cpus is None]
    cpu = 1.0
    if local and auto_cpu:
        fixed = sum(s.num_cpus * _max(s) for s in specs.values() if s.num_cpus is not None)
        n = sum(_max(specs[k]) for k in auto_cpu)
        if fixed + n > cpus and cpus - fixed > 0:
            cpu = floor_share((cpus - fixed) / n)
            notes.append(f"{_n(cpus, 'CPU')} for up to {_n(n, 'worker')}: num_cpus={cpu:g} each "
                         "(Ray's bookkeeping; the workers' threads are not limited by it)")
    asks = {k: PoolAsk(k, s.replicas, gpu if s.num_gpus is None else s.num_gpus,
                       cpu if s.num_cpus is None else s.num_cpus, dict(s.resources))
            for k, s in specs.items()}
    return asks, notes


def _max(s: PoolSpec) -> int:
    return max(s.replicas, s.max_replicas or 0)


def _n(x: float, what: str) -> str:
    return f"{x:g} {what}{'' if x == 1 else 's'}"


# ---- can it be placed? ----------------------------------------------------------------------------------

def fmt(res: dict[str, float]) -> str:
    """{CPU 1, GPU 0.5, pdserve_prefill 1}: the resources a user can ask for."""
    keys = sorted((k for k in res if k not in _HIDDEN and not k.startswith("node:")),
                  key=lambda k: (k not in ("CPU", "GPU"), k))
    return "{" + ", ".join(f"{k} {res[k]:g}" for k in keys) + "}"


def offer_text(total: dict[str, float], nodes: list[dict[str, float]], available: dict[str, float] | None = None) -> str:
    text = f"the cluster offers {fmt(total)} in all"
    if available is not None:
        text += f", {fmt(available)} free now"
    if len(nodes) > 1:
        text += f", on {len(nodes)} nodes: " + ", ".join(fmt(n) for n in nodes)
    elif nodes:
        text += " (1 node)"
    return text


def fit_problems(asks: dict[str, PoolAsk], total: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """What keeps the pools' actors (each pool at `replicas`) off the cluster, one line per
    problem; empty when they fit. Checks that one actor fits some node, the sums over all
    pools, and the packing of GPU shares onto whole GPUs."""
    problems, short_keys = [], set()
    for a in asks.values():
        need = a.per_actor()
        if not any(all(n.get(k, 0) >= v - 1e-9 for k, v in need.items()) for n in nodes):
            short = sorted(k for k, v in need.items() if max((n.get(k, 0) for n in nodes), default=0) < v - 1e-9)
            short_keys.update(short)
            what = f"no node has enough {', '.join(short)}" if short else "no node has all of it at once"
            problems.append(f"pool {a.pool}: each actor asks {fmt(need)}; {what}")
    keys = sorted({k for a in asks.values() for k in a.per_actor()}, key=lambda k: (k not in ("CPU", "GPU"), k))
    for k in keys:
        parts = [(a, a.per_actor().get(k, 0)) for a in asks.values()]
        want = sum(a.replicas * v for a, v in parts)
        if want > total.get(k, 0) + 1e-9 and k not in short_keys:   # (said once is enough)
            by = " + ".join(f"{a.pool} {a.replicas} x {v:g}" for a, v in parts if v)
            problems.append(f"{k}: the pools ask {by} = {want:g}, the cluster has {total.get(k, 0):g}")
    if not problems and not _gpus_pack(asks, nodes):
        problems.append("GPU: " + ", ".join(f"{a.pool} {a.replicas} x {a.num_gpus:g}" for a in asks.values()
                                            if a.num_gpus) +
                        " do not pack onto whole GPUs (Ray puts a fractional ask on a single GPU)")
    return problems


def _gpus_pack(asks: dict[str, PoolAsk], nodes: list[dict[str, float]]) -> bool:
    """First-fit decreasing of every actor's GPU ask onto the nodes' GPUs (whole asks take
    whole GPUs of one node, fractions share one GPU). GPUs only: CPUs and custom resources
    are sums, which fit_problems checks."""
    gpus = [[1.0] * int(n.get("GPU", 0)) for n in nodes]
    for need in sorted((a.num_gpus for a in asks.values() for _ in range(a.replicas) if a.num_gpus), reverse=True):
        for node in gpus:
            if need >= 1:
                free = [i for i, g in enumerate(node) if g >= 1 - 1e-9]
                if len(free) >= need:
                    for i in free[:math.ceil(need)]:
                        node[i] = 0.0
                    break
            else:
                i = next((i for i, g in enumerate(node) if g >= need - 1e-9), None)
                if i is not None:
                    node[i] -= need
                    break
        else:
            return False
    return True


def check_fits(asks: dict[str, PoolAsk], total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    problems = fit_problems(asks, total, nodes)
    if problems:
        raise PlacementError(unplaceable_message(problems, asks, total, nodes))


def unplaceable_message(problems: list[str], asks: dict[str, PoolAsk], total, nodes, available=None) -> str:
    each = "; ".join(f"Each {a.pool} actor asks {fmt(a.per_actor())} ({a.replicas} at start)" for a in asks.values())
    return (f"cannot place the worker pools on this Ray cluster: {'; '.join(problems)}. {each}; "
            f"{offer_text(total, nodes, available)}. Lower pools.<pool>.num_gpus / num_cpus / resources or "
            "min_replicas (or --prefill/--decode), or add nodes")


def pending_message(ask: PoolAsk, total, nodes, available) -> str:
    """Why an actor that the sums allowed may still be pending (for wait_started)."""
    return (f"pool {ask.pool}: each actor asks {fmt(ask.per_actor())}; {offer_text(total, nodes, available)}. "
            "Other actors or jobs may hold what it needs, or the node it needs is still starting "
            "(ray.placement_timeout_s sets how long to wait)")


# ---- a GPU shared by several engines -----------------------------------------------------------------

def kv_split_pools(asks: dict[str, PoolAsk], engines: dict[str, dict], local: bool) -> list[str]:
    """Pools whose engines need an explicit KV size: on a local cluster, a fraction of a GPU,
    and no KV size of the user's (engine.kv_cache_memory_gb or num_kv_blocks, shared or the
    pool's own, wins). An engine left to size its own cache takes most of the GPU's free
    memory, and the next engine on that GPU cannot start."""
    return [k for k, a in asks.items() if local and 0 < a.num_gpus < 1
            and engines.get(k, {}).get("kv_cache_memory_gb") is None and engines.get(k, {}).get("num_kv_blocks") is None]


def engine_memory(mcfg, dtype_bytes: int, max_num_batched_tokens: int) -> tuple[int, int]:
    """(weight bytes, activation reserve bytes) of one engine, from the model's shape alone.
    Weights at the model dtype (quantized weights are smaller: this errs on the safe side);
    the activation reserve is the one engine/model_runner.py _decide_num_blocks keeps (the
    logits of the largest step dominate)."""
    weights = mcfg.num_params() * dtype_bytes
    act = max_num_batched_tokens * (mcfg.vocab_size * 4 + mcfg.intermediate_size * 8) + GIB
    return weights, act


def kv_split_gib(free_bytes: int, total_bytes: int, gpu_fraction: float, weight_bytes: int, activation_bytes: int,
                 *, pool: str = "", overhead_bytes: int = ENGINE_OVERHEAD_BYTES) -> float:
    """KV cache GiB for one engine holding `gpu_fraction` of a GPU that has `free_bytes` free
    of `total_bytes` (torch.cuda.mem_get_info, measured before any engine starts): its share
    of the free memory, less GPU_HEADROOM of the whole, its weights, activations and
    per-process overhead. Raises PlacementError when nothing is left for a cache."""
    usable = free_bytes - GPU_HEADROOM * total_bytes
    share = usable * gpu_fraction
    kv = (share - weight_bytes - activation_bytes - overhead_bytes) / GIB
    if kv < MIN_KV_GIB:
        raise PlacementError(
            f"pool {pool}: the model does not fit with num_gpus={gpu_fraction:g}: that share is {share / GIB:.1f} GiB "
            f"of the GPU ({free_bytes / GIB:.1f} of {total_bytes / GIB:.1f} GiB free, {GPU_HEADROOM:.0%} kept back), "
            f"the weights take {weight_bytes / GIB:.1f} GiB, activations {activation_bytes / GIB:.1f} GiB and the "
            f"process {overhead_bytes / GIB:.1f} GiB, which leaves no KV cache. Run fewer workers or a smaller model, "
            "or set pools.<pool>.num_gpus and engine.kv_cache_memory_gb yourself")
    return math.floor(kv * 100) / 100


def split_line(asks: dict[str, PoolAsk], kv_gib: dict[str, float], free_bytes: int, total_bytes: int,
               weight_bytes: int) -> str:
    """The one line a user sees for a GPU split."""
    parts = ", ".join(f"{k} num_gpus={asks[k].num_gpus:g} KV {v:.2f} GiB" for k, v in kv_gib.items())
    return (f"pdserve: sharing the GPU: {parts} (GPU {free_bytes / GIB:.1f} of {total_bytes / GIB:.1f} GiB free, "
            f"weights {weight_bytes / GIB:.2f} GiB per engine; set engine.kv_cache_memory_gb to choose)")


# ---- Ray: what the cluster has, and a bounded wait for an actor ----------------------------------------

def cluster_view(available: bool = False):
    """(total, nodes, available or None): ray.cluster_resources(), each alive node's resources."""
    import ray
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes, (dict(ray.available_resources()) if available else None)


def actor_placed(handle) -> bool | None:
    """Whether Ray has given the actor a worker process (its constructor may still be
    loading the model). Ray reports PENDING_CREATION both while it waits for resources and
    while the constructor runs; only the latter has a worker pid. None: cannot tell."""
    try:
        from ray._private import state   # GCS lookup; the public state API needs the dashboard
        info = state.actors(handle._actor_id.hex())
    except Exception as e:
        log.debug("actor state lookup failed: %s", e)
        return None
    if not info:
        return None
    if info.get("State") in ("ALIVE", "RESTARTING", "DEAD"):
        return True   # (DEAD: its pending call raises and says why)
    return bool(info.get("Pid"))


async def wait_started(awaitable, name: str, timeout_s: float, placed, describe, progress_s: float = 30.0):
    """Await an actor's first call (its endpoints). If the actor is still not placed after
    timeout_s, raise PlacementError(describe()); once placed (loading a model can take
    minutes) wait on, with a log line every progress_s."""
    fut = asyncio.ensure_future(awaitable)
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        now = time.monotonic()
        wait = deadline - now if now < deadline else progress_s
        done, _ = await asyncio.wait({fut}, timeout=max(wait, 0.0))
        if done:
            return fut.result()
        elapsed = time.monotonic() - start
        p = placed()
        if p is False and elapsed >= timeout_s:
            fut.cancel()
            raise PlacementError(f"{name} was not placed within {timeout_s:g} s: {describe()}")
        if p is None:
            log.warning("%s: not started after %.0f s (Ray does not say whether it is placed)", name, elapsed)
        else:
            log.info("%s: placed, still starting (model load) after %.0f s", name, elapsed)
