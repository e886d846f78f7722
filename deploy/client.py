"""A small gRPC client for `pdserve generate --address HOST:PORT`."""
from __future__ import annotations

import grpc

from pdserve_api.v1 import pdserve_pb2 as pb
from pdserve_api.v1 import pdserve_pb2_grpc as pb_grpc

_ROUTE = {pb.ROUTE_KIND_DIRECT: "direct", pb.ROUTE_KIND_DISAGGREGATED: "disaggregated"}
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


def build_request(prompt: str | list[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                  request_id: str = "", chat: bool = False) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, apply_chat_template=chat)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = temperature
    if seed is not None:
        req.sampling.seed = seed
    return req


def collect(responses) -> dict:
    """Fold a Generate stream into one result dict."""
    out = dict(text="", token_ids=[], route=None, reason=None, cached_tokens=0, finish_reason=None,
               request_id=None, decode_worker=None, prefill_worker=None)
    for r in responses:
        out["token_ids"] += list(r.token_ids)
        out["text"] += r.text
        if r.request_id:
            out["request_id"] = r.request_id
        if r.finish_reason:
            out["finish_reason"] = _FINISH.get(r.finish_reason)
            out["cached_tokens"] = r.usage.cached_tokens
            out["route"] = _ROUTE.get(r.route.kind)
            out["reason"] = r.route.reason
            out["decode_worker"] = r.route.decode_worker
            out["prefill_worker"] = r.route.prefill_worker or None
    return out


def open_channel(address: str, tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls: bool = False, server_name: str | None = None) -> grpc.Channel:
    """Plaintext, or TLS when any tls_* is given (tls=True: TLS with the system roots);
    tls_cert/tls_key: a client certificate for mutual TLS. server_name overrides the name
    the server certificate is checked against (e.g. when dialling an IP address)."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return grpc.insecure_channel(address)
    from router.tls import channel_credentials
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key), options=options)


def auth_metadata(api_key: str | None) -> tuple:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def generate(address: str, prompt, max_tokens: int, timeout: float | None = 600, *, api_key: str | None = None,
             tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None, tls: bool = False,
             server_name: str | None = None, **kw) -> dict:
    with open_channel(address, tls_ca, tls_cert, tls_key, tls, server_name) as ch:
        stub = pb_grpc.GenerationStub(ch)
        return collect(stub.Generate(build_request(prompt, max_tokens, **kw), timeout=timeout,
                                     metadata=auth_metadata(api_key)))
