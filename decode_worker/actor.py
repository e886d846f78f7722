"""Ray shell around :class:`decode_worker.DecodeWorker`.

The class is not decorated at import time (importing needs no running Ray); use
:func:`remote_class` to get the actor class::

    Decode = remote_class(num_gpus=1)
    h = Decode.options(name="decode-0").remote("decode-0", "smollm2", router_token_endpoint)
    eps = ray.get(h.endpoints.remote())       # {"request": tcp://..., "kv": tcp://...}

The engine picks CUDA when the process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES for the
actor's num_gpus), the CPU otherwise; nothing here reads ray.get_gpu_ids(). Hot-path traffic
never goes through Ray: only control calls (endpoints, stats, ping, drain, stop) do.
After a restart (max_restarts) the actor binds fresh ports: callers re-read endpoints().
"""
from __future__ import annotations

import logging
import os
import time

from decode_worker.worker import DecodeWorker


def node_ip() -> str:
    """This node's address as Ray sees it (what other nodes can reach), else loopback."""
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


def wait_drained(worker, timeout_s: float | None, poll_s: float = 0.05) -> dict:
    worker.drain()
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while worker.num_in_flight() and (end is None or time.monotonic() < end) and worker.is_alive():
        time.sleep(poll_s)
    n = worker.num_in_flight()
    return dict(drained=n == 0, in_flight=n)


class WorkerActorBase:
    """Control calls shared by both pools' actors; subclasses build and start `self.worker`."""
    worker = None

    def __init__(self):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def endpoints(self) -> dict:
        return self.worker.endpoints()

    def model_info(self) -> dict:
        return self.worker.model_info()

    def stats(self) -> dict:
        return self.worker.stats()

    def ping(self, router_epoch: int | None = None) -> dict:
        """Health check: raises if the engine loop is gone (so Ray's caller sees an error).
        Also the router's sign of life for decode workers (see DecodeWorker.router_contact);
        returns the endpoints (they change when Ray restarts the actor) and the epoch of the
        router the worker streams to, so the supervisor can re-register and re-attach it."""
        if not self.worker.is_alive():
            raise RuntimeError(f"worker {self.worker.worker_id}: engine loop is not running")
        contact = getattr(self.worker, "router_contact", None)
        epoch = contact(router_epoch) if contact is not None else None
        plane = getattr(self.worker, "token_plane_state", None)
        return dict(worker_id=self.worker.worker_id, ok=True, in_flight=self.worker.num_in_flight(),
                    endpoints=self.worker.endpoints(), epoch=epoch, pid=os.getpid(),
                    token_plane=plane() if plane is not None else None)

    def drain(self, timeout_s: float | None = None) -> dict:
        """Stop accepting work (decode: new requests get "unavailable"; prefill: decode
        workers fall back to in-place prefill at once) and wait until in-flight work is
        done (or timeout_s). Returns {"drained": bool, "in_flight": int}."""
        return wait_drained(self.worker, timeout_s)

    def stop(self) -> None:
        self.worker.stop()


def make_remote(actor_cls, num_gpus: float, num_cpus: float, max_restarts: int, max_concurrency: int, **options):
    import ray
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_concurrency=max_concurrency, **options)(actor_cls)


class DecodeWorkerActor(WorkerActorBase):
    def __init__(self, worker_id: str, model: str, token_endpoint: str, **kwargs):
        super().__init__()
        if kwargs.get("bind_host") is None:
            kwargs["bind_host"] = node_ip()
        self.worker = DecodeWorker(worker_id, model, token_endpoint, **kwargs)
        self.worker.start()

    def attach_router(self, token_endpoint: str, epoch: int) -> None:
        self.worker.attach_router(token_endpoint, epoch)


def remote_class(num_gpus: float = 1, *, num_cpus: float = 1, max_restarts: int = 2, max_concurrency: int = 4,
                 **options):
    """The Ray actor class; extra options go to ray.remote (e.g. resources, runtime_env)."""
    return make_remote(DecodeWorkerActor, num_gpus, num_cpus, max_restarts, max_concurrency, **options)
