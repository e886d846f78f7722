"""A profile with some of its overheads set otherwise, for `pdserve plan` what-ifs (issue 15):
what a validation would give had the profile priced one overhead differently.

    python benchmarks/profile_with.py IN.json OUT.json --set prefill_serial_s=0
    python benchmarks/profile_with.py IN.json OUT.json \\
        --set prefill_serial_s=router_disaggregated_s-router_direct_s
    pdserve plan --profile OUT.json --validate serve.json

Each --set KEY=VALUE writes overheads.KEY: VALUE is a number (seconds) or A-B, two of the
profile's own overheads (the difference of their values). The output is validated like
any profile before it is written.
"""
from __future__ import annotations

import argparse
import json
import sys

from planner import profile_format as pf


def value_of(expr: str, overheads: dict) -> float:
    try:
        return float(expr)
    except ValueError:
        pass
    a, sep, b = expr.partition("-")
    if not sep or a not in overheads or b not in overheads:
        raise ValueError(f"--set: {expr!r} is neither a number nor A-B of two overheads")
    return float(overheads[a]) - float(overheads[b])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", required=True)
    args = ap.parse_args(argv)
    with open(args.profile, encoding="utf-8") as f:
        profile = json.load(f)
    o = profile["overheads"]
    for item in args.set:
        key, sep, expr = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        o[key] = value_of(expr, o)
        print(f"overheads.{key} = {o[key]:.6g} s")
    pf.validate_profile(profile)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
