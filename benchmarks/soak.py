"""Soak: a steady request rate against a local CPU cluster for N minutes; memory of every
process must stay flat, no KV block may leak, and every request must be accounted for.

    python benchmarks/soak.py [--minutes 10] [--rate 4] [--model random:tiny] [--out soak.json]

A local Ray instance runs the prefill and decode actors; the router and its gRPC server
run in this process, and the load comes from a thread pool in this process too (gRPC
clients, as a real client would). The mix, from a fixed seed: long prompts (disaggregated),
short prompts (direct), prompts sharing a long prefix (prefix-cache hits), a few with stop
strings or seeded sampling, and a share cancelled by the client mid-stream.

Every --sample-s seconds the RSS of every process (this one = router; each actor's pid
from its ping) is read from /proc. After the run the load stops, the cluster must become
idle, and the checks are:

  memory   for each process, median RSS of the last 3 samples minus median RSS of the first
           3 samples after the warm-up (--warmup-frac of the run) <= --rss-growth-mb
  blocks   every worker: no request in flight, no referenced KV block (free == total)
  requests sent == ok + cancelled + rejected (RESOURCE_EXHAUSTED) + failed, failed == 0,
           and the router holds no request

The JSON record (--out) has the configuration, the counts, latency percentiles, the RSS
time series and each check's result; the exit status is 1 if a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from deploy.client import build_request  # noqa: E402
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc  # noqa: E402


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Load:
    """One request per call; outcomes and latencies recorded under a lock."""

    def __init__(self, stub, rng_seed: int, cancel_frac: float, vocab_hi: int = 40000):
        self.stub = stub
        self.rng = random.Random(rng_seed)
        self.cancel_frac = cancel_frac
        self.vocab_hi = vocab_hi
        self.shared = [self.rng.randrange(100, vocab_hi) for _ in range(256)]
        self.lock = threading.Lock()
        self.outcomes: dict[str, int] = {}
        self.routes: dict[str, int] = {}
        self.ttft: list[float] = []
        self.e2e: list[float] = []
        self.sent = 0

    def next_request(self):
        r = self.rng
        kind = r.choices(["long", "short", "shared", "stop", "seeded"], [3, 4, 2, 0.5, 0.5])[0]
        n = {"long": r.randint(150, 500), "short": r.randint(4, 60), "shared": r.randint(4, 40)}.get(kind, 30)
        prompt = [r.randrange(100, self.vocab_hi) for _ in range(n)]
        if kind == "shared":
            prompt = self.shared + prompt
        req = build_request(prompt, r.randint(8, 64), temperature=0.0 if kind != "seeded" else 0.8,
                            seed=r.randrange(1 << 30) if kind == "seeded" else None)
        if kind == "stop":
            req.sampling.stop.append("the")
        cancel = r.random() < self.cancel_frac
        return req, cancel

    def run_one(self, req, cancel: bool) -> None:
        t0 = time.monotonic()
        outcome, first, route = "ok", None, None
        try:
            call = self.stub.Generate(req, timeout=120)
            for i, resp in enumerate(call):
                if first is None:
                    first = time.monotonic() - t0
                if cancel and i >= 1:
                    call.cancel()
                    outcome = "cancelled"
                    break
                if resp.finish_reason:
                    route = resp.route.reason
        except grpc.RpcError as e:
            code = e.code()
            if cancel and code == grpc.StatusCode.CANCELLED:
                outcome = "cancelled"
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                outcome = "rejected"
            else:
                outcome = f"failed:{code.name}"
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if outcome == "ok":
                self.e2e.append(time.monotonic() - t0)
                if first is not None:
                    self.ttft.append(first)
                self.routes[route] = self.routes.get(route, 0) + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (steady, evenly spaced)")
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--threshold", type=int, default=128, help="disaggregation threshold (uncached tokens)")
    ap.add_argument("--num-kv-blocks", type=int, default=1024)
    ap.add_argument("--cancel-frac", type=float, default=0.05)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup-frac", type=float, default=0.2)
    ap.add_argument("--rss-growth-mb", type=float, default=64.0)
    ap.add_argument("--max-concurrency", type=int, default=64, help="client threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    from deploy.cluster import Cluster
    from deploy.config import ServeConfig

    ray.init(num_cpus=max(4, args.prefill + args.decode + 1), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coro, timeout=300):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    cluster = Cluster(ServeConfig.simple(args.model, num_prefill=args.prefill, num_decode=args.decode,
                                         dtype=args.dtype, router=dict(port=0, disagg_threshold=args.threshold),
                                         engine=dict(num_kv_blocks=args.num_kv_blocks)))
    t_start = time.monotonic()
    call(cluster.start())
    print(f"soak: cluster up in {time.monotonic() - t_start:.1f}s; {args.rate} req/s for {args.minutes} min",
          flush=True)
    actors = {**cluster.decode_actors, **cluster.prefill_actors}
    pids = {"router": os.getpid()}
    for wid, a in actors.items():
        pids[wid] = ray.get(a.ping.remote(), timeout=60)["pid"]
    channel = grpc.insecure_channel(f"127.0.0.1:{cluster.port}")
    load = Load(pb_grpc.GenerationStub(channel), args.seed, args.cancel_frac)

    samples: list[dict] = []
    duration = args.minutes * 60

    from tqdm import tqdm
    bar = tqdm(total=round(duration), desc="soak", unit="s", dynamic_ncols=True, disable=None)   # None: TTY only

    def sample(t0):
        samples.append(dict(t=round(time.monotonic() - t0, 2), rss_mb={k: rss_mb(p) for k, p in pids.items()},
                            inflight=len(cluster.router.requests)))
        bar.n = min(round(duration), int(samples[-1]["t"]))
        bar.set_postfix(sent=load.sent, inflight=samples[-1]["inflight"], refresh=True)

    pool = ThreadPoolExecutor(args.max_concurrency)
    t0 = time.monotonic()
    next_sample = t0
    i = 0
    backlog_peak = 0
    futures = []
    while True:
        now = time.monotonic()
        if now - t0 >= duration:
            bar.close()
            break
        if now >= next_sample:
            sample(t0)
            next_sample += args.sample_s
            futures = [f for f in futures if not f.done()]
            backlog_peak = max(backlog_peak, len(futures))
        due = t0 + i / args.rate
        if now >= due:
            req, cancel = load.next_request()
            futures.append(pool.submit(load.run_one, req, cancel))
            load.sent += 1
            i += 1
        else:
            time.sleep(min(due - now, max(0.0, next_sample - now), 0.05))
    pool.shutdown(wait=True)
    sample(t0)
    elapsed = time.monotonic() - t0

    # ---- checks ---------------------------------------------------------------------------------------
    def worker_stats():
        return {wid: ray.get(a.stats.remote(), timeout=60) for wid, a in actors.items()}
    end = time.monotonic() + 60
    while True:
        stats = worker_stats()
        busy = {w: s for w, s in stats.items() if s["in_flight"] or s["num_running"] or s["num_waiting"]
                or s["num_awaiting_kv"] or s["num_free_blocks"] != s["num_blocks"]}
        if not busy or time.monotonic() > end:
            break
        time.sleep(0.5)
    leaked = {w: dict(in_flight=s["in_flight"], referenced_blocks=s["num_blocks"] - s["num_free_blocks"])
              for w, s in stats.items()}
    blocks_ok = all(v["in_flight"] == 0 and v["referenced_blocks"] == 0 for v in leaked.values())

    failed = {k: v for k, v in load.outcomes.items() if k.startswith("failed")}
    accounted = sum(load.outcomes.values())
    router_left = len(cluster.router.requests)
    requests_ok = accounted == load.sent and not failed and router_left == 0

    after = [s for s in samples if s["t"] >= args.warmup_frac * duration]
    growth = {}
    for k in pids:
        series = [s["rss_mb"][k] for s in after if s["rss_mb"][k] is not None]
        if len(series) >= 2:
            growth[k] = round(statistics.median(series[-3:]) - statistics.median(series[:3]), 1)
        else:
            growth[k] = None
    memory_ok = all(g is not None and g <= args.rss_growth_mb for g in growth.values())

    record = dict(
        benchmark="soak", argv=sys.argv, config=vars(args), host=platform.node(), cpus=os.cpu_count(),
        elapsed_s=round(elapsed, 1), sent=load.sent, outcomes=load.outcomes, routes=load.routes,
        achieved_rate=round(load.sent / elapsed, 3), client_backlog_peak=backlog_peak,
        ttft_s=dict(p50=percentile(load.ttft, 0.5), p99=percentile(load.ttft, 0.99)),
        e2e_s=dict(p50=percentile(load.e2e, 0.5), p99=percentile(load.e2e, 0.99)),
        router=cluster.router.stats(), workers={w: {k: s[k] for k in ("requests", "disaggregated", "fallbacks",
                                                                       "aborted", "errors", "orphaned")
                                                    if k in s} for w, s in stats.items()},
        rss_growth_mb=growth, leaked=leaked, samples=samples,
        checks=dict(memory_flat=memory_ok, no_leaked_blocks=blocks_ok, requests_accounted=requests_ok),
        passed=memory_ok and blocks_ok and requests_ok)
    record["router"].pop("decode", None)
    record["router"].pop("prefill", None)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(json.dumps({k: record[k] for k in ("elapsed_s", "sent", "outcomes", "achieved_rate", "ttft_s", "e2e_s",
                                             "rss_growth_mb", "leaked", "checks", "passed")}, default=str))
    print(f"soak: {'PASS' if record['passed'] else 'FAIL'}; record in {args.out}", flush=True)

    channel.close()
    call(cluster.stop())
    loop.call_soon_threadsafe(loop.stop)
    ray.shutdown()
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
