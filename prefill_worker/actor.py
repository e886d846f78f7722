"""Ray shell around :class:`prefill_worker.PrefillWorker` (see :mod:`decode_worker.actor`
for the conventions: not decorated at import time; :func:`remote_class` makes the actor
class; the engine picks CUDA if the process sees a GPU)."""
from __future__ import annotations

import logging

from decode_worker.actor import node_ip, wait_drained
from prefill_worker.worker import PrefillWorker


class PrefillWorkerActor:
    def __init__(self, worker_id: str, model: str, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if kwargs.get("bind_host") is None:
            kwargs["bind_host"] = node_ip()
        self.worker = PrefillWorker(worker_id, model, **kwargs)
        self.worker.start()

    def endpoints(self) -> dict:
        return self.worker.endpoints()

    def model_info(self) -> dict:
        return self.worker.model_info()

    def stats(self) -> dict:
        """Includes queued_tokens: prompt tokens accepted but not prefilled yet."""
        return self.worker.stats()

    def ping(self) -> dict:
        if not self.worker.is_alive():
            raise RuntimeError(f"prefill worker {self.worker.worker_id}: engine loop is not running")
        return dict(worker_id=self.worker.worker_id, ok=True, in_flight=self.worker.num_in_flight())

    def drain(self, timeout_s: float | None = None) -> dict:
        """Refuse new prefills (decode workers fall back to in-place prefill at once) and
        wait until in-flight ones are shipped (or timeout_s)."""
        return wait_drained(self.worker, timeout_s)

    def stop(self) -> None:
        self.worker.stop()


def remote_class(num_gpus: float = 1, *, num_cpus: float = 1, max_restarts: int = 2, max_concurrency: int = 4,
                 **options):
    import ray
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_concurrency=max_concurrency, **options)(PrefillWorkerActor)
