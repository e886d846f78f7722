"""Measured against predicted TTFT request by request (issue 15): where the simulator's
first token departs from a bench run's.

    pdserve bench --model random:tiny --modes colocated --decode-replicas 1 --rates 5 \\
        --requests 160 --json serve.json --requests-json measured.json
    pdserve plan --profile profile.json --validate serve.json --requests-json predicted.json
    python benchmarks/ttft_per_request.py measured.json predicted.json

Both files are in `pdserve bench --requests-json`'s format; request i of a run is request i
of the other (the same workload draw). Per mode and rate it prints measured minus predicted
TTFT by prompt length (bins of --bin tokens), for all requests, for lone ones (no other
request in flight when it was sent, none sent before its first token) and for overlapped
ones; then a least-squares line of the difference against prompt tokens for each group.
"In flight" is read from each file's own clock (measured: the measured send and end times).
--slowest F lists the slowest fraction F of the measured requests (the tail that sets TTFT
p90) with the predicted TTFT of each and the time since the request sent before it (bursts).
--burst-window MS groups the requests by their place in a burst (how many others were sent
less than MS before them) and prints the median measured-minus-predicted TTFT of each place:
a cost the simulator prices as parallel latency but the cluster serves one request at a time
grows with the place.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def lone_flags(rows: list[dict]) -> list[bool]:
    """True for a request alone from its send to its first token: no other request in
    flight when it was sent (sent earlier, not finished) and none sent before its first token."""
    spans = [(r["sent_s"], r["sent_s"] + r["e2e_s"]) for r in rows if r["ok"]]
    out = []
    for r in rows:
        if not r["ok"]:
            out.append(False)
            continue
        s, first = r["sent_s"], r["sent_s"] + r["ttft_s"]
        busy = any(a < s < b or s < a < first for a, b in spans if (a, b) != (s, s + r["e2e_s"]))
        out.append(not busy)
    return out


def joined(measured: list[dict], predicted: list[dict]) -> list[dict]:
    if len(measured) != len(predicted):
        raise ValueError(f"{len(measured)} measured requests against {len(predicted)} predicted")
    lone_m = lone_flags(measured)
    lone_p = lone_flags(predicted)
    out = []
    for m, p, lm, lp in zip(measured, predicted, lone_m, lone_p):
        if m["prompt_tokens"] != p["prompt_tokens"] or m["max_tokens"] != p["max_tokens"]:
            raise ValueError(f"request {m['i']}: the files drew different requests (not the same workload)")
        if not (m["ok"] and p["ok"]):
            continue
        out.append(dict(i=m["i"], sent=m["sent_s"], prompt=m["prompt_tokens"], out=m["max_tokens"], meas=m["ttft_s"],
                        pred=p["ttft_s"],
                        diff=m["ttft_s"] - p["ttft_s"], lone=lm, lone_pred=lp, route=m.get("route"),
                        meas_tpot=m["tpot_s"], pred_tpot=p["tpot_s"]))
    return out


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def report(rows: list[dict], bin_tokens: int) -> str:
    med = statistics.median
    lines = [f"{'prompt':>11} {'n':>4} {'meas':>6} {'pred':>6} {'diff':>6} | {'lone n':>6} {'diff':>6} "
             f"{'meas':>6} {'pred':>6} | {'ovl n':>5} {'diff':>6}   (medians, ms)"]
    top = max(r["prompt"] for r in rows)
    for lo in range(0, top + 1, bin_tokens):
        b = [r for r in rows if lo <= r["prompt"] < lo + bin_tokens]
        if not b:
            continue
        lone = [r for r in b if r["lone"]]
        ovl = [r for r in b if not r["lone"]]
        ms = lambda xs: f"{med(xs) * 1e3:6.2f}" if xs else f"{'-':>6}"  # noqa: E731
        lines.append(f"{lo:>5}-{lo + bin_tokens - 1:<5} {len(b):>4} {ms([r['meas'] for r in b])} "
                     f"{ms([r['pred'] for r in b])} {ms([r['diff'] for r in b])} | {len(lone):>6} "
                     f"{ms([r['diff'] for r in lone])} {ms([r['meas'] for r in lone])} {ms([r['pred'] for r in lone])}"
                     f" | {len(ovl):>5} {ms([r['diff'] for r in ovl])}")
    for name, group in (("all", rows), ("lone", [r for r in rows if r["lone"]]),
                        ("overlapped", [r for r in rows if not r["lone"]])):
        if len(group) < 2:
            continue
        a, s = line([r["prompt"] for r in group], [r["diff"] for r in group])
        am, sm = line([r["prompt"] for r in group], [r["meas"] for r in group])
        ap_, sp = line([r["prompt"] for r in group], [r["pred"] for r in group])
        lines.append(f"{name:>10} ({len(group)}): measured - predicted = {a * 1e3:.2f} ms + {s * 1e6:.2f} us/token; "
                     f"measured {am * 1e3:.2f} ms + {sm * 1e6:.2f} us/token, predicted {ap_ * 1e3:.2f} ms + "
                     f"{sp * 1e6:.2f} us/token")
    both = sum(r["lone"] and r["lone_pred"] for r in rows)
    lines.append(f"lone in the measurement: {sum(r['lone'] for r in rows)}, in the simulation: "
                 f"{sum(r['lone_pred'] for r in rows)}, in both: {both}")
    return "\n".join(lines)


def slowest(rows: list[dict], fraction: float) -> str:
    """The slowest `fraction` of the requests by measured TTFT, in send order: id, route,
    prompt tokens, measured and predicted TTFT, ms since the previous request was sent."""
    by_send = sorted(rows, key=lambda r: r["sent"])
    gap = {r["i"]: (r["sent"] - prev["sent"]) * 1e3 for prev, r in zip(by_send, by_send[1:])}
    n = max(1, round(fraction * len(rows)))
    tail = sorted(sorted(rows, key=lambda r: r["meas"])[-n:], key=lambda r: r["sent"])
    lines = [f"slowest {n}: {'i':>4} {'route':>13} {'prompt':>6} {'meas':>6} {'pred':>6} {'gap':>7}   (ms)"]
    lines += [f"{'':>12}{r['i']:>4} {str(r['route']):>13} {r['prompt']:>6} {r['meas'] * 1e3:6.1f} "
              f"{r['pred'] * 1e3:6.1f} {gap.get(r['i'], float('nan')):7.1f}" for r in tail]
    return "\n".join(lines)


BURST_PLACES = 3   # places counted apart; later ones go with the last


def by_burst_place(rows: list[dict], window_s: float, cap: int = BURST_PLACES) -> dict[int, list[float]]:
    """{place in its burst: measured - predicted TTFT (s) of each request there}; the place is
    how many requests were sent less than window_s before it (at most cap)."""
    by_send = sorted(rows, key=lambda r: r["sent"])
    out: dict[int, list[float]] = {}
    for k, r in enumerate(by_send):
        place = sum(1 for q in by_send[:k] if r["sent"] - q["sent"] < window_s)
        out.setdefault(min(place, cap), []).append(r["diff"])
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measured")
    ap.add_argument("predicted")
    ap.add_argument("--bin", type=int, default=64, help="prompt-length bin (tokens)")
    ap.add_argument("--json", help="write the joined rows here")
    ap.add_argument("--slowest", type=float, default=0.0, metavar="F",
                    help="also list the slowest fraction F of the requests (e.g. 0.1)")
    ap.add_argument("--burst-window", type=float, default=0.0, metavar="MS",
                    help="also print measured - predicted TTFT by place in a burst (sent within MS ms)")
    args = ap.parse_args(argv)
    with open(args.measured) as f:
        meas = json.load(f)
    with open(args.predicted) as f:
        pred = json.load(f)
    out = {}
    for mode, runs in meas["modes"].items():
        for k, run in enumerate(runs):
            prun = pred["modes"][mode][k]
            if prun["seed"] != run["seed"] or prun["rate"] != run["rate"]:
                print(f"{mode}: run {k} differs (rate/seed)", file=sys.stderr)
                return 2
            rows = joined(run["requests"], prun["requests"])
            out[f"{mode}@{run['rate']:g}"] = rows
            print(f"== {mode}, rate {run['rate']:g}/s, {len(rows)} requests")
            print(report(rows, args.bin))
            if args.slowest > 0:
                print(slowest(rows, args.slowest))
            if args.burst_window > 0:
                places = by_burst_place(rows, args.burst_window / 1e3)
                print(f"by place in a burst ({args.burst_window:g} ms): " + "  ".join(
                    f"{k}{'+' if k == BURST_PLACES else ''}: n={len(v)} {statistics.median(v) * 1e3:+.1f} ms"
                    for k, v in places.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
