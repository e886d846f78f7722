"""The controller's planned pool floors (`controller.plan` in the deployment config):
planner/plan.py's pool_targets, the smallest prefill + decode pools that the simulator says
meet the SLOs at the expected load, computed from a `pdserve profile` before the pools start."""
from __future__ import annotations

from deploy.config import ConfigError, PlannedLoadSection


def planned_floors(plan: PlannedLoadSection) -> dict[str, int] | None:
    """{"prefill": P, "decode": D}, or None when no profile is configured. Raises
    ConfigError (naming the section) when no split of up to plan.max_gpus meets the SLOs
    or the profile cannot be read: a deployment asked to follow a plan does not start
    without one."""
    if plan.profile is None:
        return None
    from planner import workload as wl
    from planner.plan import controller_targets
    spec = wl.WorkloadSpec(prompt_min=plan.prompt_min, prompt_max=plan.prompt_max, output_min=plan.output_min,
                           output_max=plan.output_max)
    try:
        return controller_targets(plan.profile, plan.rate, spec, ttft_slo=plan.ttft_slo, tpot_slo=plan.tpot_slo,
                                  attainment=plan.attainment, max_gpus=plan.max_gpus)
    except (ValueError, OSError) as e:
        raise ConfigError(f"controller.plan: {e}") from None
