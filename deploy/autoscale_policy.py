"""Scaling decisions for one pool, as a plain class: feed it load snapshots and a clock,
get back "add k replicas" / "remove one" / nothing, each with the reason.

No Ray, no sockets, no wall clock: :class:`deploy.controller.PoolController` feeds it the
router's numbers, and the unit tests feed it hand-made snapshots and a fake clock.

The two pools have different bottlenecks, so each has its own signals, each expressed as a
*load ratio* (observed / target, 1.0 = exactly at target):

  prefill  queued prefill tokens per replica   vs  target_queued_tokens_per_replica
           observed TTFT (p90, disaggregated)  vs  target_ttft_s
  decode   KV-block use of the pool            vs  target_kv_use
           running + waiting seqs per replica  vs  target_running_per_replica
           observed TPOT/ITL (p90)             vs  target_tpot_s

The pool's load is its most loaded signal. Anti-flapping, in three layers:
  * a hysteresis band: grow above ``scale_up_load`` (1.0), shrink only below
    ``scale_down_load`` (0.5), and only if the load spread over one replica fewer would
    still be below ``scale_up_load`` (so a shrink never sets up the next grow);
  * stability: the load must stay out of the band for ``up_stable_s`` / ``down_stable_s``;
  * cool-down: after any scale event, no grow for ``up_cooldown_s`` and no shrink for
    ``down_cooldown_s``; and no decision at all while a new replica is still starting
    (its capacity is not visible in the signals yet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ScalingPolicyConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    scale_up_load: float = 1.0
    scale_down_load: float = 0.5
    up_stable_s: float = 2.0
    down_stable_s: float = 10.0
    up_cooldown_s: float = 10.0
    down_cooldown_s: float = 30.0
    max_step_up: int = 1          # replicas added by one decision (a large ratio may ask for more)

    def validate(self, where: str = "scaling") -> None:
        if self.min_replicas < 0:
            raise ValueError(f"{where}.min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"{where}.max_replicas: must be >= max(1, min_replicas={self.min_replicas}), "
                             f"got {self.max_replicas}")
        if not 0 < self.scale_down_load < self.scale_up_load:
            raise ValueError(f"{where}: need 0 < scale_down_load < scale_up_load, got "
                             f"{self.scale_down_load} and {self.scale_up_load}")
        for k in ("up_stable_s", "down_stable_s", "up_cooldown_s", "down_cooldown_s"):
            if getattr(self, k) < 0:
                raise ValueError(f"{where}.{k}: must be >= 0, got {getattr(self, k)}")
        if self.max_step_up < 1:
            raise ValueError(f"{where}.max_step_up: must be >= 1, got {self.max_step_up}")


@dataclass
class PrefillTargets:
    """None switches a signal off."""
    queued_tokens_per_replica: float | None = 8192
    ttft_s: float | None = 2.0


@dataclass
class DecodeTargets:
    kv_use: float | None = 0.85
    running_per_replica: float | None = 64
    tpot_s: float | None = 0.1


@dataclass
class PoolLoad:
    """One pool at one instant: its size and its signals as load ratios."""
    replicas: int                                  # ready + starting (where the pool is heading)
    ready: int                                     # serving (not starting, not draining)
    ratios: dict[str, float] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)   # the raw numbers, for logs

    @property
    def load(self) -> float:
        return max(self.ratios.values(), default=0.0)

    @property
    def dominant(self) -> str:
        return max(self.ratios, key=self.ratios.get) if self.ratios else "idle"


@dataclass
class ScaleDecision:
    delta: int                 # > 0: add replicas; < 0: remove |delta|
    reason: str                # low-cardinality label: below_min, above_max, a signal name, idle
    detail: str                # one human line: the numbers behind it


def _ratio(observed: float | None, target: float | None) -> float | None:
    if observed is None or target is None or target <= 0:
        return None
    return observed / target


def prefill_load(replicas: int, ready: int, queued_tokens: float, ttft_p90_s: float | None,
                 targets: PrefillTargets) -> PoolLoad:
    """Queued tokens are spread over `replicas` (starting ones included), so a pending
    scale-up already counts as capacity and the next decision does not ask twice. TTFT
    counts only while something is queued: a window of samples from a burst that is over
    says nothing about the pool now (and must not grow an idle pool)."""
    per = queued_tokens / max(1, replicas)
    if queued_tokens <= 0:
        ttft_p90_s = None
    raw = {"queued_tokens": _ratio(per, targets.queued_tokens_per_replica), "ttft": _ratio(ttft_p90_s, targets.ttft_s)}
    return PoolLoad(replicas, ready, {k: v for k, v in raw.items() if v is not None},
                    {"queued_tokens": queued_tokens, "ttft_p90_s": ttft_p90_s if ttft_p90_s is not None else -1})


def decode_load(replicas: int, ready: int, used_blocks: int, total_blocks: int, running: int,
                tpot_p90_s: float | None, targets: DecodeTargets) -> PoolLoad:
    """KV use is the pool-wide fraction of blocks in use; a replica still loading adds no
    blocks yet, so it is counted at the pool's average size."""
    kv_use = None
    if running <= 0:
        tpot_p90_s = None       # as for TTFT above: latency of a batch that is gone
    if total_blocks > 0 and ready > 0:
        kv_use = used_blocks / (total_blocks / ready * max(replicas, ready))
    per = running / max(1, replicas)
    raw = {"kv_use": _ratio(kv_use, targets.kv_use), "running": _ratio(per, targets.running_per_replica),
           "tpot": _ratio(tpot_p90_s, targets.tpot_s)}
    return PoolLoad(replicas, ready, {k: v for k, v in raw.items() if v is not None},
                    {"kv_use": kv_use if kv_use is not None else -1, "running": running,
                     "tpot_p90_s": tpot_p90_s if tpot_p90_s is not None else -1})


class PoolPolicy:
    """Stateful (timers) decision maker for one pool. `decide` is called once per
    controller tick with the pool's current load and the time."""

    def __init__(self, cfg: ScalingPolicyConfig):
        cfg.validate()
        self.cfg = cfg
        self._high_since: float | None = None
        self._low_since: float | None = None
        self._last_event = -math.inf

    def decide(self, p: PoolLoad, now: float) -> ScaleDecision | None:
        c = self.cfg
        if p.replicas < c.min_replicas:
            return self._event(c.min_replicas - p.replicas, "below_min",
                               f"{p.replicas} replicas < min {c.min_replicas}", now)
        if p.replicas > c.max_replicas:
            return self._event(-1, "above_max", f"{p.replicas} replicas > max {c.max_replicas}", now)
        if p.ready < p.replicas:
            # A replica is still starting: its capacity is not in the signals yet.
            self._high_since = self._low_since = None
            return None
        load = p.load
        if load > c.scale_up_load:
            self._low_since = None
            self._high_since = now if self._high_since is None else self._high_since
            if (p.replicas < c.max_replicas and now - self._high_since >= c.up_stable_s
                    and now - self._last_event >= c.up_cooldown_s):
                want = max(p.replicas + 1, math.ceil(p.replicas * load / c.scale_up_load))
                add = min(want - p.replicas, c.max_step_up, c.max_replicas - p.replicas)
                return self._event(add, p.dominant, self._detail(p, ">", c.scale_up_load), now)
            return None
        self._high_since = None
        # Shrink only if one replica fewer would still be under the grow line (no ping-pong).
        if load < c.scale_down_load and p.replicas > c.min_replicas and \
                load * p.replicas / (p.replicas - 1) < c.scale_up_load:
            self._low_since = now if self._low_since is None else self._low_since
            if now - self._low_since >= c.down_stable_s and now - self._last_event >= c.down_cooldown_s:
                return self._event(-1, "idle", self._detail(p, "<", c.scale_down_load), now)
            return None
        self._low_since = None
        return None

    def _detail(self, p: PoolLoad, op: str, line: float) -> str:
        sig = ", ".join(f"{k}={v:.2f}x" for k, v in sorted(p.ratios.items())) or "no signals"
        raw = ", ".join(f"{k}={v:.4g}" for k, v in sorted(p.values.items()))
        return f"load {p.load:.2f} {op} {line} ({sig}; {raw}) with {p.replicas} replicas"

    def _event(self, delta: int, reason: str, detail: str, now: float) -> ScaleDecision:
        self._high_since = self._low_since = None
        self._last_event = now
        return ScaleDecision(delta, reason, detail)
