"""The skeleton both worker pools share: an engine, a request-plane PULL socket, and one
loop thread that repeats :meth:`run_once`.

:class:`WorkerBase` owns what the prefill and the decode worker did alike: the engine and the
ZeroMQ contexts (CurveZMQ when on), ``model_info()``, start / stop / is_alive / drain, the
loop thread, the request-plane drain (decode with :func:`planes.messages.decode_request`,
count and log what is malformed or meant for the other pool, hand the rest to the pool),
the step-failure cleanup (the sequences in the failed step, else every scheduled one, are
ended) and closing the sockets. A pool's worker (decode_worker/worker.py,
prefill_worker/worker.py) adds its own plane sockets, ``run_once`` and its messages.

No Ray in here (worker_base/actor.py is the Ray shell); every socket is used only by the
thread that runs the loop.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from engine import LLMEngine
from planes import messages
from planes.sockets import bind_pull, close_curve_contexts, open_contexts, recv_one

log = logging.getLogger(__name__)

MAX_REQUESTS_PER_ITERATION = 512


class WorkerBase:
    KIND = "worker"                 # "decode" | "prefill": thread names and log lines
    WORK = ()                       # the request-plane message class(es) this pool computes

    def __init__(self, worker_id: str, model: str, *, engine_kwargs: dict | None, device, dtype,
                 bind_host: str, advertise_host: str | None, context: zmq.Context | None, curve):
        self.worker_id = worker_id
        self.engine = LLMEngine(model, device=device, dtype=dtype, **(engine_kwargs or {}))
        self.block_size = self.engine.cfg.block_size
        self.num_layers = self.engine.model_config.num_layers
        self._ctx, self._srv_ctx, self._curve_zap = open_contexts(curve, context)
        self._req_sock, self._req_ep = bind_pull(self._srv_ctx, bind_host, advertise_host)
        self._poller = zmq.Poller()
        self._poller.register(self._req_sock, zmq.POLLIN)
        self._draining = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._side_threads: list[threading.Thread] = []   # stopped with the loop (the decode heartbeat)
        self._closed = False

    # ---- API -----------------------------------------------------------------------------------
    def model_info(self) -> dict:
        e = self.engine
        return dict(model=e.model_name, vocab_size=e.model_config.vocab_size, max_model_len=e.max_model_len,
                    block_size=self.block_size, num_blocks=e.blocks.num_blocks,
                    eos_token_ids=sorted(e.eos_token_ids), has_tokenizer=e.tokenizer is not None,
                    num_layers=self.num_layers, device=str(e.device), dtype=str(e.dtype).replace("torch.", ""))

    def num_in_flight(self) -> int:
        raise NotImplementedError

    def drain(self) -> None:
        """Stop accepting new work; in-flight work finishes. New requests to a decode worker
        get error_code "unavailable"; a prefill worker refuses new prefills, so the decode
        worker falls back to prefilling in place at once."""
        self._draining = True

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name=f"{self.KIND}-worker-{self.worker_id}", daemon=True)
        self._thread.start()

    def _start_side_thread(self, target, name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=f"{self.KIND}-{name}-{self.worker_id}", daemon=True)
        self._side_threads.append(t)
        t.start()
        return t

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("%s worker %s: loop did not stop", self.KIND, self.worker_id)
                return
        for t in self._side_threads:
            if t is not threading.current_thread():
                t.join(timeout_s)
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._req_sock.close()
        self._close_sockets()
        close_curve_contexts(self)

    def _close_sockets(self) -> None:
        """The pool's own sockets, senders and receivers (the request socket is closed)."""

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once(50)
            except Exception:   # run_once guards itself; this is the last line of defence
                log.exception("%s worker %s: loop iteration failed", self.KIND, self.worker_id)
                time.sleep(0.05)

    def run_once(self, timeout_ms: int = 0) -> None:
        raise NotImplementedError

    # ---- the request plane ---------------------------------------------------------------------
    def _drain_requests(self) -> None:
        for _ in range(MAX_REQUESTS_PER_ITERATION):
            buf = recv_one(self._req_sock)
            if buf is None:
                return
            try:
                msg = messages.decode_request(buf)
            except messages.PlaneError as e:
                self.counters["dropped_messages"] += 1
                log.warning("%s worker %s: dropped a malformed request-plane message: %s", self.KIND,
                            self.worker_id, e)
                continue
            self._heard_from_peer()
            try:
                self._handle(msg)
            except Exception as e:
                log.exception("%s worker %s: handling %s failed", self.KIND, self.worker_id, type(msg).__name__)
                self._handling_failed(msg, f"internal error: {type(e).__name__}: {e}")

    def _handle(self, msg) -> None:
        if isinstance(msg, self.WORK):
            self._on_work(msg)
        elif isinstance(msg, tuple) and msg[0] == "abort":
            self._on_abort(msg[1])
        elif isinstance(msg, tuple) and msg[0] == "drain":
            log.info("%s worker %s: draining", self.KIND, self.worker_id)
            self._draining = True
        elif not (isinstance(msg, tuple) and self._on_control(msg)):
            self.counters["dropped_messages"] += 1
            log.warning("%s worker %s: dropped a %s message (wrong plane)", self.KIND, self.worker_id,
                        msg[0] if isinstance(msg, tuple) else type(msg).__name__)

    def _heard_from_peer(self) -> None:
        """A well-formed request-plane message arrived."""

    def _on_work(self, msg) -> None:
        raise NotImplementedError

    def _on_abort(self, ident: str) -> None:
        raise NotImplementedError

    def _on_control(self, msg: tuple) -> bool:
        """Another control message (a tuple); False: not this pool's (dropped)."""
        return False

    def _handling_failed(self, msg, error: str) -> None:
        """Handling msg raised: end what it started."""

    # ---- the step ------------------------------------------------------------------------------
    def _engine_step(self, **kwargs) -> list | None:
        """One engine step; None when it failed, after ending the sequences it ran (if it got
        that far; else every scheduled one) through :meth:`_fail_victim`."""
        try:
            return self.engine.step(**kwargs)
        except Exception as e:
            log.exception("%s worker %s: engine step failed", self.KIND, self.worker_id)
            victims = self.engine.step_request_ids() or self.engine.unfinished_request_ids()
            for seq_id in victims:
                self._fail_victim(seq_id, f"internal error: {type(e).__name__}: {e}")
            return None

    def _fail_victim(self, seq_id: str, error: str) -> None:
        raise NotImplementedError
