"""Ray shell around :class:`prefill_worker.PrefillWorker` (see :mod:`worker_base.actor`
for the conventions: not decorated at import time; :func:`remote_class` makes the actor
class; the engine picks CUDA if the process sees a GPU)."""
from __future__ import annotations

from prefill_worker.worker import PrefillWorker
from worker_base.actor import WorkerActorBase, make_remote, node_ip


class PrefillWorkerActor(WorkerActorBase):
    def __init__(self, worker_id: str, model: str, **kwargs):
        super().__init__()
        if kwargs.get("bind_host") is None:
            kwargs["bind_host"] = node_ip()
        self._start(worker_id, model, lambda: PrefillWorker(worker_id, model, **kwargs))


def remote_class(num_gpus: float = 1, **options):
    """The Ray actor class; options as worker_base.actor.make_remote takes them."""
    return make_remote(PrefillWorkerActor, num_gpus, **options)
