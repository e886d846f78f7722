"""The whole cluster on a local Ray instance with ZeroMQ KV transfer (and cuda_ipc in the 1+2 test): gRPC in, routing by
conditional disaggregation, prefill and decode actors, tokens out. float64 random weights
make greedy outputs independent of batching, so every output can be compared exactly with
a single engine's."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from deploy.client import build_request, collect
from helpers import CLUSTER_ENGINE, MODEL, ClusterThread, wait_until
from pdserve_api.v1 import pdserve_pb2 as pb

ray = pytest.importorskip("ray")

ENGINE = CLUSTER_ENGINE


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_local):
    c = ClusterThread(num_prefill=1, num_decode=1)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference():
    from engine import LLM
    return LLM(MODEL, dtype="float64", **ENGINE)


def expected(reference, prompts, max_tokens):
    from engine import SamplingParams
    outs = reference.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [o.token_ids for o in outs]


def _rand_prompt(gen, n):
    return torch.randint(100, 40000, (n,), generator=gen).tolist()


def run_burst(c: ClusterThread, reference, n_long=6, n_short=8, n_shared=6):
    gen = torch.Generator().manual_seed(11)
    shared = _rand_prompt(gen, 256)
    # Warm one decode worker's prefix cache with the shared prefix (itself a long prompt).
    warm = c.generate(shared + _rand_prompt(gen, 8), max_tokens=2)
    assert warm["route"] == "disaggregated"
    # the worker's KV events reach the router's prefix index: a prompt on the shared
    # prefix would now be routed to the worker that holds it
    probe = shared + _rand_prompt(torch.Generator().manual_seed(0), 4)

    async def cached_tokens():
        return c.cluster.router.route(probe).cached_tokens
    wait_until(lambda: c.call(cached_tokens()) >= 240, 10, "the shared prefix in the router's prefix index")
    longs = [_rand_prompt(gen, 100 + 30 * i) for i in range(n_long)]
    shorts = [_rand_prompt(gen, 5 + 7 * i) for i in range(n_short)]
    shareds = [shared + _rand_prompt(gen, 4 + 3 * i) for i in range(n_shared)]
    prompts = longs + shorts + shareds
    with ThreadPoolExecutor(len(prompts)) as ex:
        results = list(ex.map(lambda p: c.generate(p, max_tokens=10, temperature=0.0), prompts))
    assert [r["token_ids"] for r in results] == expected(reference, prompts, 10)
    kinds = [(r["route"], r["reason"]) for r in results]
    assert kinds[:n_long] == [("disaggregated", "long_uncached_prompt")] * n_long
    assert kinds[n_long:n_long + n_short] == [("direct", "short_prompt")] * n_short
    for r in results[n_long + n_short:]:
        assert (r["route"], r["reason"]) == ("direct", "cached_prefix")
        assert r["cached_tokens"] >= 240
    assert all(r["finish_reason"] == "length" for r in results)
    return results


def test_burst_routes_and_matches_single_engine(cluster, reference):
    results = run_burst(cluster, reference)
    stats = cluster.wait_idle()
    assert stats["decode-0"]["disaggregated"] >= 6 and stats["decode-0"]["fallbacks"] == 0
    assert {r["prefill_worker"] for r in results[:6]} == {"prefill-0"}


def test_cancel_frees_blocks(cluster):
    gen = torch.Generator().manual_seed(5)
    req = build_request(_rand_prompt(gen, 200), max_tokens=1500, temperature=0.0)
    stream = cluster.stub.Generate(req, timeout=120)
    first = next(stream)
    assert first.request_id
    busy = cluster.worker_stats()["decode-0"]
    assert busy["num_running"] == 1
    stream.cancel()
    cluster.wait_idle(timeout=20)


def test_deadline_aborts_request(cluster):
    gen = torch.Generator().manual_seed(6)
    req = build_request(_rand_prompt(gen, 30), max_tokens=1800, temperature=0.0)
    with pytest.raises(grpc.RpcError) as e:
        collect(cluster.stub.Generate(req, timeout=1.0))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cluster.wait_idle(timeout=20)


def _bad(**kw):
    req = pb.GenerateRequest()
    prompt = kw.pop("prompt", [5, 6, 7])
    if prompt is not None:
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
    for k, v in kw.items():
        setattr(req.sampling, k, v)
    return req


BAD_REQUESTS = [
    ("no prompt", _bad(prompt=None), "prompt"),
    ("empty text", _bad(prompt=""), "prompt"),
    ("empty ids", _bad(prompt=[]), "prompt"),
    ("too long", _bad(prompt=[5] * 2048), "prompt"),
    ("id out of vocab", _bad(prompt=[5, 10**6]), "prompt_token_ids"),
    ("max_tokens 0", _bad(max_tokens=0), "max_tokens"),
    ("negative temperature", _bad(temperature=-0.5), "temperature"),
    ("nan temperature", _bad(temperature=float("nan")), "temperature"),
    ("top_p 0", _bad(top_p=0.0), "top_p"),
    ("top_p > 1", _bad(top_p=1.5), "top_p"),
    ("top_k 0", _bad(top_k=0), "top_k"),
]


def test_bad_requests_get_invalid_argument_and_server_keeps_serving(cluster):
    for name, req, field in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as e:
            collect(cluster.stub.Generate(req, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert field in e.value.details(), (name, e.value.details())
    # unknown fields: a request serialized with an extra field number
    raw = build_request([5, 6, 7], 4).SerializeToString() + b"\xf8\x06\x01"  # field 111, varint 1
    call = cluster.channel.unary_stream("/pdserve.v1.Generation/Generate",
                                        request_serializer=lambda b: b,
                                        response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        list(call(raw, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown" in e.value.details()
    ok = cluster.generate([5, 6, 7, 8], max_tokens=3, temperature=0.0)
    assert len(ok["token_ids"]) == 3


def test_model_info_and_health(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    info = cluster.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.block_size == 16 and info.vocab_size == 49152 and info.max_model_len == 2048
    h = health_pb2_grpc.HealthStub(cluster.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert h.status == health_pb2.HealthCheckResponse.SERVING


def test_one_prefill_two_decode_over_cuda_ipc(ray_local, cluster, reference):
    """1+2 workers with KV over the cuda_ipc backend (shared memory between the actors'
    processes on CPU): the prefill worker copies straight into each decode cache."""
    c2 = ClusterThread(num_prefill=1, num_decode=2, transfer={"backend": "cuda_ipc"})
    try:
        results = run_burst(c2, reference, n_long=4, n_short=6, n_shared=4)
        used = {r["decode_worker"] for r in results}
        assert used == {"decode-0", "decode-1"}
        # prefix-cache hits go to the worker that holds the prefix
        assert len({r["decode_worker"] for r in results[10:]}) == 1
        stats = c2.wait_idle()
        kv = [stats[w]["kv"] for w in ("decode-0", "decode-1")]
        assert sum(k["completed"] for k in kv) == sum(k["grants"] for k in kv) >= 5, kv   # warm-up + 4 long
        assert all(stats[w]["fallbacks"] == 0 for w in ("decode-0", "decode-1"))
    finally:
        c2.close()
