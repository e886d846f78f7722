"""The router path's own cost per request, for the profile.

Method: a real Router (router/core.py) with a real DecodeWorker and PrefillWorker, all in
this process (the workers on their loop threads, the router on an asyncio loop), serving
`random:tiny` on the CPU so the engines' work is small. Each worker's engine.step is
wrapped to record when it ran, so the engine time inside a request is known exactly, under
the same load as the request itself. Then, on the idle cluster, one request at a time:
  - router_direct_s: time from Router.submit to the first token of a short prompt (routed
    direct), minus the engine steps in between;
  - router_disaggregated_s: the same for a prompt past the threshold (routed to the prefill
    worker; its KV, a few KiB for this model, crosses the zmq backend): the hops
    decode -> prefill -> decode, the KV plane and the worker loops;
  - per_token_stream_s: per streamed token of one request, the time between its first and
    last token minus the decode steps in between, over the tokens.
Each is a median, floored at zero. What it leaves out: the gRPC/HTTP front end and
tokenization, Ray, separate processes (here the three share one GIL, which if anything
adds time), and a GPU engine's own host work per step (that is in the step times).
"""
from __future__ import annotations

import asyncio
import statistics
import threading
import time

import numpy as np

MODEL = "random:tiny"
ENGINE = dict(block_size=16, num_kv_blocks=512, max_num_batched_tokens=256, max_num_seqs=8)
THRESHOLD = 64           # disagg_threshold: the direct prompt is below it, the long one above
DIRECT_LEN, DISAGG_LEN, STREAM_TOKENS = 16, 192, 16


def _fresh(rng, n: int) -> list[int]:
    return rng.integers(3, 49152, size=n).tolist()


class StepClock:
    """Records (start, end) of every engine.step call of the engines it wraps."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, engine) -> None:
        step = engine.step

        def timed_step(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                with self._lock:
                    self.spans.append((t0, time.perf_counter()))

        engine.step = timed_step   # the worker calls self.engine.step: this instance attribute

    def busy(self, t0: float, t1: float) -> float:
        """Engine time inside [t0, t1] (the engines never step at once on an idle cluster
        serving one request, so the spans do not overlap)."""
        with self._lock:
            return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self.spans)


async def _cluster_timings(samples: int, rng) -> dict:
    from decode_worker import DecodeWorker
    from planes.sampling_params import SamplingParams
    from prefill_worker import PrefillWorker
    from router.core import Router, RouterConfig
    from router.policy import PolicyConfig
    router = Router(RouterConfig(PolicyConfig(disagg_threshold=THRESHOLD), block_size=ENGINE["block_size"]))
    router.start()
    clock = StepClock()
    workers = []
    try:
        decode = DecodeWorker("profile-decode", MODEL, router.token_endpoint, engine_kwargs=dict(ENGINE), device="cpu")
        workers.append(decode)
        prefill = PrefillWorker("profile-prefill", MODEL, engine_kwargs=dict(ENGINE), device="cpu")
        workers.append(prefill)
        for w in workers:
            clock.wrap(w.engine)
            w.start()
        router.add_worker("decode", "profile-decode", decode.endpoints()["request"])
        router.add_worker("prefill", "profile-prefill", prefill.endpoints()["request"])

        async def one(n: int, max_tokens: int, want_route: str) -> tuple[float, list[float]]:
            """The submit time and the times at which each token arrived."""
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            h = await router.submit(router.new_request_id(), _fresh(rng, n), params)
            if h.decision.kind != want_route:
                raise RuntimeError(f"overhead probe: a {n}-token prompt went {h.decision.kind} "
                                   f"({h.decision.reason}), expected {want_route}")
            arrivals = []
            while True:
                item = await asyncio.wait_for(h.queue.get(), 60)
                if item.error:
                    raise RuntimeError(f"overhead probe: request failed: {item.error_code}: {item.error}")
                arrivals += [time.perf_counter()] * len(item.token_ids)
                if item.finish_reason is not None:
                    if item.fallback:
                        raise RuntimeError(f"overhead probe: disaggregated request fell back: {item.fallback}")
                    return t0, arrivals

        async def first_token(n: int, route: str) -> tuple[float, float]:
            t0, arrivals = await one(n, 1, route)
            await asyncio.sleep(0.005)   # let the worker finish its iteration before the next request
            return arrivals[0] - t0, clock.busy(t0, arrivals[0])

        # The first requests connect sockets and warm the workers' engines.
        for _ in range(2):
            await first_token(DIRECT_LEN, "direct")
            await first_token(DISAGG_LEN, "disaggregated")
        direct = [await first_token(DIRECT_LEN, "direct") for _ in range(samples)]
        disagg = [await first_token(DISAGG_LEN, "disaggregated") for _ in range(samples)]
        stream = []
        for _ in range(max(2, samples // 2)):
            _, a = await one(DIRECT_LEN, STREAM_TOKENS, "direct")
            stream.append(((a[-1] - a[0]), clock.busy(a[0], a[-1]), len(a) - 1))
        return dict(direct=direct, disagg=disagg, stream=stream)
    finally:
        for w in workers:
            w.stop()
        await router.close()


def measure(samples: int = 10, seed: int = 0) -> dict:
    """The profile's `overheads` section (see the module docstring for the method)."""
    got = asyncio.run(_cluster_timings(samples, np.random.default_rng(seed)))
    med = statistics.median
    direct = max(0.0, med(t - busy for t, busy in got["direct"]))
    disagg = max(0.0, med(t - busy for t, busy in got["disagg"]))
    stream = max(0.0, med((t - busy) / n for t, busy, n in got["stream"] if n > 0))

    def ms(pairs) -> str:
        return f"{med(t for t, _ in pairs) * 1e3:.2f} ms (engine {med(b for _, b in pairs) * 1e3:.2f} ms)"

    notes = (f"in-process Router + DecodeWorker + PrefillWorker on CPU ({MODEL}), idle, one request at a time, "
             f"medians of {samples}, minus the engine steps timed inside each request. Raw first token: direct "
             f"({DIRECT_LEN}-token prompt) {ms(got['direct'])}, disaggregated ({DISAGG_LEN} tokens) "
             f"{ms(got['disagg'])}. Excludes the gRPC/HTTP front end, tokenization and Ray.")
    return dict(router_direct_s=direct, router_disaggregated_s=disagg, per_token_stream_s=stream, notes=notes)
