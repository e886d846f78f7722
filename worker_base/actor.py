"""The Ray shell both worker pools share: :class:`WorkerActorBase` (the control calls:
endpoints, model_info, stats, ping, drain, stop), :func:`make_remote` (the actor class,
decorated on demand so importing needs no running Ray) and the GPU-visibility rule.

A GPU actor sees every GPU of its node, its own first (:func:`own_gpu_first`): the engine's
"cuda" is its own GPU, and a cuda_ipc sender can open a decode cache on another GPU of the
host, which CUDA IPC needs visible. Hot-path traffic never goes through Ray: only control
calls do. After a restart (max_restarts) the actor binds fresh ports: callers re-read
endpoints(). Each pool's actor (decode_worker/actor.py, prefill_worker/actor.py) only says
how to build its worker.
"""
from __future__ import annotations

import logging
import os
import time


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


# Ray masks a GPU actor's devices with CUDA_VISIBLE_DEVICES unless this is set in the
# actor's environment (make_remote sets it for GPU actors; own_gpu_first then orders them).
NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def visible_order(own: list[str], node_gpus: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES listing the actor's own GPUs first, then the node's others."""
    return ",".join(own + [g for g in node_gpus if g not in own])


def own_gpu_first() -> None:
    """Before CUDA starts in this process: show every GPU of the node, the actor's own first."""
    if os.environ.get(NOSET_CUDA_VISIBLE_DEVICES) != "1":
        return
    import ray
    own = [str(g) for g in ray.get_gpu_ids()]
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:   # the node's raylet was started with a mask: Ray's ids are entries of it
        node_gpus = [g.strip() for g in inherited.split(",") if g.strip()]
    else:
        me = ray.get_runtime_context().get_node_id()
        count = next((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == me), 0)
        node_gpus = [str(i) for i in range(count)]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_order(own, node_gpus) if own else ""


class WorkerActorBase:
    """Control calls shared by both pools' actors; subclasses build and start `self.worker`."""
    worker = None

    def __init__(self):
        own_gpu_first()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def _start(self, worker_id: str, model: str, build) -> None:
        """Build the worker (the model load is the long part) and start its loop, with a
        line before and after: Ray forwards them, so whoever waits sees each stage's time."""
        log = logging.getLogger("pdserve.worker")
        t0 = time.monotonic()
        log.info("%s: loading %s (CUDA_VISIBLE_DEVICES=%s)", worker_id, model,
                 os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        self.worker = build()
        t1 = time.monotonic()
        self.worker.start()
        info = self.worker.model_info()
        log.info("%s: ready in %.1fs (engine %.1fs): %s %s on %s, %d KV blocks of %d tokens", worker_id,
                 time.monotonic() - t0, t1 - t0, info["model"], info["dtype"], info["device"], info["num_blocks"],
                 info["block_size"])

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


# How many times Ray restarts a dead worker actor (the config file's faults.max_restarts).
MAX_RESTARTS = 4


def make_remote(actor_cls, num_gpus: float = 1, num_cpus: float = 1, max_restarts: int = MAX_RESTARTS,
                max_concurrency: int = 4, **options):
    """The Ray actor class of a worker; extra options go to ray.remote (e.g. resources,
    runtime_env)."""
    import ray
    if num_gpus and "runtime_env" not in options:
        options["runtime_env"] = {"env_vars": {NOSET_CUDA_VISIBLE_DEVICES: "1"}}
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_concurrency=max_concurrency, **options)(actor_cls)
