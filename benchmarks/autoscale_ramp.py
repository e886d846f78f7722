"""Autoscaling under a load ramp: pool sizes and queue depths over time.

Starts a local autoscaled cluster (Ray, controller actor, router), drives it with
closed-loop gRPC clients whose number follows a schedule (a prefill-heavy ramp of long
prompts, idle, a decode-heavy ramp of long generations, idle), samples the router's load
report and the controller's pool sizes every --sample-s seconds, and writes a JSON record
and a PNG (needs matplotlib: `pip install -e ".[bench]"`).

    .venv/bin/python benchmarks/autoscale_ramp.py --model random:tiny \
        --json /tmp/autoscale_ramp.json --png benchmarks/figures/autoscale_ramp_cpu.png

Every request is checked: it must complete with the requested number of tokens; the
record counts sent / completed / failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (seconds, long-prompt clients, long-generation clients)
SCHEDULE = [(8, 2, 0), (12, 6, 0), (35, 12, 0), (20, 0, 0), (10, 0, 12), (45, 0, 36), (25, 0, 0)]


class Clients:
    """Closed-loop clients of two kinds; `resize` starts or stops threads to match."""

    def __init__(self, address: str, long_len: int, long_tokens: int, short_len: int, short_tokens: int):
        self.address = address
        self.spec = {"long": (long_len, long_tokens), "short": (short_len, short_tokens)}
        self.threads: dict[str, list[tuple[threading.Thread, threading.Event]]] = {"long": [], "short": []}
        self.lock = threading.Lock()
        self.sent = self.completed = 0
        self.failures: list[str] = []

    def _run(self, kind: str, seed: int, stop: threading.Event) -> None:
        import grpc
        import torch

        from deploy.client import build_request, collect
        from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
        n, max_tokens = self.spec[kind]
        gen = torch.Generator().manual_seed(seed)
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            while not stop.is_set():
                prompt = torch.randint(100, 40000, (n,), generator=gen).tolist()
                with self.lock:
                    self.sent += 1
                try:
                    out = collect(stub.Generate(build_request(prompt, max_tokens, temperature=0.0), timeout=300))
                    ok = len(out["token_ids"]) == max_tokens
                except Exception as e:
                    ok, out = False, f"{type(e).__name__}: {e}"
                with self.lock:
                    if ok:
                        self.completed += 1
                    else:
                        self.failures.append(str(out)[:200])

    def resize(self, kind: str, n: int) -> None:
        live = self.threads[kind]
        while len(live) > n:
            live.pop()[1].set()
        while len(live) < n:
            stop = threading.Event()
            t = threading.Thread(target=self._run, args=(kind, hash((kind, len(live), time.time())) & 0xFFFF, stop),
                                 daemon=True)
            t.start()
            live.append((t, stop))

    def stop_all(self) -> None:
        for kind in self.threads:
            for t, stop in self.threads[kind]:
                stop.set()
        for kind in self.threads:
            for t, _ in self.threads[kind]:
                t.join(timeout=300)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--sample-s", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)

    import ray

    from deploy.cluster import Cluster
    from deploy.config import from_dict

    fast = dict(up_stable_s=1, down_stable_s=3, up_cooldown_s=3, down_cooldown_s=5)
    cfg = from_dict(dict(
        model=args.model, dtype=args.dtype, engine=dict(num_kv_blocks=2048, max_num_batched_tokens=512),
        router=dict(port=0, disagg_threshold=64),
        pools=dict(prefill=dict(min_replicas=1, max_replicas=args.max_replicas, scaling=fast,
                                targets=dict(queued_tokens_per_replica=1000, ttft_s=None)),
                   decode=dict(min_replicas=1, max_replicas=args.max_replicas, scaling=fast,
                               targets=dict(kv_use=0.9, running_per_replica=14, tpot_s=None))),
        controller=dict(interval_s=0.25, sync_s=0.2)))
    ray.init(num_cpus=2 + 2 * args.max_replicas, include_dashboard=False, log_to_driver=False)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    cluster = Cluster(cfg)
    asyncio.run_coroutine_threadsafe(cluster.start(), loop).result(600)
    ctl = cluster.controller
    clients = Clients(f"127.0.0.1:{cluster.port}", long_len=400, long_tokens=3, short_len=16, short_tokens=64)
    samples = []

    def report():
        async def get():
            return cluster.metrics.load_report()
        return asyncio.run_coroutine_threadsafe(get(), loop).result(30)

    from tqdm import tqdm
    bar = tqdm(total=sum(x[0] for x in SCHEDULE), desc="ramp", unit="s", dynamic_ncols=True, disable=None)
    t0 = time.time()
    try:
        for seconds, n_long, n_short in SCHEDULE:
            clients.resize("long", n_long)
            clients.resize("short", n_short)
            end = time.time() + seconds
            while time.time() < end:
                rep = report()
                sizes = ray.get(ctl.pool_sizes.remote())
                samples.append(dict(
                    t=time.time() - t0, long_clients=n_long, short_clients=n_short,
                    queued_prefill_tokens=sum(w["queued_tokens"] for w in rep["prefill"].values()),
                    decode_running=sum(w["running"] for w in rep["decode"].values()),
                    prefill=sizes["prefill"], decode=sizes["decode"], completed=clients.completed))
                bar.n = min(bar.total, int(samples[-1]["t"]))
                bar.set_postfix(prefill=sizes["prefill"]["active"], decode=sizes["decode"]["active"], refresh=True)
                time.sleep(args.sample_s)
        bar.close()
        clients.stop_all()
        decisions = ray.get(ctl.decisions.remote())
    finally:
        asyncio.run_coroutine_threadsafe(cluster.stop(), loop).result(120)
        ray.shutdown()
    for d in decisions:
        d["t"] = d.pop("time") - t0
    record = dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]), schedule=SCHEDULE,
                  sent=clients.sent, completed=clients.completed, failed=len(clients.failures),
                  failures=clients.failures[:20], decisions=decisions, samples=samples)
    print(json.dumps({k: record[k] for k in ("sent", "completed", "failed")}))
    for d in decisions:
        print(f"  t={d['t']:6.1f}s {d['pool']:7s} {d['delta']:+d} {d['reason']}: {d['detail']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if args.png:
        plot(record, args.png)
    return 0 if clients.failures == [] and clients.sent == clients.completed else 1


def plot(record: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = record["samples"]
    t = [x["t"] for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for ax, pool, signal, label in ((axes[0], "prefill", "queued_prefill_tokens", "queued prefill tokens"),
                                    (axes[1], "decode", "decode_running", "decode running + waiting seqs")):
        ax.step(t, [x[pool]["active"] for x in s], where="post", color="tab:blue", lw=2, label="active replicas")
        ax.step(t, [x[pool]["active"] + x[pool]["starting"] for x in s], where="post", color="tab:blue", ls=":",
                label="+ starting")
        ax.step(t, [x[pool]["draining"] + x[pool]["stopping"] for x in s], where="post", color="tab:gray",
                label="draining")
        ax.set_ylabel(f"{pool} replicas")
        ax.set_ylim(-0.1, max(x[pool]["active"] + x[pool]["starting"] for x in s) + 0.5)
        tw = ax.twinx()
        tw.plot(t, [x[signal] for x in s], color="tab:orange", alpha=0.8, label=label)
        tw.set_ylabel(label, color="tab:orange")
        for d in record["decisions"]:
            if d["pool"] == pool and d["delta"]:
                ax.axvline(d["t"], color="tab:green" if d["delta"] > 0 else "tab:red", alpha=0.4, ls="--")
        ax.legend(loc="upper left", fontsize=8)
    axes[2].step(t, [x["long_clients"] for x in s], where="post", label="long-prompt clients (400 tok, 3 out)")
    axes[2].step(t, [x["short_clients"] for x in s], where="post", label="long-generation clients (16 tok, 64 out)")
    axes[2].set_ylabel("concurrent clients")
    axes[2].set_xlabel("seconds")
    axes[2].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"pdserve autoscaling on CPU ({record['completed']}/{record['sent']} requests completed, "
                 f"{record['failed']} failed); dashed: scale up (green) / down (red)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
