"""The prefill pool: an engine in prefill-only mode + KV senders.
:class:`PrefillWorker` is plain Python; :mod:`prefill_worker.actor` is its Ray shell."""
from prefill_worker.worker import PrefillWorker

__all__ = ["PrefillWorker"]
