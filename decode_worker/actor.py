"""Ray shell around :class:`decode_worker.DecodeWorker`.

The class is not decorated at import time (importing needs no running Ray); use
:func:`remote_class` to get the actor class::

    Decode = remote_class(num_gpus=1)
    h = Decode.options(name="decode-0").remote("decode-0", "smollm2", router_token_endpoint)
    eps = ray.get(h.endpoints.remote())       # {"request": tcp://..., "kv": tcp://...}

The engine picks CUDA when the process sees a GPU, the CPU otherwise. The control calls
(endpoints, stats, ping, drain, stop), the GPU-visibility rule and restarts are
:mod:`worker_base.actor`'s; this actor adds attach_router.
"""
from __future__ import annotations

from decode_worker.worker import DecodeWorker
from worker_base.actor import WorkerActorBase, make_remote, node_ip


class DecodeWorkerActor(WorkerActorBase):
    def __init__(self, worker_id: str, model: str, token_endpoint: str, **kwargs):
        super().__init__()
        if kwargs.get("bind_host") is None:
            kwargs["bind_host"] = node_ip()
        self._start(worker_id, model, lambda: DecodeWorker(worker_id, model, token_endpoint, **kwargs))

    def attach_router(self, token_endpoint: str, epoch: int) -> None:
        self.worker.attach_router(token_endpoint, epoch)


def remote_class(num_gpus: float = 1, **options):
    """The Ray actor class; options as worker_base.actor.make_remote takes them."""
    return make_remote(DecodeWorkerActor, num_gpus, **options)
