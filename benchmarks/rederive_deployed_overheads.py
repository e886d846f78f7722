"""Derive a profile's deployed-path overheads again from the per-length medians its probe
stored (and every request's TTFT, in profiles whose probe kept them: then path_jitter_s
too), by deploy/deployed_probe.py's current rules (for a profile measured under an earlier
rule); the measurements are not touched. Writes the profile in place.

    python benchmarks/rederive_deployed_overheads.py benchmarks/data/profile_cpu_tiny_2026-12-07.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deploy.deployed_probe import rederive  # noqa: E402
from planner.profile_format import load_profile, validate_profile  # noqa: E402

NOTE = (" | router_direct_s, prompt_residual, per_prompt_token_s and router_disaggregated_s re-derived from "
        "these per-length medians with the final rule (fixed path = the smallest residual, 0 up to its length).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    path = ap.parse_args().profile
    profile = load_profile(path)
    before = {k: profile["overheads"].get(k) for k in ("router_direct_s", "router_disaggregated_s", "prompt_residual")}
    profile["overheads"] = rederive(profile)
    if NOTE not in profile["overheads"].get("notes", ""):
        profile["overheads"]["notes"] = (profile["overheads"].get("notes", "") + NOTE)[:3900]
    validate_profile(profile)
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
    print("before:", before)
    print("after: ", {k: profile["overheads"][k] for k in before})


if __name__ == "__main__":
    main()
