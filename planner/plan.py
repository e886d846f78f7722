"""`pdserve plan`: which deployment serves a workload best on a GPU budget, by simulation.

    pdserve plan --profile profile.json --gpus 4 --rates 2,4,8 --requests 2000 \\
        --prompt-min 512 --prompt-max 4096 --output-min 64 --output-max 256 --json plan.json

For a budget of N GPUs (one engine per GPU: the profile is one engine's) it simulates, at
every rate: colocated (N engines, every prompt prefilled in place), xPyD disaggregated for
every P + D = N (every uncached prompt prefilled remotely) and conditional disaggregation
at each --thresholds value for the same splits, all on the same requests (the same seed
per rate). It prints a table of TTFT / TPOT / E2E percentiles and goodput under the SLOs
(bench's definitions, deploy/bench.py), and names the best configuration: the highest rate
it sustains with at least --attainment of requests within both SLOs, then the highest
goodput at the highest rate.

    pdserve plan --profile profile.json --validate serve.json

simulates the runs a `pdserve bench --json` record holds (the same modes, replicas,
threshold, workload, seeds, rates and request counts) and prints predicted against
measured TTFT p50/p90 and TPOT p50 with relative errors. Given repeats of one bench
command (`--validate a.json b.json`), it compares against their mean and shows how far the
runs themselves differ.

`pool_targets` is the planner's answer for the autoscaling controller: the smallest
prefill/decode pool sizes that meet the SLOs at an expected rate (deploy/controller.py,
PoolController.apply_targets).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

from planner import workload as wl
from planner.shared_device import DeviceLayout, layout_from_bench, profile_host_layout
from planner.simulator import ClusterConfig, simulate

# bench's modes (deploy/bench.py MODES) as simulated clusters ("disagg": the old name of
# "disaggregated", in records written before the rename).
BENCH_MODES = {"colocated": "colocated", "disaggregated": "disaggregated", "disagg": "disaggregated",
               "conditional": "conditional"}


# ---- configurations ----------------------------------------------------------------------------------
def configurations(gpus: int, thresholds: list[int], modes: list[str] | None = None,
                   layout: DeviceLayout | None = None, gpus_per_engine: int = 1) -> list[ClusterConfig]:
    """Every configuration of the engines `gpus` devices hold (layout.engines_per_device
    each; default one engine per GPU; an engine of `gpus_per_engine` GPUs, tensor-parallel,
    takes that many): colocated, then each P + D split disaggregated, then conditional at
    each threshold."""
    modes = modes or ["colocated", "disaggregated", "conditional"]
    lay = layout or DeviceLayout()
    engines = (gpus // max(1, gpus_per_engine)) * lay.engines_per_device
    out = []
    if "colocated" in modes:
        out.append(ClusterConfig("colocated", decode=engines, layout=lay))
    splits = [(p, engines - p) for p in range(1, engines)]
    if "disaggregated" in modes:
        out += [ClusterConfig("disaggregated", decode=d, prefill=p, layout=lay) for p, d in splits]
    if "conditional" in modes:
        out += [ClusterConfig("conditional", decode=d, prefill=p, threshold=t, layout=lay)
                for p, d in splits for t in thresholds]
    return out


def plan_layout(cost, engines_per_gpu: int = 1) -> DeviceLayout:
    """`pdserve plan`'s layout: engines_per_gpu engines time-slicing each GPU; for a CPU
    profile one engine per host of the profile's cores and threads (a host is the 'GPU')."""
    if cost.profile["hardware"]["device"] == "cpu":
        return DeviceLayout()
    return DeviceLayout.gpu_share(engines_per_gpu)


def bench_configuration(mode: str, bench_args: dict, layout: DeviceLayout | None = None) -> ClusterConfig:
    """The cluster `pdserve bench` starts for one of its modes, its engines placed as `layout`."""
    lay = layout or DeviceLayout()
    if mode == "colocated":
        return ClusterConfig("colocated", decode=int(bench_args.get("decode_replicas", 2)), layout=lay)
    if BENCH_MODES.get(mode) == "disaggregated":
        return ClusterConfig("disaggregated", decode=1, prefill=1, layout=lay)
    if mode == "conditional":
        return ClusterConfig("conditional", decode=1, prefill=1, threshold=int(bench_args.get("disagg_threshold", 256)),
                             layout=lay)
    raise ValueError(f"bench mode {mode!r} has no simulated counterpart (an external server's shape is unknown)")


def bench_engines(mode: str, bench_args: dict) -> int:
    return int(bench_args.get("decode_replicas", 2)) if mode == "colocated" else 2


def measured_layout(cost, measured: dict, mode: str, engines_per_gpu: int | None = None) -> tuple[DeviceLayout, str]:
    """The layout a measured mode ran with, and where that comes from: its bench record's
    (`layouts`, recorded since issue 15); else --engines-per-gpu on a GPU; else, for a CPU
    profile, bench's workers on the profile's host, each computing with the one thread Ray
    gives a worker that asks at most one CPU (shared_device.threads_under_ray); else one
    engine per GPU."""
    rec = (measured.get("layouts") or {}).get(mode)
    if rec is not None:
        return layout_from_bench(rec), "bench record"
    n = bench_engines(mode, measured.get("args") or {})
    hw = cost.profile["hardware"]
    if hw["device"] == "cpu":
        return profile_host_layout(hw, n), "CPU host, Ray's one thread each"
    if engines_per_gpu:
        return DeviceLayout.gpu_share(engines_per_gpu), "--engines-per-gpu"
    return DeviceLayout(), "one engine per GPU (default)"


def thread_mismatches(cost, measured: dict) -> list[str]:
    """A CPU profile timed with other threads than the measured run's workers computed with
    (Ray gives each max(1, floor(num_cpus))): its steps are not theirs."""
    hw = cost.profile["hardware"]
    if hw["device"] != "cpu" or not hw.get("torch_threads"):
        return []
    out = []
    for mode in measured.get("modes", {}):
        lay, _ = measured_layout(cost, measured, mode)
        if lay.weight != hw["torch_threads"]:
            out.append(f"{mode}: workers computed with {lay.weight:g} thread(s), the profile with "
                       f"{hw['torch_threads']} (profile with OMP_NUM_THREADS={lay.weight:g})")
    return out


# ---- running ---------------------------------------------------------------------------------------------
def gpus_of(cost, cfg: ClusterConfig) -> int:
    """GPUs a configuration occupies: its devices (ClusterConfig.gpus, engines sharing one
    counted once) times the GPUs one engine of the profile stands for (its tensor parallelism)."""
    return cfg.gpus * getattr(cost, "gpus_per_engine", 1)


def run_one(cost, cfg: ClusterConfig, reqs: list[wl.Request], slo, keep_records: bool = False) -> dict:
    from deploy.bench import summarise
    t = time.perf_counter()
    recs, sim = simulate(cost, cfg, reqs)
    s = summarise(recs, slo)
    s["goodput_rps_per_gpu"] = s.get("goodput_rps", 0.0) / gpus_of(cost, cfg)
    out = dict(summary=s, decisions=sim.decisions, utilisation=sim.utilisation(),
               preemptions=sum(w.engine.num_preemptions for w in sim.decode_workers.values()),
               sim_seconds=time.perf_counter() - t)
    if keep_records:
        out["records"] = recs
    return out


def predicted_rows(reqs: list[wl.Request], recs: list[dict]) -> list[dict]:
    """The simulator's per-request view in `pdserve bench --requests-json`'s row format
    (deploy/bench.py request_rows): request i is request i of bench's draw."""
    from deploy.bench import request_rows
    work = [dict(arrival=r.arrival_s, prompt_tokens=r.prompt_tokens, max_tokens=r.output_tokens) for r in reqs]
    return request_rows(work, recs)


def workload_for(args, rate: float, i: int) -> list[wl.Request]:
    """The requests of the i-th rate: bench's draw with seed + i, or the trace (rescaled
    to the rate when one is given)."""
    if args.trace:
        reqs = wl.load_trace(args.trace, limit=args.requests)
        return wl.rescale(reqs, rate) if rate else reqs
    spec = wl.WorkloadSpec.from_args(args)
    return wl.requests(spec, args.requests, rate, args.seed + i)


def sustained_rate(runs: list[dict], attainment: float) -> float:
    """The highest rate at which at least `attainment` of the requests met both SLOs."""
    ok = [r["rate"] for r in runs if r["summary"].get("slo_attainment", 0.0) >= attainment]
    return max(ok, default=0.0)


def plan(cost, args, rates: list[float], configs: list[ClusterConfig], progress=None) -> dict:
    slo = SimpleNamespace(ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo)
    record = dict(profile=getattr(args, "profile", None), gpus=args.gpus, rates=rates, requests=args.requests,
                  slo=dict(ttft_s=args.ttft_slo, tpot_s=args.tpot_slo, attainment=args.attainment),
                  workload=dict(trace=args.trace, **asdict(wl.WorkloadSpec.from_args(args))), configs={})
    for i, rate in enumerate(rates):
        reqs = workload_for(args, rate, i)
        rate = rate or wl.trace_rate(reqs)      # a trace replayed as recorded
        for cfg in configs:
            out = run_one(cost, cfg, reqs, slo)
            entry = record["configs"].setdefault(cfg.name, dict(config=asdict(cfg), gpus=gpus_of(cost, cfg), runs=[]))
            entry["runs"].append(dict(rate=rate, **out))
            if progress is not None:
                progress(cfg, rate, out)
    for entry in record["configs"].values():
        entry["sustained_rate"] = sustained_rate(entry["runs"], args.attainment)
    record["best"] = best(record)
    return record


def best(record: dict) -> str | None:
    def key(name):
        e = record["configs"][name]
        top = max(e["runs"], key=lambda r: r["rate"])
        return (e["sustained_rate"] / e["gpus"], top["summary"].get("goodput_rps_per_gpu", 0.0))
    return max(record["configs"], key=key, default=None)


# ---- the controller's targets ---------------------------------------------------------------------------
def pool_targets(cost, spec: wl.WorkloadSpec, rate: float, *, ttft_slo: float = 1.0, tpot_slo: float = 0.040,
                 attainment: float = 0.9, max_gpus: int = 8, thresholds: tuple[int, ...] = (256, 1024),
                 requests: int = 1000, seed: int = 0) -> dict | None:
    """The smallest prefill + decode pools (at least one of each: the controller manages
    both) that keep `attainment` of the requests within the SLOs at `rate`, by simulation;
    None if no split of up to max_gpus does. Fewer GPUs first; among equals the higher
    goodput wins."""
    slo = SimpleNamespace(ttft_slo=ttft_slo, tpot_slo=tpot_slo)
    reqs = wl.requests(spec, requests, rate, seed)
    for gpus in range(2, max_gpus + 1):
        found = []
        for cfg in configurations(gpus, list(thresholds), ["disaggregated", "conditional"],
                                  gpus_per_engine=getattr(cost, "gpus_per_engine", 1)):
            s = run_one(cost, cfg, reqs, slo)["summary"]
            if s.get("slo_attainment", 0.0) >= attainment:
                found.append((s["goodput_rps"], cfg, s))
        if found:
            _, cfg, s = max(found, key=lambda f: f[0])
            return dict(prefill=cfg.prefill, decode=cfg.decode, threshold=cfg.threshold, mode=cfg.mode,
                        name=cfg.name, slo_attainment=s["slo_attainment"], goodput_rps=s["goodput_rps"])
    return None


def controller_targets(profile_path: str, rate: float, spec: wl.WorkloadSpec | None = None, **kw) -> dict[str, int]:
    """pool_targets from a profile file, as the floors PoolController.apply_targets takes;
    ValueError when no split of up to max_gpus meets the SLOs."""
    from planner.costmodel import CostModel
    t = pool_targets(CostModel.load(profile_path), spec or wl.WorkloadSpec(), rate, **kw)
    if t is None:
        raise ValueError(f"no prefill/decode split of up to {kw.get('max_gpus', 8)} GPUs meets the SLOs at "
                         f"{rate:g} req/s")
    return {"prefill": t["prefill"], "decode": t["decode"]}


# ---- validation against a measured run ---------------------------------------------------------------
ENGINE_KNOBS = ("block_size", "max_num_batched_tokens", "max_num_seqs", "num_kv_blocks")


def engine_mismatches(cost, measured: dict) -> list[str]:
    """Engine settings the measured run overrode (bench --engine-kwargs) that differ from
    the profile's: the simulation would schedule another engine than the one measured."""
    try:
        kw = json.loads((measured.get("args") or {}).get("engine_kwargs") or "{}")
    except ValueError:
        return ["the bench record's engine_kwargs is not JSON"]
    return [f"{k}: measured run {kw[k]}, profile {getattr(cost, k)}" for k in ENGINE_KNOBS
            if k in kw and kw[k] != getattr(cost, k)]


# The bench arguments that must agree between repeated records of one measurement.
_RUN_KEYS = ("model", "dtype", "engine_kwargs", "decode_replicas", "disagg_threshold", "rates", "requests",
             "warmup", "workload", "prompt_min", "prompt_max", "output_min", "output_max", "prefix_len",
             "num_prefixes", "seed", "ttft_slo", "tpot_slo", "ignore_eos", "ray_cpus")


def check_repeats(records: list[dict]) -> None:
    """ValueError unless every record repeats the first one's bench command (same workload,
    seeds, rates, modes and cluster), so that their cells measure the same thing."""
    first = records[0].get("args") or {}
    for i, r in enumerate(records[1:], 1):
        a = r.get("args") or {}
        diff = [k for k in _RUN_KEYS if a.get(k) != first.get(k)]
        if r.get("layouts") != records[0].get("layouts"):
            diff.append("layouts")
        if sorted(r.get("modes", {})) != sorted(records[0].get("modes", {})):
            diff.append("modes")
        elif any(len(r["modes"][m]) != len(runs) for m, runs in records[0].get("modes", {}).items()):
            diff.append("the runs recorded per mode")
        if diff:
            raise ValueError(f"--validate: record {i + 1} is not a repeat of the first (differs in {', '.join(diff)})")


def validate(cost, measured: dict | list[dict], modes: list[str] | None = None,
             engines_per_gpu: int | None = None, per_request: dict | None = None) -> list[dict]:
    """Predicted against measured per (mode, rate) of a `pdserve bench --json` record, each
    mode simulated with the device layout it ran with (measured_layout). Several records of
    the same command (repeats) are compared by their mean per cell, and each cell says how
    far the runs themselves spread ((max - min) / mean): a prediction cannot be checked
    more closely than the measurement repeats. `per_request` (a dict), if given, gets the
    simulated requests of every run, {mode: [{rate, seed, requests: rows}]}, in the format
    of `pdserve bench --requests-json` (predicted_rows)."""
    records = measured if isinstance(measured, list) else [measured]
    check_repeats(records)
    measured = records[0]
    bargs = measured.get("args") or {}
    spec = wl.WorkloadSpec.from_args(bargs)
    slo = SimpleNamespace(ttft_slo=float(bargs.get("ttft_slo", 1.0)), tpot_slo=float(bargs.get("tpot_slo", 0.040)))
    n, seed = int(bargs.get("requests", 32)), int(bargs.get("seed", 0))
    rows = []
    for mode, runs in measured.get("modes", {}).items():
        if modes and mode not in modes:
            continue
        layout, source = measured_layout(cost, measured, mode, engines_per_gpu)
        cfg = bench_configuration(mode, bargs, layout)
        for i, run in enumerate(runs):
            reqs = wl.requests(spec, n, float(run["rate"]), seed + i)
            one = run_one(cost, cfg, reqs, slo, keep_records=per_request is not None)
            pred = one["summary"]
            if per_request is not None:
                per_request.setdefault(mode, []).append(dict(rate=run["rate"], seed=seed + i,
                                                             requests=predicted_rows(reqs, one["records"])))
            meas = [r["modes"][mode][i]["summary"] for r in records]
            row = dict(mode=mode, config=cfg.name, rate=run["rate"], layout=layout.describe(), layout_source=source)
            for metric, key, q in (("ttft_p50", "ttft_s", "p50"), ("ttft_p90", "ttft_s", "p90"),
                                   ("tpot_p50", "tpot_s", "p50")):
                runs = [x.get(key, {}).get(q) for x in meas]
                runs = [v for v in runs if v is not None]
                m = sum(runs) / len(runs) if runs else None
                p = pred.get(key, {}).get(q)
                row[metric] = dict(measured=m, predicted=p, rel_error=(p - m) / m if m and p is not None else None,
                                   runs=runs, spread=(max(runs) - min(runs)) / m if m and len(runs) > 1 else None)
            goodput = [x["goodput_rps"] for x in meas if x.get("goodput_rps") is not None]
            row["goodput"] = dict(measured=sum(goodput) / len(goodput) if goodput else None,
                                  predicted=pred.get("goodput_rps"))
            rows.append(row)
    return rows


def validation_table(rows: list[dict]) -> str:
    repeats = any(r[k].get("spread") is not None for r in rows for k in ("ttft_p50", "ttft_p90", "tpot_p50"))
    w = 33 if repeats else 25

    def cell(d, scale=1.0):
        m, p, e = d["measured"], d["predicted"], d["rel_error"]
        if m is None or p is None:
            return f"{'-':>{w}}"
        err = f"{e * 100:+6.1f}%" if e is not None else "    n/a"
        spread = f" ({d['spread'] * 100:4.0f}%)" if d.get("spread") is not None else ""
        return f"{p * scale:7.1f} {m * scale:7.1f} {err}{spread}"
    what = "pred meas err (runs)" if repeats else "pred meas err"
    head = (f"{'mode':<12}{'config':<14}{'rate':>6}  {'TTFT p50 ms ' + what:>{w}}  "
            f"{'TTFT p90 ms ' + what:>{w}}  {'TPOT p50 ms ' + what:>{w}}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<12}{r['config']:<14}{r['rate']:>6g}  {cell(r['ttft_p50'], 1e3):>{w}}  "
                     f"{cell(r['ttft_p90'], 1e3):>{w}}  {cell(r['tpot_p50'], 1e3):>{w}}")
    cells = [r[k] for r in rows for k in ("ttft_p50", "ttft_p90", "tpot_p50") if r[k]["rel_error"] is not None]
    if cells:
        errs = [abs(c["rel_error"]) for c in cells]
        line = f"worst |error| {max(errs) * 100:.1f}%, cells within 15%: {sum(e <= 0.15 for e in errs)}/{len(errs)}"
        if repeats:
            spreads = [c["spread"] for c in cells if c.get("spread") is not None]
            line += (f"; the runs themselves spread up to {max(spreads) * 100:.0f}% (median "
                     f"{sorted(spreads)[len(spreads) // 2] * 100:.0f}%); within 15% or the runs' spread: "
                     f"{sum(abs(c['rel_error']) <= max(0.15, c['spread'] or 0.0) for c in cells)}/{len(cells)}")
        lines.append(line)
    return "\n".join(lines)


# ---- output ------------------------------------------------------------------------------------------------
def table(record: dict) -> str:
    nan = float("nan")
    head = (f"{'config':<18}{'GPUs':>5}{'rate':>7}  {'TTFT p50':>9}{'p90':>8}{'p99':>8}  {'TPOT p50':>9}{'p90':>7}"
            f"  {'E2E p90':>8}  {'goodput':>8}{'in SLO':>8}{'/GPU':>7}  {'disagg':>6}")
    lines = [head, "-" * len(head)]
    for name, e in record["configs"].items():
        for r in e["runs"]:
            s = r["summary"]
            t, p, x = s.get("ttft_s", {}), s.get("tpot_s", {}), s.get("e2e_s", {})
            lines.append(f"{name:<18}{e['gpus']:>5}{r['rate']:>7.3g}  {t.get('p50', nan):>9.3f}"
                         f"{t.get('p90', nan):>8.3f}{t.get('p99', nan):>8.3f}  {p.get('p50', nan) * 1e3:>7.1f}ms"
                         f"{p.get('p90', nan) * 1e3:>5.1f}ms  {x.get('p90', nan):>8.2f}  "
                         f"{s.get('goodput_rps', 0):>8.2f}{s.get('slo_attainment', 0):>8.0%}"
                         f"{s.get('goodput_rps_per_gpu', 0):>7.2f}  {s.get('disaggregated', 0):>6}")
    b = record.get("best")
    if b is not None:
        e = record["configs"][b]
        slo = record["slo"]
        lines.append(f"best: {b} ({e['gpus']} GPUs) sustains {e['sustained_rate']:.3g} req/s with >= "
                     f"{slo['attainment']:.0%} of requests within TTFT <= {slo['ttft_s']}s and TPOT <= "
                     f"{slo['tpot_s'] * 1e3:g}ms" if e["sustained_rate"] else
                     f"best: {b}, but no configuration keeps {slo['attainment']:.0%} within the SLOs at any rate tried")
    return "\n".join(lines)


def plot(record: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install -e .[bench]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, e in record["configs"].items():
        ax.plot([r["rate"] for r in e["runs"]], [r["summary"].get("goodput_rps", 0) for r in e["runs"]], "o-",
                label=name)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("goodput (req/s within SLOs)")
    ax.set_title(f"simulated, {record['gpus']} GPUs (TTFT <= {record['slo']['ttft_s']}s, "
                 f"TPOT <= {record['slo']['tpot_s'] * 1e3:g}ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- command line ----------------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--profile", required=True, help="a `pdserve profile` JSON (one engine's cost model)")
    ap.add_argument("--gpus", type=int, default=2, help="GPU budget: one engine per GPU")
    ap.add_argument("--modes", default="colocated,disaggregated,conditional")
    ap.add_argument("--thresholds", default="256,1024", help="conditional mode's thresholds to try")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--requests", type=int, default=1000, help="requests per rate")
    ap.add_argument("--workload", choices=("synthetic", "shared-prefix"), default="synthetic")
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--output-min", type=int, default=16)
    ap.add_argument("--output-max", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--prefix-share", type=float, default=1.0, help="shared-prefix: share of requests with a prefix")
    ap.add_argument("--arrival", choices=("poisson", "bursty"), default="poisson")
    ap.add_argument("--burst-cv", type=float, default=4.0, help="bursty: coefficient of variation of the gaps")
    ap.add_argument("--trace", default=None, help="JSONL trace (pdserve serve --record-trace) instead of a synthetic "
                                                  "workload; --rates rescale it (0: as recorded)")
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.040)
    ap.add_argument("--attainment", type=float, default=0.9, help="share within SLOs that counts as sustained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines-per-gpu", type=int, default=None,
                    help="engines sharing each GPU (Ray num_gpus=1/K; they slow each other, "
                         "planner/shared_device.py); the budget then holds --gpus x K engines. With --validate: "
                         "the layout of a bench record that did not record its own (records before issue 15)")
    ap.add_argument("--validate", metavar="BENCH_JSON", default=None, nargs="+",
                    help="compare predictions with a `pdserve bench --json` record instead of planning; "
                         "several records of the same bench command are compared by their mean, with "
                         "how far the runs themselves spread")
    ap.add_argument("--json")
    ap.add_argument("--requests-json", metavar="FILE",
                    help="with --validate: also write every simulated request (lengths, route, TTFT, TPOT, E2E) "
                         "in the format of `pdserve bench --requests-json`, request i for request i")
    ap.add_argument("--png")


def _floats(flag: str, text: str, allow_zero: bool = False) -> list[float]:
    try:
        xs = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--{flag}: expected comma-separated numbers, got {text!r}") from None
    if not xs or any(x < 0 or (x == 0 and not allow_zero) for x in xs):
        raise ValueError(f"--{flag}: every value must be > 0, got {text!r}")
    return xs


def run(args) -> dict:
    from planner.costmodel import CostModel
    cost = CostModel.load(args.profile)
    if cost.fit_report.get("attention"):   # one price per attention pair or one per path, and why
        print(f"step fit ({cost.form}): {cost.fit_report['attention']}")
    if args.validate:
        records = []
        for path in args.validate:
            with open(path, encoding="utf-8") as f:
                records.append(json.load(f))
        measured = records[0]
        for path, rec in zip(args.validate, records):
            where = f" ({path})" if len(records) > 1 else ""
            for m in engine_mismatches(cost, rec):
                print(f"warning: engine setting differs{where}, {m}", file=sys.stderr)
            for m in thread_mismatches(cost, rec):
                print(f"warning: threads differ{where}, {m}", file=sys.stderr)
        per_request = {} if args.requests_json else None
        rows = validate(cost, records, engines_per_gpu=args.engines_per_gpu, per_request=per_request)
        for mode in dict.fromkeys(r["mode"] for r in rows):
            r = next(r for r in rows if r["mode"] == mode)
            print(f"layout of {mode}: {r['layout']} ({r['layout_source']})")
        print(f"profile: {cost.profile['model'].get('name')} on {cost.profile['hardware'].get('name')}; "
              f"measured: {measured.get('model')} ({measured.get('workload')} workload)")
        print(validation_table(rows))
        out = dict(profile=args.profile, measured=list(args.validate), rows=rows, cost_form=cost.form,
                   engine_mismatches=[m for rec in records for m in engine_mismatches(cost, rec)],
                   thread_mismatches=[m for rec in records for m in thread_mismatches(cost, rec)])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
            print(f"json: {args.json}")
        if args.requests_json:
            with open(args.requests_json, "w") as f:
                json.dump(dict(model=measured.get("model"), workload=measured.get("workload"),
                               args=measured.get("args"), predicted_by=args.profile, modes=per_request), f)
            print(f"requests json: {args.requests_json}")
        return out
    rates = _floats("rates", args.rates, allow_zero=bool(args.trace))
    thresholds = [int(x) for x in _floats("thresholds", args.thresholds, allow_zero=True)]
    if args.gpus < 1 or args.requests < 1:
        raise ValueError("--gpus and --requests: must be >= 1")
    if not args.trace:
        wl.WorkloadSpec.from_args(args).validate()
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--png needs matplotlib: pip install -e .[bench]") from None
    modes = [m.strip() for m in args.modes.split(",")]
    if args.engines_per_gpu is not None and args.engines_per_gpu < 1:
        raise ValueError("--engines-per-gpu: must be >= 1")
    configs = configurations(args.gpus, thresholds, modes, plan_layout(cost, args.engines_per_gpu or 1),
                             getattr(cost, "gpus_per_engine", 1))
    if not configs:
        raise ValueError(f"--modes {args.modes!r} with --gpus {args.gpus}: nothing to simulate "
                         "(disaggregated and conditional need 2 engines or more)")
    t = time.perf_counter()
    record = plan(cost, args, rates, configs)
    print(table(record))
    print(f"({len(configs)} configurations x {len(rates)} rates x {args.requests} requests simulated in "
          f"{time.perf_counter() - t:.1f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"json: {args.json}")
    if args.png:
        plot(record, args.png)
        print(f"plot: {args.png}")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"pdserve plan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
