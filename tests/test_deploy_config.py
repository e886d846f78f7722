"""The deployment config file (schema, errors, CLI mapping) and the cluster manifests,
checked offline with Ray's own validation: the `ray up` YAML through Ray's fill-out +
JSON-schema validation (what `ray up` runs), the KubeRay RayCluster through the
conversion the KubeRay autoscaler itself runs on the CR (which ends in the same
validation). No KubeRay CRD schema ships with Ray and CI has no network or kubectl, so the
CR is checked by that conversion plus explicit assertions on what it must contain."""
from __future__ import annotations

import argparse
import copy
import os

import pytest
import yaml

from deploy.config import CLI_FIELDS, ConfigError, ServeConfig, config_from_args, from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


# ---- schema ------------------------------------------------------------------------------------------

def test_defaults_and_examples_load():
    c = from_dict({"router": None})      # an empty section (`router:`) means its defaults
    assert c.router.port == 50051
    c = from_dict({})
    assert isinstance(c, ServeConfig) and c.pools.prefill.max_replicas == 1 and c.pools.decode.max_replicas == 1
    for name in ("pdserve-ray.yaml", "pdserve-local.yaml"):
        c = load_config(os.path.join(DEPLOY, name))
        assert c.pools.prefill.max_replicas >= c.pools.prefill.min_replicas >= 1
        assert c.pools.decode.max_replicas > 1


BAD = [
    ({"modle": "x"}, "modle: unknown key; did you mean 'model'?"),
    ({"pools": {"prefil": {}}}, "pools.prefil: unknown key; did you mean 'prefill'?"),
    ({"pools": {"decode": {"targets": {"ttft_s": 1}}}}, "pools.decode.targets.ttft_s: unknown key"),
    ({"pools": {"prefill": {"scaling": {"cooldown": 1}}}}, "pools.prefill.scaling.cooldown: unknown key"),
    ({"router": {"port": "50051"}}, "router.port: expected an integer"),
    ({"router": {"port": 70000}}, "router.port: must be a TCP port"),
    ({"router": {"port": True}}, "router.port: expected an integer"),
    ({"router": {"disagg_threshold": -1}}, "router.disagg_threshold: must be >= 0"),
    ({"router": []}, "router: expected a mapping"),
    ({"transfer": {"backend": "rdma"}}, "transfer.backend: 'rdma' is not available"),
    ({"transfer": {"timeout_s": 0}}, "transfer.timeout_s: must be in (0, 3600]"),
    ({"transfer": {"timeout_s": float("nan")}}, "transfer.timeout_s: expected a finite number"),
    ({"dtype": "fp8"}, "dtype: 'fp8' is not one of"),
    ({"model": ""}, "model: must not be empty"),
    ({"model": None}, "model: expected a string, got None"),
    ({"security": {"tls_cert": "c.pem"}}, "security.tls_cert/tls_key: give both or neither"),
    ({"security": {"tls_client_ca": "ca.pem"}}, "security.tls_client_ca: needs tls_cert"),
    ({"security": {"zmq_curve": "yes"}}, "security.zmq_curve: expected true/false"),
    ({"router": {"max_prompt_tokens": 0}}, "router.max_prompt_tokens: must be >= 1"),
    ({"engine": {"blok_size": 8}}, "engine.blok_size: not an engine setting; did you mean 'block_size'?"),
    ({"pools": {"decode": {"engine": {"max_num_seq": 8}}}}, "pools.decode.engine.max_num_seq: not an engine setting"),
    ({"pools": {"decode": {"engine": {"block_size": 32}}}}, "pools.decode.engine.block_size: must equal"),
    ({"pools": {"prefill": {"engine": {"kv_cache_dtype": "fp8"}}}}, "pools.prefill.engine.kv_cache_dtype: must equal"),
    ({"pools": {"decode": {"min_replicas": 0}}}, "pools.decode.min_replicas: must be >= 1"),
    ({"pools": {"prefill": {"min_replicas": 3, "max_replicas": 2}}}, "pools.prefill.max_replicas: must be >="),
    ({"pools": {"prefill": {"num_gpus": -1}}}, "pools.prefill.num_gpus: must be >= 0"),
    ({"pools": {"prefill": {"resources": {"x": -1}}}}, "pools.prefill.resources.x: must be >= 0"),
    ({"pools": {"prefill": {"resources": {"x": "1"}}}}, "pools.prefill.resources.x: expected a finite number"),
    ({"pools": {"decode": {"targets": {"kv_use": 1.5}}}}, "pools.decode.targets.kv_use: a fraction in (0, 1]"),
    ({"pools": {"decode": {"targets": {"running_per_replica": 0}}}},
     "pools.decode.targets.running_per_replica: must be > 0 or null"),
    ({"pools": {"prefill": {"scaling": {"scale_down_load": 1.5}}}}, "need 0 < scale_down_load < scale_up_load"),
    ({"pools": {"prefill": {"scaling": {"up_cooldown_s": -1}}}}, "up_cooldown_s: must be >= 0"),
    ({"pools": {"prefill": {"scaling": {"max_step_up": 0}}}}, "max_step_up: must be >= 1"),
    ({"controller": {"interval_s": 0}}, "controller.interval_s: must be > 0"),
    ({"controller": {"metrics_port": -5}}, "controller.metrics_port: must be a TCP port"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_config_is_a_clear_error(raw, message):
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    cases = {"list.yaml": "- a\n- b\n", "broken.yaml": "router: {port: [\n",
             "object.yaml": "model: !!python/object/apply:os.system ['true']\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(str(tmp_path / name))
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="no-such.yaml"):
        load_config(str(tmp_path / "no-such.yaml"))
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(str(tmp_path / "empty.yaml")).model == "smollm2"


# ---- CLI ---------------------------------------------------------------------------------------------

def _serve_parser():
    from deploy.cli import build_parser
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "command")
    return ap, sub.choices["serve"]


def test_every_serve_flag_maps_to_a_field():
    _, serve = _serve_parser()
    dests = {a.dest for a in serve._actions if a.dest not in ("help", "func", "config")}
    assert dests == set(CLI_FIELDS)
    for a in serve._actions:      # an absent flag must not override the file
        if a.dest in CLI_FIELDS:
            assert a.default in (None, False), a.dest
    base = from_dict({})
    for dest, path in CLI_FIELDS.items():
        if not path.startswith("engine."):
            _get(base, path)      # the path exists in the schema (raises otherwise)
    # ... and the security flags reach the config the server starts from (no second pass in the CLI).
    ap, _ = _serve_parser()
    c = config_from_args(ap.parse_args(["serve", "--tls-cert", "c", "--tls-key", "k", "--zmq-curve",
                                        "--internal-host", "10.0.0.1", "--api-key-file", "keys",
                                        "--max-prompt-tokens", "100", "--max-tokens-limit", "7"]))
    assert (c.security.tls_cert, c.security.tls_key, c.security.zmq_curve, c.security.internal_host,
            c.security.api_key_file, c.router.max_prompt_tokens, c.router.max_tokens_limit) == \
        ("c", "k", True, "10.0.0.1", "keys", 100, 7)


def test_flags_override_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: random:tiny\nrouter: {port: 6000, disagg_threshold: 99}\n"
                 "pools: {prefill: {min_replicas: 1, max_replicas: 4}}\nengine: {num_kv_blocks: 64}\n")
    ap, _ = _serve_parser()
    args = ap.parse_args(["serve", "--config", str(f), "--port", "7000", "--prefill", "2", "--decode", "3",
                          "--kv-cache-gb", "0.5", "--metrics-port", "9400", "--kv-timeout", "5",
                          "--controller-metrics-port", "9401", "--dtype", "float64", "--host", "0.0.0.0",
                          "--address", "auto", "--decode-max", "5"])
    c = config_from_args(args)
    assert (c.model, c.router.port, c.router.disagg_threshold) == ("random:tiny", 7000, 99)   # file kept where no flag
    assert (c.pools.prefill.min_replicas, c.pools.prefill.max_replicas) == (2, 4)
    assert (c.pools.decode.min_replicas, c.pools.decode.max_replicas) == (3, 5)
    assert c.engine == {"num_kv_blocks": 64, "kv_cache_memory_gb": 0.5}
    assert (c.router.metrics_port, c.controller.metrics_port, c.transfer.timeout_s) == (9400, 9401, 5.0)
    assert (c.dtype, c.router.host, c.ray.address) == ("float64", "0.0.0.0", "auto")
    assert c.controller.enabled      # `serve` always runs the autoscaling controller
    # Flags are validated like the file: a bad flag is the same clear error.
    f2 = tmp_path / "curve.yaml"
    f2.write_text("security: {zmq_curve: true}\n")
    assert config_from_args(ap.parse_args(["serve", "--config", str(f2)])).security.zmq_curve is True
    bad = ap.parse_args(["serve", "--config", str(f), "--prefill", "9"])
    with pytest.raises(ConfigError, match="pools.prefill.max_replicas"):
        config_from_args(bad)
    from deploy.cli import main
    assert main(["serve", "--port", "99999"]) == 2      # printed as one line, no traceback, no server


def test_every_fault_setting_is_settable_from_a_file(tmp_path):
    f = tmp_path / "faults.yaml"
    f.write_text("faults: {max_restarts: 1, dead_after_s: 2.5, orphan_timeout_s: 7, monitor_interval_s: 0.25}\n"
                 "router: {max_inflight_per_decode: 8, max_queued_prefill_tokens: 4096}\n"
                 "transfer: {timeout_s: 4}\ncontroller: {enabled: false}\n")
    c = load_config(str(f))
    assert (c.faults.max_restarts, c.faults.dead_after_s, c.faults.orphan_timeout_s, c.faults.monitor_interval_s) \
        == (1, 2.5, 7.0, 0.25)
    assert (c.router.max_inflight_per_decode, c.router.max_queued_prefill_tokens, c.transfer.timeout_s) == \
        (8, 4096, 4.0)
    assert not c.controller.enabled
    for bad, msg in (({"faults": {"dead_after_s": 0}}, "faults.dead_after_s: must be > 0"),
                     ({"faults": {"max_restarts": "2"}}, "faults.max_restarts: expected an integer"),
                     ({"router": {"max_inflight_per_decode": 0}}, "router.max_inflight_per_decode: must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            from_dict(bad)


def test_fixed_pools_in_code():
    """ServeConfig.simple: what tests and benchmarks start (no controller); validated like a file."""
    from deploy.config import FaultsSection
    c = ServeConfig.simple("random:tiny", 0, 2, router={"port": 0}, faults=FaultsSection(dead_after_s=3))
    assert (c.model, c.pools.prefill.min_replicas, c.pools.decode.min_replicas) == ("random:tiny", 0, 2)
    assert (c.router.port, c.router.disagg_threshold, c.faults.dead_after_s) == (0, 256, 3.0)
    assert not c.controller.enabled
    with pytest.raises(ConfigError, match="pools.decode.min_replicas: must be >= 1"):
        ServeConfig.simple("random:tiny", 1, 0)
    with pytest.raises(ConfigError, match="pools.prefill.min_replicas: must be >= 1"):   # autoscaled: >= 1
        ServeConfig.simple("random:tiny", 0, 1, controller={"enabled": True})


def test_every_default_is_defined_once():
    """The schema holds each deployment default: the serve flags default to None (the file or
    the schema decides), the Cluster passes every setting it has to the router and the
    workers, and nothing in deploy/ falls back to a number of its own."""
    import ast
    import inspect

    from deploy import cluster, controller, supervisor
    _, serve = _serve_parser()
    assert all(a.default in (None, False) for a in serve._actions if a.dest in CLI_FIELDS)
    # No second schema and no cycle: config does not import cluster; cluster imports config.
    import deploy.config as config_mod
    tree = ast.parse(inspect.getsource(config_mod))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "deploy.cluster" not in imported
    assert cluster.ServeConfig is ServeConfig and not hasattr(cluster, "ClusterConfig")
    # The settings with a default elsewhere in deploy/ before (max_restarts 2 and 4, the
    # placement timeout, the supervisor period, a latency window and start timeout) are required there now.
    for fn, name in ((controller.RaySpawner.__init__, "placement_timeout_s"),
                     (controller.ControllerActor.__init__, "placement_timeout_s"),
                     (supervisor.Supervisor.__init__, "interval_s")):
        assert inspect.signature(fn).parameters[name].default is inspect.Parameter.empty, (fn, name)
    src = inspect.getsource(cluster) + inspect.getsource(controller)
    for literal in ('pop("max_restarts", ', "else 20.0", "else 900.0", 'get("block_size", 16)'):
        assert literal not in src, literal
    # The router's own defaults (router/core.py RouterConfig, router/policy.py PolicyConfig) are
    # never used by a deployment: Cluster.start passes each of them from the schema.
    start = inspect.getsource(cluster.Cluster.start)
    for kw in ("disagg_threshold=", "kv_timeout_s=", "dead_after_s=", "max_inflight_per_decode=",
               "max_queued_prefill_tokens=", "block_size=", "orphan_timeout_s=", "max_restarts="):
        assert kw in start, kw


def test_schema_defaults_are_the_owning_classes_defaults():
    """A knob that a plain class owns has one default, there: the schema reads it, and every
    other class that takes the knob (workers, KV receivers and senders, actors, bench) has
    the same, so a part built without a config file behaves as under an empty one."""
    import inspect

    import kv_transfer as kt
    from decode_worker.worker import DecodeWorker
    from deploy import bench
    from engine.config import EngineConfig
    from kv_transfer.ipc_backend import IpcKVReceiver, IpcKVSender
    from kv_transfer.p2p_backend import P2PKVReceiver, P2PKVSender
    from kv_transfer.zmq_backend import ZmqKVReceiver, ZmqKVSender
    from planes.messages import GenerateMsg
    from prefill_worker.worker import PrefillWorker
    from router.core import RouterConfig
    from router.policy import PolicyConfig
    from worker_base.actor import make_remote

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    cfg, rc = ServeConfig(), RouterConfig()
    assert cfg.router.disagg_threshold == rc.policy.disagg_threshold == PolicyConfig().disagg_threshold
    assert (cfg.router.max_inflight_per_decode, cfg.router.max_queued_prefill_tokens, cfg.faults.dead_after_s) == \
        (rc.max_inflight_per_decode, rc.max_queued_prefill_tokens, rc.dead_after_s)
    kv_timeouts = {cfg.transfer.timeout_s, rc.kv_timeout_s, GenerateMsg("r", [1], None).kv_timeout_s,
                   default(DecodeWorker.__init__, "kv_timeout_s")} | \
        {default(cls.__init__, "default_timeout_s") for cls in (kt.KVReceiver, ZmqKVReceiver, IpcKVReceiver,
                                                                 P2PKVReceiver)}
    assert kv_timeouts == {kt.KV_TIMEOUT_S}
    send_timeouts = {default(PrefillWorker.__init__, "kv_send_timeout_s")} | \
        {default(cls.__init__, "send_timeout_s") for cls in (ZmqKVSender, IpcKVSender, P2PKVSender)}
    assert send_timeouts == {kt.SEND_TIMEOUT_S}
    assert cfg.faults.max_restarts == default(make_remote, "max_restarts")
    assert cfg.block_size == rc.block_size == EngineConfig().block_size
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    assert ap.get_default("disagg_threshold") == cfg.router.disagg_threshold


def test_bench_modes_are_named_after_the_routes():
    """bench's mode that prefills every prompt remotely is "disaggregated", the route's
    name, in its records and output; "disagg", its old spelling, is still accepted (older
    commands, e.g. in benchmarks/RESULTS.md), as --help says."""
    from deploy import bench
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    assert list(bench.MODES) == ["colocated", "disaggregated", "conditional"]
    assert ap.parse_args([]).modes == "colocated,disaggregated,conditional"
    assert "'disagg' is accepted" in " ".join(ap.format_help().split())
    args = ap.parse_args(["--modes", "colocated, disagg,conditional"])
    bench.check_args(args)
    assert args.modes == "colocated,disaggregated,conditional"     # what run() records and prints
    cfg = bench.cluster_config(args, "disaggregated")
    assert (cfg.pools.prefill.min_replicas, cfg.pools.decode.min_replicas, cfg.router.disagg_threshold) == (1, 1, 0)
    with pytest.raises(ValueError, match="--modes: unknown mode 'disagregated'"):
        bench.check_args(ap.parse_args(["--modes", "disagregated"]))


def test_bench_writes_every_requests_figures_with_requests_json(tmp_path, monkeypatch):
    """--requests-json: per mode and rate, one row per request in the workload's order
    (request i of planner/workload.py's draw for the record's args and seed): planned
    arrival, send, prompt and cached tokens, output tokens, route, the decode worker, TTFT,
    TPOT, E2E; a failed
    request says why. No prompt content in the file."""
    import json

    from deploy import bench
    from planner.workload import WorkloadSpec, bench_requests

    class FakeTarget:   # the server's answers, no cluster: request i takes 10 + i ms to its first token
        def __init__(self, address, timeout):
            pass

        async def run(self, work, progress):
            out = []
            for i, r in enumerate(work):
                if i == 2:
                    out.append(dict(ok=False, error="UNAVAILABLE", sent=r["arrival"]))
                    continue
                stamps = [(r["arrival"] + 0.010 + i * 1e-3 + k * 2e-3, 1) for k in range(r["max_tokens"])]
                out.append(bench._result(stamps, r["arrival"], 0.0, r["max_tokens"], r["max_tokens"],
                                         "direct" if i % 2 else "disaggregated", cached=16 * i,
                                         decode_worker=f"decode-{i % 2}"))
            return out
    monkeypatch.setattr(bench, "GrpcTarget", FakeTarget)
    out, summary = tmp_path / "requests.json", tmp_path / "serve.json"
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    args = ap.parse_args(["--address", "x:1", "--rates", "2,4", "--requests", "5", "--warmup", "0", "--seed", "3",
                          "--no-progress", "--requests-json", str(out), "--json", str(summary)])
    bench.run(args)
    rec = json.loads(out.read_text())
    assert rec["args"]["seed"] == 3 and list(rec["modes"]) == ["external"]
    runs = rec["modes"]["external"]
    assert [(r["rate"], r["seed"]) for r in runs] == [(2.0, 3), (4.0, 4)]
    for run in runs:
        want = bench_requests(WorkloadSpec.from_args(rec["args"]), 5, run["rate"], run["seed"])
        rows = run["requests"]
        assert [r["i"] for r in rows] == list(range(5))
        assert [(r["arrival_s"], r["prompt_tokens"], r["max_tokens"]) for r in rows] == \
            [(w["arrival"], len(w["prompt"]), w["max_tokens"]) for w in want]
        assert rows[2] == dict(i=2, arrival_s=want[2]["arrival"], sent_s=want[2]["arrival"],
                               prompt_tokens=len(want[2]["prompt"]), max_tokens=want[2]["max_tokens"], ok=False,
                               error="UNAVAILABLE")
        r3 = rows[3]
        assert r3["ok"] and r3["route"] == "direct" and r3["cached_tokens"] == 48 and r3["decode_worker"] == "decode-1"
        assert r3["output_tokens"] == want[3]["max_tokens"]
        assert r3["ttft_s"] == pytest.approx(0.013) and r3["tpot_s"] == pytest.approx(2e-3)
        assert r3["e2e_s"] == pytest.approx(0.013 + 2e-3 * (want[3]["max_tokens"] - 1))
        assert "prompt" not in r3
    # The summary record is what it was.
    assert json.loads(summary.read_text())["modes"]["external"][0]["summary"]["completed"] == 4


# ---- manifests ----------------------------------------------------------------------------------------

def _pool_resources():
    c = load_config(os.path.join(DEPLOY, "pdserve-ray.yaml"))
    return {"prefill": c.pools.prefill, "decode": c.pools.decode}


def test_ray_up_yaml_passes_rays_validation_and_steers_each_pool_to_its_gpu_nodes():
    from ray.autoscaler._private.util import prepare_config, validate_config
    with open(os.path.join(DEPLOY, "ray-cluster.yaml")) as f:
        raw = yaml.safe_load(f)
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    for pool, spec in _pool_resources().items():
        (res,) = spec.resources                         # one steering resource per pool
        offering = [name for name, t in types.items() if t.get("resources", {}).get(res)]
        assert len(offering) == 1, (pool, offering)
        node = types[offering[0]]
        assert node["resources"]["GPU"] >= spec.num_gpus and node["max_workers"] >= spec.max_replicas
        assert node["min_workers"] == 0                  # GPU nodes only while a pool needs them
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in cmd)
    # The validation is real: a misspelt key is rejected.
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["prefill_gpu"]["max_worker"] = 4
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_kuberay_manifest_converts_with_rays_kuberay_autoscaler_config():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    with open(os.path.join(DEPLOY, "kuberay.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "RayCluster", "Service"}
    cr = kinds["RayCluster"]
    assert cr["apiVersion"] == "ray.io/v1" and cr["spec"]["enableInTreeAutoscaling"] is True
    auto = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))     # runs Ray's validate_config too
    types = auto["available_node_types"]
    served = load_config_text(kinds["ConfigMap"]["data"]["pdserve.yaml"])
    for pool, spec in {"prefill": served.pools.prefill, "decode": served.pools.decode}.items():
        (res,) = spec.resources
        offering = [n for n, t in types.items() if t["resources"].get(res)]
        assert len(offering) == 1, (pool, offering)
        t = types[offering[0]]
        assert t["resources"]["GPU"] >= spec.num_gpus and t["max_workers"] >= spec.max_replicas
        assert t["min_workers"] == 0
    head = cr["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert types["headgroup"]["resources"].get("GPU") is None and types["headgroup"]["resources"]["CPU"] == 0
    containers = head["template"]["spec"]["containers"] + [c for g in cr["spec"]["workerGroupSpecs"]
                                                          for c in g["template"]["spec"]["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    router = next(c for c in head["template"]["spec"]["containers"] if c["name"] == "pdserve-router")
    assert "pdserve serve --config /etc/pdserve/pdserve.yaml" in router["args"][0]
    svc = kinds["Service"]["spec"]
    assert svc["type"] == "ClusterIP" and {p["port"] for p in svc["ports"]} == {served.router.port,
                                                                              served.router.metrics_port}
    # The conversion is strict where it matters: a worker group without maxReplicas is refused.
    broken = copy.deepcopy(cr)
    del broken["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(KeyError):
        _derive_autoscaling_config_from_ray_cr(broken)


def load_config_text(text: str):
    return from_dict(yaml.safe_load(text))


def test_grpc_target_reads_the_route_and_decode_worker_from_the_last_message():
    """bench's gRPC client takes the route, the cached tokens and the decode worker from
    the message that finishes the stream (what --requests-json then writes)."""
    import asyncio

    from deploy import bench
    from pdserve_api.v1 import pdserve_pb2 as pb

    class FakeStub:
        def Generate(self, req, timeout=None):
            async def stream():
                yield pb.GenerateResponse(token_ids=[5])
                last = pb.GenerateResponse(token_ids=[6], finish_reason=pb.FINISH_REASON_LENGTH)
                last.route.kind = pb.ROUTE_KIND_DISAGGREGATED
                last.route.decode_worker = "decode-3"
                last.usage.cached_tokens = 32
                yield last
            return stream()
    r = asyncio.run(bench.GrpcTarget("x:1", 5.0)._one(FakeStub(), dict(arrival=0.0, prompt=[1, 2, 3], max_tokens=2),
                                                       0.0))
    assert r["ok"] and r["tokens"] == 2 and r["route"] == "disaggregated"
    assert r["decode_worker"] == "decode-3" and r["cached"] == 32
