"""The deployed path's overheads, for `pdserve profile`: what a real deployment pays on top of
the engine's steps, measured on an idle local cluster one request at a time (and, for
per_stream_s, a few at once).

planner/overhead_probe.py times the router path in one process and deploy/frontend_probe.py
adds the gRPC front end; neither runs the workers as a deployment does (separate Ray worker
processes, ZeroMQ between them and the router, the workers' loops, the first step after
idle). This probe starts the clusters `pdserve bench` starts (deploy/bench.py ClusterThread,
ServeConfig.simple with the profiled model, dtype and engine settings, a local Ray instance
as bench's):

  direct          colocated, 1 decode worker
  disaggregated   1 prefill + 1 decode worker, threshold 0 (every uncached prompt remote)

and sends token-id prompts of a few lengths (16 to 512, capped by the model's context),
each with OUTPUT_TOKENS tokens out and ignore_eos, one at a time with an idle gap between
them, through bench's own gRPC client code (GrpcTarget._one), after warm-up requests. It
records each request's TTFT and TPOT as bench does.

The overheads are what is left after the cost model's engine time for the same work, and the
engine time is read from the simulator itself (planner/simulator.py, one request alone on an
idle cluster, overheads zeroed), so that they mean exactly what the simulator adds them for:

  per_token_stream_s      median over the direct requests of measured TPOT minus simulated
                          TPOT (a batch-1 decode step at the request's context): the
                          simulator adds it after every decode worker step.
  router_direct_s         with per_token_stream_s in place (it also sits between the chunks of
                          a chunked prefill), measured TTFT minus simulated TTFT (the prompt's
                          prefill step(s) under chunking). With every request's sample kept
                          (ttft_samples_ms) it is the smoothed path read from all of them
                          (below); from medians alone (older profiles) the smallest per-length
                          median is the fixed cost (lengths up to that one add nothing);
  prompt_residual         what each longer prompt's residual adds to it, per length
                          (CostModel.request_path_s reads it by uncached tokens, linear between
                          points): on a CPU host the deployed worker's prefill ran slower than
                          the profiled steps, and not in proportion to the tokens. With every
                          request's TTFT at hand the path is read from all of them
                          (_smoothed): a line through the per-length means, a length's own
                          mean only where it departs from it by more than 3 standard errors,
                          at the level of the median request;
  per_prompt_token_s      the slope of a line through the residuals, for longer prompts;
  router_disaggregated_s  the same for the 1P1D cluster, minus prompt_residual, median over the
                          lengths.
                          The simulated TTFT it is measured against includes the prefill
                          worker's steps, cost.transfer_time(prompt) and the decode worker's
                          first decode step, so this overhead is the path *beside* the transfer
                          fit: the simulator adds transfer_time per request again and nothing
                          is counted twice (for the short prompts measured here the transfer
                          fit is mostly its latency, which this probe then does not re-measure).

  per_stream_s            from rounds of CONCURRENT_STREAMS requests sent at once to the
                          colocated cluster: what their TPOT median exceeds the simulator's
                          for the same rounds (everything above in place, and the front end's
                          share of a CPU host's cores), per further stream; the simulator adds
                          it to a decode worker's loop per further request in its batch, up to
                          CONCURRENT_STREAMS requests (per_stream_upto: not extrapolated past
                          what was measured, e.g. to a GPU's batches of hundreds). Lone
                          requests cannot show it: on a CPU host TPOT grew with the requests
                          streaming at once far faster than the engine's batching and the
                          cores' sharing price (benchmarks/RESULTS.md, issue 15).
  prefill_serial_s        from rounds of BURST_STREAMS disaggregated requests sent at once to
                          the 1P1D cluster: how much of router_disaggregated_s the simulator
                          must serve on the prefill worker's loop, one prompt after another
                          after its step, instead of as each request's latency, for the rounds'
                          mean TTFT to match (bisection on the simulator, capped at the path).
                          A lone request's price does not change; a burst's later prompts wait.
                          In the measured cluster that loop takes a request, runs its step,
                          then sends its done and releases it, request after request.
  path_jitter_s           per route, how the lone requests' residuals scatter about the priced
                          path (quantiles at 0, 5, ..., 100 %, median 0): the simulator adds a
                          draw from it to each request's path (CostModel.path_jitter_s), so the
                          TTFT tail has the spread lone requests measured, not only the
                          prompt lengths'. Every request's TTFT is kept (ttft_samples_ms) so
                          rederive() can recompute it.

Each is clamped at >= 0; a negative residual (the cost model over-predicts the engine time) is
reported in `deployed.negative`. The in-process and front-end probes' numbers stay in the
profile under `reference`; the front end's CPU (frontend_cpu_*) stays, as the simulator's
background work on a CPU host.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import statistics
import time

import numpy as np

from planner.shared_device import profile_host_layout

LENGTHS = (16, 64, 128, 256, 384, 512)
OUTPUT_TOKENS = 32
IDLE_GAP_S = 0.1          # between requests: each one meets an idle cluster, as at bench's rates
# Concurrent streams (per_stream_s): this many requests of CONCURRENT_PROMPT tokens sent at
# once, OUTPUT_TOKENS each, a round after each idle gap.
CONCURRENT_STREAMS = 4
CONCURRENT_PROMPT = 64
# Bursts of disaggregated requests (prefill_serial_s): this many of BURST_PROMPT tokens sent
# at once to the 1P1D cluster, a round after each idle gap.
BURST_STREAMS = 3
BURST_PROMPT = 256


def probe_lengths(max_model_len: int, output: int = OUTPUT_TOKENS) -> list[int]:
    """The prompt lengths to send: LENGTHS capped by the context (prompt + output must fit)."""
    top = max(1, max_model_len - output - 1)
    return sorted({min(n, top) for n in LENGTHS})


# ---- the arithmetic (no cluster: tests drive it with fakes) ---------------------------------------
def _zeroed(cost, per_token_stream_s: float = 0.0):
    c = copy.copy(cost)
    for k in ("router_direct_s", "router_disaggregated_s", "frontend_extra_s", "per_prompt_token_s",
              "frontend_cpu_per_request_s", "frontend_cpu_per_prompt_token_s", "frontend_cpu_per_token_s",
              "prefill_serial_s"):
        setattr(c, k, 0.0)
    c.per_token_stream_s = per_token_stream_s
    c.per_stream_s = 0.0
    c.prompt_residual = []
    c.path_jitter = {}
    return c


def simulated_lone(cost, mode: str, prompt: int, output: int, per_token_stream_s: float = 0.0) -> tuple[float, float]:
    """(TTFT, TPOT) of one request alone on an idle simulated cluster, the request path free."""
    from planner.simulator import ClusterConfig, simulate
    from planner.workload import Request
    cfg = ClusterConfig("colocated", decode=1) if mode == "direct" else ClusterConfig("disaggregated", 1, 1)
    recs, _ = simulate(_zeroed(cost, per_token_stream_s), cfg, [Request(0.0, prompt, output)])
    r = recs[0]
    if not r["ok"]:
        raise RuntimeError(f"deployed probe: the simulator did not serve a lone {prompt}-token request: {r}")
    return r["ttft"], r["tpot"]


def _smoothed(samples: dict[int, list[float]]) -> tuple[dict[int, float], float]:
    """The path by prompt length from every lone request's residual, with what their
    scatter can explain taken out, and the slope of its line. Per length the mean (a median
    of a bimodal sample jumps between the modes; a mean moves by its standard error, sd /
    sqrt(k), sd pooled over the lengths); the line is least squares through the means (flat
    at their mean if it falls); a length keeps its own mean only where it departs from the
    line by more than three times that standard error, else the line's value stands for it.
    Then all of it moves by one constant so that the residuals about it have median 0: the
    path prices the median request, path_jitter_s the rest."""
    lengths = sorted(samples)
    x = np.array(lengths, float)
    y = np.array([float(np.mean(samples[n])) for n in lengths])
    # One scatter for all lengths (it does not depend on the prompt: path_jitter_s pools it
    # too), so each mean's standard error is the pooled sd / sqrt(k): a length whose few
    # samples happened to miss the slow mode does not look precise.
    dof = sum(len(samples[n]) for n in lengths) - len(lengths)
    sd = math.sqrt(sum(float(((np.asarray(samples[n]) - y[i]) ** 2).sum()) for i, n in enumerate(lengths)) / dof) \
        if dof > 0 else 0.0
    se = np.array([sd / math.sqrt(len(samples[n])) for n in lengths])
    slope, icpt = 0.0, float(y.mean())
    if len(lengths) > 1:
        slope, icpt = (float(v) for v in np.polyfit(x, y, 1))
    if slope < 0:
        slope, icpt = 0.0, float(y.mean())
    line = icpt + slope * x
    path = {n: float(y[i] if abs(y[i] - line[i]) > 3 * se[i] else line[i]) for i, n in enumerate(lengths)}
    shift = float(np.median([r - path[n] for n in lengths for r in samples[n]]))
    return {n: v + shift for n, v in path.items()}, slope


def _prompt_path(res_d: dict[int, float], negative: list[str], samples: dict[int, list[float]] | None = None) -> dict:
    """router_direct_s, prompt_residual and per_prompt_token_s from the direct requests'
    TTFT residuals by prompt length (measured minus the simulator's lone request): their
    medians, or with `samples` (every request's residual by length) the path _smoothed
    finds in them."""
    lengths = sorted(res_d)
    slope = None
    if samples:
        # Lone requests' TTFT on a deployed CPU host scatters by several ms, bimodally (about
        # half of them 1.5 to 5 ms slower; p10 to p90 about 4.7 ms at every length, 40
        # repeats each), so a median of 7 or 15 moves by a ms or more between lengths where
        # the path does not change. Taken as measured, the smallest of them (a low draw)
        # became the fixed path and every other length's draw a residual above it: a table
        # of noise, all of it on top. So the path is read from all the samples (_smoothed).
        res_d, slope = _smoothed(samples)
    # The fixed path is the smallest residual over the lengths: the short prompts' residuals
    # differ by noise alone (the shortest is not always the least), so every length up to
    # the one with the smallest residual adds nothing to it. Past that length, what each one
    # adds is kept (prompt_residual, read between points by CostModel.request_path_s): on a
    # CPU host it was the deployed worker's prefill running slower than the profiled steps,
    # which is not linear in the tokens. The line through the points stays as
    # per_prompt_token_s, for prompts past the longest one.
    least = min(lengths, key=lambda n: res_d[n])
    fixed = res_d[least]
    if fixed < 0:
        negative.append(f"router_direct_s {fixed * 1e3:.3f} ms")
    fixed = max(0.0, fixed)
    residual = [[n, 0.0 if n <= least else max(0.0, res_d[n] - fixed)] for n in lengths]
    if slope is None:
        slope = 0.0
        if len(lengths) > 1:
            slope = float(np.polyfit(np.array(lengths, float), np.array([res_d[n] for n in lengths]), 1)[0])
    if slope < 0:
        negative.append(f"per_prompt_token_s {slope * 1e6:.2f} us")
        slope = 0.0
    return dict(router_direct_s=fixed, per_prompt_token_s=slope, prompt_residual=residual)


JITTER_QUANTILES = 21      # path_jitter_s: the residuals' quantiles at 0, 5, ..., 100 %


def path_jitter(residuals) -> list[float]:
    """The lone requests' TTFT residuals about the priced path (measured minus the
    simulator's lone request with the path in place), as quantiles at 0, 5, ..., 100 %
    shifted to median 0: the spread the simulator draws per request
    (CostModel.path_jitter_s) around the median request router_*_s price."""
    x = np.asarray(residuals, float)
    q = np.percentile(x, np.linspace(0, 100, JITTER_QUANTILES)) - float(np.median(x))
    return [round(float(v), 7) for v in np.maximum.accumulate(q)]


def _path_cost(cost, prompt_path: dict):
    path = copy.copy(cost)
    path.per_prompt_token_s, path.prompt_residual = prompt_path["per_prompt_token_s"], prompt_path["prompt_residual"]
    return path


def _disaggregated_path(cost, prompt_path: dict, res_g: dict[int, float], negative: list[str],
                        samples: dict[int, list[float]] | None = None) -> float:
    """router_disaggregated_s: the median over lengths of the 1P1D TTFT residuals (measured
    minus the simulator's lone request) less what the prompt path adds at that length;
    with `samples`, the median over every request's."""
    path = _path_cost(cost, prompt_path)
    if samples:
        g = statistics.median(r - path.request_path_s(n, n) for n, rs in samples.items() for r in rs)
    else:
        g = statistics.median(r - path.request_path_s(n, n) for n, r in res_g.items())
    if g < 0:
        negative.append(f"router_disaggregated_s {g * 1e3:.3f} ms")
    return max(0.0, g)


def _jitters(cost, out: dict, samples_d: dict[int, list[float]], samples_g: dict[int, list[float]]) -> dict:
    """path_jitter_s per route from every lone request's residual (measured TTFT minus the
    simulator's engine time) less the priced path at its length."""
    path = _path_cost(cost, out)
    jit = {"direct": path_jitter([r - out["router_direct_s"] - path.request_path_s(n, n)
                                  for n, rs in samples_d.items() for r in rs])}
    if samples_g and "router_disaggregated_s" in out:
        jit["disaggregated"] = path_jitter([r - out["router_disaggregated_s"] - path.request_path_s(n, n)
                                            for n, rs in samples_g.items() for r in rs])
    return jit


def rederive(profile: dict) -> dict:
    """The profile's overheads with router_direct_s, prompt_residual, per_prompt_token_s and
    router_disaggregated_s derived again from the per-length medians the probe stored
    (overheads.deployed: measured TTFT and the simulator's lone request, per_token_stream_s
    in place), by the rules above, and prefill_serial_s from the stored bursts against that
    path: for a profile measured under an earlier rule. The measurements are not touched
    (benchmarks/rederive_deployed_overheads.py)."""
    o = copy.deepcopy(profile["overheads"])
    d = o.get("deployed")
    if not d or "direct" not in d:
        raise ValueError("profile.overheads.deployed: no deployed-path measurements to derive from")
    res = {m: {int(n): (r["ttft_ms"] - r["engine_ttft_ms"]) / 1e3 for n, r in d[m].items()}
           for m in ("direct", "disaggregated") if m in d}
    # Every request's TTFT where the probe stored them (since path_jitter_s): the medians'
    # noise and the path's jitter follow from them; without, the medians are taken as measured.
    samples = {m: {int(n): [(t - r["engine_ttft_ms"]) / 1e3 for t in r["ttft_samples_ms"]]
                   for n, r in d[m].items() if r.get("ttft_samples_ms")} for m in res}
    negative = []
    o.update(_prompt_path(res["direct"], negative, samples["direct"]))
    from planner.costmodel import CostModel
    cost = CostModel.from_profile(profile)
    if "disaggregated" in res:
        o["router_disaggregated_s"] = _disaggregated_path(cost, o, res["disaggregated"], negative,
                                                          samples.get("disaggregated"))
    if samples["direct"]:
        o["path_jitter_s"] = _jitters(cost, o, samples["direct"], samples.get("disaggregated") or {})
    b = d.get("bursts")
    if b and b.get("ttft_samples_ms"):   # the serial share, against the path derived again
        rounds = [[dict(ttft=t / 1e3) for t in rnd] for rnd in b["ttft_samples_ms"]]
        priced = CostModel.from_profile(dict(profile, overheads=dict(o, prefill_serial_s=0.0)))
        o["prefill_serial_s"], d["bursts"] = derive_prefill_serial(
            priced, rounds, b["streams"], b["prompt_tokens"], b["output_tokens"],
            profile_host_layout(profile["hardware"], 2))
    d["negative"] = negative
    return o


def derive_overheads(cost, direct: dict[int, list[dict]], disagg: dict[int, list[dict]], output: int) -> dict:
    """The profile's overheads from measured lone requests ({prompt length: [bench records]})."""
    med = statistics.median
    negative = []
    lengths = sorted(direct)
    # Token gaps first: the simulator's per_token_stream_s also sits between prefill chunks.
    sim0 = {n: simulated_lone(cost, "direct", n, output) for n in lengths}
    gap_res = [r["tpot"] - sim0[n][1] for n in lengths for r in direct[n]]
    per_token = med(gap_res)
    if per_token < 0:
        negative.append(f"per_token_stream_s {per_token * 1e3:.3f} ms")
    per_token = max(0.0, per_token)

    sim_d = {n: simulated_lone(cost, "direct", n, output, per_token) for n in lengths}
    samples_d = {n: [r["ttft"] - sim_d[n][0] for r in direct[n]] for n in lengths}
    res_d = {n: med(samples_d[n]) for n in lengths}
    out = dict(_prompt_path(res_d, negative, samples_d), per_token_stream_s=per_token)
    detail = dict(output_tokens=output, lengths=lengths,
                  direct={str(n): dict(ttft_ms=_ms(med(r["ttft"] for r in direct[n])),
                                       tpot_ms=_ms(med(r["tpot"] for r in direct[n])),
                                       engine_ttft_ms=_ms(sim_d[n][0]), engine_tpot_ms=_ms(sim0[n][1]),
                                       samples=len(direct[n]), ttft_samples_ms=[_ms(r["ttft"]) for r in direct[n]])
                          for n in lengths})
    samples_g = {}
    if disagg:
        dl = sorted(disagg)
        sim_g = {n: simulated_lone(cost, "disaggregated", n, output, per_token) for n in dl}
        samples_g = {n: [r["ttft"] - sim_g[n][0] for r in disagg[n]] for n in dl}
        out["router_disaggregated_s"] = _disaggregated_path(cost, out, {n: med(samples_g[n]) for n in dl}, negative,
                                                            samples_g)
        detail["disaggregated"] = {str(n): dict(ttft_ms=_ms(med(r["ttft"] for r in disagg[n])),
                                                tpot_ms=_ms(med(r["tpot"] for r in disagg[n])),
                                                engine_ttft_ms=_ms(sim_g[n][0]),
                                                transfer_ms=_ms(cost.transfer_time(n)),
                                                samples=len(disagg[n]),
                                                ttft_samples_ms=[_ms(r["ttft"]) for r in disagg[n]]) for n in dl}
    out["path_jitter_s"] = _jitters(cost, out, samples_d, samples_g)
    detail["negative"] = negative
    return dict(out, deployed=detail)


def simulated_concurrent(cost, streams: int, prompt: int, output: int, layout=None,
                         mode: str = "colocated", metric: str = "tpot") -> list[float]:
    """`metric` (tpot or ttft) of `streams` requests sent at once to an idle simulated x1
    cluster of `mode` (colocated, or disaggregated: 1P1D) with the cost model's overheads in
    place and no path scatter, one per request."""
    from planner.simulator import ClusterConfig, simulate
    from planner.workload import Request
    cfg = ClusterConfig(mode, decode=1, prefill=0 if mode == "colocated" else 1,
                        **({"layout": layout} if layout is not None else {}))
    recs, _ = simulate(_with(cost, path_jitter={}), cfg, [Request(0.0, prompt, output) for _ in range(streams)])
    if not all(r["ok"] for r in recs):
        raise RuntimeError(f"deployed probe: the simulator did not serve {streams} concurrent requests")
    return [r[metric] for r in recs]


def _bisect_up(simulated, measured: float, lo: float, hi: float, cap: float | None = None) -> float:
    """The smallest value in [lo, ...), to 0.1%, at which simulated(value), growing with it,
    reaches `measured` (bracketed by doubling hi, at most up to cap)."""
    for _ in range(40):
        if simulated(hi) >= measured or (cap is not None and hi >= cap):
            break
        lo, hi = hi, 2 * hi if cap is None else min(cap, 2 * hi)
    if cap is not None and hi >= cap and simulated(hi) < measured:
        return cap
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if simulated(mid) < measured else (lo, mid)
        if hi - lo <= 1e-3 * hi:
            break
    return hi   # reaches `measured`: where simulated() jumps (a step's quantum), the edge above it


def derive_per_stream(cost, rounds: list[list[dict]], streams: int, prompt: int, output: int,
                      layout=None) -> tuple[float, dict]:
    """per_stream_s from concurrent rounds (each `streams` bench records): the value at which
    the simulator's TPOT median for the same rounds (the cost model with its other
    overheads, per_token_stream_s and the front end's share of the cores in place) equals
    the measured median. The simulated TPOT only grows with it, but not in proportion (the
    front end's share of a busy host changes with the step times, and can leave it flat over
    a range), so it is found by bisection: a value that reproduces the measured median, not
    necessarily the only one. 0 when the simulator is already as slow as measured. Returns it
    and what the profile keeps of the measurement."""
    measured = statistics.median(r["tpot"] for rnd in rounds for r in rnd)

    def simulated(per: float) -> float:
        return statistics.median(simulated_concurrent(_with(cost, per_stream_s=per), streams, prompt, output, layout))
    priced = simulated(0.0)
    per = (_bisect_up(simulated, measured, 0.0, max(1e-6, (measured - priced) / max(1, streams - 1)))
           if measured > priced else 0.0)
    detail = dict(streams=streams, prompt_tokens=prompt, output_tokens=output, rounds=len(rounds),
                  tpot_ms=_ms(measured), priced_tpot_ms=_ms(priced),
                  tpot_samples_ms=[_ms(r["tpot"]) for rnd in rounds for r in rnd])
    return per, detail


def derive_prefill_serial(cost, rounds: list[list[dict]], streams: int, prompt: int, output: int,
                          layout=None) -> tuple[float, dict]:
    """prefill_serial_s from bursts of disaggregated requests (each round `streams` bench
    records of requests sent at once to a 1P1D cluster): the value at which the simulator's
    mean TTFT of such a burst equals the median of the rounds' measured means. It moves that
    much of router_disaggregated_s from the request's own latency to the prefill worker's
    loop, one prompt after another, so a lone request is priced as before and only requests
    that meet each other wait; it is capped at router_disaggregated_s (the whole path). 0 when
    the simulator is already as slow as measured. Returns it and what the profile keeps of
    the measurement."""
    measured = statistics.median(statistics.fmean(r["ttft"] for r in rnd) for rnd in rounds)
    cap = cost.router_disaggregated_s

    def simulated(serial: float) -> float:
        return statistics.fmean(simulated_concurrent(_with(cost, prefill_serial_s=serial), streams, prompt, output,
                                                     layout, mode="disaggregated", metric="ttft"))
    priced = simulated(0.0)
    serial = (_bisect_up(simulated, measured, 0.0, min(cap, max(1e-6, (measured - priced) / max(1, streams - 1))), cap)
              if measured > priced and cap > 0 else 0.0)
    detail = dict(streams=streams, prompt_tokens=prompt, output_tokens=output, rounds=len(rounds),
                  mean_ttft_ms=_ms(measured), priced_mean_ttft_ms=_ms(priced), capped=serial >= cap > 0,
                  ttft_samples_ms=[[_ms(r["ttft"]) for r in rnd] for rnd in rounds])
    return serial, detail


def _with(cost, **attrs):
    c = copy.copy(cost)
    for k, v in attrs.items():
        setattr(c, k, v)
    return c


def _ms(s: float) -> float:
    return round(s * 1e3, 4)


def merge_into(overheads: dict, derived: dict, notes: str) -> dict:
    """The profile's `overheads` with the deployed numbers in the priced keys and the probes'
    own (in-process router, gRPC front end) kept under `reference`."""
    ref = {}
    ref["in_process"] = {k: overheads[k] for k in ("router_direct_s", "router_disaggregated_s",
                                                  "per_token_stream_s", "notes") if k in overheads}
    fe = {k: overheads[k] for k in ("frontend_direct_s", "per_prompt_token_s", "frontend_notes") if k in overheads}
    if fe:
        ref["frontend"] = fe
    out = {k: v for k, v in overheads.items()
           if k not in ("router_direct_s", "router_disaggregated_s", "per_token_stream_s", "notes",
                        "per_stream_s", "per_stream_upto",   # measured against the old overheads
                        "frontend_direct_s", "per_prompt_token_s", "frontend_notes", "reference")}
    if "path_jitter_s" in derived:
        out["path_jitter_s"] = derived["path_jitter_s"]
    out.pop("prefill_serial_s", None)   # measured against the old overheads, like per_stream_s
    out.update(router_direct_s=derived["router_direct_s"],
               router_disaggregated_s=derived.get("router_disaggregated_s", overheads.get("router_disaggregated_s",
                                                                                            0.0)),
               per_token_stream_s=derived["per_token_stream_s"], per_prompt_token_s=derived["per_prompt_token_s"],
               prompt_residual=derived["prompt_residual"],
               **{k: derived[k] for k in ("per_stream_s", "per_stream_upto", "prefill_serial_s") if k in derived},
               method="deployed", notes=notes, deployed=derived["deployed"], reference=ref)
    return out


# ---- the measurement ----------------------------------------------------------------------------------
async def _sequential(address: str, prompts: list[tuple[int, list[int]]], output: int, timeout: float) -> list:
    import grpc

    from deploy.bench import GrpcTarget
    from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
    target = GrpcTarget(address, timeout)
    out = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        for n, prompt in prompts:
            await asyncio.sleep(IDLE_GAP_S)
            r = await target._one(stub, dict(arrival=0.0, prompt=prompt, max_tokens=output), time.perf_counter())
            if not r["ok"]:
                raise RuntimeError(f"deployed probe: a {n}-token request failed: {r.get('error')}")
            out.append((n, r))
    return out


async def _concurrent(address: str, rounds: list[list[list[int]]], output: int, timeout: float,
                      want_route: str | None = None) -> list[list[dict]]:
    """Each round's prompts sent at once, after an idle gap; bench records per round."""
    import grpc

    from deploy.bench import GrpcTarget
    from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
    target = GrpcTarget(address, timeout)
    out = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        for prompts in rounds:
            await asyncio.sleep(IDLE_GAP_S)
            t = time.perf_counter()
            got = await asyncio.gather(*(target._one(stub, dict(arrival=0.0, prompt=p, max_tokens=output), t)
                                         for p in prompts))
            bad = [r.get("error") for r in got if not r["ok"]]
            if bad:
                raise RuntimeError(f"deployed probe: concurrent requests failed: {bad[:3]}")
            if want_route is not None and any(r["route"] != want_route for r in got):
                raise RuntimeError(f"deployed probe: concurrent requests not all routed {want_route}: "
                                   f"{sorted({r['route'] for r in got})}")
            out.append(got)
    return out


def measure_concurrent(opts, streams: int, prompt: int, output: int, rounds: int, warmup: int, seed: int,
                       vocab: int = 40000, timeout: float = 120.0, mode: str = "direct") -> list[list[dict]]:
    """Rounds of `streams` requests sent at once to a started x1 cluster of `mode` (direct:
    colocated; disaggregated: 1P1D, threshold 0)."""
    from deploy.bench import ClusterThread
    rng = np.random.default_rng(seed)
    fresh = lambda: rng.integers(3, vocab, size=prompt).tolist()  # noqa: E731  (no prefix-cache hits)
    ct = ClusterThread(_serve_config(opts, mode))
    try:
        want = "direct" if mode == "direct" else "disaggregated"
        asyncio.run(_concurrent(ct.address, [[fresh() for _ in range(streams)] for _ in range(warmup)], output,
                                timeout))
        return asyncio.run(_concurrent(ct.address, [[fresh() for _ in range(streams)] for _ in range(rounds)],
                                       output, timeout, want))
    finally:
        ct.close()


def _serve_config(opts, mode: str):
    from deploy.config import ServeConfig
    prefill, decode, threshold = (0, 1, 1 << 20) if mode == "direct" else (1, 1, 0)
    return ServeConfig.simple(opts.model, num_prefill=prefill, num_decode=decode, dtype=opts.dtype,
                              router={"port": 0, "disagg_threshold": threshold}, engine=dict(opts.engine))


def measure_mode(opts, mode: str, lengths: list[int], output: int, repeats: int, warmup: int, seed: int,
                 vocab: int = 40000, timeout: float = 120.0) -> dict[int, list[dict]]:
    """Lone requests on a started cluster of the mode: {prompt length: [bench records]}."""
    from deploy.bench import ClusterThread
    rng = np.random.default_rng(seed)
    fresh = lambda n: rng.integers(3, vocab, size=n).tolist()  # noqa: E731  (no prefix-cache hits)
    ct = ClusterThread(_serve_config(opts, mode))
    try:
        asyncio.run(_sequential(ct.address, [(n, fresh(n)) for _ in range(warmup) for n in lengths], output, timeout))
        got = asyncio.run(_sequential(ct.address, [(n, fresh(n)) for _ in range(repeats) for n in lengths],
                                      output, timeout))
    finally:
        ct.close()
    want = "direct" if mode == "direct" else "disaggregated"
    wrong = [n for n, r in got if r["route"] != want]
    if wrong:
        raise RuntimeError(f"deployed probe: {len(wrong)} requests not routed {want} (lengths {wrong[:5]})")
    out: dict[int, list[dict]] = {n: [] for n in lengths}
    for n, r in got:
        out[n].append(r)
    return out


def measure(profile: dict, opts, repeats: int = 15, warmup: int = 2, ray_cpus: int = 6) -> dict:
    """Run the probe for a profile (its fit in place) and return the profile's new `overheads`."""
    import os

    import ray

    from deploy.cluster import quiet_ray_auth_notice
    from planner.costmodel import CostModel
    cost = CostModel.from_profile(profile)
    lengths = probe_lengths(int(profile["engine"]["max_model_len"]))
    burst_prompt = min(BURST_PROMPT, lengths[-1])   # capped by the context like the lone prompts
    started_ray = False
    if not ray.is_initialized():
        quiet_ray_auth_notice()
        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        started_ray = True
    t0 = time.perf_counter()
    rounds = max(3, repeats // 3)
    try:
        direct = measure_mode(opts, "direct", lengths, OUTPUT_TOKENS, repeats, warmup, opts.seed)
        disagg = measure_mode(opts, "disaggregated", lengths, OUTPUT_TOKENS, repeats, warmup, opts.seed + 1)
        loaded = measure_concurrent(opts, CONCURRENT_STREAMS, CONCURRENT_PROMPT, OUTPUT_TOKENS, rounds, 1,
                                    opts.seed + 2)
        bursts = measure_concurrent(opts, BURST_STREAMS, burst_prompt, OUTPUT_TOKENS, repeats, 1, opts.seed + 3,
                                    mode="disaggregated")
    finally:
        if started_ray:
            ray.shutdown()
    derived = derive_overheads(cost, direct, disagg, OUTPUT_TOKENS)
    # The concurrent streams against the simulator with everything derived so far in place,
    # on the host's layout as `pdserve plan` would simulate this cluster.
    priced = CostModel.from_profile(dict(profile, overheads=merge_into(profile["overheads"], derived, "")))
    derived["per_stream_s"], derived["deployed"]["concurrent"] = derive_per_stream(
        priced, loaded, CONCURRENT_STREAMS, CONCURRENT_PROMPT, OUTPUT_TOKENS,
        profile_host_layout(profile["hardware"], 1))
    derived["per_stream_upto"] = CONCURRENT_STREAMS   # measured this far: not extrapolated past it
    # The bursts on the 1P1D layout, with everything above (per_stream_s too) in place.
    priced = CostModel.from_profile(dict(profile, overheads=merge_into(profile["overheads"], derived, "")))
    derived["prefill_serial_s"], derived["deployed"]["bursts"] = derive_prefill_serial(
        priced, bursts, BURST_STREAMS, burst_prompt, OUTPUT_TOKENS, profile_host_layout(profile["hardware"], 2))
    d = derived["deployed"]
    d.update(repeats=repeats, warmup=warmup, idle_gap_s=IDLE_GAP_S, seconds=round(time.perf_counter() - t0, 1),
             load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    notes = (f"deployed path (deploy/deployed_probe.py): local Ray clusters as pdserve bench starts them "
             f"(colocated x1; 1P1D threshold 0), {profile['model']['name']}, idle, one request at a time "
             f"{IDLE_GAP_S}s apart over gRPC (then {CONCURRENT_STREAMS} at once), prompts {lengths} tokens, "
             f"{OUTPUT_TOKENS} out, medians of {repeats}, "
             f"minus the simulator's engine time for the same lone request. Measured TTFT direct "
             + ", ".join(f"{n}: {d['direct'][str(n)]['ttft_ms']:.2f} ms (engine {d['direct'][str(n)]['engine_ttft_ms']:.2f})"
                         for n in lengths)
             + "; 1P1D " + ", ".join(f"{n}: {d['disaggregated'][str(n)]['ttft_ms']:.2f} ms (engine+transfer "
                                      f"{d['disaggregated'][str(n)]['engine_ttft_ms']:.2f})" for n in lengths)
             + (f"; {CONCURRENT_STREAMS} streams at once ({CONCURRENT_PROMPT}-token prompts, {rounds} rounds): "
                f"TPOT {d['concurrent']['tpot_ms']:.2f} ms (engine and the rest priced "
                f"{d['concurrent']['priced_tpot_ms']:.2f}), per further stream "
                f"{derived['per_stream_s'] * 1e3:.3f} ms")
             + (f"; {BURST_STREAMS} disaggregated at once ({burst_prompt}-token prompts, {repeats} rounds): mean TTFT "
                f"{d['bursts']['mean_ttft_ms']:.2f} ms (priced {d['bursts']['priced_mean_ttft_ms']:.2f} with the "
                f"path as latency), served one prompt after another by the prefill loop "
                f"{derived['prefill_serial_s'] * 1e3:.3f} ms")
             + (f". Negative residuals (cost model over-predicts), clamped at 0: {d['negative']}" if d["negative"] else ""))
    return merge_into(profile["overheads"], derived, notes[:3900])


def describe(overheads: dict) -> str:
    return json.dumps(overheads.get("deployed", {}), indent=1)
