"""controller.plan: the deployment's pool floors from a profile and an expected load
(deploy/planned_pools.py -> planner.plan.pool_targets; the controller's side,
PoolController.apply_targets, is tested with fakes in tests/test_planner_sim.py)."""
from __future__ import annotations

import pytest

from deploy.config import ConfigError, PlannedLoadSection, from_dict
from deploy.planned_pools import planned_floors
from planner import workload as wl
from planner.costmodel import CostModel
from planner.plan import pool_targets
from planner.profile_format import save_profile


def profile_file(tmp_path, **kw):
    base = dict(step_s=4e-3, per_token_s=4e-5, transfer_latency_s=1e-3, transfer_bytes_per_s=1e9,
                kv_bytes_per_token=4096)
    cost = CostModel.synthetic(**{**base, **kw})
    path = tmp_path / "profile.json"
    save_profile(cost.profile, str(path))
    return str(path), cost


def test_plan_section_is_checked_by_name(tmp_path):
    path, _ = profile_file(tmp_path)
    with pytest.raises(ConfigError, match=r"controller\.plan\.profile: no such file"):
        from_dict({"controller": {"plan": {"profile": str(tmp_path / "missing.json"), "rate": 1}}})
    with pytest.raises(ConfigError, match=r"controller\.plan\.rate"):
        from_dict({"controller": {"plan": {"profile": path}}})
    with pytest.raises(ConfigError, match=r"controller\.plan: planned pool floors need the controller"):
        from_dict({"controller": {"enabled": False, "plan": {"profile": path, "rate": 2}}})
    cfg = from_dict({"controller": {"plan": {"profile": path, "rate": 2.5, "prompt_max": 1024}}})
    assert cfg.controller.plan.rate == 2.5 and cfg.controller.plan.prompt_max == 1024
    assert from_dict({}).controller.plan.profile is None and planned_floors(from_dict({}).controller.plan) is None


def test_floors_are_the_planners_smallest_split(tmp_path):
    path, cost = profile_file(tmp_path)
    plan = PlannedLoadSection(profile=path, rate=60.0, prompt_min=256, prompt_max=1024, output_min=16,
                              output_max=64, ttft_slo=0.2, tpot_slo=0.012, max_gpus=6)
    floors = planned_floors(plan)
    spec = wl.WorkloadSpec(prompt_min=256, prompt_max=1024, output_min=16, output_max=64)
    want = pool_targets(cost, spec, 60.0, ttft_slo=0.2, tpot_slo=0.012, max_gpus=6)
    assert want is not None
    assert floors == {"prefill": want["prefill"], "decode": want["decode"]}
    assert floors["prefill"] + floors["decode"] > 2      # this load needs more than the smallest cluster


def test_a_plan_no_split_can_meet_stops_the_start(tmp_path):
    path, _ = profile_file(tmp_path)
    plan = PlannedLoadSection(profile=path, rate=5.0, tpot_slo=1e-4, max_gpus=3)   # TPOT below one step
    with pytest.raises(ConfigError, match=r"controller\.plan: no prefill/decode split of up to 3 GPUs"):
        planned_floors(plan)
