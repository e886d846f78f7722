"""TPOT of a bench run's requests, split by whether another request was in flight while
they streamed (issue 15): how much of the TPOT growth with load is contention, and how far
lone requests in a serving run stand from a profile's lone ones.

    pdserve bench ... --requests-json measured.json        # or a committed *_requests.json.gz
    python benchmarks/tpot_by_overlap.py benchmarks/data/serve_cpu_tiny_1_run_c_requests.json.gz

Per mode and rate: TPOT p50 / p90 of the requests with no other request alive (sent, not
finished) at any moment between their first and last token ("lone"), and p50 of the others
with the mean number of others alive at once ("overlapped").

--by-other-worker (several decode workers; rows that name their `decode_worker`, bench
since the fifth session): TTFT and TPOT medians split by whether another worker was serving.
TTFT: short prompts (< 256 tokens) sent with nothing in flight on their own worker, by
whether another worker had a request in flight when they were sent; TPOT: every request, by
whether another worker was busy for more than half of its life (sent to last token).

    python benchmarks/tpot_by_overlap.py --by-other-worker benchmarks/data/serve_cpu_tiny_2_2026-12-07e_a_requests.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics


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


def by_other_worker(rows: list[dict], short: int = 256) -> dict[str, dict[str, list[float]]]:
    """{"ttft" | "tpot": {"other busy" | "other idle": [ms, ...]}} (see the module's --by-other-worker)."""
    ok = sorted((r for r in rows if r["ok"]), key=lambda r: r["sent_s"])
    if any(r.get("decode_worker") is None for r in ok):
        raise ValueError("--by-other-worker needs every request's decode_worker (bench records it since the "
                         "fifth session)")
    life = [(r["sent_s"], r["sent_s"] + r["e2e_s"], r["decode_worker"]) for r in ok]
    out = {"ttft": {"other busy": [], "other idle": []}, "tpot": {"other busy": [], "other idle": []}}
    for r in ok:
        t, end, w = r["sent_s"], r["sent_s"] + r["e2e_s"], r["decode_worker"]
        own_busy = any(a < t < b and x == w for a, b, x in life)
        other_busy = any(a <= t < b and x != w for a, b, x in life)
        if not own_busy and r["prompt_tokens"] < short:
            out["ttft"]["other busy" if other_busy else "other idle"].append(1e3 * r["ttft_s"])
        if r["output_tokens"] >= 2:
            shared = _covered([(max(a, t), min(b, end)) for a, b, x in life if x != w and a < end and b > t])
            out["tpot"]["other busy" if shared > 0.5 * r["e2e_s"] else "other idle"].append(1e3 * r["tpot_s"])
    return out


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals (requests in flight at once on the other
    workers count once)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("requests", nargs="+", help="pdserve bench --requests-json files (.json or .json.gz)")
    ap.add_argument("--by-other-worker", action="store_true",
                    help="TTFT and TPOT medians by whether another decode worker was serving")
    args = ap.parse_args(argv)
    if args.by_other_worker:
        print("| file | mode | rate/s | requests per worker | TTFT p50 ms, other busy / idle (n) | "
              "TPOT p50 ms, other busy / idle (n) |")
        print("|---|---|---|---|---|---|")
        for path in args.requests:
            for mode, runs in _load(path)["modes"].items():
                for run in runs:
                    s = by_other_worker(run["requests"])
                    cell = lambda d: " / ".join(  # noqa: E731
                        f"{statistics.median(d[k]) if d[k] else float('nan'):.2f} ({len(d[k])})"
                        for k in ("other busy", "other idle"))
                    ok = [r["decode_worker"] for r in run["requests"] if r["ok"]]
                    per = ", ".join(f"{w} {ok.count(w)}" for w in sorted(set(ok)))
                    print(f"| {path.rsplit('/', 1)[-1]} | {mode} | {run['rate']:g} | {per} | {cell(s['ttft'])} | "
                          f"{cell(s['tpot'])} |")
        return
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
