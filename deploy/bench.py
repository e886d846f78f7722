"""`pdserve bench`: the serving benchmark, a load generator against the gRPC Generate API
(--address), any OpenAI-compatible HTTP server (--http URL: pdserve's own or another
engine's, so the figures compare), or local clusters it starts per mode.

Requests arrive as a Poisson process at each --rates value (requests/s); each streams its
tokens back, and the client records when every message arrives. Per rate and mode it
reports percentiles (p50/p90/p99) of

  TTFT  time from sending the request to the first token
  TPOT  (E2E - TTFT) / (output tokens - 1): the mean time per output token after the first
  ITL   gaps between successive token-bearing stream messages
  E2E   time from sending to the last message

and goodput: requests per second (over the run, first send to last completion) that met
both SLOs (TTFT <= --ttft-slo, TPOT <= --tpot-slo), with the share that met them.

Workloads (token-id prompts, EOS ignored so every request gets its output length):
  synthetic      prompt lengths uniform in [--prompt-min, --prompt-max], outputs uniform
                 in [--output-min, --output-max]
  shared-prefix  each prompt = one of --num-prefixes shared prefixes of --prefix-len
                 tokens + a unique suffix of the synthetic length (prefix-cache hits)

Modes start a cluster each (deploy/cluster.py on a local Ray instance, this process):
  colocated      0 prefill + --decode-replicas decode workers; every prompt prefilled in place
  disaggregated  1 prefill + 1 decode, threshold 0: every uncached prompt prefilled remotely
                 ("disagg", its old name, is still accepted)
  conditional    1 prefill + 1 decode, --disagg-threshold (the router decides per request)
or, with --address HOST:PORT (gRPC) or --http URL (OpenAI API, /v1/completions streamed
with token-id prompts and ignore_eos, as vLLM and SGLang accept), the load goes to a
running server (mode "external"). Over HTTP, token counts come from the usage chunk and
ITL is measured between text chunks.

Writes a JSON record (--json), every request's own figures (--requests-json: per mode and
rate, request i of the workload's draw with its lengths, route, TTFT, TPOT and E2E; `pdserve
plan --validate ... --requests-json` writes the simulator's for the same requests) and a
PNG of latency and goodput against rate for every mode (--png; needs matplotlib:
`pip install -e .[bench]`).

    pdserve bench --model random:tiny --modes colocated,disaggregated,conditional \\
        --rates 1,2,4 --requests 24 --json serve.json --png serve.png
    pdserve bench --http http://127.0.0.1:8000/v1 --rates 2 --requests 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time

import numpy as np

from router.policy import PolicyConfig

MODES = {
    # mode: (prefill workers, decode workers or None = --decode-replicas, threshold or None = flag)
    "colocated": (0, None, None),
    "disaggregated": (1, 1, 0),
    "conditional": (1, 1, None),
}
# Old spellings still accepted on the command line (older commands, e.g. in
# benchmarks/RESULTS.md); records and output use the names above.
MODE_ALIASES = {"disagg": "disaggregated"}


def parse_modes(text: str) -> list[str]:
    """--modes as the modes' names; ValueError naming the flag for an unknown one."""
    modes = []
    for m in (x.strip() for x in text.split(",")):
        m = MODE_ALIASES.get(m, m)
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
        modes.append(m)
    return modes


# ---- workload -------------------------------------------------------------------------------
def make_workload(args, n: int, rate: float, seed: int) -> list[dict]:
    # One generator for bench and the simulator (planner/workload.py), so `pdserve plan
    # --validate` simulates exactly the requests a measured run sent.
    from planner.workload import WorkloadSpec, bench_requests
    return bench_requests(WorkloadSpec.from_args(args), n, rate, seed)


def _result(stamps: list[tuple[float, int]], sent: float, start: float, tokens: int, expected: int, route,
            cached: int | None = None, decode_worker: str | None = None) -> dict:
    ttft = stamps[0][0] - sent
    e2e = stamps[-1][0] - sent
    return dict(ok=True, sent=sent - start, done=stamps[-1][0] - start, ttft=ttft, e2e=e2e, tokens=tokens,
                tpot=(e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0, route=route,
                itl=[b[0] - a[0] for a, b in zip(stamps, stamps[1:])], expected=expected, cached=cached,
                decode_worker=decode_worker)


def request_rows(work: list[dict], results: list[dict]) -> list[dict]:
    """--requests-json: one row per request of a run, in the workload's order (request i of
    planner/workload.py's draw for the same args and seed): its planned arrival and actual
    send (s from the run's start), prompt tokens, cached prompt tokens (the server's usage;
    None where unknown), output tokens received, route, the decode worker that streamed it
    (gRPC only; None where unknown), and TTFT, TPOT, E2E (s). No content."""
    rows = []
    for i, (w, r) in enumerate(zip(work, results)):
        prompt = len(w["prompt"]) if "prompt" in w else w["prompt_tokens"]
        row = dict(i=i, arrival_s=w["arrival"], sent_s=r.get("sent"), prompt_tokens=prompt,
                   max_tokens=w["max_tokens"], ok=r["ok"])
        if r["ok"]:
            row.update(cached_tokens=r.get("cached"), output_tokens=r["tokens"], route=r["route"],
                       decode_worker=r.get("decode_worker"), ttft_s=r["ttft"], tpot_s=r["tpot"], e2e_s=r["e2e"])
        else:
            row["error"] = r.get("error")
        rows.append(row)
    return rows


# ---- targets: where the load goes -----------------------------------------------------------------
class GrpcTarget:
    """pdserve's gRPC Generate API (token-bearing messages timed; the route is reported)."""

    def __init__(self, address: str, timeout: float):
        self.address, self.timeout = address, timeout

    async def run(self, work: list[dict], progress) -> list[dict]:
        import grpc

        from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            start = time.perf_counter()
            return await asyncio.gather(*(_counted(self._one(stub, r, start), progress) for r in work))

    async def _one(self, stub, r: dict, start: float) -> dict:
        import grpc

        from deploy.client import build_request
        from pdserve_api.v1 import pdserve_pb2 as pb
        await asyncio.sleep(max(0.0, r["arrival"] - (time.perf_counter() - start)))
        req = build_request(r["prompt"], r["max_tokens"], temperature=0.0)
        req.sampling.ignore_eos = True
        sent = time.perf_counter()
        stamps: list[tuple[float, int]] = []
        route = cached = worker = None
        try:
            async for msg in stub.Generate(req, timeout=self.timeout):
                now = time.perf_counter()
                if msg.token_ids:
                    stamps.append((now, len(msg.token_ids)))
                if msg.finish_reason:
                    route = "disaggregated" if msg.route.kind == pb.ROUTE_KIND_DISAGGREGATED else "direct"
                    cached = msg.usage.cached_tokens if msg.HasField("usage") else None
                    worker = msg.route.decode_worker or None
        except grpc.aio.AioRpcError as e:
            return dict(ok=False, error=e.code().name, sent=sent - start)
        if not stamps:
            return dict(ok=False, error="no tokens", sent=sent - start)
        return _result(stamps, sent, start, sum(k for _, k in stamps), r["max_tokens"], route, cached, worker)


class HttpTarget:
    """Any OpenAI-compatible server: streamed /v1/completions with token-id prompts. Token
    counts come from the usage chunk (stream_options.include_usage); a text chunk may carry
    several tokens, so ITL is the gap between text chunks."""

    def __init__(self, base_url: str, timeout: float, api_key: str | None = None, model: str | None = None,
                 ignore_eos: bool = True):
        try:
            import openai
        except ImportError:
            raise ValueError("--http needs the openai package: pip install openai") from None
        self.base_url, self.api_key, self.timeout = base_url, api_key or "unused", timeout
        self.model, self.ignore_eos, self.openai = model, ignore_eos, openai
        self.client = None

    async def run(self, work: list[dict], progress) -> list[dict]:
        # A client per run: its connection pool belongs to the event loop it was made on.
        self.client = self.openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                                              timeout=self.timeout)
        try:
            if self.model is None:    # the server's first (usually only) model
                models = await self.client.models.list()
                if not models.data:
                    raise ValueError("the server lists no model; pass --served-model")
                self.model = models.data[0].id
            start = time.perf_counter()
            return await asyncio.gather(*(_counted(self._one(r, start), progress) for r in work))
        finally:
            await self.client.close()

    async def _one(self, r: dict, start: float) -> dict:
        await asyncio.sleep(max(0.0, r["arrival"] - (time.perf_counter() - start)))
        sent = time.perf_counter()
        stamps: list[tuple[float, int]] = []
        tokens = cached = None
        try:
            stream = await self.client.completions.create(
                model=self.model, prompt=r["prompt"], max_tokens=r["max_tokens"], temperature=0.0, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True} if self.ignore_eos else None)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    stamps.append((now, 1))
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                    details = getattr(chunk.usage, "prompt_tokens_details", None)
                    cached = getattr(details, "cached_tokens", None)
        except self.openai.APIError as e:
            return dict(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}", sent=sent - start)
        if not stamps:
            return dict(ok=False, error="no tokens", sent=sent - start)
        return _result(stamps, sent, start, tokens if tokens is not None else len(stamps), r["max_tokens"], None,
                       cached)


async def _counted(coro, progress):
    try:
        return await coro
    finally:
        if progress is not None:
            progress.update(1)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True, disable=None)  # None: TTY only


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {}
    a = np.asarray(xs)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)} | {"mean": float(a.mean())}


def summarise(results: list[dict], args) -> dict:
    ok = [r for r in results if r["ok"]]
    if not ok:
        errors = sorted({r.get("error", "?") for r in results})
        return dict(requests=len(results), completed=0, errors=len(results), error_kinds=errors[:5])
    duration = max(r["done"] for r in ok) - min(r["sent"] for r in results)
    good = [r for r in ok if r["ttft"] <= args.ttft_slo and r["tpot"] <= args.tpot_slo]
    wrong = [r for r in ok if r["tokens"] != r["expected"]]
    return dict(requests=len(results), completed=len(ok), errors=len(results) - len(ok),
                wrong_token_count=len(wrong), duration_s=duration,
                output_tokens_per_s=sum(r["tokens"] for r in ok) / duration,
                ttft_s=_pcts([r["ttft"] for r in ok]), tpot_s=_pcts([r["tpot"] for r in ok if r["tokens"] > 1]),
                itl_s=_pcts([x for r in ok for x in r["itl"]]), e2e_s=_pcts([r["e2e"] for r in ok]),
                goodput_rps=len(good) / duration, slo_attainment=len(good) / len(results),
                disaggregated=sum(r["route"] == "disaggregated" for r in ok))


# ---- cluster ---------------------------------------------------------------------------------
class ClusterThread:
    """A Cluster (router + gRPC server) on its own event loop in a background thread, so
    the load generator's loop does not share a thread with the router."""

    def __init__(self, cfg):
        from deploy.cluster import Cluster
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cluster = Cluster(cfg)
        self._call(self.cluster.start(), 600)
        self.address = f"127.0.0.1:{self.cluster.port}"

    def _call(self, coro, timeout):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self._call(self.cluster.stop(), 120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def cluster_config(args, mode: str):
    from deploy.config import ServeConfig
    prefill, decode, threshold = MODES[mode]
    return ServeConfig.simple(args.model, num_prefill=prefill,
                              num_decode=args.decode_replicas if decode is None else decode, dtype=args.dtype,
                              router={"port": 0,
                                      "disagg_threshold": args.disagg_threshold if threshold is None else threshold},
                              engine=json.loads(args.engine_kwargs))


def device_layout(cluster) -> dict:
    """Where a started cluster's workers sit, for `pdserve plan --validate` to simulate the
    same sharing: each pool's per-actor ask and the host's GPUs and cores. Ray packs
    fractional GPU asks onto one GPU, and gives a worker max(1, floor(num_cpus)) OpenMP threads."""
    import os

    import ray
    plan = cluster.pool_plan
    pools = {k: dict(replicas=a.replicas, num_gpus=a.num_gpus, num_cpus=a.num_cpus) for k, a in plan.asks.items()}
    return dict(pools=pools, host=dict(gpus=float(ray.cluster_resources().get("GPU", 0)), cpu_cores=os.cpu_count()))


# ---- plot ------------------------------------------------------------------------------------
def plot(record: dict, path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("TTFT p50 / p90 (s)", "ttft_s", args.ttft_slo), ("TPOT p50 / p90 (s)", "tpot_s", args.tpot_slo),
              ("E2E p50 / p90 (s)", "e2e_s", None), ("goodput (req/s within SLOs)", None, None)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (title, key, slo) in zip(axes, panels):
        for mode, runs in record["modes"].items():
            rates = [r["rate"] for r in runs]
            if key is None:
                ax.plot(rates, [r["summary"].get("goodput_rps", 0) for r in runs], "o-", label=mode)
                continue
            line, = ax.plot(rates, [r["summary"].get(key, {}).get("p50", np.nan) for r in runs], "o-", label=mode)
            ax.plot(rates, [r["summary"].get(key, {}).get("p90", np.nan) for r in runs], "x--",
                    color=line.get_color())
        if slo is not None:
            ax.axhline(slo, color="grey", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{record['model']}, {record['workload']} workload "
                 f"(SLOs: TTFT <= {args.ttft_slo}s, TPOT <= {args.tpot_slo * 1000:.0f}ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- command line ------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--address", help="a running pdserve's gRPC HOST:PORT; otherwise clusters are started per mode")
    target.add_argument("--http", metavar="URL", help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=None, help="--http: sent as Authorization: Bearer (default: $OPENAI_API_KEY)")
    ap.add_argument("--served-model", default=None, help="--http: the model name (default: the server's first)")
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="--http: do not send ignore_eos (for servers that refuse the field; outputs may end early)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, from {', '.join(MODES)} (default: all; 'disagg' is accepted "
                         "for disaggregated)")
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--engine-kwargs", default="{}", help="JSON EngineConfig overrides for every worker")
    ap.add_argument("--decode-replicas", type=int, default=2, help="decode workers in colocated mode")
    ap.add_argument("--disagg-threshold", type=int, default=PolicyConfig.disagg_threshold,
                    help="conditional mode's threshold (default %(default)s)")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--warmup", type=int, default=4, help="untimed requests before each mode's runs")
    ap.add_argument("--workload", choices=("synthetic", "shared-prefix"), default="synthetic")
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--output-min", type=int, default=16)
    ap.add_argument("--output-max", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--vocab-max", type=int, default=40000, help="prompt token ids are drawn below this")
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.040)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request deadline (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray-cpus", type=int, default=6, help="num_cpus for a local Ray instance")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ap.add_argument("--json")
    ap.add_argument("--requests-json", metavar="FILE",
                    help="also write every request's lengths, route, TTFT, TPOT and E2E per mode and rate (JSON, "
                         "no content; `pdserve plan --validate ... --requests-json` writes the simulator's)")
    ap.add_argument("--png")


def check_args(args) -> list[float]:
    """ValueError naming the flag for bad values (the CLI prints it as one line)."""
    try:
        rates = [float(x) for x in args.rates.split(",")]
    except ValueError:
        raise ValueError(f"--rates: expected comma-separated numbers, got {args.rates!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--rates: every rate must be > 0, got {args.rates!r}")
    for flag in ("requests", "prompt_min", "output_min", "num_prefixes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1")
    if args.prompt_max < args.prompt_min or args.output_max < args.output_min:
        raise ValueError("--prompt-max/--output-max: must be >= the matching --*-min")
    if not args.address and not args.http:
        args.modes = ",".join(parse_modes(args.modes))   # recorded by the modes' names, whatever spelling was given
    try:
        json.loads(args.engine_kwargs)
    except ValueError:
        raise ValueError("--engine-kwargs: not valid JSON") from None
    return rates


def _line(mode: str, rate: float, s: dict) -> str:
    nan = float("nan")
    return (f"[{mode}] rate {rate:g}/s: {s['completed']}/{s['requests']} ok, "
            f"TTFT p50 {s.get('ttft_s', {}).get('p50', nan):.3f}s p90 {s.get('ttft_s', {}).get('p90', nan):.3f}s, "
            f"TPOT p50 {s.get('tpot_s', {}).get('p50', nan) * 1000:.1f}ms, "
            f"ITL p99 {s.get('itl_s', {}).get('p99', nan) * 1000:.1f}ms, "
            f"E2E p90 {s.get('e2e_s', {}).get('p90', nan):.2f}s, "
            f"goodput {s.get('goodput_rps', 0):.2f} req/s ({s.get('slo_attainment', 0):.0%} within SLOs), "
            f"{s.get('disaggregated', 0)} disaggregated"
            + (f"; errors: {s['error_kinds']}" if s.get("error_kinds") else ""))


def run(args) -> dict:
    """Every mode and rate; prints one line per run and returns the JSON record."""
    import os
    rates = check_args(args)
    external = bool(args.address or args.http)
    modes = ["external"] if external else args.modes.split(",")
    model = args.served_model or args.model if not args.http else args.served_model
    record = dict(model=model, workload=args.workload, target=args.http or args.address or "local",
                  args={k: v for k, v in vars(args).items() if not callable(v)}, modes={})
    per_request: dict[str, list[dict]] = {}
    if not external:
        import ray

        from deploy.cluster import quiet_ray_auth_notice
        quiet_ray_auth_notice()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        for mode in modes:
            ct = None
            if args.http:
                target = HttpTarget(args.http, args.timeout, args.api_key or os.environ.get("OPENAI_API_KEY"),
                                    args.served_model, args.ignore_eos)
            else:
                if mode == "external":
                    address = args.address
                else:
                    t = time.perf_counter()
                    ct = ClusterThread(cluster_config(args, mode))
                    address = ct.address
                    record.setdefault("layouts", {})[mode] = device_layout(ct.cluster)
                    print(f"[{mode}] cluster up in {time.perf_counter() - t:.1f}s at {address}", flush=True)
                target = GrpcTarget(address, args.timeout)
            try:
                if args.warmup:   # a few requests of each kind before the timed runs
                    asyncio.run(target.run(make_workload(args, args.warmup, 100.0, args.seed + 999), None))
                if args.http:
                    record["model"] = target.model
                runs = []
                for i, rate in enumerate(rates):
                    work = make_workload(args, args.requests, rate, args.seed + i)
                    bar = _progress(len(work), f"[{mode}] rate {rate:g}/s", args.progress)
                    try:
                        results = asyncio.run(target.run(work, bar))
                    finally:
                        if bar is not None:
                            bar.close()
                    summary = summarise(results, args)
                    runs.append(dict(rate=rate, summary=summary))
                    if args.requests_json:
                        per_request.setdefault(mode, []).append(dict(rate=rate, seed=args.seed + i,
                                                                     requests=request_rows(work, results)))
                    print(_line(mode, rate, summary), flush=True)
                record["modes"][mode] = runs
            finally:
                if ct is not None:
                    ct.close()
    finally:
        if not external:
            import ray
            ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"json: {args.json}")
    if args.requests_json:
        with open(args.requests_json, "w") as f:
            json.dump(dict(model=record["model"], workload=record["workload"], args=record["args"],
                           modes=per_request), f)
        print(f"requests json: {args.requests_json}")
    if args.png:
        plot(record, args.png, args)
        print(f"plot: {args.png}")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        run(args)
    except ValueError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
