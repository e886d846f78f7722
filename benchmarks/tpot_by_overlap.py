"""TPOT of a bench run's requests, split by whether another request was in flight while
they streamed (issue 15): how much of the TPOT growth with load is contention, and how far
lone requests in a serving run stand from a profile's lone ones.

    pdserve bench ... --requests-json measured.json        # or a committed *_requests.json.gz
    python benchmarks/tpot_by_overlap.py benchmarks/data/serve_cpu_tiny_1_run_c_requests.json.gz

Per mode and rate: TPOT p50 / p90 of the requests with no other request alive (sent, not
finished) at any moment between their first and last token ("lone"), and p50 of the others
with the mean number of others alive at once ("overlapped").
"""
from __future__ import annotations

import argparse
import gzip
import json


def _load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[round(p * (len(xs) - 1))] if xs else float("nan")


def split(rows: list[dict]) -> tuple[list[float], list[float], float]:
    """(lone TPOTs, overlapped TPOTs, mean others alive during an overlapped request's stream), in ms."""
    ok = [r for r in rows if r["ok"]]
    alive = [(r["sent_s"], r["sent_s"] + r["e2e_s"]) for r in ok]
    lone, busy, others = [], [], []
    for i, r in enumerate(ok):
        if r["output_tokens"] < 2:   # no TPOT; still a neighbour of the others
            continue
        a, b = r["sent_s"] + r["ttft_s"], r["sent_s"] + r["e2e_s"]
        # time-weighted count of the others alive during [a, b]
        overlap = sum(max(0.0, min(b, e) - max(a, s)) for j, (s, e) in enumerate(alive) if j != i)
        if overlap > 0:
            busy.append(1e3 * r["tpot_s"])
            others.append(overlap / max(b - a, 1e-12))
        else:
            lone.append(1e3 * r["tpot_s"])
    return lone, busy, (sum(others) / len(others) if others else 0.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("requests", nargs="+", help="pdserve bench --requests-json files (.json or .json.gz)")
    args = ap.parse_args(argv)
    print("| file | mode | rate/s | lone n | lone TPOT p50 / p90 ms | overlapped n | overlapped TPOT p50 ms | others alive |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.requests:
        d = _load(path)
        for mode, runs in d["modes"].items():
            for run in runs:
                lone, busy, others = split(run["requests"])
                print(f"| {path.rsplit('/', 1)[-1]} | {mode} | {run['rate']:g} | {len(lone)} | "
                      f"{_q(lone, .5):.2f} / {_q(lone, .9):.2f} | {len(busy)} | {_q(busy, .5):.2f} | {others:.2f} |")


if __name__ == "__main__":
    main()
