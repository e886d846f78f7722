"""Issue 15, part 4: what the planner recommends for Llama-3-8B and a Llama-3-70B shape on 8
and 64 H100s, for a chat and a RAG workload, under TTFT <= 1 s and TPOT <= 40 ms.

    .venv/bin/python benchmarks/plan_scenarios.py [--jobs 2] [--requests 1500] [--max-requests 8000] \\
        [--out benchmarks/data/plan_scenarios] [--no-what-ifs]
    .venv/bin/python benchmarks/plan_scenarios.py --from-json benchmarks/data/plan_scenarios.json

writes <out>.json (every simulated point) and <out>.md (the tables docs/PLANNING.md quotes)
and prints the summary; --from-json rebuilds the answers and tables from a saved run, with
the diagnostics (refused share, peak decode batch) simulated again. Each answer names the
raw best (highest sustained rate per GPU), the best within what the profile measured (decode
batches <= max_num_seqs, <= 1% refused), and the best of each mode. Everything goes through the planner's public API: CostModel.load and
CostModel.scaled (a profile extrapolated to another shape and tensor parallelism; the factors
are computed from the two shapes below), ClusterConfig and simulate, deploy.bench.summarise.

The simulator knows engines, not GPUs: an engine of tensor parallelism tp is one simulated
engine standing for tp GPUs, so a budget of G GPUs holds G // tp engines and every per-GPU
figure here divides by engines x tp, as plan.py's goodput_rps_per_gpu does
(plan.gpus_of: CostModel.gpus_per_engine, which scaled() sets to tp).

What is assumed (each figure is in ASSUMPTIONS and in the JSON) is a model, not a measurement:
the profile is one Llama-3-8B engine on one H100 at tp = 1; pdserve has no tensor-parallel
engine, so a tp > 1 engine is the profile rescaled by scaled()'s rules plus the all-reduce
and KV-transfer figures below.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from planner.costmodel import CostModel, ImplausibleTransferFit  # noqa: E402
from planner.simulator import ClusterConfig, Simulation, simulate  # noqa: E402
from planner.workload import WorkloadSpec, requests  # noqa: E402

PROFILE = os.path.join(ROOT, "benchmarks", "data", "profile_h100_llama3-8b.json")
GPUS_PER_NODE = 8
BUDGETS = (8, 64)


# ---- model shapes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 128
    dtype_bytes: int = 2          # bf16 weights and KV

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h   # qkv, o, gate/up/down, 2 norms

    @property
    def linear_params(self) -> int:
        """Parameters every prompt token multiplies through (not the embedding table; the
        LM head only for the sampled positions)."""
        return self.num_layers * self.layer_params + self.hidden

    @property
    def num_params(self) -> int:
        return self.linear_params + 2 * self.vocab * self.hidden     # untied embedding and LM head

    @property
    def read_params(self) -> int:
        """Parameters a decode step reads: every layer and the LM head (the embedding table
        only in the rows looked up)."""
        return self.linear_params + self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_dims(self) -> int:
        return self.num_layers * self.num_heads * self.head_dim


LLAMA3_8B = Shape("llama3-8b", 32, 4096, 32, 8, 14336, 128256)
LLAMA3_70B = Shape("llama3-70b", 80, 8192, 64, 8, 28672, 128256)
MODELS = {"llama3-8b": (LLAMA3_8B, (1, 2)), "llama3-70b": (LLAMA3_70B, (4, 8))}


# ---- assumptions --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """The KV transfer path between a prefill and a decode engine: each of an engine's tp
    shards moves its share over its own link (per_gpu=True) or one stream carries it all."""
    name: str
    bytes_per_s: float
    latency_s: float
    per_gpu: bool = True

    def engine_bytes_per_s(self, tp: int) -> float:
        return self.bytes_per_s * (tp if self.per_gpu else 1)


# pdserve's cuda_ipc backend end to end, 512 MiB between two processes on one H100
# (benchmarks/data/kv_ipc_h100.json: 42.8 GB/s, its control path is the limit, not NVLink);
# latency assumed (the measured TTFT over in-place prefill was +12..17 ms at 1k..8k tokens).
INTRA_NODE = Link("cuda_ipc within a node (NVLink)", 42.8e9, 5e-3)
# The nccl backend GPU to GPU across nodes over InfiniBand/RoCE with GPUDirect RDMA: half of a
# 400 Gb/s NIC per GPU (not measured: pdserve has not run across nodes).
INTER_NODE = Link("nccl across nodes (InfiniBand, 400 Gb/s NIC per GPU)", 25e9, 5e-3)
# What-if: host-staged ZeroMQ over TCP, one stream per engine, at the rate measured on one
# H100 host's loopback (benchmarks/data/kv_ipc_h100.json transfer_zmq: 5.9 GB/s).
ZMQ_TCP = Link("zmq over TCP, one stream per engine", 5.9e9, 5e-3, per_gpu=False)

ASSUMPTIONS = dict(
    allreduce_bus_bytes_per_s=400e9,      # NCCL all-reduce bus bandwidth within an H100 node (NVLink 4, NVSwitch)
    allreduce_latency_s=15e-6,            # per all-reduce (small messages, NCCL on NVLink)
    allreduces_per_layer=2,               # attention output and MLP down projections (Megatron-style TP)
    host_scales_with_layers=True,         # eager launches are per layer (see build_cost)
    kv_memory_fraction_source="the profile's engine: weights + KV pool per GPU as measured at tp=1",
)
HOST_COEFFICIENTS = ("graph_host_s", "eager_host_s", "mixed_host_s", "prefill_seq_s")

WORKLOADS = {
    "chat": WorkloadSpec(prompt_min=64, prompt_max=1024, output_min=64, output_max=512),
    "rag": WorkloadSpec(prompt_min=3500, prompt_max=4500, output_min=200, output_max=200),
}
THRESHOLDS = {"chat": (256, 512, 768), "rag": (3750, 4000, 4250)}
SLO = dict(ttft_s=1.0, tpot_s=0.040, attainment=0.9)


# ---- accounting: engines and GPUs ------------------------------------------------------------------------
def engines_for(budget_gpus: int, tp: int) -> int:
    """Engines of tp GPUs each that a budget holds (whole engines only)."""
    if tp < 1 or budget_gpus < 1:
        raise ValueError("budget and tp must be >= 1")
    return budget_gpus // tp


def gpus_of(cfg: ClusterConfig, tp: int, replicas: int = 1) -> int:
    """GPUs a configuration occupies: every engine (prefill and decode) is tp GPUs;
    `replicas` copies of it (node-local units replicated across a larger budget)."""
    return (cfg.decode + cfg.prefill) * tp * replicas


def per_gpu(rate: float, cfg: ClusterConfig, tp: int, replicas: int = 1) -> float:
    """A cluster-wide rate (of one unit, times replicas) per GPU: rate x replicas / GPUs."""
    return rate * replicas / gpus_of(cfg, tp, replicas)


def kv_blocks(base: CostModel, shape: Shape, tp: int) -> int:
    """KV blocks an engine of tp GPUs holds: each GPU keeps for its weight shard and KV shard
    what the profiled engine kept for its weights and KV pool; 0 if the weights do not fit."""
    src_w = LLAMA3_8B.weight_bytes
    per_gpu_bytes = src_w + base.num_kv_blocks * base.block_size * base.kv_bytes_per_token
    kv_bytes = tp * per_gpu_bytes - shape.weight_bytes
    if kv_bytes <= 0:
        return 0
    return int(kv_bytes // (shape.kv_bytes_per_token * base.block_size))


def allreduce_costs(shape: Shape, tp: int, a: dict = ASSUMPTIONS) -> tuple[float, float]:
    """(seconds per step, seconds per token) of tensor parallelism's all-reduces: a ring
    all-reduce of b bytes takes 2 (tp-1)/tp x b / bus bandwidth plus a latency, and each token
    all-reduces hidden x dtype bytes twice a layer."""
    if tp == 1:
        return 0.0, 0.0
    n = a["allreduces_per_layer"] * shape.num_layers
    per_token = n * 2 * (tp - 1) / tp * shape.hidden * shape.dtype_bytes / a["allreduce_bus_bytes_per_s"]
    return n * a["allreduce_latency_s"], per_token


# ---- cost models ----------------------------------------------------------------------------------------------
_BASE: dict[str, CostModel] = {}


def load_base(path: str = PROFILE) -> CostModel:
    if path not in _BASE:
        with warnings.catch_warnings():
            # The profile's device_copy transfer points are flat in bytes (docs/PLANNING.md): the
            # transfer line is replaced by a Link in every scenario, so the warning is moot here.
            warnings.simplefilter("ignore", ImplausibleTransferFit)
            _BASE[path] = CostModel.load(path)
    return _BASE[path]


def build_cost(shape: Shape, tp: int, link: Link, *, scale_host: bool = True, max_num_seqs: int | None = None,
               base: CostModel | None = None) -> tuple[CostModel | None, dict]:
    """The profiled Llama-3-8B engine rescaled to `shape` on tp GPUs (CostModel.scaled), with
    the KV transfer over `link`; None when the weights leave no KV room. Two adjustments on
    top of scaled()'s rules, both in the returned info:
      - host launch costs (the *_host_s coefficients) times the layer ratio when scale_host:
        pdserve's prefill steps launch their kernels eagerly, layer by layer (scaled() keeps
        them as measured);
      - the all-reduces' per-token cost also on decode tokens in the weight-read branch
        (decode_seq_s): scaled() adds comm_s_per_token to per_token_s only, which a decode
        step's max(weight read, compute) hides, while the all-reduce does not overlap the read."""
    base = base or load_base()
    src = LLAMA3_8B
    blocks = kv_blocks(base, shape, tp)
    info = dict(model=shape.name, tp=tp, link=asdict(link), num_kv_blocks=blocks,
                kv_tokens_per_engine=blocks * base.block_size, weight_gb=shape.weight_bytes / 1e9)
    if blocks * base.block_size < 8192:      # not even one max_model_len sequence
        info["infeasible"] = "weights leave no KV room"
        return None, info
    comm_step, comm_token = allreduce_costs(shape, tp)
    factors = dict(weight_bytes_factor=shape.read_params / src.read_params,
                   flops_factor=shape.linear_params / src.linear_params,
                   attention_factor=shape.attention_dims / src.attention_dims,
                   kv_bytes_factor=shape.kv_bytes_per_token / src.kv_bytes_per_token)
    cost = base.scaled(factors["weight_bytes_factor"], factors["flops_factor"], tp,
                       attention_factor=factors["attention_factor"], kv_bytes_factor=factors["kv_bytes_factor"],
                       comm_s_per_step=comm_step, comm_s_per_token=comm_token,
                       transfer_bytes_per_s=link.engine_bytes_per_s(tp), transfer_latency_s=link.latency_s,
                       num_kv_blocks=blocks, name=f"{shape.name} tp={tp}")
    layer_ratio = shape.num_layers / src.num_layers
    p = copy.deepcopy(cost.profile)
    coef = p["fit"]["coefficients"]
    adjusted = {}
    if scale_host and layer_ratio != 1.0:
        for k in HOST_COEFFICIENTS:
            if coef.get(k):
                coef[k] *= layer_ratio
                adjusted[k] = f"x{layer_ratio:g} (layers)"
    if comm_token and "decode_seq_s" in coef:
        coef["decode_seq_s"] += comm_token
        adjusted["decode_seq_s"] = f"+{comm_token:.3g} s (all-reduce bytes per decode token)"
    if max_num_seqs is not None:
        p["engine"]["max_num_seqs"] = int(max_num_seqs)
        adjusted["max_num_seqs"] = int(max_num_seqs)
    if adjusted:
        cost = CostModel.from_profile(p)
    info.update(form=cost.form, factors=factors, comm_s_per_step=comm_step, comm_s_per_token=comm_token,
                adjusted=adjusted, coefficients=dict(cost.coefficients),
                transfer_bytes_per_s=cost.transfer_bytes_per_s, transfer_latency_s=cost.transfer_latency_s,
                max_num_seqs=cost.max_num_seqs, max_num_batched_tokens=cost.max_num_batched_tokens,
                prefill_4096_s=cost.prefill_time(4096), prefill_512_s=cost.prefill_time(512),
                decode_step_128x1024_s=cost.step_time([], [1024] * 128),
                decode_step_128x4200_s=cost.step_time([], [4200] * 128),
                transfer_4096_s=cost.transfer_time(4096))
    return cost, info


# ---- scenarios ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """A pool the simulator runs: `engines` engines of tp GPUs under one router, KV moving over
    `link`; `replicas` copies of it make up the budget (node-local units)."""
    model: str
    tp: int
    budget: int
    workload: str
    placement: str                 # "node" (a pool within one node) | "cross-node" (a pool spanning nodes)
    link: Link
    replicas: int = 1
    scale_host: bool = True
    max_num_seqs: int | None = None
    tpot_slo: float = SLO["tpot_s"]
    spec: WorkloadSpec | None = None   # overrides WORKLOADS[workload] (what-ifs)
    tag: str = ""

    @property
    def engines(self) -> int:
        return engines_for(self.budget // self.replicas, self.tp)

    @property
    def key(self) -> str:
        return (f"{self.model}|tp{self.tp}|{self.budget}|{self.workload}|{self.placement}"
                + (f"|{self.tag}" if self.tag else ""))

    def workload_spec(self) -> WorkloadSpec:
        return self.spec or WORKLOADS[self.workload]


def scenarios() -> list[Scenario]:
    out = []
    for model, (shape, tps) in MODELS.items():
        for tp in tps:
            for wl in WORKLOADS:
                # 8 GPUs: one node; 64 GPUs as 8 copies of it (every transfer stays in its node).
                out.append(Scenario(model, tp, GPUS_PER_NODE, wl, "node", INTRA_NODE))
                if tp * 2 >= GPUS_PER_NODE:
                    # Engines of half a node or more: a node holds at most 2, so 64 GPUs also as
                    # pools of 8 engines spanning nodes (64 / (8 tp) of them), transfers crossing nodes.
                    out.append(Scenario(model, tp, 64, wl, "cross-node", INTER_NODE, replicas=64 // (8 * tp)))
    return out


def split_candidates(engines: int) -> list[int]:
    """Prefill engine counts to try: every split up to 4 engines, else P/E near 1/8 .. 5/8."""
    if engines < 2:
        return []
    if engines <= 4:
        return list(range(1, engines))
    return sorted({min(engines - 1, max(1, round(engines * f / 8))) for f in (1, 2, 3, 4, 5)})


# ---- simulation and the rate search -------------------------------------------------------------------------
_COSTS: dict = {}


def cost_for(sc: Scenario) -> CostModel | None:
    k = (sc.model, sc.tp, sc.link, sc.scale_host, sc.max_num_seqs)
    if k not in _COSTS:
        _COSTS[k] = build_cost(MODELS[sc.model][0], sc.tp, sc.link, scale_host=sc.scale_host,
                               max_num_seqs=sc.max_num_seqs)
    return _COSTS[k][0]


POLITE = True


def wait_for_measurements(pattern: str = "pdserve (profile|bench)", poll_s: float = 30.0) -> None:
    """Pause while a measurement (pdserve profile or bench) runs on this machine: simulations
    would perturb its timings."""
    while POLITE:
        try:
            busy = subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0
        except OSError:
            return
        if not busy:
            return
        time.sleep(poll_s)


def evaluate(cost: CostModel, cfg: ClusterConfig, spec: WorkloadSpec, rate: float, n: int, seed: int,
             tpot_slo: float) -> dict:
    from deploy.bench import summarise
    wait_for_measurements()
    recs, sim = simulate(cost, cfg, requests(spec, n, rate, seed))
    s = summarise(recs, SimpleNamespace(ttft_slo=SLO["ttft_s"], tpot_slo=tpot_slo))
    pick = lambda d, q: (d or {}).get(q)   # noqa: E731
    return dict(rate=rate, attainment=s.get("slo_attainment", 0.0), goodput_rps=s.get("goodput_rps", 0.0),
                ttft_p50=pick(s.get("ttft_s"), "p50"), ttft_p90=pick(s.get("ttft_s"), "p90"),
                tpot_p50=pick(s.get("tpot_s"), "p50"), tpot_p90=pick(s.get("tpot_s"), "p90"),
                disaggregated=s.get("disaggregated", 0) / max(1, s.get("requests", n)),
                errors=s.get("errors", 0), preemptions=sum(w.engine.num_preemptions
                                                           for w in sim.decode_workers.values()))


def capacity_guess(cost: CostModel, cfg: ClusterConfig, spec: WorkloadSpec) -> float:
    """A rough request rate the configuration serves (the rate search's first point)."""
    p_in = (spec.prompt_min + spec.prompt_max) / 2
    out = (spec.output_min + spec.output_max) / 2
    b = cost.max_num_seqs
    step = cost.step_time([], [int(p_in + out / 2)] * b)
    batch = b
    while batch > 8 and step > 0.8 * SLO["tpot_s"]:          # TPOT caps the batch
        batch = int(batch * 0.8)
        step = cost.step_time([], [int(p_in + out / 2)] * batch)
    decode = batch / (out * step)
    prefill = 1.0 / cost.prefill_time(int(p_in))
    if cfg.mode == "colocated":
        return cfg.decode / (1 / prefill + 1 / decode)
    return min(cfg.prefill * prefill, cfg.decode * decode) * 1.2


def mean_e2e_guess(cost: CostModel, spec: WorkloadSpec, tpot_s: float) -> float:
    """A request's E2E at a full decode batch, at most the TPOT bound: how long a run must
    last to fill the batches."""
    out = (spec.output_min + spec.output_max) / 2
    p_in = (spec.prompt_min + spec.prompt_max) / 2 + (spec.prefix_len if spec.workload == "shared-prefix" else 0)
    step = cost.step_time([], [int(p_in + out / 2)] * cost.max_num_seqs)
    return cost.prefill_time(int(p_in)) + out * min(step, tpot_s)


def run_requests(rate: float, seconds: float, n_min: int, n_max: int) -> int:
    """Requests for a run of about `seconds` of arrivals at `rate`, within [n_min, n_max]."""
    return max(n_min, min(n_max, int(round(rate * seconds))))


def search(sc: Scenario, cfg: ClusterConfig, n: int, seed: int, precision: float, guess: float | None = None,
           n_max: int = 8000, coarse_s: float = 8.0, fine_s: float = 20.0) -> dict:
    """The highest rate (within `precision`, relative) at which >= SLO attainment of the
    requests meet both SLOs. Coarse to fine: geometric bracketing from a guess and bisection to
    10% on short runs (about coarse_s seconds of arrivals, at least n requests), then on long
    ones (max(fine_s, 4 x a request's E2E) seconds, at most n_max requests) from the coarse
    bracket down: a short run is optimistic (the decode batches are still filling, a backlog
    has had little time to grow), so the coarse pass bounds the rate from above. The same seed
    at every rate: the same lengths, arrivals scaled by the rate (a longer run extends a
    shorter one)."""
    cost = cost_for(sc)
    spec = sc.workload_spec()
    fine_s = max(fine_s, 4 * mean_e2e_guess(cost, spec, sc.tpot_slo))
    points: dict[tuple[float, int], dict] = {}
    t0 = time.perf_counter()

    def ok(rate, seconds):
        k = (rate, run_requests(rate, seconds, n, n_max))
        if k not in points:
            points[k] = dict(evaluate(cost, cfg, spec, rate, k[1], seed, sc.tpot_slo), requests=k[1])
        return points[k]["attainment"] >= SLO["attainment"]

    def bisect(lo, hi, seconds, until):
        while lo > 0 and hi / lo > 1 + until:
            mid = float(f"{math.sqrt(lo * hi):.4g}")
            if mid in (lo, hi):
                break
            if ok(mid, seconds):
                lo = mid
            else:
                hi = mid
        return lo, hi

    r = float(f"{guess or capacity_guess(cost, cfg, spec):.3g}")
    step = 1.5
    floor = r / 300
    if ok(r, coarse_s):
        lo, hi = r, None
        while hi is None:
            nxt = float(f"{lo * step:.3g}")
            if ok(nxt, coarse_s):
                lo = nxt
            else:
                hi = nxt
    else:
        hi, lo = r, None
        while lo is None:
            nxt = float(f"{hi / step:.3g}")
            if nxt < floor:
                lo = 0.0
            elif ok(nxt, coarse_s):
                lo = nxt
            else:
                hi = nxt
    lo, hi = bisect(lo, hi, coarse_s, 0.10)
    # Fine: long runs, from the coarse pass's bracket downwards.
    while lo > 0 and not ok(lo, fine_s):
        hi, lo = lo, float(f"{lo / 1.1:.4g}")
        if lo < floor:
            lo = 0.0
    lo, hi = bisect(lo, hi, fine_s, precision)
    fine_n = run_requests(lo, fine_s, n, n_max) if lo else None
    at = points.get((lo, fine_n)) if lo else None
    pts = [points[k] for k in sorted(points)]
    return dict(scenario=sc.key, config=cfg.name, mode=cfg.mode, prefill=cfg.prefill, decode=cfg.decode,
                threshold=cfg.threshold if cfg.mode == "conditional" else None, tp=sc.tp,
                engines=cfg.decode + cfg.prefill, replicas=sc.replicas, gpus=gpus_of(cfg, sc.tp, sc.replicas),
                sustained_rate=lo * sc.replicas, unit_rate=lo, failed_rate=hi * sc.replicas,
                rate_per_gpu=per_gpu(lo, cfg, sc.tp, sc.replicas),
                goodput_per_gpu=per_gpu(at["goodput_rps"], cfg, sc.tp, sc.replicas) if at else 0.0,
                run_seconds=fine_s, at_sustained=at, points=pts, sim_seconds=time.perf_counter() - t0)


def _search_task(args):
    sc, cfg, n, seed, precision, guess, run = args
    return search(sc, cfg, n, seed, precision, guess, **run)


def configs_stage1(sc: Scenario) -> list[ClusterConfig]:
    e = sc.engines
    return [ClusterConfig("colocated", decode=e)] + [ClusterConfig("disaggregated", decode=e - p, prefill=p)
                                                     for p in split_candidates(e)]


def next_split(sc: Scenario, stage1: list[dict]) -> int | None:
    """The prefill count to try next when the best disaggregated split so far has the most
    (or fewest) prefill engines tried and a split beyond it exists; else None."""
    dis = [r for r in stage1 if r["mode"] == "disaggregated"]
    if not dis:
        return None
    tried = {r["prefill"] for r in dis}
    bestp = max(dis, key=lambda r: (r["sustained_rate"], -r["prefill"]))["prefill"]
    if bestp == max(tried) and bestp + 1 < sc.engines:
        return bestp + 1
    if bestp == min(tried) and bestp - 1 >= 1:
        return bestp - 1
    return None


def configs_stage2(sc: Scenario, stage1: list[dict]) -> list[ClusterConfig]:
    """Conditional disaggregation at each threshold on the best disaggregated split and the
    one with one prefill engine fewer (keeping short prompts local needs fewer); none for
    tp=2 Llama-3-8B engines (a side option, kept cheap)."""
    dis = [r for r in stage1 if r["mode"] == "disaggregated"]
    if not dis or (sc.model == "llama3-8b" and sc.tp > 1):
        return []
    bestp = max(dis, key=lambda r: (r["sustained_rate"], -r["prefill"]))["prefill"]
    e = sc.engines
    return [ClusterConfig("conditional", decode=e - p, prefill=p, threshold=t)
            for p in sorted({bestp, max(1, bestp - 1)}) for t in THRESHOLDS[sc.workload]]


def run_all(scs: list[Scenario], n: int, seed: int, precision: float, jobs: int, log=print,
            stage2: bool = True, run: dict | None = None) -> dict[str, list[dict]]:
    """Every scenario's configurations searched: stage 1 (colocated, disaggregated splits),
    then stage 2 (conditional around the best split)."""
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    imap = pool.imap_unordered if pool else map
    results: dict[str, list[dict]] = {sc.key: [] for sc in scs}
    by_key = {sc.key: sc for sc in scs}

    def batch(tasks):
        for r in imap(_search_task, tasks):
            results[r["scenario"]].append(r)
            log(f"  {r['scenario']:<40} {r['config']:<16} sustains {r['sustained_rate']:8.3g} req/s "
                f"({r['rate_per_gpu']:.3g}/GPU; {len(r['points'])} sims, {r['sim_seconds']:.0f}s)")
    try:
        batch([(sc, cfg, n, seed, precision, None, run or {}) for sc in scs if cost_for(sc) is not None
               for cfg in configs_stage1(sc)])
        # A best split at the edge of the candidates: try the next one out, until one is not better.
        while True:
            tasks = []
            for key, rs in results.items():
                sc = by_key[key]
                nxt = next_split(sc, rs)
                if nxt is not None:
                    guess = max(r["unit_rate"] for r in rs if r["mode"] == "disaggregated") or None
                    tasks.append((sc, ClusterConfig("disaggregated", decode=sc.engines - nxt, prefill=nxt), n, seed,
                                  precision, guess, run or {}))
            if not tasks:
                break
            batch(tasks)
        if stage2:
            tasks = []
            for key, rs in results.items():
                sc = by_key[key]
                guess = max((r["unit_rate"] for r in rs if r["mode"] == "disaggregated"), default=None)
                tasks += [(sc, cfg, n, seed, precision, guess or None, run or {}) for cfg in configs_stage2(sc, rs)]
            batch(tasks)
    finally:
        if pool:
            pool.close()
            pool.join()
    return results


# ---- choosing -------------------------------------------------------------------------------------------------------
def rank_key(r: dict):
    """Highest sustained rate per GPU, then goodput per GPU there, then fewer prefill engines."""
    return (r["rate_per_gpu"], r["goodput_per_gpu"], -r["prefill"])


def label(r: dict) -> str:
    if r["mode"] == "colocated":
        s = f"colocated x{r['engines']}"
    elif r["mode"] == "disaggregated":
        s = f"{r['prefill']}P{r['decode']}D"
    else:
        s = f"{r['prefill']}P{r['decode']}D t={r['threshold']}"
    s += f", tp={r['tp']}"
    if r["replicas"] > 1:
        s = f"{r['replicas']} x ({s})"
    return s


def summarise_answers(results: dict[str, list[dict]], scs: list[Scenario]) -> list[dict]:
    """One answer per (model, budget, workload): the best configuration over every tp and
    placement, and the best of each mode. 64-GPU node-placed answers are 8 copies of the
    8-GPU node's (the same rows with replicas=8)."""
    rows = []
    by = {}
    for sc in scs:
        for r in results.get(sc.key, []):
            by.setdefault((sc.model, sc.budget, sc.workload), []).append((sc, r))
            if sc.placement == "node" and sc.budget == GPUS_PER_NODE:
                rep = 64 // GPUS_PER_NODE
                r64 = dict(r, replicas=rep, gpus=r["gpus"] * rep, sustained_rate=r["unit_rate"] * rep,
                           failed_rate=r["failed_rate"] * rep, scenario=r["scenario"] + " x8 nodes")
                by.setdefault((sc.model, 64, sc.workload), []).append((replace(sc, budget=64, replicas=rep), r64))
    for (model, budget, wl), items in sorted(by.items(), key=lambda kv: (list(MODELS).index(kv[0][0]), kv[0][1],
                                                                          kv[0][2])):
        rs = [dict(r, placement=sc.placement, link=sc.link.name) for sc, r in items]
        best = max(rs, key=rank_key)
        per_mode = {m: max((r for r in rs if r["mode"] == m), key=rank_key, default=None)
                    for m in ("colocated", "disaggregated", "conditional")}
        robust = max((r for r in rs if within_measured(r)), key=rank_key, default=None)
        rows.append(dict(model=model, budget=budget, workload=wl, best=best, per_mode=per_mode,
                         best_within_measured=robust))
    return rows


# ---- what-ifs -------------------------------------------------------------------------------------------------------
def what_ifs(answers: list[dict], scs: list[Scenario]) -> list[tuple[str, Scenario, ClusterConfig, dict]]:
    """(what-if name, changed scenario, configuration, baseline result): the best colocated and
    the best disaggregated-or-conditional configuration of chosen answers, re-searched under
    one change each."""
    by_key = {sc.key: sc for sc in scs}
    out = []

    def answer(model, budget, wl):
        return next(a for a in answers if (a["model"], a["budget"], a["workload"]) == (model, budget, wl))

    def contenders(a):
        cs = [a["per_mode"]["colocated"]]
        split = [r for r in (a["per_mode"]["disaggregated"], a["per_mode"]["conditional"]) if r]
        if split:
            cs.append(max(split, key=rank_key))
        return [c for c in cs if c]

    def cfg_of(r):
        return ClusterConfig(r["mode"], decode=r["decode"], prefill=r["prefill"],
                             threshold=r["threshold"] if r["threshold"] is not None else 256)

    def base_sc(r):
        return by_key[r["scenario"].replace(" x8 nodes", "")]

    long_chat = WorkloadSpec(prompt_min=64, prompt_max=1024, output_min=512, output_max=2048)
    shared_rag = WorkloadSpec(workload="shared-prefix", prompt_min=500, prompt_max=1500, output_min=200,
                              output_max=200, prefix_len=3000, num_prefixes=8)
    plan = [
        ("TPOT <= 25 ms", ("llama3-8b", 8, "rag"), dict(tpot_slo=0.025)),
        ("TPOT <= 25 ms", ("llama3-70b", 64, "rag"), dict(tpot_slo=0.025)),
        ("outputs 512-2048", ("llama3-8b", 8, "chat"), dict(spec=long_chat)),
        ("outputs 512-2048", ("llama3-70b", 64, "chat"), dict(spec=long_chat)),
        ("RAG with a shared 3000-token prefix (8 prefixes)", ("llama3-8b", 8, "rag"), dict(spec=shared_rag)),
        ("RAG with a shared 3000-token prefix (8 prefixes)", ("llama3-70b", 64, "rag"), dict(spec=shared_rag)),
        ("KV over zmq/TCP, 5.9 GB/s per engine", ("llama3-70b", 64, "rag"), dict(link=ZMQ_TCP)),
        ("KV over zmq/TCP, 5.9 GB/s per engine", ("llama3-8b", 8, "rag"), dict(link=ZMQ_TCP)),
        ("host launch costs as measured (not x layers)", ("llama3-70b", 64, "chat"), dict(scale_host=False)),
        ("host launch costs as measured (not x layers)", ("llama3-70b", 64, "rag"), dict(scale_host=False)),
        ("max_num_seqs 256", ("llama3-70b", 64, "chat"), dict(max_num_seqs=256)),
    ]
    for name, (model, budget, wl), change in plan:
        try:
            a = answer(model, budget, wl)
        except StopIteration:
            continue
        for r in contenders(a):
            sc = replace(base_sc(r), tag=name, **change)
            if sc.placement == "node":       # the 8-GPU node, alone or as one of 8 copies
                sc = replace(sc, replicas=r["replicas"], budget=GPUS_PER_NODE * r["replicas"])
            out.append((name, sc, cfg_of(r), r))
    return out


def run_what_ifs(items, n, seed, precision, jobs, log=print, run: dict | None = None) -> list[dict]:
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    imap = pool.imap if pool else map
    out = []
    try:
        tasks = [(sc, cfg, n, seed, precision, base["unit_rate"] or None, run or {}) for _, sc, cfg, base in items]
        for (name, sc, cfg, base), r in zip(items, imap(_search_task, tasks)):
            out.append(dict(what_if=name, model=sc.model, budget=sc.budget, workload=sc.workload,
                            config=label(dict(r, replicas=sc.replicas)), baseline_rate=base["sustained_rate"],
                            baseline_per_gpu=base["rate_per_gpu"], rate=r["sustained_rate"],
                            rate_per_gpu=r["rate_per_gpu"], at_sustained=r["at_sustained"], mode=r["mode"]))
            log(f"  what-if {name}: {sc.model} {sc.budget} {sc.workload} {out[-1]['config']}: "
                f"{base['sustained_rate']:.3g} -> {r['sustained_rate']:.3g} req/s")
    finally:
        if pool:
            pool.close()
            pool.join()
    return out


# ---- diagnostics -----------------------------------------------------------------------------------------------------
def peak_decode_batch(sc: Scenario, r: dict, seed: int) -> int | None:
    """The largest decode batch any decode engine ran in the result's run at its sustained
    rate (re-simulated; the step pricing is wrapped to count decoded sequences). A
    disaggregated decode engine's batch stays within max_num_seqs now (a landed prompt waits
    for a slot, as engine/scheduler.py's remote_kv_landed does); results computed before
    that change could show batches up to the router's in-flight cap (256)."""
    at = r.get("at_sustained")
    if not at:
        return None
    cfg = ClusterConfig(r["mode"], decode=r["decode"], prefill=r["prefill"],
                        threshold=r["threshold"] if r["threshold"] is not None else 256)
    sim = Simulation(cost_for(sc), cfg, requests(sc.workload_spec(), at["requests"], r["unit_rate"], seed))
    price, peak = sim.step_parts, [0]

    def counted(chunks, contexts):
        peak[0] = max(peak[0], len(contexts))
        return price(chunks, contexts)
    sim.step_parts = counted
    sim.run()
    return peak[0]


def _peak_task(args):
    sc, r, seed = args
    return peak_decode_batch(sc, r, seed)


def add_diagnostics(results: dict[str, list[dict]], scs: list[Scenario], seed: int, jobs: int = 1) -> None:
    """Every searched configuration at its sustained rate: the share of requests the router
    refused (admission control; counted as missing the SLOs) and the peak decode batch."""
    by_key = {sc.key: sc for sc in scs}
    rows = [(by_key[key], r) for key, rs in results.items() if key in by_key for r in rs]
    for sc, r in rows:
        cost_for(sc)                      # built before the workers fork
        at = r.get("at_sustained") or {}
        r["refused_share"] = at.get("errors", 0) / at["requests"] if at.get("requests") else None
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    try:
        peaks = (pool.map if pool else lambda f, xs: list(map(f, xs)))(_peak_task, [(sc, r, seed) for sc, r in rows])
    finally:
        if pool:
            pool.close()
            pool.join()
    for (sc, r), peak in zip(rows, peaks):
        r["peak_decode_batch"] = peak
        r["max_num_seqs"] = cost_for(sc).max_num_seqs


def within_measured(r: dict) -> bool:
    """A result whose operating point the profile covers and that serves what it is sent: its
    decode batches stay within max_num_seqs (the largest batch profiled, and the engine's
    largest CUDA graph) and the router refused at most 1% of the requests."""
    peak, cap = r.get("peak_decode_batch"), r.get("max_num_seqs")
    return (peak is not None and cap is not None and peak <= cap
            and (r.get("refused_share") or 0.0) <= 0.01)


# ---- output ---------------------------------------------------------------------------------------------------------
def fmt_share(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def fmt_rate(r: dict | None) -> str:
    if not r:
        return "-"
    extra = []
    if r.get("refused_share"):
        extra.append(f"{r['refused_share']:.0%} refused")
    if r.get("peak_decode_batch") is not None:
        extra.append(f"batch <= {r['peak_decode_batch']}")
    return (f"{label(r)}: {r['sustained_rate']:.3g} req/s ({r['rate_per_gpu']:.3g}/GPU"
            + "".join(f"; {e}" for e in extra) + ")")


def markdown(answers: list[dict], results: dict, scs: list[Scenario], wi: list[dict], meta: dict) -> str:
    L = []
    L.append("| model | GPUs | workload | best configuration | max sustained req/s | req/s per GPU | "
             "goodput/GPU | TTFT p90 | TPOT p90 | refused | peak decode batch | best within the profile's batches, "
             "nothing refused | best colocated | best disaggregated | best conditional |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for a in answers:
        b = a["best"]
        at = b["at_sustained"] or {}
        model = "Llama-3-8B" if a["model"] == "llama3-8b" else "70B (Llama-3-70B shape)"
        L.append(f"| {model} | {a['budget']} | {a['workload']} | **{label(b)}**"
                 f"{' (cross-node KV)' if b.get('placement') == 'cross-node' else ''} | {b['sustained_rate']:.3g} | "
                 f"{b['rate_per_gpu']:.3g} | {b['goodput_per_gpu']:.3g} | "
                 f"{(at.get('ttft_p90') or float('nan')) * 1e3:.0f} ms | "
                 f"{(at.get('tpot_p90') or float('nan')) * 1e3:.1f} ms | "
                 f"{fmt_share(b.get('refused_share'))} | {b.get('peak_decode_batch', '-')} | "
                 f"{fmt_rate(a.get('best_within_measured'))} | "
                 + " | ".join(fmt_rate(a["per_mode"][m]) for m in ("colocated", "disaggregated", "conditional"))
                 + " |")
    L.append("")
    L.append("Every configuration searched (per pool; a 64-GPU node-placed answer is 8 copies of the "
             "8-GPU node's row):")
    L.append("")
    L.append("| pool | configuration | GPUs | sustained req/s | req/s per GPU | TTFT p90 | TPOT p90 | disaggregated | "
             "refused | peak decode batch | first failing req/s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for sc in scs:
        for r in sorted(results.get(sc.key, []), key=lambda r: -r["rate_per_gpu"]):
            at = r["at_sustained"] or {}
            L.append(f"| {sc.model} tp={sc.tp}, {sc.budget} GPUs, {sc.workload}, {sc.placement} | {r['config']} | "
                     f"{r['gpus']} | {r['sustained_rate']:.3g} | {r['rate_per_gpu']:.3g} | "
                     f"{(at.get('ttft_p90') or float('nan')) * 1e3:.0f} ms | "
                     f"{(at.get('tpot_p90') or float('nan')) * 1e3:.1f} ms | {at.get('disaggregated', 0):.0%} | "
                     f"{fmt_share(at.get('errors', 0) / at['requests'] if at.get('requests') else None)} | "
                     f"{r.get('peak_decode_batch', '-')} | {r['failed_rate']:.3g} |")
        cost = cost_for(sc)
        if cost is None:
            L.append(f"| {sc.model} tp={sc.tp}, {sc.budget} GPUs, {sc.workload} | infeasible: weights leave no "
                     "KV room | | | | | | | | | |")
    if wi:
        L.append("")
        L.append("What-ifs (one change each, the same configuration re-searched):")
        L.append("")
        L.append("| change | model, GPUs, workload | configuration | baseline req/s | with the change | per GPU |")
        L.append("|---|---|---|---|---|---|")
        for w in wi:
            L.append(f"| {w['what_if']} | {w['model']}, {w['budget']}, {w['workload']} | {w['config']} | "
                     f"{w['baseline_rate']:.3g} | {w['rate']:.3g} | {w['rate_per_gpu']:.3g} |")
    L.append("")
    L.append(f"Produced by `{meta['command']}` at commit {meta['commit']} in {meta['seconds']:.0f} s "
             f"({meta['requests']}-{meta['max_requests']} requests per simulation: about {meta['run_seconds']:g} s "
             f"of arrivals, or 4 request lifetimes, in the fine pass; rates searched to {meta['precision']:.0%}).")
    return "\n".join(L)


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "planner"], capture_output=True, cwd=ROOT,
                               text=True).stdout.strip()
        return rev + (" (planner/ with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1500, help="fewest requests per simulation")
    ap.add_argument("--max-requests", type=int, default=8000, help="most requests per simulation")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="arrivals a fine-pass run spans (at least 4 x a request's E2E), within the request bounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", type=float, default=0.05, help="relative width the rate search stops at")
    ap.add_argument("--jobs", type=int, default=2, help="processes")
    ap.add_argument("--out", default="benchmarks/data/plan_scenarios", help="writes OUT.json and OUT.md")
    ap.add_argument("--no-what-ifs", action="store_true")
    ap.add_argument("--impolite", action="store_true",
                    help="do not pause while a `pdserve profile` or `pdserve bench` runs on this machine")
    ap.add_argument("--only", default=None, help="run scenarios whose key contains this (e.g. llama3-8b|tp1)")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="no search: rebuild the answers, diagnostics and tables from an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        return rebuild(args)
    global POLITE
    POLITE = not args.impolite
    t0 = time.perf_counter()
    scs = [sc for sc in scenarios() if not args.only or args.only in sc.key]
    infos = {}
    for sc in scs:
        cost = cost_for(sc)
        info = _COSTS[(sc.model, sc.tp, sc.link, sc.scale_host, sc.max_num_seqs)][1]
        infos[f"{sc.model}|tp{sc.tp}|{sc.link.name}"] = info
        print(f"{sc.key}: {sc.engines} engines" + ("" if cost else f" -- {info.get('infeasible')}"))
    print("searching ...")
    run = dict(n_max=args.max_requests, fine_s=args.seconds)
    results = run_all(scs, args.requests, args.seed, args.precision, args.jobs, run=run)
    add_diagnostics(results, scs, args.seed, args.jobs)
    answers = summarise_answers(results, scs)
    wi = []
    if not args.no_what_ifs:
        print("what-ifs ...")
        wi = run_what_ifs(what_ifs(answers, scs), args.requests, args.seed, args.precision, args.jobs, run=run)
    meta = dict(command="python benchmarks/plan_scenarios.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                commit=git_commit(), seconds=time.perf_counter() - t0, requests=args.requests, seed=args.seed,
                max_requests=args.max_requests, run_seconds=args.seconds,
                precision=args.precision, profile=os.path.relpath(PROFILE, ROOT), slo=SLO, assumptions=ASSUMPTIONS,
                links={k: asdict(v) for k, v in dict(intra=INTRA_NODE, inter=INTER_NODE, zmq=ZMQ_TCP).items()},
                workloads={k: asdict(v) for k, v in WORKLOADS.items()}, thresholds=THRESHOLDS)
    md = markdown(answers, results, scs, wi, meta)
    print(md)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, cost_models=infos, answers=answers, results=results, what_ifs=wi), f, indent=1,
                  default=str)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    print(f"wrote {args.out}.json, {args.out}.md ({time.perf_counter() - t0:.0f} s)")
    return 0


def rebuild(args) -> int:
    """The answers, their diagnostics (refusals, peak decode batch) and the tables from a saved
    run: its searches are kept, nothing but the diagnostics is simulated again."""
    with open(args.from_json) as f:
        saved = json.load(f)
    results, wi, meta = saved["results"], saved.get("what_ifs", []), saved["meta"]
    scs = [sc for sc in scenarios() if sc.key in results]
    add_diagnostics(results, scs, meta.get("seed", args.seed), args.jobs)
    answers = summarise_answers(results, scs)
    meta["rebuilt"] = f"tables and diagnostics rebuilt with --from-json at commit {git_commit()}"
    md = markdown(answers, results, scs, wi, meta)
    print(md)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(saved, meta=meta, answers=answers), f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    print(f"wrote {args.out}.json, {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
