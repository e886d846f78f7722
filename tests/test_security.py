"""Security options against a real in-process server: API keys (UNAUTHENTICATED without
one, health stays open), TLS and mutual TLS on the gRPC port (certificates made at test
time), the `pdserve generate --address` client flags, internal sockets bound to loopback
by default, CurveZMQ on the internal planes (a peer without the key cannot inject a
frame), and per-tenant prefix-cache salts (no cross-tenant cached_tokens)."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import time

import grpc
import pytest
import zmq

from deploy.client import auth_metadata, build_request, collect
from helpers import wait_until
from inproc import InProcessServer
from pdserve_api.v1 import pdserve_pb2 as pb
from planes import messages
from router.auth import APIKeys, bearer_token
from router.curve import CurveKeys
from router.tls import TLSConfig, channel_credentials

x509 = pytest.importorskip("cryptography.x509", reason="cryptography is in the test extras")

KEY = "k3y-" + "a1b2c3d4e5f6" * 2
PROMPT = [(i * 37) % 40000 + 11 for i in range(70)]     # 4 full blocks of 16


# ---- certificates made at test time -----------------------------------------------------------------
def _cert(name: str, issuer=None, ca: bool = False, san: bool = False):
    from cryptography import x509 as X
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = X.Name([X.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (X.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert else subject)
         .public_key(key.public_key()).serial_number(X.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(X.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(X.SubjectAlternativeName([X.DNSName("localhost"),
                                                      X.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256()), key


def _write(path, cert, key=None):
    from cryptography.hazmat.primitives import serialization
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = _cert("pdserve test CA", ca=True)
    other_ca = _cert("someone else's CA", ca=True)
    paths = {"ca": _write(d / "ca", ca[0])[0], "other_ca": _write(d / "other_ca", other_ca[0])[0]}
    paths["server"] = _write(d / "server", *_cert("localhost", issuer=ca, san=True))
    paths["client"] = _write(d / "client", *_cert("client-1", issuer=ca))
    paths["intruder"] = _write(d / "intruder", *_cert("client-x", issuer=other_ca))
    return paths


@pytest.fixture(scope="module")
def secure_server(pki):
    """Mutual TLS + API keys."""
    tls = TLSConfig(*pki["server"], client_ca_file=pki["ca"])
    s = InProcessServer(tls=tls, api_keys=APIKeys.from_keys([KEY, "second-key-" + "x" * 10]))
    yield s
    s.close()


def _tls_channel(server, pki, client="client"):
    creds = channel_credentials(pki["ca"], *(pki[client] if client else (None, None)))
    return server.channel(creds)


def _generate(stub, prompt=PROMPT, key=KEY, salt=b"", max_tokens=2):
    r = build_request(prompt, max_tokens, temperature=0.0)
    r.cache_salt = salt
    return collect(stub.Generate(r, timeout=30, metadata=auth_metadata(key)))


# ---- API keys -----------------------------------------------------------------------------------------
def test_api_key_loading_and_checking(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# tenants\n" + KEY + "\n\n  other-key-1234567890  \n")
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    keys = APIKeys.load(str(f))
    assert keys.check(KEY) and keys.check("other-key-1234567890")
    assert not keys.check(KEY[:-1]) and not keys.check(KEY + "x") and not keys.check("") and not keys.check(None)
    assert KEY not in repr(keys)                              # only digests are kept
    monkeypatch.setenv("PDSERVE_API_KEYS", "env-key-abcdefghijkl, env-key-2-abcdefghijkl")
    both = APIKeys.load(str(f))
    assert both.check("env-key-2-abcdefghijkl") and both.check(KEY)
    monkeypatch.delenv("PDSERVE_API_KEYS")
    assert APIKeys.load(None) is None                         # nothing configured: auth off
    for bad in (["short"], ["has space in the key 123"], []):
        with pytest.raises(ValueError):
            APIKeys.from_keys(bad)
    with pytest.raises(ValueError, match="no keys"):
        (tmp_path / "empty").write_text("# nothing\n")
        APIKeys.load(str(tmp_path / "empty"))
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None and bearer_token([]) is None


def test_api_keys_gate_every_rpc_but_health(secure_server, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with _tls_channel(secure_server, pki) as ch:
        stub = secure_server.stub(ch)
        for key, why in ((None, "missing"), ("wrong-key-0123456789", "invalid"), (KEY.upper(), "invalid")):
            with pytest.raises(grpc.RpcError) as e:
                _generate(stub, key=key)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=auth_metadata(key))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the health service stays open (load balancers probe it without credentials)
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        out = _generate(stub)
        assert len(out["token_ids"]) == 2
        assert _generate(stub, key="second-key-" + "x" * 10)["finish_reason"] == "length"
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=auth_metadata(KEY))
        assert info.vocab_size == 49152


# ---- TLS / mutual TLS ---------------------------------------------------------------------------------
def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(secure_server, pki):
    for client in (None, "intruder"):
        with _tls_channel(secure_server, pki, client) as ch:
            with pytest.raises(grpc.RpcError) as e:
                _generate(secure_server.stub(ch))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, client
    with secure_server.channel() as plain:     # plaintext to a TLS port: no handshake
        with pytest.raises(grpc.RpcError) as e:
            _generate(secure_server.stub(plain))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with _tls_channel(secure_server, pki) as ch:   # a trusted client certificate + key
        assert len(_generate(secure_server.stub(ch))["token_ids"]) == 2


def test_cli_generate_flags_reach_a_secure_server(secure_server, pki, tmp_path, capsys, monkeypatch):
    from deploy.cli import main
    keyfile = tmp_path / "client-key"
    keyfile.write_text(KEY + "\n")
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    base = ["generate", "--address", f"localhost:{secure_server.port}", "--max-tokens", "3", "--json",
            "--tls-ca", pki["ca"], "--tls-cert", pki["client"][0], "--tls-key", pki["client"][1]]
    assert main(base + ["--api-key-file", str(keyfile), "Hello"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 3 and out["finish_reason"] == "length"
    assert main(base + ["Hello"]) == 1                               # no key
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("PDSERVE_API_KEY", KEY)                        # the env var works too
    assert main(base + ["Hi"]) == 0


def test_http_api_takes_the_same_tls_and_keys(secure_server, pki):
    """The OpenAI HTTP API with the gRPC port's files: mutual TLS and API keys."""
    import http.client
    import ssl

    from router.http_server import HTTPServer
    from router.openai_api import OpenAIAPI
    keys = APIKeys.from_keys([KEY])
    app = OpenAIAPI(lambda: secure_server.service, "random:tiny", api_keys=keys).app()
    server = HTTPServer(app, "127.0.0.1", 0, tls=TLSConfig(*pki["server"], client_ca_file=pki["ca"]), api_keys=keys)
    port = secure_server.call(server.start())

    def post(client, key):
        ctx = ssl.create_default_context(cafile=pki["ca"])
        if client:
            ctx.load_cert_chain(*pki[client])
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 2}),
                         headers={"Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()
    try:
        status, body = post("client", KEY)
        assert status == 200 and body["usage"]["completion_tokens"] == 2, body
        assert post("client", "wrong-key-" + "y" * 10)[0] == 401
        for client in (None, "intruder"):     # no certificate, or one from another CA
            with pytest.raises(OSError):      # ssl.SSLError or the connection cut
                post(client, KEY)
    finally:
        secure_server.call(server.stop())


def test_tls_config_checks_its_inputs(pki, tmp_path):
    assert TLSConfig.from_paths(None, None) is None
    with pytest.raises(ValueError, match="both"):
        TLSConfig.from_paths(pki["server"][0], None)
    with pytest.raises(ValueError, match="client CA"):
        TLSConfig.from_paths(None, None, pki["ca"])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="PEM"):
        TLSConfig(str(tmp_path / "junk.pem"), pki["server"][1]).server_credentials()


# ---- prefix-cache salt ------------------------------------------------------------------------------------
def test_cache_salt_isolates_tenants(secure_server, pki):
    prompt = [t + 1 for t in PROMPT]     # seen by no other test on this server
    with _tls_channel(secure_server, pki) as ch:
        stub = secure_server.stub(ch)
        first = _generate(stub, prompt, salt=b"tenant-a")
        again = _generate(stub, prompt, salt=b"tenant-a")
        other = _generate(stub, prompt, salt=b"tenant-b")
        unsalted = _generate(stub, prompt)
        unsalted_again = _generate(stub, prompt)
    assert first["cached_tokens"] == 0
    assert again["cached_tokens"] == 64                    # same tenant: its 4 full blocks are reused
    assert other["cached_tokens"] == 0 and unsalted["cached_tokens"] == 0   # other tenants see nothing
    assert unsalted_again["cached_tokens"] == 64           # the shared (unsalted) cache still works
    assert first["token_ids"] == again["token_ids"] == other["token_ids"]


# ---- internal sockets ------------------------------------------------------------------------------------
def _host(endpoint: str) -> str:
    return endpoint[len("tcp://"):].rpartition(":")[0]


def test_internal_sockets_bind_to_loopback_by_default(secure_server):
    from deploy.cli import build_parser
    from deploy.config import ServeConfig
    from kv_transfer.zmq_backend import DEFAULT_BIND
    from router.core import RouterConfig
    s = secure_server
    eps = [s.router.token_endpoint, *s.decode.endpoints().values()]
    bound = [s.router.token_sock.getsockopt(zmq.LAST_ENDPOINT).decode(),
             s.decode._req_sock.getsockopt(zmq.LAST_ENDPOINT).decode(),
             s.decode.receiver._sock.getsockopt(zmq.LAST_ENDPOINT).decode()]
    assert all(_host(e) == "127.0.0.1" for e in eps + bound), eps + bound
    assert RouterConfig().bind_host == "127.0.0.1" and DEFAULT_BIND.startswith("tcp://127.0.0.1:")
    cfg = ServeConfig()
    assert cfg.router.host == "127.0.0.1" and cfg.security.internal_host is None and not cfg.security.zmq_curve
    serve = build_parser().parse_args(["serve"])
    assert serve.host in (None, "127.0.0.1") and serve.internal_host is None


# ---- CurveZMQ ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curve_server():
    keys = CurveKeys.generate()
    s = InProcessServer(curve=keys, prefill=True, disagg_threshold=32)
    s.keys = keys
    yield s
    s.close()


def _wait(pred, timeout=5.0, what="condition"):
    return wait_until(pred, timeout, what)


def test_curve_planes_serve_direct_and_disaggregated_requests(curve_server):
    with curve_server.channel() as ch:
        stub = curve_server.stub(ch)
        long = collect(stub.Generate(build_request(PROMPT, 4, temperature=0.0), timeout=60))
        short = collect(stub.Generate(build_request(PROMPT[:10], 4, temperature=0.0), timeout=60))
    assert long["route"] == "disaggregated" and long["reason"] == "long_uncached_prompt"   # request + KV planes
    assert short["route"] == "direct" and len(short["token_ids"]) == 4                     # token plane
    assert curve_server.decode.stats()["disaggregated"] >= 1


def test_curve_peers_without_the_key_cannot_inject(curve_server):
    s, keys = curve_server, curve_server.keys
    dec, pre = s.decode, s.prefill
    targets = {"decode request plane": dec.endpoints()["request"], "prefill request plane": pre.endpoints()["request"],
               "router token plane": s.router.token_endpoint, "decode KV plane": dec.endpoints()["kv"]}
    forged_gen = messages.GenerateMsg("evil", [5, 6, 7], messages.SamplingParams(max_tokens=2)).encode()
    forged_batch = messages.TokenBatch("decode-0", [], [("cleared", None, None)], {"running": 999}).encode()
    before = (dec.stats()["requests"], pre.stats()["dropped_messages"], dict(dec.stats()["kv"]),
              s.router.bad_messages)
    zap_before = dec._curve_zap.denied + pre._curve_zap.denied + s.router._zap.denied
    ctx = zmq.Context()
    stranger = CurveKeys.generate()
    socks = []
    try:
        for name, ep in targets.items():
            plain = ctx.socket(zmq.PUSH)                   # no CURVE at all
            wrong = stranger.make_client(ctx.socket(zmq.PUSH))   # CURVE, but not the cluster's key
            knows_pub = ctx.socket(zmq.PUSH)               # knows the server's public key, not the secret
            knows_pub.curve_serverkey = keys.public
            knows_pub.curve_publickey, knows_pub.curve_secretkey = stranger.public, stranger.secret
            for sock in (plain, wrong, knows_pub):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDTIMEO, 0)
                sock.connect(ep)
                socks.append(sock)
                for frames in ([forged_gen], [forged_batch], [b"\x00garbage"]):
                    try:
                        sock.send_multipart(frames, zmq.NOBLOCK)
                    except zmq.Again:
                        pass   # no handshake, no peer to queue for: that is the point
        # A client that knows the server's public key completes the CURVE crypto but is
        # refused by the ZAP handler (its own key is not the cluster's): one per target. The
        # others fail earlier (no CURVE / a HELLO the server cannot open).
        assert _wait(lambda: dec._curve_zap.denied + pre._curve_zap.denied + s.router._zap.denied
                     >= zap_before + len(targets))
        # (kept) waiting for nothing to arrive has no condition to poll: give a forged frame
        # that got through the time to be handled before counting
        time.sleep(0.5)
        after = (dec.stats()["requests"], pre.stats()["dropped_messages"], dict(dec.stats()["kv"]),
                 s.router.bad_messages)
        assert after == before, (before, after)
        # Control: the same forged frame from a peer that holds the key does arrive, so the
        # check above would have seen an injection.
        insider = keys.make_client(ctx.socket(zmq.PUSH))
        insider.setsockopt(zmq.LINGER, 0)
        insider.connect(targets["decode request plane"])
        socks.append(insider)
        insider.send(forged_gen)
        assert _wait(lambda: dec.stats()["requests"] == before[0] + 1)
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
    with s.channel() as ch:     # and the cluster still serves
        assert len(collect(s.stub(ch).Generate(build_request(PROMPT[:12], 2), timeout=30))["token_ids"]) == 2


def test_curve_keys_validate_and_hide_the_secret():
    k = CurveKeys.generate()
    assert k.secret.decode() not in repr(k)
    with pytest.raises(ValueError):
        CurveKeys(CurveKeys.generate().public, k.secret)   # a public key of another pair
    with pytest.raises(ValueError):
        CurveKeys(b"short", k.secret)


def test_ray_is_started_without_a_dashboard():
    """deploy/cluster.py starts a local Ray with include_dashboard=False (no unauthenticated
    dashboard / job API on this host); SECURITY.md has the rule for existing clusters."""
    import inspect

    from deploy import cluster
    src = inspect.getsource(cluster.Cluster.start)
    local_inits = [ln for ln in src.splitlines() if "ray.init(" in ln and "address=" not in ln]
    assert local_inits and all("include_dashboard=False" in ln for ln in local_inits)
    assert os.path.exists(os.path.join(os.path.dirname(cluster.__file__), "..", "SECURITY.md"))
