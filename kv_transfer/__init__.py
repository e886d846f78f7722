"""Moving KV blocks between workers, layer by layer, block-granular.

Backends: ``"zmq"`` -- host-staged over ZeroMQ (tcp:// across hosts, ipc:// on one host;
what CPU CI runs). ``"nccl"`` -- GPU to GPU -- is future work: the factories name it and
raise NotImplementedError until it exists.

See :mod:`kv_transfer.base` for how the prefill and decode workers use the interface and
:mod:`kv_transfer.wire` for the message format.
"""
from __future__ import annotations

from kv_transfer.base import Completed, Failed, KVReceiver, KVSender, PollResult, WriteLayer
from kv_transfer.wire import (PROTOCOL_VERSION, AbortHeader, DoneHeader, KVHeader, KVLayout, KVMessage,
                              Reservation, UnknownRequestError, WireError, decode_header, decode_message)

BACKENDS = ("zmq", "nccl")

_NCCL_TODO = ("the NCCL KV transfer backend (GPU to GPU, no host staging) is not implemented yet; "
              "it is planned future work. Use backend='zmq' (tcp:// or ipc://) meanwhile.")


def make_sender(backend: str, endpoint: str, **kwargs) -> KVSender:
    """A sender to one receiver endpoint. zmq kwargs: context, sndhwm, send_timeout_s,
    max_message_bytes, linger_s (see ZmqKVSender)."""
    if backend == "zmq":
        from kv_transfer.zmq_backend import ZmqKVSender
        return ZmqKVSender(endpoint, **kwargs)
    if backend == "nccl":
        raise NotImplementedError(_NCCL_TODO)
    raise ValueError(f"unknown KV transfer backend {backend!r}; one of {BACKENDS}")


def make_receiver(backend: str, layout: KVLayout, write_layer: WriteLayer, **kwargs) -> KVReceiver:
    """A receiver writing into a cache of ``layout`` through ``write_layer(request_id,
    layer, block_ids, tensor)``. zmq kwargs: bind (default tcp://127.0.0.1:*; "ipc" for a
    fresh ipc:// path), advertise_host, context, rcvhwm, max_message_bytes,
    default_timeout_s, max_messages_per_poll (see ZmqKVReceiver)."""
    if backend == "zmq":
        from kv_transfer.zmq_backend import ZmqKVReceiver
        return ZmqKVReceiver(layout, write_layer, **kwargs)
    if backend == "nccl":
        raise NotImplementedError(_NCCL_TODO)
    raise ValueError(f"unknown KV transfer backend {backend!r}; one of {BACKENDS}")


def engine_writer(engine) -> WriteLayer:
    """write_layer for an ``engine.LLMEngine``: copies into its paged cache."""
    runner = engine.runner

    def write_layer(request_id: str, layer: int, block_ids: list, tensor) -> None:
        runner.write_kv_blocks(layer, block_ids, tensor)

    return write_layer


__all__ = ["make_sender", "make_receiver", "engine_writer", "BACKENDS", "KVSender", "KVReceiver", "PollResult",
           "Completed", "Failed", "WriteLayer", "KVLayout", "Reservation", "KVHeader", "DoneHeader", "AbortHeader",
           "KVMessage", "WireError", "UnknownRequestError", "decode_header", "decode_message", "PROTOCOL_VERSION"]
