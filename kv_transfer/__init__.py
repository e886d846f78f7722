"""Moving KV blocks between workers, layer by layer, block-granular.

Backends: ``"zmq"`` -- host-staged over ZeroMQ (tcp:// across hosts, ipc:// on one host;
what CPU CI runs). ``"nccl"`` -- torch.distributed point-to-point on a two-rank process
group per (prefill, decode) pair: ProcessGroupNCCL GPU to GPU, ProcessGroupGloo when the
receiving cache is on the CPU (how CI tests it); control headers still go over ZeroMQ
(:mod:`kv_transfer.p2p_backend`). ``"cuda_ipc"`` -- one host: the prefill worker copies
blocks straight into the decode worker's cache, opened through a CUDA IPC handle (POSIX
shared memory between CPU processes), with claims and fences so that a failed or
cancelled transfer's blocks are never written once reused (:mod:`kv_transfer.ipc_backend`).
:func:`backend_of` tells an endpoint's backend.

See :mod:`kv_transfer.base` for how the prefill and decode workers use the interface and
:mod:`kv_transfer.wire` for the message format.
"""
from __future__ import annotations

from kv_transfer.base import (KV_TIMEOUT_S, SEND_TIMEOUT_S, Completed, Failed, KVReceiver, KVSender, PollResult,
                              WriteLayer, layers_due)
from kv_transfer.wire import (PROTOCOL_VERSION, AbortHeader, DoneHeader, KVHeader, KVLayout, KVMessage,
                              Reservation, UnknownRequestError, WireError, decode_header, decode_message)

BACKENDS = ("zmq", "nccl", "cuda_ipc")


def backend_of(endpoint: str) -> str:
    """The backend a receiver endpoint belongs to: ``nccl://...`` -> "nccl",
    ``cudaipc://...`` -> "cuda_ipc", else "zmq"."""
    if isinstance(endpoint, str) and endpoint.startswith("nccl://"):
        return "nccl"
    if isinstance(endpoint, str) and endpoint.startswith("cudaipc://"):
        return "cuda_ipc"
    return "zmq"


def make_sender(backend: str, endpoint: str, **kwargs) -> KVSender:
    """A sender to one receiver endpoint. zmq kwargs: context, sndhwm, send_timeout_s,
    max_message_bytes, linger_s (see ZmqKVSender). nccl kwargs: context, send_timeout_s,
    connect_timeout_s, linger_s, max_in_flight, sndhwm, device (see P2PKVSender). cuda_ipc
    kwargs: context, send_timeout_s, connect_timeout_s, linger_s, ping_s, lease_s, device (the
    sender's cache device; see IpcKVSender)."""
    if backend == "zmq":
        from kv_transfer.zmq_backend import ZmqKVSender
        return ZmqKVSender(endpoint, **kwargs)
    if backend == "nccl":
        from kv_transfer.p2p_backend import P2PKVSender
        return P2PKVSender(endpoint, **kwargs)
    if backend == "cuda_ipc":
        from kv_transfer.ipc_backend import IpcKVSender
        return IpcKVSender(endpoint, **kwargs)
    raise ValueError(f"unknown KV transfer backend {backend!r}; one of {BACKENDS}")


def make_receiver(backend: str, layout: KVLayout, write_layer: WriteLayer, **kwargs) -> KVReceiver:
    """A receiver writing into a cache of ``layout`` through ``write_layer(request_id,
    layer, block_ids, tensor)``. zmq kwargs: bind (default tcp://127.0.0.1:*; "ipc" for a
    fresh ipc:// path), advertise_host, context, rcvhwm, max_message_bytes,
    default_timeout_s, max_messages_per_poll (see ZmqKVReceiver). nccl kwargs: bind_host,
    advertise_host, device (the cache's: cuda -> NCCL pairs, cpu -> gloo), pg,
    default_timeout_s, op_timeout_s, connect_timeout_s, max_pairs (see P2PKVReceiver). cuda_ipc
    kwargs: cache (the engine's whole KV cache tensor; required), bind_host, advertise_host,
    context, default_timeout_s, peer_timeout_s, max_pairs (see IpcKVReceiver)."""
    if backend == "zmq":
        from kv_transfer.zmq_backend import ZmqKVReceiver
        return ZmqKVReceiver(layout, write_layer, **kwargs)
    if backend == "nccl":
        from kv_transfer.p2p_backend import P2PKVReceiver
        return P2PKVReceiver(layout, write_layer, **kwargs)
    if backend == "cuda_ipc":
        from kv_transfer.ipc_backend import IpcKVReceiver
        return IpcKVReceiver(layout, write_layer, **kwargs)
    raise ValueError(f"unknown KV transfer backend {backend!r}; one of {BACKENDS}")


def engine_writer(engine) -> WriteLayer:
    """write_layer for an ``engine.LLMEngine``: copies into its paged cache."""
    def write_layer(request_id: str, layer: int, block_ids: list, tensor) -> None:
        engine.write_kv_blocks(layer, block_ids, tensor)

    return write_layer


__all__ = ["make_sender", "make_receiver", "engine_writer", "backend_of", "BACKENDS", "KVSender", "KVReceiver", "PollResult",
           "Completed", "Failed", "WriteLayer", "KVLayout", "Reservation", "KVHeader", "DoneHeader", "AbortHeader",
           "KVMessage", "WireError", "UnknownRequestError", "decode_header", "decode_message", "PROTOCOL_VERSION",
           "layers_due"]
