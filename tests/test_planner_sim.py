"""The planner's simulator (planner/simulator.py, planner/engine_model.py): its mechanics on
a synthetic cost model with exact arithmetic. A single request's TTFT is the profile's
prefill time plus the overheads; queueing appears where the cost model's service time says
it must; the routing is router.policy.decide's; a disaggregated prompt pays its transfer;
goodput is bench's; the engine model schedules as engine/scheduler.py does; the workload
draws bench's requests; traces round-trip; the controller takes planned pool sizes."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from planner import workload as wl
from planner.costmodel import CostModel
from planner.engine_model import EngineModel, SimSeq
from planner.profile_format import attention_pairs
from planner.simulator import ClusterConfig, simulate
from planner.workload import Request, WorkloadSpec

SLO = SimpleNamespace(ttft_slo=1.0, tpot_slo=0.040)


def cost(**kw) -> CostModel:
    """A linear model: 2 ms a step + 10 us per token, transfers 1 ms + bytes / 1 GB/s."""
    base = dict(step_s=2e-3, per_token_s=1e-5, transfer_latency_s=1e-3, transfer_bytes_per_s=1e9,
                kv_bytes_per_token=4096, router_direct_s=3e-4, router_disaggregated_s=7e-4,
                per_token_stream_s=1e-4)
    return CostModel.synthetic(**{**base, **kw})


def one(prompt, out, t=0.0, **kw) -> Request:
    return Request(t, prompt, out, **kw)


# ---- a single request: exact ------------------------------------------------------------------------
def test_single_request_ttft_is_prefill_time_plus_overheads():
    c = cost()
    recs, _ = simulate(c, ClusterConfig("colocated", decode=1), [one(300, 5)])
    r = recs[0]
    ttft = c.router_direct_s + c.step_time([(300, 0)], [])
    assert r["ttft"] == pytest.approx(ttft, rel=1e-12)
    assert r["ttft"] == pytest.approx(c.router_direct_s + c.prefill_time(300), rel=1e-12)
    # Then one decode step per token, alone in the batch, each after the worker loop's own
    # work (per_token_stream_s): TPOT is their mean.
    steps = [c.per_token_stream_s + c.step_time([], [301 + i]) for i in range(4)]
    assert r["tokens"] == 5 and r["route"] == "direct"
    assert r["tpot"] == pytest.approx(sum(steps) / 4, rel=1e-12)
    assert r["e2e"] == pytest.approx(ttft + sum(steps), rel=1e-12)
    assert r["itl"] == pytest.approx(steps, rel=1e-12)


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    c = cost(max_num_batched_tokens=256, attention_s_per_pair=1e-9)
    recs, _ = simulate(c, ClusterConfig("colocated", decode=1), [one(600, 1)])
    chunks = c.step_time([(256, 0)], []) + c.step_time([(256, 256)], []) + c.step_time([(88, 512)], [])
    chunks += 2 * c.per_token_stream_s          # the loop's own work between its steps
    assert recs[0]["ttft"] == pytest.approx(c.router_direct_s + chunks, rel=1e-12)
    assert recs[0]["tokens"] == 1 and recs[0]["tpot"] == 0.0


def test_disaggregated_ttft_adds_the_transfer_and_one_decode_step():
    c = cost()
    recs, sim = simulate(c, ClusterConfig("disaggregated", decode=1, prefill=1), [one(300, 5)])
    r = recs[0]
    assert r["route"] == "disaggregated" and sim.decisions == {"disaggregated:long_uncached_prompt": 1}
    # The prefill worker's step, the KV transfer, then the decode worker's first step, whose
    # batch carries the prefill worker's token and the first decoded one.
    ttft = (c.router_disaggregated_s + c.step_time([(300, 0)], []) + c.transfer_time(300)
            + c.step_time([], [301]))
    assert r["ttft"] == pytest.approx(ttft, rel=1e-12)
    assert r["tokens"] == 5 and len(r["itl"]) == 3
    slower = cost(transfer_latency_s=0.051)
    r2 = simulate(slower, ClusterConfig("disaggregated", decode=1, prefill=1), [one(300, 5)])[0][0]
    assert r2["ttft"] - r["ttft"] == pytest.approx(0.05, rel=1e-9)
    assert r2["e2e"] - r["e2e"] == pytest.approx(0.05, rel=1e-9)


def test_shared_prefix_hit_shortens_the_second_prefill_and_skips_shipped_blocks():
    c = cost()
    a = one(400, 1, 0.0, prefix_key="p", prefix_tokens=256)
    b = one(400, 1, 1.0, prefix_key="p", prefix_tokens=256)
    recs, _ = simulate(c, ClusterConfig("colocated", decode=1), [a, b])
    assert recs[1]["ttft"] == pytest.approx(c.router_direct_s + c.step_time([(144, 256)], [])
                                           , rel=1e-12)
    # Disaggregated: the decode worker's cached blocks are not shipped (the prefill worker
    # has its own cache hit for the compute).
    recs, _ = simulate(c, ClusterConfig("disaggregated", decode=1, prefill=1), [a, b])
    want = c.router_disaggregated_s + c.step_time([(144, 256)], []) + c.transfer_time(144)
    assert recs[1]["ttft"] == pytest.approx(want, rel=1e-12)     # one token: no decode step


def test_a_chunk_after_a_prefix_is_charged_the_paged_attention_coefficient():
    """With dense prefill on, a chunk that starts its sequence is priced at dense attention's
    cost per pair, a chunk after a prefix-cache hit or an earlier chunk at the paged kernel's
    (the engine model passes each chunk's computed tokens)."""
    dense, paged = 1e-9, 2e-8
    c = cost(max_num_batched_tokens=256, attention_s_per_pair=paged, dense_attention_s_per_pair=dense,
             dense_prefill=True)

    def step(new, cached, per_pair):   # the additive form by hand: one chunk, nothing decoded
        return c.coefficients["step_s"] + c.coefficients["per_token_s"] * new + per_pair * attention_pairs(new, cached)

    a = one(400, 1, 0.0, prefix_key="p", prefix_tokens=256)
    b = one(400, 1, 1.0, prefix_key="p", prefix_tokens=256)
    recs, _ = simulate(c, ClusterConfig("colocated", decode=1), [a, b])
    # a: a fresh first chunk, then one after it; b: one chunk after its 256 cached tokens.
    first = step(256, 0, dense) + c.per_token_stream_s + step(144, 256, paged)
    assert recs[0]["ttft"] == pytest.approx(c.router_direct_s + first, rel=1e-12)
    assert recs[1]["ttft"] == pytest.approx(c.router_direct_s + step(144, 256, paged), rel=1e-12)
    # The same requests from an engine with dense prefill off: every chunk paged.
    off = cost(max_num_batched_tokens=256, attention_s_per_pair=paged, dense_attention_s_per_pair=dense)
    recs, _ = simulate(off, ClusterConfig("colocated", decode=1), [a, b])
    first = step(256, 0, paged) + c.per_token_stream_s + step(144, 256, paged)
    assert recs[0]["ttft"] == pytest.approx(c.router_direct_s + first, rel=1e-12)


# ---- queueing ---------------------------------------------------------------------------------------
def _fixed_service(gap: float, n: int):
    """Prompts that fill a step each, one output token: a single server with service time
    S, the step and the worker loop's own work after it."""
    c = cost(max_num_batched_tokens=512)
    s = c.step_time([(512, 0)], []) + c.per_token_stream_s
    reqs = [one(512, 1, i * gap) for i in range(n)]
    return c, s, simulate(c, ClusterConfig("colocated", decode=1), reqs)[0]


def test_below_capacity_nobody_waits_and_above_it_the_backlog_grows_by_the_deficit():
    c, s, recs = _fixed_service(gap=0.0, n=1)
    alone = recs[0]["ttft"]
    _, _, recs = _fixed_service(gap=s * 1.01, n=50)             # 99% utilisation, deterministic
    assert max(r["ttft"] for r in recs) == pytest.approx(alone, rel=1e-9)
    _, _, recs = _fixed_service(gap=s / 2, n=50)                # twice the capacity
    for k, r in enumerate(recs):
        assert r["ttft"] == pytest.approx(alone + k * s / 2, rel=1e-9), k


def test_poisson_waits_follow_md1_at_the_cost_models_utilisation():
    """M/D/1: mean wait rho * S / (2 (1 - rho)) for service time S from the cost model."""
    c = cost(max_num_batched_tokens=512)
    step = c.step_time([(512, 0)], [])
    s = step + c.per_token_stream_s
    rng = random.Random(7)
    for rho in (0.3, 0.7):
        t, reqs = 0.0, []
        for _ in range(6000):
            t += rng.expovariate(rho / s)
            reqs.append(one(512, 1, t))
        recs, _ = simulate(c, ClusterConfig("colocated", decode=1), reqs)
        alone = c.router_direct_s + step
        wait = sum(r["ttft"] - alone for r in recs) / len(recs)
        assert wait == pytest.approx(rho * s / (2 * (1 - rho)), rel=0.15), rho


def test_two_colocated_workers_split_the_load():
    c = cost(max_num_batched_tokens=512)
    s = c.step_time([(512, 0)], [])
    reqs = [one(512, 1, i * s / 1.8) for i in range(60)]        # 1.8x one worker's capacity
    one_w = simulate(c, ClusterConfig("colocated", decode=1), reqs)[0]
    two_w = simulate(c, ClusterConfig("colocated", decode=2), reqs)[0]
    assert one_w[-1]["ttft"] > 20 * s                           # one worker falls behind
    assert max(r["ttft"] for r in two_w) < 3 * s                # two keep up


# ---- the router's policy ------------------------------------------------------------------------------
def test_routing_calls_router_policy_decide(monkeypatch):
    import router.policy as rp
    seen = []
    real = rp.decide

    def spy(prompt_len, block_size, decode, prefill, cfg):
        seen.append((prompt_len, cfg.disagg_threshold, len(decode), len(prefill)))
        return real(prompt_len, block_size, decode, prefill, cfg)

    monkeypatch.setattr(rp, "decide", spy)
    reqs = [one(p, 2, 0.01 * i) for i, p in enumerate((100, 300, 256, 257, 1000))]
    recs, sim = simulate(cost(), ClusterConfig("conditional", decode=2, prefill=1, threshold=256), reqs)
    assert seen == [(p, 256, 2, 1) for p in (100, 300, 256, 257, 1000)]
    assert [r["route"] for r in recs] == ["direct", "disaggregated", "direct", "disaggregated", "disaggregated"]

    def always_direct(prompt_len, block_size, decode, prefill, cfg):
        return real(prompt_len, block_size, decode, [], cfg)     # as if no prefill worker

    monkeypatch.setattr(rp, "decide", always_direct)
    recs, sim = simulate(cost(), ClusterConfig("conditional", decode=1, prefill=1, threshold=0), reqs)
    assert all(r["route"] == "direct" for r in recs)
    assert sim.prefill_workers["prefill-0"].steps == 0


def test_router_loads_follow_the_routers_books():
    """A prefill worker's queued tokens count until the first token is back; the policy
    then sees a saturated pool (max_prefill_queue_tokens) and keeps prompts local."""
    c = cost()
    reqs = [one(1000, 3, 0.0), one(1000, 3, 1e-6), one(1000, 3, 10.0)]
    cfg = ClusterConfig("conditional", decode=1, prefill=1, threshold=0, max_prefill_queue_tokens=1500)
    recs, sim = simulate(c, cfg, reqs)
    assert [r["route"] for r in recs] == ["disaggregated", "direct", "disaggregated"]
    assert sim.decisions["direct:prefill_saturated"] == 1
    assert sim.prefill_queued == {"prefill-0": 0} and sim.inflight == {"decode-0": 0}
    assert sim.queued_prefill_tokens == 0


def test_routing_follows_the_prefix_cache_as_the_routers_index_would():
    """Requests sharing a prefix go where it is cached (router.policy trades overlap
    against load), and with it cached the uncached rest is under the threshold: direct."""
    reqs = [one(400, 2, 0.5 * i, prefix_key="p", prefix_tokens=256) for i in range(6)]
    recs, sim = simulate(cost(), ClusterConfig("conditional", decode=2, prefill=1, threshold=256), reqs)
    assert sim.decisions == {"disaggregated:long_uncached_prompt": 1, "direct:cached_prefix": 5}
    assert [r["route"] for r in recs] == ["disaggregated"] + ["direct"] * 5
    assert sim.decode_workers["decode-1"].steps == 0     # every one on the worker holding the prefix


def test_admission_control_refuses_past_the_inflight_cap():
    reqs = [one(64, 50, 0.0) for _ in range(5)]
    recs, _ = simulate(cost(), ClusterConfig("colocated", decode=1, max_inflight_per_decode=3), reqs)
    assert [r["ok"] for r in recs] == [True] * 3 + [False] * 2
    assert recs[-1]["error"] == "overloaded"


# ---- goodput: bench's -----------------------------------------------------------------------------------
def test_goodput_and_percentiles_are_benchs_on_the_simulated_records():
    from deploy.bench import summarise
    spec = WorkloadSpec(prompt_min=32, prompt_max=1024, output_min=8, output_max=64)
    reqs = wl.requests(spec, 400, 40.0, seed=3)
    recs, _ = simulate(cost(step_s=8e-3), ClusterConfig("conditional", decode=1, prefill=1), reqs)
    slo = SimpleNamespace(ttft_slo=0.05, tpot_slo=0.012)
    s = summarise(recs, slo)
    ok = [r for r in recs if r["ok"]]
    good = [r for r in ok if r["ttft"] <= 0.05 and r["tpot"] <= 0.012]
    duration = max(r["done"] for r in ok) - min(r["sent"] for r in recs)
    assert 0 < len(good) < len(ok)              # the SLOs cut somewhere: the figure means something
    assert s["goodput_rps"] == pytest.approx(len(good) / duration, rel=1e-12)
    assert s["slo_attainment"] == pytest.approx(len(good) / len(recs), rel=1e-12)
    assert s["wrong_token_count"] == 0 and s["completed"] == 400
    assert s["disaggregated"] == sum(q.prompt_tokens > 256 for q in reqs)


# ---- the engine model is the scheduler ------------------------------------------------------------------
def _real_scheduler(bs, budget, max_seqs, blocks):
    from engine.block_manager import BlockManager
    from engine.config import EngineConfig
    from engine.scheduler import Scheduler
    cfg = EngineConfig(block_size=bs, max_num_batched_tokens=budget, max_num_seqs=max_seqs, num_kv_blocks=blocks)
    return Scheduler(cfg, BlockManager(blocks, bs))


def _advance(real, scheduled) -> None:
    """What the engine does with a step's results, on the real scheduler: token 7 sampled
    where the step completes the sequence's tokens, finished at max_tokens."""
    from engine.sequence import FinishReason
    for x in scheduled:
        samples = x.samples
        x.seq.num_computed_tokens += x.num_new_tokens
        real.commit_full_blocks(x.seq)
        if samples:
            x.seq.token_ids.append(7)
            if x.seq.num_output_tokens >= x.seq.params.max_tokens:
                real.finish(x.seq, FinishReason.LENGTH)


def _lockstep(real, model, step: int) -> None:
    """One step of the real scheduler and the engine model side by side: the same
    sequences with the same token counts, the same free blocks before and after."""
    a, b = real.schedule(), model.schedule()
    assert [(x.seq.seq_id, x.num_new_tokens) for x in a] == [(s.rid, n) for s, n in b], step
    assert real.blocks.num_free_blocks == model.num_free_blocks, step
    _advance(real, a)
    model.step_done(b)
    model.check()
    assert real.blocks.num_free_blocks == model.num_free_blocks, step


@pytest.mark.parametrize("blocks,prefixes", [(4000, 3), (60, 0), (90, 2)])
def test_engine_model_schedules_as_the_engine_scheduler(blocks, prefixes):
    """Same arrivals into engine/scheduler.py (real Sequences with token ids, real block
    manager) and EngineModel: every step schedules the same sequences with the same token
    counts, preemptions included (60 blocks is tight), and free blocks agree."""
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    bs, budget, max_seqs = 16, 128, 6
    real = _real_scheduler(bs, budget, max_seqs, blocks)
    model = EngineModel(block_size=bs, max_num_batched_tokens=budget, max_num_seqs=max_seqs, num_kv_blocks=blocks)
    rng = random.Random(blocks)
    prefix_ids = [[rng.randrange(100, 30000) for _ in range(64)] for _ in range(prefixes)]
    pending = []
    for i in range(40):
        p, out = rng.randint(5, 300), rng.randint(1, 30)
        key = i % prefixes if prefixes else None
        ids = (prefix_ids[key] if key is not None else []) + [rng.randrange(100, 30000) for _ in range(p)]
        pending.append((rng.randint(0, 150), i, ids, out, key))
    pending.sort()
    real_seqs = {}
    preempted = 0
    for step in range(3000):
        while pending and pending[0][0] <= step:
            _, i, ids, out, key = pending.pop(0)
            s = Sequence(i, list(ids), len(ids), SamplingParams(max_tokens=out, ignore_eos=True))
            real_seqs[i] = s
            real.add(s)
            model.add(SimSeq(i, len(ids), out, prefix_key=key, prefix_blocks=64 // bs if key is not None else 0))
        _lockstep(real, model, step)
        if not pending and not real.has_work():
            break
    assert not model.has_work() and not pending
    preempted = real.num_preemptions
    assert model.num_preemptions == preempted
    if blocks == 60:
        assert preempted > 0                     # the tight case did exercise preemption
    if prefixes:
        assert sum(s.num_cached_tokens for s in real_seqs.values()) > 0


@pytest.mark.parametrize("bs,blocks,out_max", [(16, 400, 12), (4, 60, 40), (4, 40, 60)])
def test_engine_model_lands_remote_prompts_as_the_scheduler_does(bs, blocks, out_max):
    """Remote prefills landing into a full batch (max_num_seqs) wait, KV in place, ahead of
    prompts not started and of preempted ones: the scheduler and the model schedule the same
    steps throughout, and under memory pressure (small caches, long outputs: preemptions,
    landed prompts giving their KV up) nothing stalls."""
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    max_seqs = 3
    real = _real_scheduler(bs, 256, max_seqs, blocks)
    model = EngineModel(block_size=bs, max_num_batched_tokens=256, max_num_seqs=max_seqs, num_kv_blocks=blocks)
    rng = random.Random(3)
    seqs = {}
    remote = set()

    def add(i, want_remote):
        ids = [rng.randrange(100, 30000) for _ in range(rng.randint(20, 90))]
        out = rng.randint(2, out_max)
        s = seqs[i] = Sequence(i, ids, len(ids), SamplingParams(max_tokens=out, ignore_eos=True))
        m = SimSeq(i, len(ids), out)
        if want_remote:
            got = real.reserve_for_remote(s)
            assert model.reserve_for_remote(m) == got
            if got:
                remote.add(i)
                return
        real.add(s)
        model.add(m)

    def land(i):
        s = real.remote_kv_landed(i)
        s.token_ids.append(7)
        model.remote_kv_landed(i)

    landed_waiting = 0
    for i in range(3):
        add(i, want_remote=False)
    for i in range(3, 9):
        add(i, want_remote=True)
    add(9, want_remote=False)
    pending = [i for i in range(3, 9) if i in remote]
    for step in range(3000):
        if pending and step % 2 == 1:
            land(pending.pop(0))
            landed_waiting += any(s.block_table for s in real.waiting)
        _lockstep(real, model, step)
        assert len(real.running) <= max_seqs
        if not pending and not real.has_work():
            break
    assert not model.has_work() and not real.has_work() and remote
    assert model.num_preemptions == real.num_preemptions
    if blocks < 100:
        assert real.num_preemptions > 0
    else:
        assert landed_waiting > 0


def test_a_landed_prompt_never_waits_behind_one_that_cannot_get_blocks():
    """Preempted prompts queue behind the landed ones, and a landed prompt that cannot get a
    block while nothing runs gives its KV up: a full, memory-tight decode engine with landed
    prompts keeps stepping (it used to stop for good)."""
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    real = _real_scheduler(4, 64, 2, 24)
    params = SamplingParams(max_tokens=60, ignore_eos=True)   # each fits the 96-token cache alone
    a, b = Sequence("A", list(range(10, 22)), 12, params), Sequence("B", list(range(30, 42)), 12, params)
    real.add(a)
    real.add(b)

    def step():
        out = real.schedule()
        _advance(real, out)
        return out
    step()
    for i in range(2):
        s = Sequence(f"L{i}", list(range(100 + 20 * i, 120 + 20 * i)), 20, params)
        assert real.reserve_for_remote(s)
        real.remote_kv_landed(s.seq_id)
        s.token_ids.append(7)
    assert [s.seq_id for s in real.waiting] == ["L0", "L1"]
    for _ in range(2000):
        if not real.has_work():
            break
        assert step(), [(s.seq_id, len(s.block_table)) for s in real.waiting]
        # Whatever holds blocks in the queue (a landed prompt) is ahead of what does not.
        held = [bool(s.block_table) for s in real.waiting]
        assert held == sorted(held, reverse=True)
    assert not real.has_work() and real.num_preemptions > 0


def test_engine_model_disaggregated_entry_points():
    m = EngineModel(block_size=16, max_num_batched_tokens=64, max_num_seqs=4, num_kv_blocks=10)
    a = SimSeq("a", 100, 3)
    assert m.reserve_for_remote(a) and m.num_free_blocks == 3       # 7 blocks for 100 tokens
    assert not m.reserve_for_remote(SimSeq("b", 100, 3)) and m.num_free_blocks == 3
    seq = m.remote_kv_landed("a")
    assert seq.outputs == 1 and m.running == [seq]
    assert m.schedule() == [(seq, 1)] and m.step_shape([(seq, 1)]) == ([], [101])


# ---- workload -----------------------------------------------------------------------------------------
def _bench_make_workload_as_it_was(args, n, rate, seed):
    """deploy/bench.py's generator before it moved to planner/workload.py, verbatim."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, args.vocab_max) for _ in range(args.prefix_len)]
                for _ in range(args.num_prefixes)]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(100, args.vocab_max) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        if args.workload == "shared-prefix":
            prompt = prefixes[i % args.num_prefixes] + prompt
        out.append(dict(arrival=t, prompt=prompt, max_tokens=rng.randint(args.output_min, args.output_max)))
    return out


@pytest.mark.parametrize("workload", ["synthetic", "shared-prefix"])
def test_simulated_workload_is_the_one_bench_sends(workload):
    import argparse

    from deploy import bench
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    args = ap.parse_args(["--workload", workload, "--prompt-max", "700"])
    old = _bench_make_workload_as_it_was(args, 50, 3.0, 11)
    new = bench.make_workload(args, 50, 3.0, 11)
    assert [(r["arrival"], r["prompt"], r["max_tokens"]) for r in new] == \
        [(r["arrival"], r["prompt"], r["max_tokens"]) for r in old]
    sim = wl.requests(WorkloadSpec.from_args(args), 50, 3.0, 11)
    assert [(q.arrival_s, q.prompt_tokens, q.output_tokens) for q in sim] == \
        [(r["arrival"], len(r["prompt"]), r["max_tokens"]) for r in old]
    if workload == "shared-prefix":
        assert {q.prefix_key for q in sim} == {0, 1, 2, 3} and all(q.prefix_tokens == 256 for q in sim)


def test_bursty_arrivals_keep_the_rate_and_clump():
    def gaps(arrival):
        reqs = wl.requests(WorkloadSpec(arrival=arrival, burst_cv=3.0), 20000, 10.0, 1)
        g = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
        mean = sum(g) / len(g)
        return mean, (sum((x - mean) ** 2 for x in g) / len(g)) ** 0.5 / mean
    mean, cv = gaps("poisson")
    assert mean == pytest.approx(0.1, rel=0.05) and cv == pytest.approx(1.0, rel=0.1)
    mean, cv = gaps("bursty")
    assert mean == pytest.approx(0.1, rel=0.1) and cv == pytest.approx(3.0, rel=0.2)


def test_trace_round_trip_rescale_and_known_hits(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        dict(arrival_s=12.0, prompt_tokens=400, cached_tokens=256, output_tokens=4),
        dict(arrival_s=10.0, prompt_tokens=100, cached_tokens=0, output_tokens=2)]) + "\n")
    reqs = wl.load_trace(str(path))
    assert [(r.arrival_s, r.prompt_tokens, r.cached_tokens) for r in reqs] == [(0.0, 100, 0), (2.0, 400, 256)]
    assert wl.trace_rate(reqs) == 0.5 and wl.rescale(reqs, 2.0)[1].arrival_s == 0.5
    wl.save_trace(str(tmp_path / "u.jsonl"), reqs)
    assert wl.load_trace(str(tmp_path / "u.jsonl")) == reqs
    c = cost()
    recs, _ = simulate(c, ClusterConfig("colocated", decode=1), reqs)
    assert recs[1]["ttft"] == pytest.approx(c.router_direct_s + c.step_time([(144, 256)], [])
                                           , rel=1e-12)
    (tmp_path / "bad.jsonl").write_text('{"arrival_s": 1, "prompt_tokens": 5}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        wl.load_trace(str(tmp_path / "bad.jsonl"))


# ---- the router records a trace ------------------------------------------------------------------------
def test_router_records_finished_requests_as_a_trace(tmp_path):
    import asyncio

    from planes import messages
    from planes.sampling_params import SamplingParams
    from router.core import RequestHandle, Router, RouterConfig
    from router.policy import Decision

    path = tmp_path / "trace.jsonl"

    async def scenario():
        r = Router(RouterConfig(record_trace=str(path)))
        d = Decision("direct", "short_prompt", "decode-0", None, 32, 68)
        for i, (finish, out) in enumerate([("length", 5), ("abort", 0), ("stop", 3)]):
            h = RequestHandle(f"r{i}", d, 100, prompt_ids=[1] * 100, params=SamplingParams(max_tokens=5))
            h.sent_at = 1000.0 + i
            r.requests[h.rid] = h
            r._deliver(h, messages.TokenItem(h.rid, [7], finish_reason=finish, prompt_tokens=100, cached_tokens=32,
                                             completion_tokens=out))
        await r.close()

    asyncio.run(scenario())
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [dict(arrival_s=1000.0, prompt_tokens=100, cached_tokens=32, output_tokens=5),
                    dict(arrival_s=1002.0, prompt_tokens=100, cached_tokens=32, output_tokens=3)]
    reqs = wl.load_trace(str(path))                  # what the planner replays
    assert [(q.arrival_s, q.prompt_tokens, q.cached_tokens, q.output_tokens) for q in reqs] == \
        [(0.0, 100, 32, 5), (2.0, 100, 32, 3)]


def test_trace_recorder_stops_at_its_bound(tmp_path):
    from router.trace import TraceRecorder
    t = TraceRecorder(str(tmp_path / "t.jsonl"), max_records=3)
    for i in range(10):
        t.record(float(i), 10, 0, 2)
    t.close()
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 3


def test_serve_flag_sets_the_routers_trace():
    from deploy.cli import build_parser
    from deploy.config import config_from_args
    args = build_parser().parse_args(["serve", "--record-trace", "/tmp/x.jsonl"])
    assert config_from_args(args).router.record_trace == "/tmp/x.jsonl"


# ---- planning and the controller -----------------------------------------------------------------------
def test_pool_targets_are_the_smallest_split_that_meets_the_slos():
    from planner.plan import configurations, pool_targets, run_one
    c = cost(step_s=4e-3, per_token_s=4e-5)
    spec = WorkloadSpec(prompt_min=256, prompt_max=1024, output_min=16, output_max=64)
    kw = dict(ttft_slo=0.2, tpot_slo=0.012, attainment=0.9)
    t = pool_targets(c, spec, 30.0, max_gpus=6, requests=300, thresholds=(256,), **kw)
    assert t is not None and t["slo_attainment"] >= 0.9
    gpus = t["prefill"] + t["decode"]
    assert gpus > 2                                 # the load needs more than the smallest cluster
    reqs = wl.requests(spec, 300, 30.0, 0)
    slo = SimpleNamespace(ttft_slo=0.2, tpot_slo=0.012)
    for cfg in configurations(gpus - 1, [256], ["disaggregated", "conditional"]):
        assert run_one(c, cfg, reqs, slo)["summary"]["slo_attainment"] < 0.9, cfg.name


def test_a_tensor_parallel_engine_counts_as_its_gpus():
    """A profile rescaled to tp GPUs per engine: a GPU budget holds budget // tp engines and
    per-GPU goodput divides by every GPU, not by the engines."""
    from planner.plan import configurations, gpus_of, run_one
    c1 = cost()
    c2 = c1.scaled(1.0, 1.0, 2)
    assert (c1.gpus_per_engine, c2.gpus_per_engine, c2.scaled(1.0, 1.0, 2).gpus_per_engine) == (1, 2, 4)
    assert [x.name for x in configurations(8, [256], ["colocated"], gpus_per_engine=2)] == ["colocated x4"]
    assert [x.name for x in configurations(5, [256], ["disaggregated"], gpus_per_engine=2)] == ["1P1D"]
    cfg = ClusterConfig("colocated", decode=2)
    assert (gpus_of(c1, cfg), gpus_of(c2, cfg)) == (2, 4)
    reqs = wl.requests(WorkloadSpec(prompt_min=64, prompt_max=256, output_min=8, output_max=16), 60, 5.0, 0)
    s = run_one(c2, cfg, reqs, SLO)["summary"]
    assert s["goodput_rps"] > 0 and s["goodput_rps_per_gpu"] == pytest.approx(s["goodput_rps"] / 4)


def test_controller_takes_planned_pool_sizes_as_floors():
    import asyncio

    from deploy.config import ControllerSection
    from deploy.controller import PoolController
    from helpers import FakeClock, FakeSpawner
    from helpers import decode_entry as dw
    from helpers import pool_report
    from helpers import pools_config
    from helpers import prefill_entry as pw

    async def scenario():
        clock, spawner = FakeClock(), FakeSpawner()
        ctl = PoolController(pools_config(pmax=3, dmax=2), ControllerSection(report_stale_s=5), spawner, clock=clock)
        await ctl.start()
        assert ctl.apply_targets({"prefill": 3, "decode": 5}) == {"prefill": 3, "decode": 2}   # max 2 decode
        with pytest.raises(ValueError, match="unknown pool"):
            ctl.apply_targets({"gpu": 1})
        idle = pool_report({"prefill-0": pw()}, {"decode-0": dw()})
        for _ in range(3):
            clock.t += 0.5
            ctl.report(idle)
            await ctl.tick()
            await asyncio.sleep(0.01)
        assert ctl.pool_sizes()["prefill"]["active"] == 3 and ctl.pool_sizes()["decode"]["active"] == 2
        assert {(d["pool"], d["reason"]) for d in ctl.decision_log()} == {("prefill", "below_min"),
                                                                         ("decode", "below_min")}
        # Idle for long: nothing drains below the floor.
        idle = pool_report({f"prefill-{i}": pw() for i in range(3)}, {f"decode-{i}": dw() for i in range(2)})
        for _ in range(40):
            clock.t += 1.0
            ctl.report(idle)
            await ctl.tick()
        assert ctl.pool_sizes()["prefill"]["active"] == 3 and ctl.pool_sizes()["decode"]["active"] == 2
        await ctl.shutdown()

    asyncio.run(scenario())


def test_plan_command_and_validation_against_a_bench_record(tmp_path, capsys):
    from deploy.cli import main
    from planner.plan import validate
    c = cost(step_s=4e-3, per_token_s=4e-5)
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(c.profile))
    out = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(prof), "--gpus", "3", "--rates", "5,20", "--requests", "200",
                 "--thresholds", "256", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["configs"]) == {"colocated x3", "1P2D", "2P1D", "1P2D t=256", "2P1D t=256"}
    assert record["best"] in record["configs"] and "best: " in capsys.readouterr().out
    # A measured record in bench's format whose figures are the simulator's own: zero error.
    bench_args = dict(requests=60, seed=4, decode_replicas=2, disagg_threshold=256, prompt_min=32, prompt_max=700,
                      output_min=4, output_max=20, workload="shared-prefix", ttft_slo=1.0, tpot_slo=0.04)
    measured = dict(args=bench_args, modes={})
    for mode in ("colocated", "disagg", "conditional"):
        runs = []
        for rate in (2.0, 8.0):
            runs.append(dict(rate=rate, summary=None))
        measured["modes"][mode] = runs
    from deploy.bench import summarise
    from planner.plan import bench_configuration, measured_layout
    for mode, runs in measured["modes"].items():
        # (Validation simulates the layout the run had: here, a CPU profile's, all on one host.)
        layout = measured_layout(c, measured, mode)[0]
        for i, run in enumerate(runs):
            reqs = wl.requests(WorkloadSpec.from_args(bench_args), 60, run["rate"], 4 + i)
            run["summary"] = summarise(simulate(c, bench_configuration(mode, bench_args, layout), reqs)[0], SLO)
    rows = validate(c, measured)
    assert [(r["mode"], r["config"], r["rate"]) for r in rows] == [
        ("colocated", "colocated x2", 2.0), ("colocated", "colocated x2", 8.0), ("disagg", "1P1D", 2.0),
        ("disagg", "1P1D", 8.0), ("conditional", "1P1D t=256", 2.0), ("conditional", "1P1D t=256", 8.0)]
    assert all(r[k]["rel_error"] == 0.0 for r in rows for k in ("ttft_p50", "ttft_p90", "tpot_p50"))
    # And a model that is off by a known factor shows it.
    slow = cost(step_s=8e-3, per_token_s=8e-5, router_direct_s=6e-4, router_disaggregated_s=1.4e-3,
                per_token_stream_s=2e-4, transfer_latency_s=2e-3, transfer_bytes_per_s=5e8)
    rows = validate(slow, {**measured, "modes": {"colocated": measured["modes"]["colocated"][:1]}})
    assert rows[0]["tpot_p50"]["rel_error"] == pytest.approx(1.0, rel=1e-6)
    mfile = tmp_path / "serve.json"
    mfile.write_text(json.dumps(measured))
    assert main(["plan", "--profile", str(prof), "--validate", str(mfile)]) == 0
    assert "cells within 15%: 18/18" in capsys.readouterr().out
    # Repeats of one bench command: compared by their mean, each cell with the runs' spread.
    import copy
    again = copy.deepcopy(measured)
    for runs in again["modes"].values():
        for run in runs:
            run["summary"]["ttft_s"]["p50"] *= 1.5
    rows = validate(c, [measured, again])
    for r, one in zip(rows, validate(c, measured)):
        m = one["ttft_p50"]["measured"]
        assert r["ttft_p50"]["runs"] == pytest.approx([m, 1.5 * m])
        assert r["ttft_p50"]["measured"] == pytest.approx(1.25 * m)
        assert r["ttft_p50"]["rel_error"] == pytest.approx(1 / 1.25 - 1)
        assert r["ttft_p50"]["spread"] == pytest.approx(0.5 / 1.25)
        assert r["tpot_p50"]["spread"] == 0.0 and r["tpot_p50"]["rel_error"] == 0.0
    afile = tmp_path / "serve_again.json"
    afile.write_text(json.dumps(again))
    assert main(["plan", "--profile", str(prof), "--validate", str(mfile), str(afile)]) == 0
    text = capsys.readouterr().out
    assert "cells within 15%: 12/18" in text and "spread up to 40%" in text and "or the runs' spread: 18/18" in text
    other = copy.deepcopy(again)
    other["args"] = dict(other["args"], requests=61)
    with pytest.raises(ValueError, match="record 2 is not a repeat of the first.*requests"):
        validate(c, [measured, other])
    short = copy.deepcopy(again)
    short["modes"]["colocated"] = short["modes"]["colocated"][:1]
    with pytest.raises(ValueError, match="record 2 is not a repeat of the first.*runs recorded per mode"):
        validate(c, [measured, short])


def test_validation_writes_the_simulated_requests_as_bench_writes_the_measured(tmp_path):
    """`pdserve plan --validate ... --requests-json` writes every simulated request in the
    format of `pdserve bench --requests-json`, request i for request i of the record's runs
    (the same draw: arrival, prompt and output lengths), with the simulator's own TTFT,
    TPOT and E2E for it: benchmarks/ttft_per_request.py compares the two request by request."""
    from deploy.cli import main
    from planner.plan import bench_configuration, measured_layout
    c = cost(step_s=4e-3, per_token_s=4e-5)
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(c.profile))
    bench_args = dict(requests=30, seed=5, decode_replicas=1, disagg_threshold=256, prompt_min=32, prompt_max=512,
                      output_min=4, output_max=12, ttft_slo=1.0, tpot_slo=0.04)
    measured = dict(args=bench_args, modes={"colocated": [], "conditional": []})
    from deploy.bench import summarise
    for mode, runs in measured["modes"].items():
        cfg = bench_configuration(mode, bench_args, measured_layout(c, measured, mode)[0])
        for i, rate in enumerate((3.0, 9.0)):
            reqs = wl.requests(WorkloadSpec.from_args(bench_args), 30, rate, 5 + i)
            runs.append(dict(rate=rate, summary=summarise(simulate(c, cfg, reqs)[0], SLO)))
    mfile, out = tmp_path / "serve.json", tmp_path / "predicted.json"
    mfile.write_text(json.dumps(measured))
    assert main(["plan", "--profile", str(prof), "--validate", str(mfile), "--requests-json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["args"] == bench_args and list(got["modes"]) == ["colocated", "conditional"]
    for mode, runs in got["modes"].items():
        cfg = bench_configuration(mode, bench_args, measured_layout(c, measured, mode)[0])
        assert [(r["rate"], r["seed"]) for r in runs] == [(3.0, 5), (9.0, 6)]
        for run in runs:
            drawn = wl.bench_requests(WorkloadSpec.from_args(bench_args), 30, run["rate"], run["seed"])
            recs = simulate(c, cfg, wl.requests(WorkloadSpec.from_args(bench_args), 30, run["rate"], run["seed"]))[0]
            rows = run["requests"]
            assert [(r["i"], r["arrival_s"], r["prompt_tokens"], r["max_tokens"]) for r in rows] == \
                [(i, d["arrival"], len(d["prompt"]), d["max_tokens"]) for i, d in enumerate(drawn)]
            assert [(r["ttft_s"], r["tpot_s"], r["e2e_s"], r["route"], r["output_tokens"]) for r in rows] == \
                [(x["ttft"], x["tpot"], x["e2e"], x["route"], x["tokens"]) for x in recs]
            if mode == "conditional":
                assert {r["route"] for r in rows} == {"direct", "disaggregated"}


def test_each_request_gets_its_share_of_the_paths_scatter():
    """A profile with the deployed path's scatter (overheads.path_jitter_s, quantiles per
    route) gives each request's path a draw from it: lone requests of one length no longer
    all take the same TTFT, their spread is the table's (the TTFT tail), the median request
    keeps the priced path, each route draws from its own table, and a run is a function of
    its requests (the same figures twice)."""
    import copy
    base = cost(router_direct_s=4e-3, router_disaggregated_s=6e-3)
    p = copy.deepcopy(base.profile)
    direct_q = [-1e-3 + 0.1e-3 * k for k in range(11)] + [0.5e-3 * k for k in range(1, 11)]   # -1 .. +5 ms
    p["overheads"]["path_jitter_s"] = {"direct": direct_q, "disaggregated": [0.0] * 20 + [10e-3]}
    c = CostModel.from_profile(p)
    reqs = [one(100, 4, t=0.5 * i) for i in range(200)]        # 0.5 s apart: each alone
    alone = simulate(base, ClusterConfig("colocated", decode=1), reqs[:1])[0][0]["ttft"]
    recs, _ = simulate(c, ClusterConfig("colocated", decode=1), reqs)
    extra = sorted(r["ttft"] - alone for r in recs)
    assert extra[0] == pytest.approx(-1e-3, abs=0.05e-3) and extra[-1] == pytest.approx(5e-3, abs=0.2e-3)
    assert extra[100] == pytest.approx(0.0, abs=0.1e-3)
    for q, want in ((10, -0.8e-3), (90, 4e-3)):
        assert extra[2 * q] == pytest.approx(want, abs=0.15e-3), q
    assert [r["ttft"] for r in simulate(c, ClusterConfig("colocated", decode=1), reqs)[0]] == \
        [r["ttft"] for r in recs]
    # A disaggregated request draws from its route's table: 0 but for its top 5 %.
    recs, _ = simulate(c, ClusterConfig("disaggregated", decode=1, prefill=1), reqs)
    alone = simulate(base, ClusterConfig("disaggregated", decode=1, prefill=1), reqs[:1])[0][0]["ttft"]
    extra = sorted(r["ttft"] - alone for r in recs)
    assert extra[int(0.94 * len(extra))] == pytest.approx(0.0, abs=1e-9) and 0 < extra[-1] <= 10e-3


# ---- engines sharing a device ------------------------------------------------------------------------------
class _Clock:
    """The simulator's event loop, alone: enough to drive a SharedDevice."""

    def __init__(self):
        import heapq
        import itertools
        self.now, self.events, self._heapq, self._n = 0.0, [], heapq, itertools.count()

    def at(self, t, fn, *args):
        self._heapq.heappush(self.events, (t, next(self._n), fn, args))

    def run(self):
        while self.events:
            self.now, _, fn, args = self._heapq.heappop(self.events)
            fn(*args)


def test_processor_sharing_splits_a_device_between_the_jobs_in_progress():
    from planner.shared_device import SharedDevice
    clock, done = _Clock(), {}
    gpu = SharedDevice(clock)            # capacity 1, weight 1: k jobs run at 1/k each
    clock.at(0.0, gpu.run, 1.0, lambda: done.setdefault("a", clock.now))
    clock.at(0.0, gpu.run, 3.0, lambda: done.setdefault("b", clock.now))
    clock.at(0.5, gpu.run, 1.0, lambda: done.setdefault("c", clock.now))
    clock.run()
    # a and b at 1/2 until 0.5 (0.25 done each); a, b, c at 1/3: a's 0.75 left takes 2.25 s
    # -> 2.75; b and c at 1/2: c's 0.25 left -> 3.25; b alone, 1.75 left -> 5.0 (all the work).
    assert done == {"a": pytest.approx(2.75), "c": pytest.approx(3.25), "b": pytest.approx(5.0)}
    assert gpu.busy_s == pytest.approx(5.0) and gpu.shared_s == pytest.approx(3.25)
    # A CPU host of 2 cores: two one-thread engines do not slow each other, a third does.
    clock, done = _Clock(), {}
    host = SharedDevice(clock, capacity=2.0, weight=1.0)
    for name in "xy":
        clock.at(0.0, host.run, 1.0, lambda n=name: done.setdefault(n, clock.now))
    clock.run()
    assert done == {"x": pytest.approx(1.0), "y": pytest.approx(1.0)}
    for name in "xyz":
        clock.at(clock.now, host.run, 1.0, lambda n=name: done.__setitem__(n, clock.now))
    clock.run()
    assert all(t == pytest.approx(1.0 + 1.5) for t in done.values())
    # The front end's CPU (one thread, nothing waits for it) takes its share too.
    start, done = clock.now, {}
    for name in "xy":
        clock.at(start, host.run, 1.0, lambda n=name: done.__setitem__(n, clock.now))
    clock.at(start, host.add_background, 0.5)
    clock.at(start, host.add_background, 0.5)    # queued behind the first: still one thread
    clock.run()
    assert all(t - start == pytest.approx(1.5) for t in done.values())


def test_the_request_path_costs_what_the_front_end_probe_measured():
    """A profile with the gRPC front end measured (deploy/frontend_probe.py): a request's path
    is frontend_direct_s plus per_prompt_token_s per prompt token; its CPU (frontend_cpu_*)
    slows the engines of a CPU host it shares."""
    import copy
    from planner.shared_device import DeviceLayout
    base = cost()
    p = copy.deepcopy(base.profile)
    p["overheads"].update(frontend_direct_s=2e-3, per_prompt_token_s=1e-6)
    c = CostModel.from_profile(p)
    r = simulate(c, ClusterConfig("colocated", decode=1), [one(300, 1)])[0][0]
    assert r["ttft"] == pytest.approx(2e-3 + 300e-6 + c.step_time([(300, 0)], []), rel=1e-12)
    p["overheads"].update(frontend_cpu_per_request_s=0.1)
    busy = CostModel.from_profile(p)
    host = DeviceLayout.cpu_host(1, 1.0, 1.0)         # one core for the engine and the front end
    slow = simulate(busy, ClusterConfig("colocated", decode=1, layout=host), [one(300, 1)])[0][0]
    assert slow["ttft"] > r["ttft"] + 1e-3
    assert simulate(c, ClusterConfig("colocated", decode=1, layout=host), [one(300, 1)])[0][0]["ttft"] == \
        pytest.approx(r["ttft"], rel=1e-12)


def test_on_a_cpu_host_the_decode_loops_work_takes_its_share_of_the_cores():
    """The worker loop's own work (per_token_stream_s) is CPU work: on a CPU host of one
    core, two workers streaming at once share the core for their steps and their loops
    alike, so each token takes the two workers' whole work (2 x (step + loop)); alone,
    step + loop. On a shared GPU the loop is the host's, beside the device: there only
    the steps are shared."""
    from planner.shared_device import DeviceLayout
    c = cost(per_token_stream_s=1e-3)
    step = c.step_time([], [301])
    two = [one(300, 40, 0.0), one(300, 40, 0.0)]     # the router sends one to each worker
    core = DeviceLayout.cpu_host(2, 1.0, 1.0)
    alone = simulate(c, ClusterConfig("colocated", decode=2, layout=core), two[:1])[0][0]["tpot"]
    both = [r["tpot"] for r in simulate(c, ClusterConfig("colocated", decode=2, layout=core), two)[0]]
    assert alone == pytest.approx(step + 1e-3, rel=0.02)
    assert both == pytest.approx([2 * (step + 1e-3)] * 2, rel=0.02)
    gpu = [r["tpot"] for r in simulate(cost(per_token_stream_s=1e-3, device="cuda"),
                                       ClusterConfig("colocated", decode=2, layout=DeviceLayout.gpu_share(2)),
                                       two)[0]]
    assert all(t < 1.9 * (step + 1e-3) for t in gpu)


def test_engines_sharing_a_gpu_slow_each_other_only_while_both_compute():
    from planner.shared_device import DeviceLayout
    c = cost(device="cuda")
    alone, shared = DeviceLayout(), DeviceLayout.gpu_share(2)
    two = [one(300, 1, 0.0), one(300, 1, 0.0)]     # the router sends one to each engine
    step = c.step_time([(300, 0)], [])
    for layout, factor in ((alone, 1), (shared, 2)):
        recs, sim = simulate(c, ClusterConfig("colocated", decode=2, layout=layout), two)
        assert [r["ttft"] for r in recs] == pytest.approx([c.router_direct_s + factor * step] * 2, rel=1e-9)
    # One request: the other engine is idle, nothing is shared.
    recs, _ = simulate(c, ClusterConfig("colocated", decode=2, layout=shared), two[:1])
    assert recs[0]["ttft"] == pytest.approx(c.router_direct_s + step, rel=1e-9)
    # 1P1D on one GPU: a prefill next to a running decode slows both.
    reqs = [one(64, 40, 0.0), one(2000, 2, 0.05)]
    base = simulate(c, ClusterConfig("disaggregated", decode=1, prefill=1), reqs)[0]
    slow = simulate(c, ClusterConfig("disaggregated", decode=1, prefill=1, layout=shared), reqs)[0]
    assert slow[1]["ttft"] > base[1]["ttft"] * 1.3 and slow[0]["tpot"] > base[0]["tpot"]


def test_overlapped_scheduling_sends_a_token_after_the_next_steps_launches():
    """With overlapped scheduling, step n's tokens leave when step n+1 is launched: an eager
    chunk of another prompt launched next holds them back by its launches."""
    import copy
    ov = dict(step_s=0.0, graph_host_s=0.0, eager_host_s=10e-3, mixed_host_s=5e-3, weights_s=2e-3,
              per_token_s=1e-5, transfer_latency_s=1e-3, transfer_bytes_per_s=1e9, device="cuda")
    sync = CostModel.synthetic(form="overlapped", **ov)
    p = copy.deepcopy(sync.profile)
    p["engine"]["async_scheduling"] = True
    overlapped = CostModel.from_profile(p)
    assert overlapped.overlapped_scheduling and not sync.overlapped_scheduling
    # Alone: the token leaves at the end of the prefill step either way (the next step is a
    # graph replay, nothing to launch).
    for c in (sync, overlapped):
        r = simulate(c, ClusterConfig("colocated", decode=1), [one(100, 3)])[0][0]
        assert r["ttft"] == pytest.approx(10e-3, rel=1e-9)
    # B arrives during A's prefill: the engine launches A's decode with B's chunk (an eager
    # step with decodes: 15 ms of launches) before it hands out A's first token.
    reqs = [one(100, 3, 0.0), one(100, 1, 0.004)]
    a_sync = simulate(sync, ClusterConfig("colocated", decode=1), reqs)[0][0]
    a_ov = simulate(overlapped, ClusterConfig("colocated", decode=1), reqs)[0][0]
    assert a_sync["ttft"] == pytest.approx(10e-3, rel=1e-9)
    assert a_ov["ttft"] == pytest.approx(10e-3 + 15e-3, rel=1e-9)


def test_validation_simulates_the_layout_the_run_had():
    from planner.plan import measured_layout, thread_mismatches
    from planner.shared_device import DeviceLayout, layout_from_bench
    gpu = cost(device="cuda")
    half = dict(pools=dict(prefill=dict(replicas=1, num_gpus=0.5, num_cpus=1.0),
                           decode=dict(replicas=1, num_gpus=0.5, num_cpus=1.0)), host=dict(gpus=1.0, cpu_cores=16))
    rec = dict(args=dict(decode_replicas=1), modes={}, layouts=dict(disaggregated=half))
    assert measured_layout(gpu, rec, "disaggregated") == (DeviceLayout.gpu_share(2), "bench record")
    assert measured_layout(gpu, rec, "colocated")[0] == DeviceLayout()
    assert measured_layout(gpu, rec, "colocated", engines_per_gpu=2)[0] == DeviceLayout.gpu_share(2)
    cpu_rec = dict(pools=dict(decode=dict(replicas=2, num_gpus=0.0, num_cpus=1.0)), host=dict(gpus=0.0, cpu_cores=2))
    assert layout_from_bench(cpu_rec) == DeviceLayout.cpu_host(2, 2.0, 1.0)
    # A CPU profile timed with 2 threads against workers that computed with 1: said.
    c = cost()
    c.profile["hardware"].update(cpu_cores=2, torch_threads=2)
    assert thread_mismatches(c, dict(modes={"colocated": []}, layouts=dict(colocated=cpu_rec)))
    c.profile["hardware"]["torch_threads"] = 1
    assert not thread_mismatches(c, dict(modes={"colocated": []}, layouts=dict(colocated=cpu_rec)))


def test_validation_warns_when_the_measured_engine_is_not_the_profiled_one():
    from planner.plan import engine_mismatches
    c = cost(max_num_batched_tokens=512)
    rec = dict(args=dict(engine_kwargs=json.dumps(dict(max_num_batched_tokens=2048, block_size=16))))
    assert engine_mismatches(c, rec) == ["max_num_batched_tokens: measured run 2048, profile 512"]
    assert engine_mismatches(c, dict(args=dict(engine_kwargs="{}"))) == []


def test_simulating_and_planning_load_no_ray_grpc_or_torch():
    import subprocess
    import sys
    code = ("import sys, json\n"
            "from planner import plan, simulator, workload\n"
            "from planner.simulator import ClusterConfig, simulate\n"
            "from planner.plan import run_one\n"
            "from types import SimpleNamespace\n"
            "class C:\n"
            "    block_size, max_num_batched_tokens, max_num_seqs, num_kv_blocks = 16, 512, 8, 512\n"
            "    router_direct_s = router_disaggregated_s = per_token_stream_s = 0.0\n"
            "    def step_time(self, chunks, ctx): return 1e-3\n"
            "    def transfer_time(self, n): return 1e-3\n    def request_path_s(self, prompt, uncached): return 0.0\n"
            "reqs = workload.requests(workload.WorkloadSpec(), 20, 5.0, 0)\n"
            "run_one(C(), ClusterConfig('conditional', 1, 1), reqs, SimpleNamespace(ttft_slo=1, tpot_slo=1))\n"
            "print(json.dumps(sorted(m for m in ('ray', 'grpc', 'torch') if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


def test_engine_model_counts_a_traces_known_hits_while_they_are_held():
    """Trace requests carry their cached tokens (fixed_hit_blocks, no prefix entry): those
    blocks are held while the sequence runs and come back when it ends; the accounting
    invariants hold at every step and every block is free at the end."""
    m = EngineModel(block_size=16, max_num_batched_tokens=128, max_num_seqs=4, num_kv_blocks=64)
    seqs = [SimSeq(i, 100 + 30 * i, 5, fixed_hit_blocks=2 + i) for i in range(3)]
    for s in seqs:
        m.add(s)
    first = True
    while m.has_work():
        sched = m.schedule()
        m.check()
        if first:   # the first prompt's hits and the blocks of what it computes are held
            assert m.num_blocks - m.num_free_blocks >= -(-100 // 16)
            first = False
        m.step_done(sched)
        m.check()
    assert m.num_free_blocks == 64 and m.own_used == 0


def test_ttft_per_request_lists_the_slowest_requests_with_the_gap_before_them():
    """benchmarks/ttft_per_request.py --slowest: the slowest fraction by measured TTFT, in
    send order, each with its predicted TTFT and the time since the request sent before it."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "ttft_per_request.py")
    spec = importlib.util.spec_from_file_location("ttft_per_request", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(i, sent, ttft):
        return dict(i=i, ok=True, sent_s=sent, ttft_s=ttft, e2e_s=ttft + 0.05, tpot_s=0.002, prompt_tokens=100,
                    max_tokens=20, route="direct")
    measured = [row(0, 0.0, 0.010), row(1, 1.0, 0.030), row(2, 1.002, 0.040), row(3, 3.0, 0.011)]
    predicted = [row(r["i"], r["sent_s"], 0.012) for r in measured]
    out = mod.slowest(mod.joined(measured, predicted), 0.5)
    lines = out.splitlines()[1:]
    assert [int(x.split()[0]) for x in lines] == [1, 2]          # the two slowest, in send order
    assert [float(x.split()[-1]) for x in lines] == [pytest.approx(1000.0), pytest.approx(2.0)]
    assert [float(x.split()[-2]) for x in lines] == [12.0, 12.0]   # predicted TTFT, ms
    # --burst-window: request 2 was sent 2 ms after request 1, the others alone.
    places = mod.by_burst_place(mod.joined(measured, predicted), 0.010)
    assert places == {0: [pytest.approx(-0.002), pytest.approx(0.018), pytest.approx(-0.001)],
                      1: [pytest.approx(0.028)]}


def test_tpot_by_overlap_splits_requests_by_who_else_was_alive_while_they_streamed():
    """benchmarks/tpot_by_overlap.py: a request is lone only if no other request was alive
    (sent, not finished) at any moment of its stream; the others' count is time-weighted."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "tpot_by_overlap.py")
    spec = importlib.util.spec_from_file_location("tpot_by_overlap", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(sent, ttft, e2e, tpot, ok=True, out=10):
        return dict(ok=ok, sent_s=sent, ttft_s=ttft, e2e_s=e2e, tpot_s=tpot, output_tokens=out)
    rows = [row(0.0, 0.1, 1.0, 0.002),          # streams 0.1-1.0; the next is alive from 0.55
            row(0.55, 0.1, 1.0, 0.004),         # streams 0.65-1.55; the first alive until 1.0
            row(3.0, 0.1, 1.0, 0.003),          # alone the whole time
            row(0.5, 0.1, 0.2, 0.009, ok=False),  # failed: not counted, not a neighbour
            row(5.0, 0.1, 1.0, 0.005),          # streams 5.1-6.0 beside a one-token request
            row(5.5, 0.01, 0.05, 0.0, out=1)]   # one token: no TPOT of its own, but alive 5.5-5.55
    lone, busy, others = mod.split(rows)
    assert lone == [3.0]
    assert sorted(busy) == [2.0, 4.0, 5.0]
    # the first: 0.45 s of 0.9 with one other alive; the second: 0.35 s of 0.9; the fourth 0.05 of 0.9
    assert others == pytest.approx((0.45 / 0.9 + 0.35 / 0.9 + 0.05 / 0.9) / 3)
    # --by-other-worker: split by whether another decode worker was serving.
    def wrow(sent, e2e, ttft, tpot, worker, prompt=100, out=10):
        return dict(ok=True, sent_s=sent, e2e_s=e2e, ttft_s=ttft, tpot_s=tpot, decode_worker=worker,
                    prompt_tokens=prompt, output_tokens=out)
    s = mod.by_other_worker([wrow(0.0, 1.0, 0.005, 0.002, "d0"),    # d1 busy 0.2-1.2: 0.8 of its life
                             wrow(0.2, 1.0, 0.009, 0.003, "d1"),    # sent while d0 serves; 0.8 of its life shared
                             wrow(3.0, 1.0, 0.006, 0.001, "d0"),    # nobody else
                             wrow(3.1, 0.2, 0.004, 0.004, "d0"),    # own worker busy: no TTFT; other idle
                             wrow(5.0, 1.0, 0.007, 0.005, "d1", prompt=300)])   # long prompt: TPOT only
    assert s["ttft"] == {"other busy": [9.0], "other idle": [5.0, 6.0]}
    assert s["tpot"] == {"other busy": [2.0, 3.0], "other idle": [1.0, 4.0, 5.0]}
    # Two requests in flight at once on the other worker count once: 0.4 s of 1.0, not 0.8.
    s = mod.by_other_worker([wrow(0.0, 1.0, 0.005, 0.002, "d0"), wrow(0.1, 0.4, 0.005, 0.001, "d1"),
                             wrow(0.1, 0.4, 0.005, 0.001, "d1")])
    assert s["tpot"]["other idle"][0] == 2.0
    with pytest.raises(ValueError, match="decode_worker"):
        mod.by_other_worker([row(0.0, 0.1, 1.0, 0.002)])


def test_simulated_records_name_the_decode_worker_like_bench():
    """The simulator's per-request records carry the decode worker the router chose, as
    bench's rows do (tpot_by_overlap.py --by-other-worker reads both): ties of idle workers
    go to the first, the second takes what arrives while the first is busy."""
    cost = CostModel.synthetic(step_s=0.01)
    reqs = [Request(0.0, 64, 8), Request(0.001, 64, 8), Request(5.0, 64, 8)]
    recs, _ = simulate(cost, ClusterConfig("colocated", decode=2), reqs)
    assert [r["decode_worker"] for r in recs] == ["decode-0", "decode-1", "decode-0"]
