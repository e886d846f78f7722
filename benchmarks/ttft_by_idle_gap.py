"""TTFT of lone requests by how long the cluster had been idle before them, from the
per-request rows of `pdserve bench --requests-json` (benchmarks/RESULTS.md, issue 15).

A request is lone when no earlier request is still in flight when it is sent; its idle gap
is the time since the last one finished (cluster-wide: with several decode workers the
one that serves it may have been idle longer). --per-worker counts both on the decode
worker that streamed the request instead (the rows' `decode_worker`, recorded by bench
since the fifth session). Medians per gap bucket, per mode and rate.

    python benchmarks/ttft_by_idle_gap.py benchmarks/data/serve_cpu_tiny_1_run_f_requests.json.gz [...]
    python benchmarks/ttft_by_idle_gap.py --per-worker benchmarks/data/serve_cpu_tiny_2_2026-12-07e_a_requests.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics

EDGES = (0.1, 0.15, 0.2, 0.3, 0.6)   # bucket upper bounds, seconds; the last bucket is open


def lone_by_gap(requests: list[dict], per_worker: bool = False) -> dict[str, list[float]]:
    """{bucket label: [TTFT ms of the lone requests whose idle gap falls in it]}; with
    per_worker, lone and idle on the decode worker that served each request."""
    reqs = sorted((r for r in requests if r["ok"]), key=lambda r: r["sent_s"])
    if per_worker and any(r.get("decode_worker") is None for r in reqs):
        raise ValueError("--per-worker needs every request's decode_worker (bench records it since the fifth session)")
    ends: dict[object, list[float]] = {}
    out: dict[str, list[float]] = {}
    for r in reqs:
        t = r["sent_s"]
        mine = ends.setdefault(r["decode_worker"] if per_worker else None, [])
        if not any(e > t for e in mine):
            gap = t - max((e for e in mine if e <= t), default=0.0)
            label = next((f"<{e}" for e in EDGES if gap < e), f">={EDGES[-1]}")
            out.setdefault(label, []).append(1e3 * r["ttft_s"])
        mine.append(t + r["e2e_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="bench --requests-json files (.json or .json.gz)")
    ap.add_argument("--mode", default="colocated")
    ap.add_argument("--per-worker", action="store_true", help="lone and idle on the serving decode worker")
    args = ap.parse_args()
    order = [f"<{e}" for e in EDGES] + [f">={EDGES[-1]}"]
    for path in args.files:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
            d = json.load(f)
        for run in d["modes"].get(args.mode, []):
            b = lone_by_gap(run["requests"], args.per_worker)
            cells = ", ".join(f"{k} s: {statistics.median(b[k]):.2f} ms (n={len(b[k])})" for k in order if k in b)
            print(f"{path.rsplit('/', 1)[-1]}  {args.mode} rate {run['rate']:g}: {cells}")


if __name__ == "__main__":
    main()
