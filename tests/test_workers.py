"""Decode and prefill workers driven in one process by a fake router: direct and
disaggregated requests against a single engine's output, KV-transfer timeout fallback,
aborts on both workers, invalid and malformed input, KV events and heartbeats, drain,
and the Ray shells' import-time contract. Every test ends with both engines idle and
no KV block referenced."""
from __future__ import annotations

import sys
import time

import msgpack
import pytest
import torch
import zmq

import kv_transfer as kt
from decode_worker import DecodeWorker
from engine import LLM, SamplingParams
from helpers import EKW, MODEL, PARAMS, PROMPT, FakeRouter, assert_no_leaks, drive, gen, settle, wait_until
from kv_transfer.wire import KVLayout
from planes import messages
from prefill_worker import PrefillWorker


@pytest.fixture(scope="module")
def expected():
    """Greedy output of the plain offline engine: prompt -> (token ids, text)."""
    llm = LLM(MODEL, **EKW)
    cache = {}

    def get(prompt=PROMPT, params=PARAMS):
        key = (tuple(prompt), params.max_tokens)
        if key not in cache:
            out = llm.generate([list(prompt)], params)[0]
            cache[key] = (out.token_ids, out.text)
        return cache[key]
    return get


@pytest.fixture
def cluster():
    """make(decode=..., prefill=...) -> (router, decode worker, prefill worker or None)."""
    made = []
    router = FakeRouter()

    def make(prefill=True, decode_kw=None, prefill_kw=None):
        dkw = dict(engine_kwargs=EKW, kv_bind="ipc")
        dkw.update(decode_kw or {})
        dw = DecodeWorker("d0", MODEL, router.endpoint, **dkw)
        made.append(dw)
        pw = None
        if prefill:
            pw = PrefillWorker("p0", MODEL, **{"engine_kwargs": EKW, **(prefill_kw or {})})
            made.append(pw)
        return router, dw, pw

    yield make
    try:
        for w in made:
            assert w.num_in_flight() == 0, f"{w.worker_id}: requests left"
            assert_no_leaks(w.engine)
            if isinstance(w, DecodeWorker):
                assert w.receiver.pending() == []
    finally:
        for w in made:
            w.stop()
        router.close()


# ---- serving -------------------------------------------------------------------------------------
def test_direct_request_equals_single_engine(cluster, expected):
    router, dw, _ = cluster(prefill=False)
    router.send(dw.endpoints()["request"], gen("r1"))
    drive(router, dw, None, lambda: "r1" in router.final)
    want_ids, want_text = expected()
    fin = router.final["r1"]
    assert router.tokens["r1"] == want_ids
    assert router.text["r1"] == want_text
    assert (fin.finish_reason, fin.error, fin.fallback) == ("length", None, None)
    assert (fin.prompt_tokens, fin.cached_tokens, fin.completion_tokens) == (75, 0, 12)
    s = dw.stats()
    assert (s["requests"], s["disaggregated"], s["fallbacks"], s["rejected"]) == (1, 0, 0, 0)
    assert all(b.worker == "d0" for b in router.batches)
    load = router.batches[-1].load
    assert load["num_blocks"] == 64 and load["free_blocks"] == 64 and load["running"] == 0


@pytest.mark.parametrize("prefill_chunk", [2048, 32], ids=["one-step", "chunked"])
def test_disaggregated_request_equals_single_engine(cluster, expected, prefill_chunk):
    router, dw, pw = cluster(prefill_kw=dict(engine_kwargs={**EKW, "max_num_batched_tokens": prefill_chunk}))
    req_ep = dw.endpoints()["request"]
    # Warm the decode worker's prefix cache with 2 full blocks of the prompt.
    router.send(req_ep, gen("warm", PROMPT[:40], SamplingParams(max_tokens=1)))
    drive(router, dw, pw, lambda: "warm" in router.final)
    router.send(req_ep, gen("r1", mode="disaggregated", prefill_endpoint=pw.endpoints()["request"]))
    drive(router, dw, pw, lambda: "r1" in router.final)
    fin = router.final["r1"]
    assert router.tokens["r1"] == expected()[0]
    assert router.text["r1"] == expected()[1]
    assert (fin.finish_reason, fin.error, fin.fallback) == ("length", None, None)
    assert (fin.prompt_tokens, fin.cached_tokens, fin.completion_tokens) == (75, 32, 12)
    ds, ps = dw.stats(), pw.stats()
    assert (ds["disaggregated"], ds["fallbacks"], ds["requests"]) == (1, 0, 2)
    assert ds["kv"]["completed"] == 1 and ds["kv"]["layers_written"] >= 2
    assert (ps["completed"], ps["requests"], ps["queued_tokens"], ps["in_flight"]) == (1, 1, 0, 0)
    assert ps["prompt_tokens"] == 75


def test_mixed_batch_direct_and_disaggregated(cluster, expected):
    router, dw, pw = cluster()
    req_ep, pf_ep = dw.endpoints()["request"], pw.endpoints()["request"]
    other = [(i * 104729) % 40000 + 7 for i in range(50)]
    router.send(req_ep, gen("a", mode="disaggregated", prefill_endpoint=pf_ep))
    router.send(req_ep, gen("b", other))
    router.send(req_ep, gen("c", other[:20], SamplingParams(max_tokens=5, ignore_eos=True),
                            mode="disaggregated", prefill_endpoint=pf_ep))
    router.send(req_ep, gen("one", params=SamplingParams(max_tokens=1), mode="disaggregated", prefill_endpoint=pf_ep))
    drive(router, dw, pw, lambda: len(router.final) == 4)
    assert router.tokens["one"] == expected()[0][:1] and router.final["one"].completion_tokens == 1
    assert router.tokens["a"] == expected()[0]
    assert router.tokens["b"] == expected(other)[0]
    assert router.tokens["c"] == expected(other[:20], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert dw.stats()["disaggregated"] == 3 and not any(f.fallback for f in router.final.values())


def test_prefill_that_never_answers_falls_back_to_in_place_prefill(cluster, expected, tmp_path):
    router, dw, _ = cluster(prefill=False, decode_kw=dict(kv_timeout_s=0.5))
    dead = zmq.Context.instance().socket(zmq.PULL)     # a prefill "worker" that never reads
    dead.setsockopt(zmq.LINGER, 0)
    dead.bind(f"ipc://{tmp_path}/dead.sock")
    try:
        t0 = time.monotonic()
        router.send(dw.endpoints()["request"], gen("r1", mode="disaggregated", prefill_endpoint=f"ipc://{tmp_path}/dead.sock"))
        drive(router, dw, None, lambda: "r1" in router.final)
        assert time.monotonic() - t0 >= 0.5
        fin = router.final["r1"]
        assert fin.fallback == "kv_timeout" and fin.error is None and fin.finish_reason == "length"
        assert router.tokens["r1"] == expected()[0]
        assert (fin.prompt_tokens, fin.completion_tokens) == (75, 12)
        s = dw.stats()
        assert (s["disaggregated"], s["fallbacks"]) == (0, 1) and s["kv"]["timed_out"] == 1
        # What the prefill worker would have been asked, then told to drop.
        pm = messages.decode_request(dead.recv())
        assert isinstance(pm, messages.PrefillMsg) and pm.rid == "r1" and pm.kv_key.startswith("r1#")
        assert pm.first_block == 0 and len(pm.dst_block_ids) == 5 and pm.kv_endpoint == dw.endpoints()["kv"]
        assert pm.reply_to == dw.endpoints()["request"] and pm.prompt_ids == PROMPT
        assert messages.decode_request(dead.recv()) == ("abort", pm.kv_key)
    finally:
        dead.close(0)


def test_prefill_failed_message_falls_back_at_once(cluster, expected, tmp_path):
    router, dw, _ = cluster(prefill=False, decode_kw=dict(kv_timeout_s=60))
    dead = zmq.Context.instance().socket(zmq.PULL)
    dead.setsockopt(zmq.LINGER, 0)
    dead.bind(f"ipc://{tmp_path}/p.sock")
    try:
        router.send(dw.endpoints()["request"], gen("r1", mode="disaggregated", prefill_endpoint=f"ipc://{tmp_path}/p.sock"))
        drive(router, dw, None, lambda: dead.poll(0))
        pm = messages.decode_request(dead.recv())
        router.send(pm.reply_to, messages.encode_prefill_failed(pm.kv_key))
        drive(router, dw, None, lambda: "r1" in router.final, timeout_s=10)
        assert router.final["r1"].fallback == "prefill_failed"
        assert router.tokens["r1"] == expected()[0]
        router.send(pm.reply_to, gen("r2", mode="disaggregated", prefill_endpoint="bogus://nowhere"))
        router.send(pm.reply_to, gen("r3", mode="disaggregated"))       # no prefill endpoint at all
        drive(router, dw, None, lambda: {"r2", "r3"} <= set(router.final), timeout_s=10)
        assert router.final["r2"].fallback.startswith("prefill_unreachable")
        assert router.final["r3"].fallback == "no_prefill_endpoint"
        assert router.tokens["r2"] == router.tokens["r3"] == expected()[0]
        assert dw.stats()["fallbacks"] == 3
    finally:
        dead.close(0)


# ---- aborts ---------------------------------------------------------------------------------------
def test_abort_mid_stream_frees_blocks_on_both_workers(cluster):
    router, dw, pw = cluster()
    req_ep = dw.endpoints()["request"]
    long = SamplingParams(max_tokens=500, ignore_eos=True)
    router.send(req_ep, gen("r1", params=long, mode="disaggregated", prefill_endpoint=pw.endpoints()["request"]))
    router.send(req_ep, gen("r2", params=long))
    drive(router, dw, pw, lambda: len(router.tokens["r1"]) >= 3 and len(router.tokens["r2"]) >= 3)
    assert dw.engine.num_free_blocks() < 64
    router.send(req_ep, messages.encode_abort("r1"))
    router.send(req_ep, messages.encode_abort("r2"))
    drive(router, dw, pw, lambda: {"r1", "r2"} <= set(router.final))
    assert router.final["r1"].finish_reason == router.final["r2"].finish_reason == "abort"
    assert router.final["r1"].error is None
    n = len(router.tokens["r1"])
    router.send(req_ep, messages.encode_abort("r1"))    # aborting again, or an unknown id: nothing happens
    router.send(req_ep, messages.encode_abort("nope"))
    settle(router, dw, pw)
    assert len(router.tokens["r1"]) == n and set(router.final) == {"r1", "r2"}
    assert dw.stats()["aborted"] == 2
    for w in (dw, pw):
        assert_no_leaks(w.engine)


def test_abort_while_prefill_worker_is_mid_prompt(cluster):
    """The prompt is chunked on the prefill worker; the abort reaches it between chunks."""
    router, dw, pw = cluster(prefill_kw=dict(engine_kwargs={**EKW, "max_num_batched_tokens": 16}))
    req_ep = dw.endpoints()["request"]
    router.send(req_ep, gen("r1", mode="disaggregated", prefill_endpoint=pw.endpoints()["request"]))
    end = time.monotonic() + 10
    while not pw.engine.scheduler.running:        # the prefill worker has computed a chunk
        dw.run_once(5)
        pw.run_once(0)
        assert time.monotonic() < end
    seq = pw.engine.scheduler.running[0]
    assert 0 < seq.num_computed_tokens < 75 and pw.stats()["queued_tokens"] == 75 - seq.num_computed_tokens
    assert dw.engine.scheduler.awaiting_kv
    router.send(req_ep, messages.encode_abort("r1"))
    drive(router, dw, pw, lambda: "r1" in router.final and pw.num_in_flight() == 0)
    settle(router, dw, pw)
    assert router.final["r1"].finish_reason == "abort" and router.tokens["r1"] == []
    assert pw.stats()["aborted"] == 1 and pw.stats()["completed"] == 0
    for w in (dw, pw):
        assert_no_leaks(w.engine)


# ---- bad input -------------------------------------------------------------------------------------
def test_invalid_requests_get_error_items_and_the_worker_keeps_serving(cluster, expected):
    router, dw, pw = cluster()
    req_ep, pf_ep = dw.endpoints()["request"], pw.endpoints()["request"]
    router.send(req_ep, gen("bad-token", [5, 49152 + 7, 9]))
    router.send(req_ep, gen("too-long", params=SamplingParams(max_tokens=2000)))
    router.send(req_ep, gen("too-long-disagg", params=SamplingParams(max_tokens=2000), mode="disaggregated",
                            prefill_endpoint=pf_ep))
    router.send(req_ep, gen("bad-stop", params=SamplingParams(stop_token_ids=[10**6]), mode="disaggregated",
                            prefill_endpoint=pf_ep))
    router.send(req_ep, gen("ok"))
    drive(router, dw, pw, lambda: len(router.final) == 5)
    f = router.final
    assert (f["bad-token"].error_code, f["bad-token"].finish_reason) == ("invalid_argument", "abort")
    assert "prompt_token_ids" in f["bad-token"].error and router.tokens["bad-token"] == []
    assert f["too-long"].error_code == f["too-long-disagg"].error_code == "resource_exhausted"
    assert "max_tokens" in f["too-long"].error
    assert f["bad-stop"].error_code == "invalid_argument"
    assert f["ok"].error is None and router.tokens["ok"] == expected()[0]
    assert dw.stats()["rejected"] == 4 and pw.stats()["requests"] == 0


def test_malformed_request_plane_messages_are_dropped(cluster, expected):
    router, dw, pw = cluster()
    req_ep, pf_ep = dw.endpoints()["request"], pw.endpoints()["request"]
    junk = [b"", b"\xc1\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 2, "type": "generate"}),
            msgpack.packb({"v": 1, "type": "generate", "rid": "x"}), msgpack.packb({"v": 1, "type": "nope"}),
            messages.pack({"v": 1, "type": "generate", "rid": "y", "prompt_ids": [1, "a"], "mode": "direct",
                           "params": {}}),
            messages.pack({"v": 1, "type": "generate", "rid": "z", "prompt_ids": [1, 2], "mode": "direct",
                           "params": {"max_tokens": -1}})]
    for ep in (req_ep, pf_ep):
        for j in junk:
            router.send(ep, j)
        router.send(ep, gen("multi"), b"extra frame")
    # A prefill message sent to a decode worker (wrong plane) is dropped too.
    router.send(req_ep, messages.PrefillMsg("p", "p#1", [1, 2], PARAMS, "tcp://127.0.0.1:1", [0], 0,
                                            req_ep).encode())
    router.send(req_ep, gen("ok", mode="disaggregated", prefill_endpoint=pf_ep))
    drive(router, dw, pw, lambda: "ok" in router.final)
    assert set(router.final) == {"ok"} and router.final["ok"].fallback is None
    assert router.tokens["ok"] == expected()[0]
    assert dw.stats()["dropped_messages"] == len(junk) + 2 and pw.stats()["dropped_messages"] == len(junk) + 1


def test_prefill_worker_refusals_reach_the_receiver(cluster, expected, tmp_path):
    """Prefill worker alone, with a bare KV receiver: bad requests are aborted over the KV
    plane (so the decode side falls back at once); an unusable KV endpoint is reported to
    reply_to; a good one completes with the right first token."""
    router, dw, pw = cluster()
    layout = KVLayout.from_engine(pw.engine)
    writes = []
    rx = kt.make_receiver("zmq", layout, lambda rid, layer, ids, t: writes.append((rid, layer, list(ids))),
                          bind="ipc")
    reply = zmq.Context.instance().socket(zmq.PULL)
    reply.setsockopt(zmq.LINGER, 0)
    reply.bind(f"ipc://{tmp_path}/reply.sock")
    reply_ep = f"ipc://{tmp_path}/reply.sock"
    pf_ep = pw.endpoints()["request"]
    try:
        def ask(key, prompt=PROMPT, dst=(1, 2, 3, 4, 5), first=0, kv_ep=rx.endpoint, params=PARAMS):
            rx.expect(key, list(dst), deadline=time.monotonic() + 30) if kv_ep == rx.endpoint else None
            router.send(pf_ep, messages.PrefillMsg(key.split("#")[0], key, list(prompt), params, kv_ep, list(dst),
                                                   first, reply_ep).encode())

        ask("tok#1", prompt=[1, 49152 + 1, 2], dst=[1])
        ask("cover#1", dst=[1, 2, 3])                  # 75 tokens need 5 blocks
        ask("bogus#1", kv_ep="bogus://nowhere")
        ask("good#1", dst=[9, 8, 7, 6], first=1)
        done, failed = [], []
        end = time.monotonic() + 15
        while len(done) + len(failed) < 3 or not reply.poll(0):
            pw.run_once(5)
            r = rx.poll(5)
            done += r.completed
            failed += r.failed
            assert time.monotonic() < end, (done, failed)
        reasons = {f.request_id: f.reason for f in failed}
        assert set(reasons) == {"tok#1", "cover#1"}
        assert "sender aborted" in reasons["tok#1"] and "prompt_token_ids" in reasons["tok#1"]
        assert "dst_block_ids" in reasons["cover#1"]
        assert done == [kt.Completed("good#1", expected()[0][0])]
        assert sorted({(layer, tuple(ids)) for _, layer, ids in writes}) == [(0, (9, 8, 7, 6)), (1, (9, 8, 7, 6))]
        assert messages.decode_request(reply.recv()) == ("prefill_failed", "bogus#1")
        s = pw.stats()
        assert (s["requests"], s["rejected"], s["completed"]) == (4, 3, 1)
    finally:
        rx.close()
        reply.close(0)


def test_internal_errors_end_only_the_affected_requests(cluster, expected, monkeypatch):
    router, dw, pw = cluster()
    req_ep, pf_ep = dw.endpoints()["request"], pw.endpoints()["request"]
    add = dw.engine.add_request

    def flaky_add(rid, *a, **kw):
        if rid == "boom":
            raise RuntimeError("kaboom")
        return add(rid, *a, **kw)
    monkeypatch.setattr(dw.engine, "add_request", flaky_add)
    router.send(req_ep, gen("boom"))
    drive(router, dw, pw, lambda: "boom" in router.final)
    assert router.final["boom"].error_code == "internal" and "kaboom" in router.final["boom"].error
    # One failing engine step ends the requests in it; the next requests are served.
    execute = dw.engine.runner.execute
    calls = []

    def flaky_execute(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("step failed")
        return execute(*a, **kw)
    monkeypatch.setattr(dw.engine.runner, "execute", flaky_execute)
    router.send(req_ep, gen("s1"))
    drive(router, dw, pw, lambda: "s1" in router.final)
    assert router.final["s1"].error_code == "internal" and len(router.tokens["s1"]) == 1
    # A KV send that raises on the prefill side: the transfer is aborted, decode falls back.
    real = pw._sender

    def broken_sender(ep):
        s = real(ep)
        monkeypatch.setattr(s, "send_layer", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("wire cut")))
        return s
    monkeypatch.setattr(pw, "_sender", broken_sender)
    router.send(req_ep, gen("s2", mode="disaggregated", prefill_endpoint=pf_ep))
    drive(router, dw, pw, lambda: "s2" in router.final)
    fin = router.final["s2"]
    assert fin.error is None and fin.fallback.startswith("kv_error: sender aborted") and "wire cut" in fin.fallback
    assert router.tokens["s2"] == expected()[0]
    assert pw.stats()["send_errors"] >= 1 and dw.stats()["errors"] == 2


# ---- token plane ---------------------------------------------------------------------------------------
def test_kv_events_arrive_on_the_token_plane(cluster):
    router, dw, _ = cluster(prefill=False)
    router.send(dw.endpoints()["request"], gen("r1"))
    drive(router, dw, None, lambda: "r1" in router.final)
    ev = router.kv_events
    stored = [e for e in ev if e[0] == "stored"]
    # 75 prompt tokens + 11 computed outputs = 86 tokens: 5 full blocks, chained.
    assert len(stored) == 5 and all(isinstance(h, bytes) and h for _, h, _ in stored)
    assert stored[0][2] is None
    assert [p for _, _, p in stored[1:]] == [h for _, h, _ in stored[:-1]]
    # The same prompt again hits the cache; nothing new is stored for the prompt.
    n = len(stored)
    router.send(dw.endpoints()["request"], gen("r2"))
    drive(router, dw, None, lambda: "r2" in router.final)
    assert router.final["r2"].cached_tokens == 64
    assert len([e for e in router.kv_events if e[0] == "stored"]) == n


# ---- threads, heartbeats, drain ---------------------------------------------------------------------------
def test_threaded_workers_heartbeat_and_drain(cluster, expected):
    router, dw, pw = cluster()
    req_ep, pf_ep = dw.endpoints()["request"], pw.endpoints()["request"]
    dw.start()
    pw.start()

    def wait(cond, timeout_s=15):
        wait_until(lambda: router.collect() or cond(), timeout_s, "the workers' token batches", interval_s=0.01)

    router.send(req_ep, gen("a", mode="disaggregated", prefill_endpoint=pf_ep))
    router.send(req_ep, gen("b"))
    wait(lambda: {"a", "b"} <= set(router.final))
    assert router.tokens["a"] == router.tokens["b"] == expected()[0]
    n = len(router.batches)
    wait(lambda: len(router.batches) >= n + 2)     # idle heartbeats, about every 0.5 s
    hb = router.batches[-1]
    assert hb.items == [] and hb.load["free_blocks"] == 64 and hb.load["running"] == 0
    router.send(req_ep, messages.encode_drain())
    router.send(req_ep, gen("c"))
    wait(lambda: "c" in router.final)
    assert router.final["c"].error_code == "unavailable"
    assert dw.stats()["draining"] and dw.is_alive() and pw.is_alive()
    dw.stop()
    pw.stop()
    assert not dw.is_alive() and not pw.is_alive()


def test_heartbeats_continue_through_a_long_engine_step(cluster, expected, monkeypatch):
    # A step that takes seconds (a big prefill chunk on a loaded CPU) must not look like a
    # dead worker: the heartbeat thread keeps the token plane alive while the loop is busy.
    router, dw, _ = cluster(prefill=False)
    real_step = dw.engine.step
    slow = {"left": 1}

    def slow_step():
        if slow["left"]:
            slow["left"] -= 1
            time.sleep(2.5)     # (kept) the long step is what the test is about
        return real_step()

    monkeypatch.setattr(dw.engine, "step", slow_step)
    dw.start()
    router.send(dw.endpoints()["request"], gen("a"))
    end = time.monotonic() + 30
    arrivals = []
    while "a" not in router.final:
        n = len(router.batches)
        router.collect()
        arrivals += [time.monotonic()] * (len(router.batches) - n)
        assert time.monotonic() < end
        time.sleep(0.02)    # (kept) the sampling period of the arrival times measured here
    assert router.tokens["a"] == expected()[0]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert gaps and max(gaps) < 1.6, f"token plane silent for {max(gaps):.1f}s during a 2.5 s step"
    # (the slow part runs before the real step, so the request is still waiting then)
    beats = [b for b in router.batches if not b.items and b.load.get("running", 0) + b.load.get("waiting", 0) == 1]
    assert beats, "no heartbeat reported the request in flight"


# ---- Ray shells -----------------------------------------------------------------------------------------
def test_actor_shells_import_without_ray_running():
    import decode_worker.actor as da
    import prefill_worker.actor as pa
    assert not hasattr(da.DecodeWorkerActor, "remote") and not hasattr(pa.PrefillWorkerActor, "remote")
    for mod in (da, pa):
        cls = mod.remote_class(num_gpus=0)
        assert hasattr(cls, "remote") and hasattr(cls, "options")
    if "ray" in sys.modules:
        import ray
        assert not ray.is_initialized()
