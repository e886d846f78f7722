"""The decode pool: an engine in decode mode (with in-place prefill) + the KV receiver.
:class:`DecodeWorker` is plain Python; :mod:`decode_worker.actor` is its Ray shell."""
from decode_worker.worker import DecodeWorker

__all__ = ["DecodeWorker"]
