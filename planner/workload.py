"""Request streams for the simulator, and the synthetic workload `pdserve bench` sends.

`bench_requests` is the one generator of bench's synthetic and shared-prefix workloads
(deploy/bench.py's make_workload calls it), so a simulated run of a seed draws exactly the
requests a measured run of that seed sent. `requests` turns the same draw into what the
simulator needs: lengths and prefix identity, no token ids.

Arrivals: "poisson" (exponential gaps, as bench) or "bursty" (gamma gaps with coefficient
of variation `burst_cv` > 1 at the same mean rate: requests come in clumps).

A trace (JSONL, one request a line: arrival_s, prompt_tokens, cached_tokens,
output_tokens; no content) replays recorded traffic; `pdserve serve --record-trace` writes
one (router/trace.py).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass
class WorkloadSpec:
    """The knobs of bench's workload (same names as its flags), plus arrival shape and the
    share of requests that carry a shared prefix."""
    workload: str = "synthetic"          # "synthetic" | "shared-prefix"
    prompt_min: int = 32
    prompt_max: int = 512
    output_min: int = 16
    output_max: int = 64
    prefix_len: int = 256
    num_prefixes: int = 4
    vocab_max: int = 40000
    arrival: str = "poisson"             # "poisson" | "bursty"
    burst_cv: float = 4.0                # bursty: std/mean of the inter-arrival gaps
    prefix_share: float = 1.0            # shared-prefix: the share of requests with a prefix

    @classmethod
    def from_args(cls, args) -> WorkloadSpec:
        """From bench's (or plan's) argparse namespace or its JSON `args` dict; absent
        fields keep their defaults."""
        get = args.get if isinstance(args, dict) else (lambda k, d: getattr(args, k, d))
        return cls(**{k: get(k, getattr(cls, k)) for k in cls.__dataclass_fields__})

    def validate(self) -> None:
        if self.workload not in ("synthetic", "shared-prefix"):
            raise ValueError(f"--workload: expected synthetic or shared-prefix, got {self.workload!r}")
        if self.arrival not in ("poisson", "bursty"):
            raise ValueError(f"--arrival: expected poisson or bursty, got {self.arrival!r}")
        if self.arrival == "bursty" and not self.burst_cv > 0:
            raise ValueError(f"--burst-cv: must be > 0, got {self.burst_cv}")
        if not 0.0 <= self.prefix_share <= 1.0:
            raise ValueError(f"--prefix-share: must be in [0, 1], got {self.prefix_share}")
        if min(self.prompt_min, self.output_min, self.num_prefixes) < 1:
            raise ValueError("--prompt-min, --output-min, --num-prefixes: must be >= 1")
        if self.prompt_max < self.prompt_min or self.output_max < self.output_min:
            raise ValueError("--prompt-max/--output-max: must be >= the matching --*-min")


@dataclass
class Request:
    """One request as the simulator sees it. `prefix_key` names a shared prefix of
    `prefix_tokens` tokens (None: nothing shared); `cached_tokens` is a prefix-cache hit
    known in advance (traces), found on whichever worker serves it."""
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    prefix_key: object = None
    prefix_tokens: int = 0


def _gap(rng: random.Random, spec: WorkloadSpec, rate: float) -> float:
    if spec.arrival == "poisson":
        return rng.expovariate(rate)
    # Gamma with shape 1/cv^2 and mean 1/rate: cv = 1 is Poisson, larger is burstier.
    shape = 1.0 / (spec.burst_cv ** 2)
    return rng.gammavariate(shape, 1.0 / (rate * shape))


def bench_requests(spec: WorkloadSpec, n: int, rate: float, seed: int) -> list[dict]:
    """bench's requests: dicts of arrival (s), prompt (token ids) and max_tokens. The draw
    order is fixed (bench's figures are reproducible by seed): prefixes, then per request
    the gap, the prompt length and its tokens, the output length."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, spec.vocab_max) for _ in range(spec.prefix_len)]
                for _ in range(spec.num_prefixes)]
    t, out = 0.0, []
    for i in range(n):
        t += _gap(rng, spec, rate)
        prompt = [rng.randrange(100, spec.vocab_max) for _ in range(rng.randint(spec.prompt_min, spec.prompt_max))]
        key = None
        if spec.workload == "shared-prefix":
            # (No extra draw at share 1, so bench's default workload keeps its sequence.)
            if spec.prefix_share >= 1.0 or rng.random() < spec.prefix_share:
                key = i % spec.num_prefixes
                prompt = prefixes[key] + prompt
        out.append(dict(arrival=t, prompt=prompt, max_tokens=rng.randint(spec.output_min, spec.output_max),
                        prefix_key=key))
    return out


def requests(spec: WorkloadSpec, n: int, rate: float, seed: int) -> list[Request]:
    """The simulator's view of bench_requests(spec, n, rate, seed): same arrivals and
    lengths; a shared-prefix request names its prefix instead of carrying its tokens."""
    out = []
    for r in bench_requests(spec, n, rate, seed):
        shared = r["prefix_key"] is not None
        out.append(Request(r["arrival"], len(r["prompt"]), r["max_tokens"], prefix_key=r["prefix_key"],
                           prefix_tokens=spec.prefix_len if shared else 0))
    return out


# ---- traces ----------------------------------------------------------------------------------------
TRACE_FIELDS = ("arrival_s", "prompt_tokens", "cached_tokens", "output_tokens")


def load_trace(path: str, limit: int | None = None) -> list[Request]:
    """A trace's requests in arrival order, the first at t = 0."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                row = tuple(float(d[k]) if k == "arrival_s" else int(d[k]) for k in TRACE_FIELDS)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a trace record ({', '.join(TRACE_FIELDS)}): {e}") from None
            if row[1] < 1 or row[3] < 1 or not 0 <= row[2] <= row[1]:
                raise ValueError(f"{path}:{lineno}: need prompt_tokens >= 1, output_tokens >= 1 and "
                                 f"0 <= cached_tokens <= prompt_tokens")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no trace records")
    rows.sort(key=lambda r: r[0])
    rows = rows[:limit] if limit else rows
    t0 = rows[0][0]
    return [Request(a - t0, p, o, cached_tokens=c) for a, p, c, o in rows]


def trace_rate(reqs: list[Request]) -> float:
    """Mean arrival rate of a trace (requests/s over its span)."""
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    return (len(reqs) - 1) / span if span > 0 else float("inf")


def rescale(reqs: list[Request], rate: float) -> list[Request]:
    """The same trace replayed at another mean rate (arrival times scaled, shape kept)."""
    k = trace_rate(reqs) / rate
    return [Request(r.arrival_s * k, r.prompt_tokens, r.output_tokens, r.cached_tokens, r.prefix_key,
                    r.prefix_tokens) for r in reqs]


def save_trace(path: str, reqs: list[Request]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in reqs:
            f.write(json.dumps(dict(arrival_s=r.arrival_s, prompt_tokens=r.prompt_tokens,
                                    cached_tokens=r.cached_tokens, output_tokens=r.output_tokens)) + "\n")
