"""benchmarks/plan_scenarios.py (docs/PLANNING.md, "A plan for Llama-3-8B and a 70B shape"):
its GPU and engine accounting. The simulator counts engines; an engine of tensor parallelism
tp stands for tp GPUs, so budgets, per-GPU rates and KV room must count GPUs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from planner.simulator import ClusterConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ps():
    spec = importlib.util.spec_from_file_location("plan_scenarios", ROOT / "benchmarks" / "plan_scenarios.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod         # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_shapes_match_the_profile_and_llama3_70b(ps):
    import json
    prof = json.loads((ROOT / "benchmarks" / "data" / "profile_h100_llama3-8b.json").read_text())["model"]
    assert ps.LLAMA3_8B.num_params == prof["num_params"]
    assert ps.LLAMA3_8B.kv_bytes_per_token == prof["kv_bytes_per_token"]
    assert ps.LLAMA3_70B.num_params == 70_553_706_496          # Llama-3-70B's published count
    assert ps.LLAMA3_70B.kv_bytes_per_token == 80 * 2 * 8 * 128 * 2
    assert 140e9 < ps.LLAMA3_70B.weight_bytes < 142e9


def test_engines_and_gpus(ps):
    assert [ps.engines_for(8, tp) for tp in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert ps.engines_for(64, 8) == 8 and ps.engines_for(8, 3) == 2
    cfg = ClusterConfig("disaggregated", decode=3, prefill=1)
    assert cfg.gpus == 4                                  # the simulator's count: engines
    assert ps.gpus_of(cfg, tp=4) == 16
    assert ps.gpus_of(cfg, tp=4, replicas=4) == 64
    # Per GPU divides a unit's rate by its GPUs, whatever the replicas.
    assert ps.per_gpu(32.0, cfg, tp=4) == pytest.approx(2.0)
    assert ps.per_gpu(32.0, cfg, tp=4, replicas=4) == pytest.approx(2.0)
    assert ps.per_gpu(32.0, ClusterConfig("colocated", decode=8), tp=1) == pytest.approx(4.0)


def test_every_scenario_fills_its_budget(ps):
    for sc in ps.scenarios():
        assert sc.engines * sc.tp * sc.replicas == sc.budget, sc.key
        assert sc.placement == "node" or sc.tp * 2 >= ps.GPUS_PER_NODE


def test_splits(ps):
    assert ps.split_candidates(1) == []
    assert ps.split_candidates(2) == [1]
    assert ps.split_candidates(4) == [1, 2, 3]
    assert ps.split_candidates(8) == [1, 2, 3, 4, 5]
    assert ps.split_candidates(16) == [2, 4, 6, 8, 10]


def test_kv_room_and_tp_costs(ps):
    base = ps.load_base()
    # The profiled engine's own pool at tp=1.
    assert ps.kv_blocks(base, ps.LLAMA3_8B, 1) == base.num_kv_blocks
    assert ps.kv_blocks(base, ps.LLAMA3_70B, 2) == 0           # 141 GB of weights on 2 x 80 GB
    b4, b8 = ps.kv_blocks(base, ps.LLAMA3_70B, 4), ps.kv_blocks(base, ps.LLAMA3_70B, 8)
    assert 0 < 2 * b4 < b8                                     # tp=8 frees more than twice the room
    cost, info = ps.build_cost(ps.LLAMA3_70B, 2, ps.INTRA_NODE)
    assert cost is None and info["infeasible"]
    assert ps.allreduce_costs(ps.LLAMA3_70B, 1) == (0.0, 0.0)
    step, token = ps.allreduce_costs(ps.LLAMA3_70B, 8)
    assert step == pytest.approx(160 * ps.ASSUMPTIONS["allreduce_latency_s"])
    assert token == pytest.approx(160 * 2 * 7 / 8 * 8192 * 2 / ps.ASSUMPTIONS["allreduce_bus_bytes_per_s"])
    cost, info = ps.build_cost(ps.LLAMA3_70B, 8, ps.INTER_NODE)
    assert cost.num_kv_blocks == b8
    # Each of the 8 shards moves its share over its own link.
    assert cost.transfer_bytes_per_s == pytest.approx(8 * ps.INTER_NODE.bytes_per_s, rel=1e-3)
    assert cost.kv_bytes_per_token == ps.LLAMA3_70B.kv_bytes_per_token
    # One decode step of the 70B on 8 GPUs reads about 9.3/8 of the 8B's weights, plus the all-reduces.
    small = base.step_time([], [1024])
    assert 1.0 < cost.step_time([], [1024]) / small < 1.8
    assert ps.ZMQ_TCP.engine_bytes_per_s(8) == ps.ZMQ_TCP.bytes_per_s


def test_answers_replicate_the_node_to_64_gpus(ps):
    sc8 = ps.Scenario("llama3-8b", 1, 8, "chat", "node", ps.INTRA_NODE)
    cfg = ClusterConfig("colocated", decode=8)
    r = dict(scenario=sc8.key, config=cfg.name, mode="colocated", prefill=0, decode=8, threshold=None, tp=1,
             engines=8, replicas=1, gpus=8, sustained_rate=100.0, unit_rate=100.0, failed_rate=105.0,
             rate_per_gpu=12.5, goodput_per_gpu=12.0, at_sustained=None, points=[])
    answers = ps.summarise_answers({sc8.key: [r]}, [sc8])
    by = {a["budget"]: a["best"] for a in answers}
    assert by[8]["sustained_rate"] == 100.0 and by[8]["gpus"] == 8
    assert by[64]["sustained_rate"] == 800.0 and by[64]["gpus"] == 64 and by[64]["replicas"] == 8
    assert by[64]["rate_per_gpu"] == by[8]["rate_per_gpu"]
    assert ps.label(by[64]) == "8 x (colocated x8, tp=1)"


def test_split_search_extends_past_an_edge(ps):
    sc = ps.Scenario("llama3-8b", 1, 8, "rag", "node", ps.INTRA_NODE)
    rows = lambda rates: [dict(mode="disaggregated", prefill=p, sustained_rate=r)   # noqa: E731
                          for p, r in rates.items()]
    assert ps.next_split(sc, rows({1: 8, 2: 17, 3: 28, 4: 38, 5: 45})) == 6        # still rising at 5
    assert ps.next_split(sc, rows({1: 8, 2: 17, 3: 28, 4: 38, 5: 45, 6: 40})) is None
    assert ps.next_split(sc, rows({1: 80, 2: 60})) is None                          # 0 prefill engines: colocated
    assert ps.next_split(sc, rows({2: 80, 3: 60})) == 1
    assert ps.next_split(sc, rows({1: 1, 7: 2})) is None                            # 7 of 8: no split beyond
