"""TTFT and TPOT of lone requests against the idle time before them (issue 15): the
deployed probe's own measurement (deploy/deployed_probe.measure_mode: a local Ray cluster
as `pdserve bench` starts it, one request at a time over gRPC) at several gaps, to see
whether a worker that has been idle longer answers more slowly.

    python benchmarks/idle_gap_probe.py [--gaps 0.1,0.3,0.6,1.0] [--prompt 64] [--repeats 12]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gaps", default="0.1,0.3,0.6,1.0")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    import ray

    import deploy.deployed_probe as dp
    from deploy.cluster import quiet_ray_auth_notice
    quiet_ray_auth_notice()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    opts = SimpleNamespace(model=args.model, dtype=None, engine={}, seed=0)
    rows = []
    print("| route | idle gap s | TTFT median ms | TTFT p90 ms | TPOT median ms |")
    print("|---|---|---|---|---|")
    try:
        for mode in ("direct", "disaggregated"):
            for gap in (float(g) for g in args.gaps.split(",")):
                dp.IDLE_GAP_S = gap   # the probe's gap between requests
                got = dp.measure_mode(opts, mode, [args.prompt], 32, args.repeats, 2, 1)[args.prompt]
                ttft = sorted(1e3 * r["ttft"] for r in got)
                tpot = [1e3 * r["tpot"] for r in got]
                rows.append(dict(route=mode, gap_s=gap, prompt_tokens=args.prompt, ttft_ms=ttft, tpot_ms=tpot))
                print(f"| {mode} | {gap:g} | {statistics.median(ttft):.2f} | {ttft[round(0.9 * (len(ttft) - 1))]:.2f} "
                      f"| {statistics.median(tpot):.2f} |", flush=True)
    finally:
        ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, repeats=args.repeats, cpus=os.cpu_count(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
