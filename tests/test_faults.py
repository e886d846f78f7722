"""Faults and overload inside the cluster: keep serving, lose nothing.

Three layers, cheapest first:
  - the Router driven directly against fake decode workers (ZeroMQ sockets this test
    holds): admission control, heartbeat-silence detection and re-dispatch of prompt +
    streamed tokens, stale incarnations, deadlines;
  - a DecodeWorker driven directly: router epochs and orphaned requests;
  - the whole cluster on a local Ray instance: a stalled and a killed prefill actor, a
    decode actor killed while it streams 50 requests, a router restart, admission control
    over gRPC. One cluster serves the module; the fc fixture brings it back to a known
    state before each test (no process frozen, router up, every worker registered and
    idle, default limits), and each test counts only what changed during it: any test
    passes alone and in any order.
random:tiny in float64 makes greedy outputs independent of batching, so every completed
request is compared exactly with a single engine's output.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
import zmq

from helpers import assert_no_leaks, await_until, wait_until
from deploy.client import build_request, collect
from engine import SamplingParams
from planes import messages
from router.core import Overloaded, Router, RouterConfig

MODEL = "random:tiny"


# ---- the router against fake decode workers ----------------------------------------------------------

class FakeDecode:
    """A decode worker's two sockets: its request PULL and a PUSH onto the router's token plane."""

    def __init__(self, router: Router, wid: str):
        ctx = zmq.Context.instance()
        self.wid = wid
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(router.token_endpoint)

    def recv(self, timeout_ms=2000):
        assert self.pull.poll(timeout_ms), f"{self.wid}: nothing received"
        return messages.decode_request(self.pull.recv())

    def recv_all(self, timeout_ms=300):
        out = []
        while self.pull.poll(timeout_ms if not out else 50):
            out.append(messages.decode_request(self.pull.recv()))
        return out

    def send(self, *items, endpoint=None):
        load = dict(running=len(items), endpoint=endpoint or self.endpoint)
        self.push.send(messages.TokenBatch(self.wid, list(items), load=load).encode())

    def close(self):
        self.pull.close(0)
        self.push.close(0)


def _drain(q: asyncio.Queue) -> list[messages.TokenItem]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def run_router(body, **cfg):
    async def main():
        r = Router(RouterConfig(**cfg))
        r.start()
        fakes = []

        def fake(wid):
            f = FakeDecode(r, wid)
            fakes.append(f)
            r.add_worker("decode", wid, f.endpoint)
            return f
        try:
            await body(r, fake)
        finally:
            await r.close()
            for f in fakes:
                f.close()
    asyncio.run(main())


P = SamplingParams(max_tokens=10)
PARAMS_LONG = SamplingParams(max_tokens=100, ignore_eos=True)


def test_admission_control_refuses_at_once_past_the_bounds():
    async def body(r, fake):
        a, b = fake("a"), fake("b")
        handles = [await r.submit(f"r{i}", [5] * 10, P) for i in range(4)]
        assert sorted(h.decode_worker for h in handles) == ["a", "a", "b", "b"]
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="limit of 2"):
            await r.submit("r4", [5] * 10, P)
        assert time.monotonic() - t0 < 0.1 and "r4" not in r.requests
        assert len(a.recv_all()) == 2 and len(b.recv_all()) == 2   # nothing was dispatched for r4
        # a finished request frees its slot
        on_a = next(h for h in handles if h.decode_worker == "a")
        a.send(messages.TokenItem(on_a.rid, [7], finish_reason="length"))
        await await_until(lambda: on_a.rid not in r.requests, 5, f"{on_a.rid} to finish")
        h = await r.submit("r5", [5] * 10, P)
        assert h.decode_worker == "a"
        assert r.stats()["overloaded"] == 1
    run_router(body, max_inflight_per_decode=2)


def test_admission_control_bounds_tokens_waiting_for_prefill():
    async def body(r, fake):
        a = fake("a")
        big = await r.submit("big", [5] * 70, P)     # alone, even a prompt past the budget is admitted
        assert r.queued_prefill_tokens == 70
        with pytest.raises(Overloaded, match="waiting for prefill"):
            await r.submit("r1", [5] * 40, P)
        a.send(messages.TokenItem(big.rid, [9]))         # its first token: the prompt is prefilled
        await await_until(lambda: r.queued_prefill_tokens == 0, 5, "the prefill queue to empty")
        await r.submit("r1", [5] * 40, P)
        await r.submit("r2", [5] * 20, P)
        with pytest.raises(Overloaded):
            await r.submit("r3", [5] * 1, P)
        assert len(a.recv_all()) == 3
    run_router(body, max_queued_prefill_tokens=60, policy=_no_disagg())


def _no_disagg():
    from router.policy import PolicyConfig
    return PolicyConfig(disagg_threshold=10**6)


def test_prefill_counts_return_to_zero_whatever_becomes_of_a_request():
    """A request's uncached prompt tokens count for admission (Router.queued_prefill_tokens)
    until its first token, and on a disaggregated route on its prefill worker (queued_tokens,
    inflight) until its decode worker first reports on it or it moves. Every way a request
    can go, direct or disaggregated, served, cancelled, failed by its worker, moved to
    another worker, failed unsent, brings both back to zero, each released once."""
    from router.policy import PolicyConfig

    async def body(r, fake):
        a = fake("a")
        sink = zmq.Context.instance().socket(zmq.PULL)   # the prefill worker's request socket (unused here)
        sink.setsockopt(zmq.LINGER, 0)
        sink.bind("tcp://127.0.0.1:*")
        r.add_worker("prefill", "p", sink.getsockopt(zmq.LAST_ENDPOINT).decode())
        pw, a_w = r.prefill["p"], r.decode["a"]

        def counts():
            return r.queued_prefill_tokens, pw.queued_tokens, len(pw.inflight), len(a_w.inflight)

        async def settled(what):
            await await_until(lambda: not r.requests, 5, what)
            assert counts() == (0, 0, 0, 0), (what, counts())
        try:
            # direct: admission only, released by the first token
            h = await r.submit("direct", [5] * 10, P)
            assert h.decision.kind == "direct" and counts() == (10, 0, 0, 1)
            a.send(messages.TokenItem("direct", [1]))
            await await_until(lambda: r.queued_prefill_tokens == 0, 5, "the first token")
            a.send(messages.TokenItem("direct", [2], finish_reason="length"))
            await settled("direct")
            # disaggregated: both counts, both released by the first token
            h = await r.submit("disagg", [6] * 40, P)
            assert h.decision.kind == "disaggregated" and counts() == (40, 40, 1, 1)
            a.send(messages.TokenItem("disagg", [1]))
            await await_until(lambda: counts()[:3] == (0, 0, 0), 5, "the first token")
            a.send(messages.TokenItem("disagg", [2], finish_reason="length"))
            await settled("disaggregated")
            # cancelled before its first token
            await r.submit("cancel", [7] * 40, P)
            await r.abort("cancel")
            await settled("cancelled")
            # failed by its decode worker before its first token
            await r.submit("fail", [8] * 40, P)
            a.send(messages.TokenItem("fail", [], finish_reason="abort", error="boom", error_code="internal"))
            await settled("failed")
            # its decode worker lost: the prefill worker's count goes with the move, admission
            # waits for the first token from the new worker
            await r.submit("moved", [9] * 40, P)
            b = fake("b")
            assert await r.worker_lost("a", "test") == 1
            assert r.queued_prefill_tokens == 40 and (pw.queued_tokens, len(pw.inflight)) == (0, 0)
            b.send(messages.TokenItem("moved", [1]))
            await await_until(lambda: r.queued_prefill_tokens == 0, 5, "the first token from b")
            b.send(messages.TokenItem("moved", [2], finish_reason="length"))
            await await_until(lambda: not r.requests, 5, "moved")
            # a dispatch that cannot be sent: submit fails and counts nothing
            r.decode["b"].sock.close(linger=0)
            r.decode["b"].sock = r.ctx.socket(zmq.PUSH)   # connected nowhere: the send times out
            with pytest.raises(LookupError):
                await r.submit("unsent", [10] * 40, P)
            assert (r.queued_prefill_tokens, pw.queued_tokens, len(pw.inflight), len(r.decode["b"].inflight)) == \
                (0, 0, 0, 0)
        finally:
            sink.close(0)
    run_router(body, policy=PolicyConfig(disagg_threshold=16), send_timeout_s=0.2)


def test_silent_decode_worker_requests_move_with_their_streamed_tokens():
    async def body(r, fake):
        a = fake("a")
        prompt = list(range(100, 120))
        greedy = await r.submit("greedy", prompt, SamplingParams(max_tokens=10))
        seeded = await r.submit("seeded", prompt, SamplingParams(max_tokens=10, temperature=0.8, seed=7))
        stops = await r.submit("stops", prompt, SamplingParams(max_tokens=10, stop=["xyz"]))
        fresh = await r.submit("fresh", prompt, SamplingParams(max_tokens=10, stop=["xyz"]))
        assert len(a.recv_all()) == 4
        a.send(messages.TokenItem("greedy", [1, 2, 3]), messages.TokenItem("seeded", [4]),
               messages.TokenItem("stops", [5]))
        b = fake("b")          # joins after the requests were placed on a
        await await_until(lambda: not (greedy.queue.empty() or seeded.queue.empty() or stops.queue.empty()),
                          5, "a's streamed tokens at the router")
        b.send()
        # a falls silent; b keeps heartbeating; the monitor finds a lost after dead_after_s
        end = time.monotonic() + 10
        while "a" in r.decode:
            await asyncio.sleep(0.1)    # b's heartbeat period (well under dead_after_s): time must pass
            b.send()
            assert time.monotonic() < end, "a was never declared lost"
        assert r.counters["workers_lost"] == 1 and "b" in r.decode
        moved = {m.rid: m for m in b.recv_all()}
        assert set(moved) == {"greedy", "seeded", "fresh"}
        g = moved["greedy"]
        assert g.prompt_ids == prompt + [1, 2, 3] and g.params.max_tokens == 7 and g.mode == "direct"
        s = moved["seeded"]
        assert s.prompt_ids == prompt + [4] and s.params.max_tokens == 9 and s.params.temperature == 0.8
        assert s.params.seed != 7   # a derived seed: reproducible, not the original stream
        f = moved["fresh"]         # nothing streamed yet: re-dispatched exactly as sent
        assert f.prompt_ids == prompt and f.params.max_tokens == 10 and f.params.stop == ["xyz"]
        # stop strings + streamed tokens cannot resume exactly: UNAVAILABLE (error_code)
        items = _drain(stops.queue)
        assert [i.token_ids for i in items] == [[5], []]
        assert items[-1].error_code == "unavailable" and "stop strings" in items[-1].error
        # late tokens from the lost worker are dropped, even if it turns out to be alive
        handled = []
        real_handle = r.handle_batch

        def spy(batch):
            real_handle(batch)
            handled.append(batch)
        r.handle_batch = spy
        a.send(messages.TokenItem("greedy", [99]))
        # a batch from another incarnation of b (same id, other endpoint) is not b's
        b.send(messages.TokenItem("greedy", [98]), endpoint="tcp://127.0.0.1:1")
        await await_until(lambda: any(x.worker == "a" for x in handled) and r.counters["stale_batches"] >= 1,
                          5, "a's late batch and b's stale one handled")
        assert r.counters["stale_batches"] == 1
        b.send(messages.TokenItem("greedy", [4, 5, 6, 7, 8, 9, 10], finish_reason="length",
                                  prompt_tokens=23, cached_tokens=16, completion_tokens=7))
        await await_until(lambda: "greedy" not in r.requests, 5, "greedy to finish")
        items = _drain(greedy.queue)
        assert sum((i.token_ids for i in items), []) == list(range(1, 11))
        last = items[-1]
        assert (last.prompt_tokens, last.completion_tokens, last.fallback) == (20, 10, "redispatched")
        assert greedy.decode_worker == "b" and "greedy" not in r.requests
        assert r.counters["redispatched"] == 3
    run_router(body, dead_after_s=0.6, monitor_interval_s=0.1, policy=_no_disagg())


def test_lost_worker_without_a_successor_fails_its_requests_unavailable():
    async def body(r, fake):
        fake("a")
        h = await r.submit("x", [5] * 8, P)
        n = await r.worker_lost("a", "ray: ActorDiedError")
        assert n == 1 and await r.worker_lost("a", "again") == 0   # reported twice: handled once
        (item,) = _drain(h.queue)
        assert item.error_code == "unavailable" and "no other decode worker" in item.error
        with pytest.raises(LookupError):
            await r.submit("y", [5] * 8, P)
    run_router(body)


def test_token_loop_survives_a_batch_it_cannot_handle():
    """One batch that breaks the router's handling must not stop the token loop: every
    worker would look silent and be declared lost."""
    async def body(r, fake):
        a = fake("a")
        h = await r.submit("x", [5] * 8, P)

        def broken(worker, events):
            raise RuntimeError("index bug")
        r.index.apply = broken
        a.send(messages.TokenItem("x", [1]))
        a.push.send(messages.TokenBatch("a", [], kv_events=[("stored", b"h" * 16, None)]).encode())
        a.push.send(b"\x93not a batch")
        a.send(messages.TokenItem("x", [2], finish_reason="length"))
        await await_until(lambda: h.queue.qsize() >= 2 and r.bad_messages >= 2, 5, "both batches and both bad ones")
        assert [i.token_ids for i in _drain(h.queue)] == [[1], [2]]
        assert r.bad_messages == 2 and not r._task.done()
    run_router(body)


def test_deadline_is_enforced_by_the_router():
    async def body(r, fake):
        a = fake("a")
        h_deadline = time.monotonic() + 0.3
        h = await r.submit("late", [5] * 8, P, deadline=h_deadline)
        keep = await r.submit("keep", [5] * 8, P)
        assert [m.rid for m in a.recv_all()] == ["late", "keep"]
        a.send()
        await await_until(lambda: "late" not in r.requests, 5, "the router to end the late request")
        assert time.monotonic() >= h_deadline
        assert a.recv(1000) == ("abort", "late")      # the worker is told to drop it
        (item,) = _drain(h.queue)
        assert item.error_code == "deadline_exceeded"
        assert "late" not in r.requests and "keep" in r.requests and not keep.done
    run_router(body, monitor_interval_s=0.1)


# ---- a decode worker and its router's epoch ---------------------------------------------------------

@pytest.fixture
def token_sinks():
    ctx = zmq.Context.instance()
    socks = []

    def make():
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.LINGER, 0)
        s.bind("tcp://127.0.0.1:*")
        socks.append(s)
        return s, s.getsockopt(zmq.LAST_ENDPOINT).decode()
    yield make
    for s in socks:
        s.close(0)


def _batches(sock):
    out = []
    while sock.poll(0):
        out.append(messages.decode_tokens(sock.recv()))
    return out


def test_decode_worker_drops_requests_of_a_silent_or_replaced_router(token_sinks):
    from decode_worker import DecodeWorker
    old_sink, old_ep = token_sinks()
    dw = DecodeWorker("d0", MODEL, old_ep, engine_kwargs=dict(num_kv_blocks=64), kv_bind="ipc",
                      router_epoch=1, orphan_timeout_s=2.0)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(dw.endpoints()["request"])
    try:
        # Requests that wait for KV from a prefill worker that never answers stay in flight,
        # holding reserved blocks, as long as the test needs (kv_timeout_s=60).
        silent_prefill = "tcp://127.0.0.1:9"

        def waiting(rid, tok):
            return messages.GenerateMsg(rid, [tok] * 40, PARAMS_LONG, mode="disaggregated", kv_timeout_s=60,
                                        prefill_endpoint=silent_prefill).encode()
        push.send(waiting("r1", 5))
        end = time.monotonic() + 30
        while not dw.engine.stats()["num_awaiting_kv"]:
            dw.run_once(5)
            assert time.monotonic() < end
        # heartbeats say which incarnation and epoch they come from
        dw.run_once(0)
        assert old_sink.poll(5000)
        loads = [b.load for b in _batches(old_sink)]
        assert loads and loads[-1]["endpoint"] == dw.endpoints()["request"] and loads[-1]["epoch"] == 1
        # the router keeps in touch for a while: nothing is dropped
        t_end = time.monotonic() + 2.5
        while time.monotonic() < t_end:
            dw.router_contact(1)
            dw.run_once(5)
        assert dw.num_in_flight() == 1
        # contacts from another epoch do not count; after 2 s of silence r1 is dropped
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and dw.num_in_flight():
            dw.router_contact(2)
            dw.run_once(5)
        assert dw.num_in_flight() == 0 and dw.counters["orphaned"] == 1
        assert_no_leaks(dw.engine)
        assert dw.receiver.pending() == []
        # attached to a new router: a request of the old epoch in flight is dropped at once,
        # and batches go to the new router, stamped with the new epoch
        push.send(waiting("r2", 6))
        end = time.monotonic() + 30
        while dw.num_in_flight() != 1:
            dw.router_contact(1)
            dw.run_once(5)
            assert time.monotonic() < end
        new_sink, new_ep = token_sinks()
        dw.attach_router(new_ep, 2)
        dw.run_once(0)
        assert dw.num_in_flight() == 0 and dw.counters["orphaned"] == 2
        push.send(messages.GenerateMsg("r3", [7] * 10, SamplingParams(max_tokens=4)).encode())
        final = None
        end = time.monotonic() + 30
        while final is None:
            dw.router_contact(2)
            dw.run_once(5)
            for b in _batches(new_sink):
                assert b.load["epoch"] == 2
                final = next((i for i in b.items if i.rid == "r3" and i.finish_reason), final)
            assert time.monotonic() < end
        assert final.completion_tokens == 4
        assert_no_leaks(dw.engine)
        assert dw.receiver.pending() == []
    finally:
        push.close(0)
        dw.stop()


# ---- the whole cluster on local Ray -----------------------------------------------------------------

ray = pytest.importorskip("ray")

ENGINE = dict(block_size=16, num_kv_blocks=2048, max_num_batched_tokens=512)
THRESHOLD = 64


class FaultCluster:
    """A Cluster (1 prefill + 2 decode actors) whose router runs in a background loop;
    short fault timers so faults are noticed within seconds."""

    MAX_INFLIGHT_PER_DECODE = 64     # as configured below; restore() puts it back

    def __init__(self):
        from deploy.cluster import Cluster
        from deploy.config import ServeConfig
        self.frozen: set[int] = set()     # pids a test stopped (SIGSTOP); restore() thaws them
        self.router_down = False
        self.loop = asyncio.new_event_loop()
        self.cluster = Cluster(ServeConfig.simple(
            MODEL, num_prefill=1, num_decode=2, dtype="float64", engine=dict(ENGINE),
            router=dict(port=0, disagg_threshold=THRESHOLD, max_inflight_per_decode=64), transfer=dict(timeout_s=3.0),
            faults=dict(dead_after_s=3.0, orphan_timeout_s=3.0, monitor_interval_s=0.5)))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.cluster.start(), timeout=300)
        self.connect()

    def connect(self):
        # gRPC shares subchannels between channels to one target by default, so a fresh
        # channel after a router restart would inherit the old one's reconnect backoff
        # (seconds of "connection refused" from a port that listens again); a client of
        # a restarted router reconnects on its own, and waits until it is through.
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.cluster.port}",
                                             options=[("grpc.use_local_subchannel_pool", 1)])
        grpc.channel_ready_future(self.channel).result(timeout=30)
        from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc
        self.stub = pb_grpc.GenerationStub(self.channel)

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, prompt, max_tokens, timeout=120, **kw):
        return collect(self.stub.Generate(build_request(prompt, max_tokens, temperature=0.0, **kw),
                                          timeout=timeout))

    def actor(self, wid):
        return {**self.cluster.decode_actors, **self.cluster.prefill_actors}[wid]

    def stats(self, wid):
        return ray.get(self.actor(wid).stats.remote(), timeout=60)

    def wait_for(self, cond, timeout=60, what="condition"):
        wait_until(cond, timeout, what, interval_s=0.1)

    def workers(self):
        return [*self.cluster.decode_actors, *self.cluster.prefill_actors]

    def all_stats(self):
        return {w: self.stats(w) for w in self.workers()}

    def freeze(self, wid):
        pid = _pid(self, wid)
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)
        return pid

    def thaw(self, pid):
        self.frozen.discard(pid)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:      # killed meanwhile (Ray restarts it as a new process)
            pass

    def crash_router(self):
        """Stop the router as a dying router process looks to everyone else: no more pings
        or requests to the workers, no gRPC port; its clients get UNAVAILABLE."""
        async def crash(cluster):
            await cluster.supervisor.stop()
            cluster.router.fail_all("unavailable", "router restarting")
            await cluster.server.stop(0)
            await cluster.router.close()
        self.router_down = True
        self.call(crash(self.cluster))

    def restart_router(self):
        from deploy.supervisor import start_router
        self.call(start_router(self.cluster))
        self.router_down = False
        self.channel.close()
        self.connect()

    def restore(self):
        """The known state every cluster test starts from, whatever the previous test left:
        no process frozen, a router serving (restarted if a test left it down), the default
        in-flight limit, a fresh channel, every worker registered, idle, every block free."""
        for pid in list(self.frozen):
            self.thaw(pid)
        if self.router_down:
            self.restart_router()
        else:
            self.channel.close()
            self.connect()
        self.cluster.router.cfg.max_inflight_per_decode = self.MAX_INFLIGHT_PER_DECODE
        self.wait_for(lambda: all(self.registered().values()), 90, "every worker registered")
        self.wait_idle(timeout=60)

    def wait_idle(self, timeout=30):
        """Until every worker holds no request and no referenced block."""
        def idle():
            for wid in [*self.cluster.decode_actors, *self.cluster.prefill_actors]:
                try:
                    s = self.stats(wid)
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
                    return False     # being restarted by Ray
                if s["num_running"] or s["num_waiting"] or s["num_awaiting_kv"] or s["in_flight"] \
                        or s["num_free_blocks"] != s["num_blocks"]:
                    return False
            return True
        self.wait_for(idle, timeout, "idle workers with every block free")

    def registered(self):
        r = self.cluster.router
        return {w: r.endpoint_of(w) for w in [*self.cluster.decode_actors, *self.cluster.prefill_actors]}

    def close(self):
        self.channel.close()
        self.call(self.cluster.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def fault_cluster():
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    c = FaultCluster()
    try:
        yield c
    finally:
        for pid in list(c.frozen):
            c.thaw(pid)
        c.close()
        ray.shutdown()


@pytest.fixture
def fc(fault_cluster):
    """The module's cluster, brought back to a known state before the test (restore())."""
    fault_cluster.restore()
    return fault_cluster


@pytest.fixture(scope="module")
def reference():
    from engine import LLM
    llm = LLM(MODEL, dtype="float64", **ENGINE)

    def expected(prompts, max_tokens):
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [o.token_ids for o in outs]
    return expected


def _prompts(seed, n, lo, hi):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (lo + (i * (hi - lo)) // max(1, n - 1),), generator=gen).tolist()
            for i in range(n)]


def _pid(c, wid):
    return ray.get(c.actor(wid).ping.remote(), timeout=60)["pid"]


def _grown(after: dict, before: dict, key: str) -> int:
    """How much a worker's cumulative counter grew during the test."""
    return after[key] - before[key]


def test_cluster_kv_transfer_stalled_past_its_timeout_falls_back(fc, reference):
    """The prefill actor's process is frozen (SIGSTOP) while its transfers are due: the
    decode workers time out, prefill in place, and the outputs are exact; when it thaws,
    whatever it still sends for those transfers is dropped, and it serves again."""
    prompts = _prompts(1, 3, 150, 250)
    before = fc.all_stats()
    pid = fc.freeze("prefill-0")
    try:
        with ThreadPoolExecutor(3) as ex:
            results = list(ex.map(lambda p: fc.generate(p, 8), prompts))
        assert [r["token_ids"] for r in results] == reference(prompts, 8)
        assert [r["reason"] for r in results] == ["fallback_kv_timeout"] * 3
        # meanwhile the supervisor took the unresponsive prefill worker out of routing
        fc.wait_for(lambda: fc.registered()["prefill-0"] is None, 10, "prefill-0 out of routing")
        fresh = _prompts(7, 1, 150, 150)[0]
        r = fc.generate(fresh, 4)
        assert (r["route"], r["reason"]) == ("direct", "no_prefill_workers")
        assert r["token_ids"] == reference([fresh], 4)[0]
    finally:
        fc.thaw(pid)
    fc.wait_for(lambda: fc.registered()["prefill-0"] is not None, 20, "prefill-0 back in routing")
    fc.wait_idle()
    after = fc.all_stats()
    kv = [(after[w]["kv"], before[w]["kv"]) for w in fc.cluster.decode_actors]
    assert sum(_grown(a, b, "timed_out") for a, b in kv) == 3 and sum(_grown(a, b, "completed") for a, b in kv) == 0
    p, p0 = after["prefill-0"], before["prefill-0"]
    # the thawed worker saw the 3 prefills and the decode workers' aborts for them: each
    # was aborted before it ran, or ran and its late KV was dropped by the receiver
    assert _grown(p, p0, "requests") == 3
    assert _grown(p, p0, "aborted") + sum(_grown(a, b, "dropped_late") > 0 for a, b in kv) >= 1
    again = _prompts(8, 1, 200, 200)[0]    # cached nowhere yet
    r = fc.generate(again, 8)
    assert (r["route"], r["prefill_worker"]) == ("disaggregated", "prefill-0")
    assert r["token_ids"] == reference([again], 8)[0]


def test_cluster_prefill_actor_killed_mid_transfer_falls_back_and_restarts(fc, reference):
    """Decode workers hold reserved blocks and wait for KV from a prefill actor that is
    killed (frozen first, so the kill lands while every transfer is in flight)."""
    prompts = _prompts(2, 4, 120, 300)
    old_ep = fc.registered()["prefill-0"]
    fc.freeze("prefill-0")
    with ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(fc.generate, p, 8) for p in prompts]
        fc.wait_for(lambda: sum(fc.stats(w)["num_awaiting_kv"] for w in fc.cluster.decode_actors) == len(prompts),
                    10, "every request dispatched and waiting for its KV")
        ray.kill(fc.actor("prefill-0"), no_restart=False)
        results = [f.result() for f in futs]
    assert [r["token_ids"] for r in results] == reference(prompts, 8)
    assert all(r["reason"].startswith("fallback_") for r in results), [r["reason"] for r in results]
    fc.wait_idle()          # no block leaked on the decode side (nor on the restarted prefill worker)
    # Ray restarted it on new ports; the supervisor re-registered it and routing uses it
    fc.wait_for(lambda: fc.registered()["prefill-0"] not in (None, old_ep), 60, "prefill-0 re-registered")
    again = _prompts(9, 1, 200, 200)[0]    # cached nowhere yet
    r = fc.generate(again, 8)
    assert (r["route"], r["prefill_worker"]) == ("disaggregated", "prefill-0")
    assert r["token_ids"] == reference([again], 8)[0]


def test_cluster_decode_actor_killed_while_streaming_50_requests(fc, reference):
    """50 greedy streams over two decode workers; decode-0 is killed mid-stream. Its
    requests continue on decode-1 from prompt + streamed tokens, exactly; decode-1's own
    requests are untouched; Ray restarts decode-0 and the router uses it again."""
    n, max_tokens = 50, 120
    prompts = _prompts(3, n, 12, 40)
    want = reference(prompts, max_tokens)
    router = fc.cluster.router
    counters0 = dict(router.counters)
    old_ep = fc.registered()["decode-0"]
    streams = [fc.stub.Generate(build_request(p, max_tokens, temperature=0.0), timeout=180) for p in prompts]
    firsts = [next(s) for s in streams]       # every request is streaming
    where = {f.request_id: router.requests[f.request_id].decode_worker for f in firsts}
    assert set(where.values()) == {"decode-0", "decode-1"}
    ray.kill(fc.actor("decode-0"), no_restart=False)

    def rest(i):
        out = collect(streams[i])
        out["token_ids"] = list(firsts[i].token_ids) + out["token_ids"]
        return out
    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(rest, range(n)))
    assert [r["token_ids"] for r in results] == want
    for f, r in zip(firsts, results):
        assert r["finish_reason"] in ("length", "stop")
        assert r["decode_worker"] == "decode-1"
        if where[f.request_id] == "decode-1":
            assert not r["reason"].startswith("fallback_"), r   # untouched
        else:
            assert r["reason"] == "fallback_redispatched"
    moved = sum(w == "decode-0" for w in where.values())
    assert router.counters["redispatched"] - counters0["redispatched"] == moved
    assert router.counters["failed_unavailable"] == counters0["failed_unavailable"]
    fc.wait_for(lambda: fc.registered()["decode-0"] not in (None, old_ep), 60, "decode-0 re-registered")
    more = _prompts(4, 6, 10, 30)
    with ThreadPoolExecutor(6) as ex:
        again = list(ex.map(lambda p: fc.generate(p, 40), more))
    assert [r["token_ids"] for r in again] == reference(more, 40)
    assert "decode-0" in {r["decode_worker"] for r in again}
    fc.wait_idle()


def test_cluster_admission_control_gives_resource_exhausted_at_once(fc):
    router = fc.cluster.router
    fc.wait_for(lambda: all(fc.registered().values()), 60, "every worker registered")
    router.cfg.max_inflight_per_decode = 1
    try:
        prompts = _prompts(5, 3, 10, 20)
        streams = [fc.stub.Generate(build_request(p, 1500, temperature=0.0), timeout=60) for p in prompts[:2]]
        for s in streams:
            next(s)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            fc.generate(prompts[2], 4)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in e.value.details()
        assert time.monotonic() - t0 < 2.0
        for s in streams:
            s.cancel()
    finally:
        router.cfg.max_inflight_per_decode = fc.MAX_INFLIGHT_PER_DECODE
    fc.wait_idle()
    assert len(fc.generate(prompts[2], 4)["token_ids"]) == 4


def test_cluster_router_restart(fc, reference):
    """The router goes away mid-stream: clients get UNAVAILABLE (no hang), the workers free
    the orphaned requests' blocks within their orphan timeout, and a new router (new epoch)
    re-attaches the same actors and serves exactly."""
    prompts = _prompts(6, 4, 20, 200)
    before = fc.all_stats()
    streams = [fc.stub.Generate(build_request(p, 1500, temperature=0.0), timeout=60) for p in prompts]
    for s in streams:
        next(s)
    old_epoch = fc.cluster.router.epoch
    fc.crash_router()
    t0 = time.monotonic()
    for s in streams:
        with pytest.raises(grpc.RpcError) as e:
            collect(s)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as e:     # nobody listens: fails fast, no hang
        fc.generate(prompts[0], 4, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 10
    # no router pings or requests any more: orphan_timeout_s (3 s) later the blocks are free
    fc.wait_idle(timeout=15)
    assert sum(_grown(fc.stats(w), before[w], "orphaned") for w in fc.cluster.decode_actors) == 4
    fc.restart_router()
    assert fc.cluster.router.epoch != old_epoch
    assert all(fc.registered().values())
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda p: fc.generate(p, 12), prompts))
    assert [r["token_ids"] for r in results] == reference(prompts, 12)
    assert {r["route"] for r in results} == {"direct", "disaggregated"}
    assert {r["decode_worker"] for r in results} == {"decode-0", "decode-1"}
    fc.wait_idle()
