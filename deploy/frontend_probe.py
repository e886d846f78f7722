"""The gRPC front end's share of a request's latency, for `pdserve profile`.

planner/overhead_probe.py times the router path in process (Router.submit to the first
token) and leaves out the front end a client talks to. This probe adds it, the way
`pdserve bench` meets it: a Router and a DecodeWorker (random:tiny on the CPU) with the gRPC
GenerationService on a background event loop, and a gRPC client on this thread's loop, in
one process (bench runs its client and the cluster's router in one process too). One
request at a time on the idle server, for a short and a long token-id prompt (routed
direct), with max_tokens 1: the time from sending to the first token minus the engine steps
inside it (its engine.step is wrapped). From the two lengths:

  frontend_direct_s    the whole request path of a direct prompt at zero length: front end,
                       router, dispatch, worker loop, the first token's way back;
  per_prompt_token_s   what each prompt token adds on that path (parsing and copying the
                       ids, hashing their blocks for the prefix index and the cache, the
                       messages), beside the engine's compute.

and the CPU the process spends beside the engine (the client, the gRPC server, the router;
the worker's own loop threads are excluded, read from /proc on Linux), which competes with
the engines for the cores of a CPU host:

  frontend_cpu_per_request_s        per request (max_tokens 1, a short prompt)
  frontend_cpu_per_prompt_token_s   what each prompt token adds to that
  frontend_cpu_per_token_s          per further streamed token

It lives in deploy/ because planner/ does not import grpc; `pdserve profile` stores these in
the profile's `overheads`.
"""
from __future__ import annotations

import asyncio
import statistics
import threading
import time

import numpy as np

from planner.overhead_probe import MODEL, StepClock

ENGINE = dict(block_size=16, num_kv_blocks=512, max_num_batched_tokens=1024, max_num_seqs=8)
LENGTHS = (16, 512)
STREAM_TOKENS = 32


class _Server:
    """Router + DecodeWorker + gRPC server on their own loop thread."""

    def __init__(self, clock: StepClock):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clock = clock
        self.router = self.decode = self.server = None
        self.port = self._call(self._start())

    def _call(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> int:
        from decode_worker import DecodeWorker
        from router.core import Router, RouterConfig
        from router.policy import PolicyConfig
        from router.server import GenerationService, start_grpc_server
        # Every prompt direct: the threshold is past any length probed.
        self.router = Router(RouterConfig(PolicyConfig(disagg_threshold=1 << 20), block_size=ENGINE["block_size"]))
        self.router.start()
        self.decode = DecodeWorker("probe-decode", MODEL, self.router.token_endpoint, engine_kwargs=dict(ENGINE),
                                   device="cpu")
        self.clock.wrap(self.decode.engine)
        self.decode.start()
        self.router.add_worker("decode", "probe-decode", self.decode.endpoints()["request"])
        service = GenerationService(self.router, self.decode.model_info())
        self.server, port = await start_grpc_server(service, "127.0.0.1", 0)
        return port

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
        if self.decode is not None:
            self.decode.stop()
        if self.router is not None:
            await self.router.close()

    def close(self) -> None:
        try:
            self._call(self._stop(), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def _thread_cpu_s(native_ids: list[int]) -> float | None:
    """CPU seconds the given threads of this process used so far (Linux /proc), or None."""
    import os
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        for tid in native_ids:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick    # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return total


async def _timings(port: int, clock: StepClock, samples: int, rng, worker_threads) -> dict:
    import grpc

    from deploy.client import build_request
    from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
    out: dict[int, list[float]] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.GenerationStub(ch)

        async def first_token(n: int, max_tokens: int = 1) -> float:
            req = build_request(rng.integers(3, 40000, size=n).tolist(), max_tokens, temperature=0.0)
            req.sampling.ignore_eos = True
            t0 = time.perf_counter()
            t1 = None
            async for msg in stub.Generate(req, timeout=60):
                if msg.token_ids and t1 is None:
                    t1 = time.perf_counter()
            if t1 is None:
                raise RuntimeError("front-end probe: no token came back")
            await asyncio.sleep(0.005)   # the worker finishes its iteration before the next request
            return (t1 - t0) - clock.busy(t0, t1)

        async def cpu_of(n: int, max_tokens: int) -> float | None:
            """CPU seconds per request of this process outside the worker's threads."""
            w0, p0 = _thread_cpu_s(worker_threads), time.process_time()
            for _ in range(samples):
                await first_token(n, max_tokens)
            w1, p1 = _thread_cpu_s(worker_threads), time.process_time()
            return None if w0 is None or w1 is None else max(0.0, (p1 - p0) - (w1 - w0)) / samples

        for n in LENGTHS:   # the first requests connect and warm up
            for _ in range(2):
                await first_token(n)
        for n in LENGTHS:
            out[n] = [await first_token(n) for _ in range(samples)]
        out["cpu"] = [await cpu_of(LENGTHS[0], 1), await cpu_of(LENGTHS[1], 1),
                      await cpu_of(LENGTHS[0], STREAM_TOKENS)]
    return out


def measure(samples: int = 12, seed: int = 0) -> dict:
    """`frontend_direct_s`, `per_prompt_token_s` and a note, for the profile's `overheads`."""
    import torch
    # The engine computes on its loop thread alone, so that every other thread's CPU is the
    # front end's (torch's intra-op pool would otherwise do part of each step elsewhere).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = StepClock()
    server = _Server(clock)
    try:
        w = server.decode
        threads = [t.native_id for t in [w._thread, *w._side_threads] if t is not None and t.native_id]
        got = asyncio.run(_timings(server.port, clock, samples, np.random.default_rng(seed), threads))
    finally:
        server.close()
        torch.set_num_threads(threads_before)
    short, long = (statistics.median(got[n]) for n in LENGTHS)
    span = LENGTHS[1] - LENGTHS[0]
    per_token = max(0.0, (long - short) / span)
    fixed = max(0.0, short - per_token * LENGTHS[0])
    note = (f"gRPC front end + Router + DecodeWorker in one process ({MODEL}, CPU), idle, one request at a time, "
            f"first token of token-id prompts of {LENGTHS[0]} and {LENGTHS[1]} tokens (direct), medians of "
            f"{samples} minus the engine steps: {short * 1e3:.2f} and {long * 1e3:.2f} ms")
    out = dict(frontend_direct_s=fixed, per_prompt_token_s=per_token)
    c_short, c_long, c_stream = got["cpu"]
    if None not in (c_short, c_long, c_stream):
        per_prompt = max(0.0, (c_long - c_short) / span)
        out.update(frontend_cpu_per_request_s=max(0.0, c_short - per_prompt * LENGTHS[0]),
                   frontend_cpu_per_prompt_token_s=per_prompt,
                   frontend_cpu_per_token_s=max(0.0, (c_stream - c_short) / (STREAM_TOKENS - 1)))
        note += (f"; CPU outside the worker's threads per request: {c_short * 1e3:.2f} ms "
                 f"({LENGTHS[0]} tokens, 1 out), "
                 f"{c_long * 1e3:.2f} ms ({LENGTHS[1]}, 1 out), {c_stream * 1e3:.2f} ms ({LENGTHS[0]}, "
                 f"{STREAM_TOKENS} out)")
    else:
        note += "; CPU not measured (no /proc)"
    return dict(out, frontend_notes=note)
