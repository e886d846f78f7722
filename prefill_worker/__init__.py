"""The prefill pool: an engine in prefill-only mode + KV senders.
:class:`PrefillWorker` is plain Python; :mod:`prefill_worker.actor` is its Ray shell."""
# engine first, before anything imports torch (see decode_worker/__init__.py).
import engine  # noqa: F401,I001  isort: skip
from prefill_worker.worker import PrefillWorker

__all__ = ["PrefillWorker"]
