"""The decode pool: an engine in decode mode (with in-place prefill) + the KV receiver.
:class:`DecodeWorker` is plain Python; :mod:`decode_worker.actor` is its Ray shell."""
# engine first, before anything imports torch: its CPU OpenMP default (engine/__init__.py)
# is read once, when torch loads libgomp. Every worker process (Ray actors included) imports
# this package (or prefill_worker, which does the same) before torch.
import engine  # noqa: F401,I001  isort: skip
from decode_worker.worker import DecodeWorker

__all__ = ["DecodeWorker"]
