"""A profile's step fit with one prefill attention coefficient and with one for each path
(dense attention for steps whose chunks start their sequence, the paged kernel for the
others; planner/costmodel.py), and each prefill step's error under both. Reads the stored
steps only; writes nothing.

    python benchmarks/step_fit_by_path.py benchmarks/data/profile_cpu_tiny_2026-12-07.json --dense-prefill on

--dense-prefill on is for a profile measured with dense prefill on that does not record it
(engine.dense_prefill was added to the profile after the 2026-12-07 CPU profile was taken,
on a CPU backend whose default was already on); by default the profile's own record counts.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from planner.costmodel import dense_prefill_of, fit_steps, predict_entry_as  # noqa: E402
from planner.profile_format import entry_chunks, load_profile  # noqa: E402


def _error(fit: dict, step: dict, dense_prefill: bool) -> float:
    return predict_entry_as(fit["model"], fit["coefficients"], step, dense_prefill) / step["seconds"] - 1.0


def _summary_line(name: str, fit: dict) -> str:
    held = fit.get("holdout_relative_error") or fit["relative_error"]
    c = fit["coefficients"]
    return (f"{name}: {fit['model']} form, attention per pair paged {c['attention_s_per_pair']:.3g} s, dense "
            f"{c['dense_attention_s_per_pair']:.3g} s; held-out |error| median {held['median']:.1%}, "
            f"p90 {held['p90']:.1%}, mean signed {held['mean_signed']:+.1%}\n  ({fit['attention']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--dense-prefill", choices=["recorded", "on", "off"], default="recorded",
                    help="the profiled engine's dense prefill (default: the profile's engine.dense_prefill)")
    args = ap.parse_args()
    profile = copy.deepcopy(load_profile(args.profile))
    if args.dense_prefill != "recorded":
        profile["engine"]["dense_prefill"] = args.dense_prefill == "on"
    dense_prefill, why = dense_prefill_of(profile)
    one = fit_steps(profile["steps"], paged_only_because="asked for here, as the fit was before the split")
    by_path = fit_steps(profile["steps"], dense_prefill=dense_prefill, paged_only_because=why)
    print(_summary_line("one coefficient", one))
    print(_summary_line("one per path   ", by_path))
    print("\nkind     new  cached  decodes  measured ms  one coef  per path")
    for step in profile["steps"]:
        if not step["num_prefill_seqs"]:
            continue
        chunks = entry_chunks(step)
        new, cached = chunks[0] if chunks else (step["prefill_tokens"], None)
        print(f"{step['kind']:7} {new:5} {'?' if cached is None else cached:>7} {step['decode_seqs']:8} "
              f"{step['seconds'] * 1e3:12.2f} {_error(one, step, False):+9.1%} "
              f"{_error(by_path, step, dense_prefill):+9.1%}")


if __name__ == "__main__":
    main()
