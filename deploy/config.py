"""One YAML file for a deployment: model, pools (resources, min/max, targets, scaling),
router, KV transfer, engine kwargs, controller. `pdserve serve --config FILE` reads it;
every `serve` flag maps to one field (CLI_FIELDS) and overrides the file.

The schema is the dataclasses below, the only one: `deploy.cluster.Cluster` takes a
ServeConfig as loaded. Every default is defined once: a knob that a plain class owns
(router.core.RouterConfig, router.policy.PolicyConfig, the KV timeout of planes.messages,
worker_base.actor's restarts, the autoscaling policy's) reads its default from there, the
rest are defined here (CLI flag defaults are None).
In code (tests, benchmarks, the demo) build one with `ServeConfig.simple(...)` or
`from_dict({...})`. Loading checks every key and value and raises
ConfigError naming the dotted path of the offending field (unknown keys included, with a
"did you mean" when one is close), so a typo never silently falls back to a default.

    model: smollm2
    engine: {kv_cache_memory_gb: 4}            # EngineConfig fields, both pools
    router: {host: 0.0.0.0, port: 50051, disagg_threshold: 256, metrics_port: 9400}
    transfer: {backend: auto, timeout_s: 30}    # auto: cuda_ipc on a host, nccl across hosts, zmq on CPU
    faults: {max_restarts: 4, dead_after_s: 5, orphan_timeout_s: 15, monitor_interval_s: 1}
    pools:
      prefill: {min_replicas: 1, max_replicas: 4, num_gpus: 1, resources: {pdserve_prefill: 1},
                targets: {queued_tokens_per_replica: 8192, ttft_s: 2.0}}
      decode:  {min_replicas: 1, max_replicas: 4, targets: {kv_use: 0.85, running_per_replica: 64}}
    controller: {interval_s: 1.0, metrics_port: 9401}   # enabled: false -> fixed pools, no controller

Placement (deploy/placement.py). Before any worker starts, the pools' per-actor asks
(num_gpus, num_cpus, resources, times min_replicas) are checked against the Ray cluster's
nodes. On a local cluster (no ray.address), pools that leave num_gpus / num_cpus unset share
what the machine has: one GPU for 1 prefill + 1 decode gives each num_gpus 0.5 and a KV
cache size computed from the model's shape (engine.kv_cache_memory_gb, shared or the pool's
own, wins), logged and printed; a shortfall left after that fails at once with a
PlacementError naming the pool, each actor's ask and what the cluster offers. A worker Ray
has not placed after ray.placement_timeout_s fails the start the same way (a scale-up is
logged and counted as `unplaceable`) instead of waiting forever.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field

from deploy.autoscale_policy import DecodeTargets, PrefillTargets, ScalingPolicyConfig
from planner.workload import WorkloadSpec
from planes.messages import KV_TIMEOUT_S
from router.core import RouterConfig
from router.policy import PolicyConfig
from worker_base.actor import MAX_RESTARTS

DTYPES = ("float32", "float16", "bfloat16", "float64")
# "auto": when both pools' workers have GPUs, CUDA IPC between workers of one host
# (kv_transfer/ipc_backend.py) and NCCL pairs across hosts (kv_transfer/p2p_backend.py);
# ZeroMQ, host-staged, otherwise. One name forces that backend for every pair.
TRANSFER_BACKENDS = ("auto", "zmq", "nccl", "cuda_ipc")
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """A bad config file or flag; the message starts with the dotted field path."""


# ---- schema -----------------------------------------------------------------------------------

@dataclass
class RaySection:
    address: str | None = None          # an existing cluster ("auto", "ray://..."); None starts a local one
    # A worker actor Ray has not placed after this long fails the start (or the scale-up) with
    # what it asks and what the cluster offers. None: 30 s on a local cluster (it cannot
    # grow); controller.start_timeout_s with an address (the autoscaler may be adding a node).
    placement_timeout_s: float | None = None

    def validate(self, path: str) -> None:
        if self.placement_timeout_s is not None and not 0 < self.placement_timeout_s <= 86400:
            raise ConfigError(f"{path}.placement_timeout_s: must be in (0, 86400] or null, "
                              f"got {self.placement_timeout_s}")


@dataclass
class RouterSection:
    host: str = "127.0.0.1"             # gRPC listen address
    port: int = 50051
    disagg_threshold: int = PolicyConfig.disagg_threshold
    metrics_host: str = "127.0.0.1"     # Prometheus /metrics (loopback unless you mean to expose it)
    metrics_port: int | None = None     # None: no endpoint
    max_prompt_tokens: int | None = None   # per-request limits at the gRPC edge; None: the context
    max_tokens_limit: int | None = None
    http_host: str = "127.0.0.1"        # the OpenAI-compatible HTTP API (router/openai_api.py)
    http_port: int | None = None        # None: no HTTP API
    shutdown_grace_s: float = 30.0      # on SIGTERM, in-flight requests get this long to finish
    # Overload (router/core.py): requests beyond these are refused as resource-exhausted.
    max_inflight_per_decode: int = RouterConfig.max_inflight_per_decode   # requests held by one decode worker
    # admitted prompt tokens not yet prefilled, all pools
    max_queued_prefill_tokens: int = RouterConfig.max_queued_prefill_tokens
    # Append a JSONL trace of finished requests (arrival, prompt, cached and output lengths;
    # no content) for `pdserve plan --trace` (router/trace.py). None: no trace.
    record_trace: str | None = None

    def validate(self, path: str) -> None:
        _port(self.port, f"{path}.port")
        for k in ("max_inflight_per_decode", "max_queued_prefill_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{path}.{k}: must be >= 1, got {getattr(self, k)}")
        if self.http_port is not None:
            _port(self.http_port, f"{path}.http_port")
        if not 0 <= self.shutdown_grace_s <= 3600:
            raise ConfigError(f"{path}.shutdown_grace_s: must be in [0, 3600], got {self.shutdown_grace_s}")
        for k in ("max_prompt_tokens", "max_tokens_limit"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(f"{path}.{k}: must be >= 1 or null, got {getattr(self, k)}")
        if self.metrics_port is not None:
            _port(self.metrics_port, f"{path}.metrics_port")
        if self.disagg_threshold < 0:
            raise ConfigError(f"{path}.disagg_threshold: must be >= 0, got {self.disagg_threshold}")


@dataclass
class SecuritySection:
    """See SECURITY.md. Paths, not secrets: key and certificate files stay out of this file."""
    api_key_file: str | None = None     # gRPC API keys, one per line (also $PDSERVE_API_KEYS)
    tls_cert: str | None = None         # gRPC over TLS
    tls_key: str | None = None
    tls_client_ca: str | None = None    # mutual TLS: require client certificates from this CA
    zmq_curve: bool = False             # CurveZMQ on the internal planes
    internal_host: str | None = None    # the router's token-plane interface (None: loopback / node IP)

    def validate(self, path: str) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(f"{path}.tls_cert/tls_key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(f"{path}.tls_client_ca: needs tls_cert and tls_key (mutual TLS is TLS)")


@dataclass
class TransferSection:
    backend: str = "auto"
    timeout_s: float = KV_TIMEOUT_S     # a KV transfer slower than this falls back to in-place prefill

    def validate(self, path: str) -> None:
        if self.backend not in TRANSFER_BACKENDS:
            raise ConfigError(f"{path}.backend: {self.backend!r} is not available; choose from {TRANSFER_BACKENDS}")
        if not 0 < self.timeout_s <= 3600:
            raise ConfigError(f"{path}.timeout_s: must be in (0, 3600], got {self.timeout_s}")


@dataclass
class FaultsSection:
    """Worker failures (deploy/supervisor.py, router/core.py; docs/ARCHITECTURE.md, the fault model)."""
    max_restarts: int = MAX_RESTARTS    # Ray restarts a dead worker actor this many times
    dead_after_s: float = RouterConfig.dead_after_s   # decode worker heartbeat silence -> lost
    orphan_timeout_s: float = 15.0      # decode workers drop requests of a router silent this long
    monitor_interval_s: float = 1.0     # supervisor ping period

    def validate(self, path: str) -> None:
        if self.max_restarts < -1:
            raise ConfigError(f"{path}.max_restarts: must be >= 0 (or -1: without limit), got {self.max_restarts}")
        for k in ("dead_after_s", "orphan_timeout_s", "monitor_interval_s"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{path}.{k}: must be > 0, got {getattr(self, k)}")


@dataclass
class ScalingSection:
    """Hysteresis and cool-downs (see deploy/autoscale_policy.py, whose ScalingPolicyConfig
    holds the defaults: the policy is also built without a file, in tests)."""
    scale_up_load: float = ScalingPolicyConfig.scale_up_load
    scale_down_load: float = ScalingPolicyConfig.scale_down_load
    up_stable_s: float = ScalingPolicyConfig.up_stable_s
    down_stable_s: float = ScalingPolicyConfig.down_stable_s
    up_cooldown_s: float = ScalingPolicyConfig.up_cooldown_s
    down_cooldown_s: float = ScalingPolicyConfig.down_cooldown_s
    max_step_up: int = ScalingPolicyConfig.max_step_up


@dataclass
class PoolSection:
    min_replicas: int = 1
    max_replicas: int | None = None     # None: = min_replicas (a fixed pool)
    # Per actor. None: 1 GPU if the Ray cluster has GPUs (else 0) and 1 CPU, except on a local
    # cluster that has fewer than the pools ask, where they share (deploy/placement.py).
    num_gpus: float | None = None
    num_cpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)   # custom Ray resources per actor (node steering)
    engine: dict = field(default_factory=dict)                  # EngineConfig overrides for this pool only
    scaling: ScalingSection = field(default_factory=ScalingSection)

    def policy_config(self) -> ScalingPolicyConfig:
        return ScalingPolicyConfig(min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                                   **dataclasses.asdict(self.scaling))

    def validate(self, path: str) -> None:
        # (min_replicas >= 1 is checked by ServeConfig.validate: 0 prefill workers is a fixed
        # deployment's choice, never an autoscaled one's.)
        if self.max_replicas is None:
            self.max_replicas = max(1, self.min_replicas)
        try:
            self.policy_config().validate(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"{path}.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.num_cpus is not None and self.num_cpus < 0:
            raise ConfigError(f"{path}.num_cpus: must be >= 0, got {self.num_cpus}")
        for k, v in self.resources.items():
            if v < 0:
                raise ConfigError(f"{path}.resources.{k}: must be >= 0, got {v}")
        _engine_kwargs(self.engine, f"{path}.engine")
        targets = getattr(self, "targets", None)
        for k, v in dataclasses.asdict(targets).items():
            if v is not None and v <= 0:
                raise ConfigError(f"{path}.targets.{k}: must be > 0 or null (off), got {v}")


@dataclass
class PrefillPool(PoolSection):
    targets: PrefillTargets = field(default_factory=PrefillTargets)


@dataclass
class DecodePool(PoolSection):
    targets: DecodeTargets = field(default_factory=DecodeTargets)

    def validate(self, path: str) -> None:
        if self.targets.kv_use is not None and self.targets.kv_use > 1:
            raise ConfigError(f"{path}.targets.kv_use: a fraction in (0, 1], got {self.targets.kv_use}")
        super().validate(path)


@dataclass
class PoolsSection:
    prefill: PrefillPool = field(default_factory=PrefillPool)
    decode: DecodePool = field(default_factory=DecodePool)


@dataclass
class PlannedLoadSection:
    """Pool floors planned from a `pdserve profile` and an expected load (planner/plan.py,
    pool_targets): when `profile` is set, right after the pools start at min_replicas the
    controller raises their floors to the smallest prefill and decode pools that the
    simulator says keep `attainment` of requests within the SLOs at `rate` (within
    max_replicas); load still grows them up to max_replicas. Off by default."""
    profile: str | None = None          # a `pdserve profile` JSON of one engine of this deployment
    rate: float = 0.0                   # expected requests/s
    # the expected prompt and output lengths (uniform), by default bench's and the planner's
    prompt_min: int = WorkloadSpec.prompt_min
    prompt_max: int = WorkloadSpec.prompt_max
    output_min: int = WorkloadSpec.output_min
    output_max: int = WorkloadSpec.output_max
    ttft_slo: float = 1.0
    tpot_slo: float = 0.040
    attainment: float = 0.9
    max_gpus: int = 8                   # the largest prefill + decode total considered

    def validate(self, path: str) -> None:
        if self.profile is None:
            return
        if not os.path.isfile(self.profile):
            raise ConfigError(f"{path}.profile: no such file: {self.profile!r}")
        if self.rate <= 0:
            raise ConfigError(f"{path}.rate: the expected requests/s must be > 0 with a profile, got {self.rate}")
        if not 1 <= self.prompt_min <= self.prompt_max or not 1 <= self.output_min <= self.output_max:
            raise ConfigError(f"{path}: need 1 <= prompt_min <= prompt_max and 1 <= output_min <= output_max")
        if self.ttft_slo <= 0 or self.tpot_slo <= 0 or not 0 < self.attainment <= 1:
            raise ConfigError(f"{path}: the SLOs must be > 0 and attainment in (0, 1]")
        if not 2 <= self.max_gpus <= 1024:
            raise ConfigError(f"{path}.max_gpus: must be in [2, 1024], got {self.max_gpus}")


@dataclass
class ControllerSection:
    # false: no controller actor; the pools stay at min_replicas, started by the router's
    # process (what tests, benchmarks and the demo run: ServeConfig.simple).
    enabled: bool = True
    interval_s: float = 1.0             # policy tick
    sync_s: float = 0.5                 # router -> controller load report period (and long-poll wait)
    latency_window_s: float = 20.0      # TTFT/TPOT p90 over this many seconds
    drain_timeout_s: float = 600.0      # a draining worker is stopped after this even if busy
    start_timeout_s: float = 900.0      # a replica not ready by then (no node came up) is given up
    report_stale_s: float = 10.0        # no decisions on a router report older than this
    # An active worker absent from the router's reports this long (dead for good, or dropped
    # and never re-registered by the supervisor) is replaced. Longer than a re-registration,
    # including a Ray restart's model load, or a worker Ray is bringing back gets replaced.
    lost_after_s: float = 300.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    plan: PlannedLoadSection = field(default_factory=PlannedLoadSection)

    def validate(self, path: str) -> None:
        for k in ("interval_s", "sync_s", "latency_window_s", "drain_timeout_s", "start_timeout_s", "report_stale_s",
                  "lost_after_s"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{path}.{k}: must be > 0, got {getattr(self, k)}")
        if self.lost_after_s <= self.sync_s:
            # A new worker reaches the router's reports one sync round after it is active.
            raise ConfigError(f"{path}.lost_after_s: must be > sync_s ({self.sync_s}), got {self.lost_after_s}")
        if self.metrics_port is not None:
            _port(self.metrics_port, f"{path}.metrics_port")
        if self.plan.profile is not None and not self.enabled:
            raise ConfigError(f"{path}.plan: planned pool floors need the controller ({path}.enabled: true)")


@dataclass
class ServeConfig:
    model: str = "smollm2"
    dtype: str | None = None
    engine: dict = field(default_factory=dict)       # EngineConfig fields for both pools
    ray: RaySection = field(default_factory=RaySection)
    router: RouterSection = field(default_factory=RouterSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    transfer: TransferSection = field(default_factory=TransferSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    pools: PoolsSection = field(default_factory=PoolsSection)
    controller: ControllerSection = field(default_factory=ControllerSection)

    def validate(self, path: str = "") -> None:
        if not self.model:
            raise ConfigError("model: must not be empty")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {DTYPES}")
        _engine_kwargs(self.engine, "engine")
        for name in ("prefill", "decode"):
            pool = getattr(self.pools, name)
            # A pool at 0 would never see load to grow from (the router sends everything
            # direct when it has no prefill worker), so an autoscaled pool keeps at least one;
            # a fixed deployment may run without a prefill pool, never without a decode one.
            if pool.min_replicas < 1 and (name == "decode" or self.controller.enabled):
                raise ConfigError(f"pools.{name}.min_replicas: must be >= 1, got {pool.min_replicas}")
            if pool.engine.get("block_size", self.block_size) != self.block_size:
                raise ConfigError(f"pools.{name}.engine.block_size: must equal engine.block_size "
                                  "(the router hashes prompts in blocks of that size)")
            # KV shipped from a prefill worker lands as raw bytes in the decode worker's cache:
            # both pools must store it the same way.
            for key in ("kv_cache_dtype", "kv_cache_scale", "max_model_len"):
                if key in pool.engine and pool.engine[key] != self.engine.get(key):
                    raise ConfigError(f"pools.{name}.engine.{key}: must equal engine.{key} "
                                      "(the KV cache travels between the pools as is)")

    @property
    def block_size(self) -> int:
        """The KV block size both pools and the router use (engine.block_size, else the engine's default)."""
        from engine.config import EngineConfig
        return self.engine.get("block_size", EngineConfig.block_size)

    @classmethod
    def simple(cls, model: str = "smollm2", num_prefill: int = 1, num_decode: int = 1, **sections) -> ServeConfig:
        """A config in code (tests, benchmarks, the demo): fixed pools of num_prefill +
        num_decode workers (controller.enabled false: no autoscaling controller), and any
        other top-level field or section as a file would give it (a mapping, or the section's
        dataclass), e.g. simple("random:tiny", 1, 2, router={"port": 0}, faults={"dead_after_s": 3}).
        Built and validated like a file."""
        raw = _merge({"model": model, "controller": {"enabled": False},
                      "pools": {"prefill": {"min_replicas": num_prefill}, "decode": {"min_replicas": num_decode}}},
                     _plain(sections))
        return from_dict(raw)


def _plain(x):
    """Dataclasses (sections) as the mappings a file would hold."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# `pdserve serve` flag (argparse dest) -> the field it sets.
CLI_FIELDS = {
    "model": "model",
    "dtype": "dtype",
    "address": "ray.address",
    "host": "router.host",
    "port": "router.port",
    "disagg_threshold": "router.disagg_threshold",
    "record_trace": "router.record_trace",
    "metrics_port": "router.metrics_port",
    "http_host": "router.http_host",
    "http_port": "router.http_port",
    "shutdown_grace": "router.shutdown_grace_s",
    "kv_timeout": "transfer.timeout_s",
    "kv_cache_gb": "engine.kv_cache_memory_gb",
    "prefill": "pools.prefill.min_replicas",
    "prefill_max": "pools.prefill.max_replicas",
    "decode": "pools.decode.min_replicas",
    "decode_max": "pools.decode.max_replicas",
    "controller_metrics_port": "controller.metrics_port",
    "max_prompt_tokens": "router.max_prompt_tokens",
    "max_tokens_limit": "router.max_tokens_limit",
    "api_key_file": "security.api_key_file",
    "tls_cert": "security.tls_cert",
    "tls_key": "security.tls_key",
    "tls_client_ca": "security.tls_client_ca",
    "zmq_curve": "security.zmq_curve",
    "internal_host": "security.internal_host",
}


def config_from_args(args) -> ServeConfig:
    """`pdserve serve`: the file (args.config, optional) first, then every flag given on the
    command line. Flag defaults are None, so an absent flag never overrides the file."""
    # (False is a store_true flag left out, not a request to switch the file's setting off.)
    overrides = {CLI_FIELDS[k]: v for k, v in vars(args).items()
                 if k in CLI_FIELDS and v is not None and v is not False}
    return load_config(getattr(args, "config", None), overrides)


# ---- loading ------------------------------------------------------------------------------------------

def load_config(path: str | None = None, overrides: dict[str, object] | None = None) -> ServeConfig:
    """Read FILE (optional), apply {dotted.path: value} overrides, build and validate."""
    raw: dict = {}
    if path is not None:
        import yaml
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror or e}") from None
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes")
        try:
            raw = yaml.safe_load(text)     # safe_load: plain data only, no object construction
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping, got {type(raw).__name__}")
    return from_dict(raw, overrides)


def from_dict(raw: dict, overrides: dict[str, object] | None = None) -> ServeConfig:
    raw = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{dotted}: cannot override inside {p!r}, which is not a mapping")
            node = child
        node[leaf] = value
    cfg = _build(ServeConfig, raw, "")
    return cfg


def _deep_copy(x):
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{_join(path, str(key))}: unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], _join(path, k)) for k, v in data.items()}
    for k in fields - set(data):     # absent sections are built (and so validated) from defaults
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], {}, _join(path, k))
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(value, typ, path: str):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, path)
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, path)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if typ is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping with string keys, got {value!r}")
        args = typing.get_args(typ)
        if args:
            return {k: _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    raise TypeError(f"{path}: unsupported schema type {typ!r}")   # a bug in the schema, not the file


def _port(port: int, path: str) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{path}: must be a TCP port in [0, 65535], got {port}")


def _engine_kwargs(kw: dict, path: str) -> None:
    from engine.config import EngineConfig
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    for k in kw:
        if k not in known:
            near = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{path}.{k}: not an engine setting{hint}")
