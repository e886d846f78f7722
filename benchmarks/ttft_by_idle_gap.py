"""TTFT of lone requests by how long the cluster had been idle before them, from the
per-request rows of `pdserve bench --requests-json` (benchmarks/RESULTS.md, issue 15).

A request is lone when no earlier request is still in flight when it is sent; its idle gap
is the time since the last one finished (cluster-wide: with several decode workers the
one that serves it may have been idle longer). Medians per gap bucket, per mode and rate.

    python benchmarks/ttft_by_idle_gap.py benchmarks/data/serve_cpu_tiny_1_run_f_requests.json.gz [...]
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics

EDGES = (0.1, 0.15, 0.2, 0.3, 0.6)   # bucket upper bounds, seconds; the last bucket is open


def lone_by_gap(requests: list[dict]) -> dict[str, list[float]]:
    """{bucket label: [TTFT ms of the lone requests whose idle gap falls in it]}."""
    reqs = sorted((r for r in requests if r["ok"]), key=lambda r: r["sent_s"])
    ends: list[float] = []
    out: dict[str, list[float]] = {}
    for r in reqs:
        t = r["sent_s"]
        if not any(e > t for e in ends):
            gap = t - max((e for e in ends if e <= t), default=0.0)
            label = next((f"<{e}" for e in EDGES if gap < e), f">={EDGES[-1]}")
            out.setdefault(label, []).append(1e3 * r["ttft_s"])
        ends.append(t + r["e2e_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="bench --requests-json files (.json or .json.gz)")
    ap.add_argument("--mode", default="colocated")
    args = ap.parse_args()
    order = [f"<{e}" for e in EDGES] + [f">={EDGES[-1]}"]
    for path in args.files:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
            d = json.load(f)
        for run in d["modes"].get(args.mode, []):
            b = lone_by_gap(run["requests"])
            cells = ", ".join(f"{k} s: {statistics.median(b[k]):.2f} ms (n={len(b[k])})" for k in order if k in b)
            print(f"{path.rsplit('/', 1)[-1]}  {args.mode} rate {run['rate']:g}: {cells}")


if __name__ == "__main__":
    main()
