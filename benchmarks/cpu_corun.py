"""CPU: do engine processes stepping at the same time slow each other? (issue 15: the
simulator's processor sharing assumes a host of `os.cpu_count()` cores, each engine using
the threads Ray gives it.)

    python benchmarks/cpu_corun.py --engines 1,2,3 [--seconds 4] [--threads 1] [--json out.json]

For each count k: k processes, each an LLMEngine on `random:tiny` (fp32, --threads torch
threads) decoding a batch of 8 sequences, start stepping at one agreed instant and step
back to back for --seconds; each reports its median step time and its number of steps.
Alone (k=1) against k at once: a median that rises means the engines slow each other's
steps; fewer steps at an unchanged median means the OS time-slices them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(start_at: float, seconds: float, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, ROOT)
    from engine import LLMEngine, SamplingParams
    engine = LLMEngine("random:tiny", device="cpu", dtype=torch.float32)
    for i in range(8):
        engine.add_request(f"r{i}", list(range(5, 205)), SamplingParams(max_tokens=1_000_000, ignore_eos=True))
    for _ in range(20):
        engine.step()
    while time.time() < start_at:
        time.sleep(0.001)
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - a)
    return dict(median_step_ms=1e3 * statistics.median(times), steps=len(times))


def run(k: int, seconds: float, threads: int) -> list[dict]:
    start_at = time.time() + 10.0   # time for every process to build its engine first
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(start_at), str(seconds),
                               str(threads)], stdout=subprocess.PIPE, text=True) for _ in range(k)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker exited {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="1,2,3")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = {}
    print(f"host: {os.cpu_count()} CPUs; torch threads per engine {args.threads}")
    print("| engines at once | median step ms (each) | steps in the window (each) |")
    print("|---|---|---|")
    for k in (int(x) for x in args.engines.split(",")):
        rows[k] = run(k, args.seconds, args.threads)
        medians = " / ".join(f"{r['median_step_ms']:.2f}" for r in rows[k])
        steps = " / ".join(str(r["steps"]) for r in rows[k])
        print(f"| {k} | {medians} | {steps} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpus=os.cpu_count(), threads=args.threads, seconds=args.seconds, runs=rows), f, indent=1)


if __name__ == "__main__":
    main()
