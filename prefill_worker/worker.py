"""The prefill worker: an engine in prefill-only mode that computes prompts for decode
workers and ships each prompt's KV to them layer by layer while the prefill runs.

No Ray in here: :class:`PrefillWorker` is a plain object that tests drive with
:meth:`PrefillWorker.run_once` (or :meth:`PrefillWorker.start`); :mod:`prefill_worker.actor`
wraps it in a Ray actor. The loop thread, the request-plane drain, the step-failure cleanup
and the shutdown are :class:`worker_base.worker.WorkerBase`'s.

    decode worker ──PUSH──► [PULL request]   PrefillMsg, abort(kv_key or rid), drain
    [KV sender] ──► decode worker's KV PULL  layers, then done(first_token) or abort(reason)
    [PUSH] ──► decode worker's request PULL  prefill_failed(kv_key), when the KV endpoint
                                              itself is unusable

A prompt's last chunk is computed in some engine step; during that step, as each layer
finishes (``on_layer_done``), the layer's blocks [first_block:] of that sequence are read
and queued to the sender (whose I/O thread stages and sends them), so shipping overlaps
the following layers. When the step's output for the sequence arrives (its first token),
``done`` is sent and the engine's blocks are released: the zmq and nccl senders gathered
copies of them; the cuda_ipc sender copies block to block and orders the engine's stream
behind those copies before the release (see kv_transfer/ipc_backend.py).

The engine captures no decode CUDA graphs: a prefill-only engine never runs a decode step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import zmq

import kv_transfer as kt
from engine import CapacityError, InvalidRequestError
from planes import messages
from planes.sockets import PushPool
from worker_base.worker import WorkerBase

log = logging.getLogger(__name__)

SENDER_IDLE_S = 300.0           # a KV sender unused this long is closed (its decode worker left)
SENDER_PRUNE_EVERY_S = 10.0


@dataclass
class _Job:
    rid: str
    kv_key: str
    sender: kt.KVSender
    dst: list[int]
    first_block: int
    reply_to: str
    layers_sent: int = 0
    error: str | None = None


class PrefillWorker(WorkerBase):
    KIND = "prefill"
    WORK = messages.PrefillMsg

    def __init__(self, worker_id: str, model: str, *, engine_kwargs: dict | None = None, device=None, dtype=None,
                 bind_host: str = "127.0.0.1", advertise_host: str | None = None,
                 kv_send_timeout_s: float = kt.SEND_TIMEOUT_S, context: zmq.Context | None = None, curve=None):
        super().__init__(worker_id, model, engine_kwargs={**(engine_kwargs or {}), "enable_cuda_graphs": False},
                         device=device, dtype=dtype, bind_host=bind_host, advertise_host=advertise_host,
                         context=context, curve=curve)
        self.kv_send_timeout_s = float(kv_send_timeout_s)
        self._senders: dict[str, kt.KVSender] = {}
        self._sender_used: dict[str, float] = {}   # endpoint -> last use, to close senders of departed workers
        self._last_prune = time.monotonic()
        self._replies = PushPool(self._ctx)
        self._jobs: dict[str, _Job] = {}
        self._shipping: list[tuple[_Job, object]] = []
        self._queued_tokens = 0
        self._failed_in_closed = 0   # transfers_failed of the senders closed so far
        self.counters = dict(requests=0, completed=0, aborted=0, rejected=0, send_errors=0, dropped_messages=0,
                             prompt_tokens=0, cached_tokens=0)

    # ---- API -----------------------------------------------------------------------------------
    def endpoints(self) -> dict:
        return {"request": self._req_ep}

    def stats(self) -> dict:
        """``completed`` counts prefills whose every layer and done were handed to a sender;
        a backend that copies after that (cuda_ipc) can still fail one and send its done as
        an abort, which ``transfers_failed`` counts (senders closed since included)."""
        failed = self._failed_in_closed + sum(_dones_as_aborts(s) for s in list(self._senders.values()))
        return {**self.engine.stats(), **self.counters, "queued_tokens": self._queued_tokens,
                "in_flight": len(self._jobs), "draining": self._draining, "transfers_failed": failed}

    def num_in_flight(self) -> int:
        return len(self._jobs)

    def _close_sockets(self) -> None:
        self._replies.close()
        for s in self._senders.values():
            try:
                s.close(1.0)
            except Exception:
                log.exception("prefill worker %s: closing a KV sender failed", self.worker_id)
            self._failed_in_closed += _dones_as_aborts(s)
        self._senders.clear()

    # ---- one loop iteration ------------------------------------------------------------------------
    def run_once(self, timeout_ms: int = 0) -> None:
        if timeout_ms > 0 and not self.engine.has_unfinished():
            self._poller.poll(timeout_ms)
        self._drain_requests()
        if self.engine.has_unfinished():
            self._step()
        self._queued_tokens = self.engine.queue_stats()["queued_prompt_tokens"]
        if time.monotonic() - self._last_prune > SENDER_PRUNE_EVERY_S:
            self._prune_senders()

    def _handling_failed(self, msg, error: str) -> None:
        if isinstance(msg, messages.PrefillMsg):
            self._abort_job(msg.kv_key, error)

    def _sender(self, endpoint: str) -> kt.KVSender:
        self._sender_used[endpoint] = time.monotonic()
        s = self._senders.get(endpoint)
        if s is not None and getattr(s, "broken", None):   # a cuda_ipc pair that failed: try a fresh one
            self._forget_sender(s)
            s = None
        if s is None:
            backend = kt.backend_of(endpoint)   # the decode worker's receiver chose it
            dev = self.engine.device
            if backend == "nccl":
                s = kt.make_sender("nccl", endpoint, send_timeout_s=self.kv_send_timeout_s,
                                   device=dev if dev.type == "cuda" else None)
            elif backend == "cuda_ipc":
                s = kt.make_sender("cuda_ipc", endpoint, context=self._ctx, send_timeout_s=self.kv_send_timeout_s,
                                   device=dev)
            else:
                s = kt.make_sender("zmq", endpoint, context=self._ctx, send_timeout_s=self.kv_send_timeout_s)
            self._senders[endpoint] = s
        return s

    def _reply_failed(self, reply_to: str, kv_key: str) -> None:
        try:
            self._replies.send(reply_to, messages.encode_prefill_failed(kv_key))
        except Exception as e:
            log.warning("prefill worker %s: cannot tell %s that %s failed: %s", self.worker_id, reply_to, kv_key, e)

    def _on_work(self, msg: messages.PrefillMsg) -> None:
        key = msg.kv_key
        if key in self._jobs:
            self.counters["dropped_messages"] += 1
            log.warning("prefill worker %s: %r is already in flight; duplicate dropped", self.worker_id, key)
            return
        self.counters["requests"] += 1
        try:
            sender = self._sender(msg.kv_endpoint)
        except Exception as e:
            self.counters["rejected"] += 1
            log.warning("prefill worker %s: KV endpoint %r unusable: %s", self.worker_id, msg.kv_endpoint, e)
            self._reply_failed(msg.reply_to, key)
            return
        try:
            if self._draining:
                raise _Refused("prefill worker is draining")
            n = len(msg.prompt_ids)
            want = self.engine.blocks_for(n) - msg.first_block
            if msg.first_block * self.block_size >= n or want != len(msg.dst_block_ids):
                raise _Refused(f"dst_block_ids: {len(msg.dst_block_ids)} blocks from block {msg.first_block} "
                               f"do not cover a {n}-token prompt in blocks of {self.block_size}")
            if len(set(msg.dst_block_ids)) != len(msg.dst_block_ids):
                raise _Refused("dst_block_ids: must be distinct")
            self.engine.add_request(key, msg.prompt_ids, msg.params, prefill_only=True, cache_salt=msg.cache_salt)
        except (_Refused, InvalidRequestError, CapacityError) as e:
            self.counters["rejected"] += 1
            log.info("prefill worker %s: refused %s: %s", self.worker_id, key, e)
            self._send_abort(sender, key, str(e))
            return
        self._jobs[key] = _Job(msg.rid, key, sender, list(msg.dst_block_ids), msg.first_block, msg.reply_to)
        try:
            sender.begin(key)   # a cuda_ipc sender is granted the transfer while the prefill runs
        except Exception as e:
            self._jobs[key].error = f"begin failed: {type(e).__name__}: {e}"

    def _send_abort(self, sender: kt.KVSender, key: str, reason: str) -> None:
        try:
            sender.send_abort(key, reason[:1024])
        except Exception as e:
            self.counters["send_errors"] += 1
            log.warning("prefill worker %s: abort for %s not sent: %s", self.worker_id, key, e)
            self._forget_sender(sender)

    def _forget_sender(self, sender: kt.KVSender) -> None:
        if self._senders.get(sender.endpoint) is sender:
            del self._senders[sender.endpoint]
        if not any(j.sender is sender for j in self._jobs.values()):
            self._close_sender(sender)

    def _close_sender(self, sender: kt.KVSender) -> None:
        # A sender holds a socket and an I/O thread (an NCCL one also a communicator).
        try:
            sender.close(0)
        except Exception:
            log.exception("prefill worker %s: closing a KV sender failed", self.worker_id)
        self._failed_in_closed += _dones_as_aborts(sender)

    def _prune_senders(self) -> None:
        """Close senders to decode workers not used for SENDER_IDLE_S (scaled down or
        restarted on new ports: their endpoints never come back)."""
        self._last_prune = now = time.monotonic()
        busy = {id(j.sender) for j in self._jobs.values()}
        for ep in [ep for ep, t in self._sender_used.items() if now - t > SENDER_IDLE_S]:
            s = self._senders.get(ep)
            if s is not None and id(s) in busy:
                continue   # a transfer still ships through it
            del self._sender_used[ep]
            if s is not None:
                del self._senders[ep]
                self._close_sender(s)

    def _abort_job(self, key: str, reason: str) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:   # first: a cuda_ipc sender orders the stream behind its copies of these blocks
            self._send_abort(job.sender, key, reason)
        self.engine.abort(key)

    def _on_abort(self, ident: str) -> None:
        """ident is a kv_key (from the decode worker) or a request id (all its transfers)."""
        keys = [ident] if ident in self._jobs else [k for k, j in self._jobs.items() if j.rid == ident]
        for k in keys:
            self.counters["aborted"] += 1
            self._abort_job(k, "aborted")

    # ---- the step -----------------------------------------------------------------------------------
    def _on_layer_done(self, layer: int) -> None:
        if layer == 0:   # which sequences finish their prompt in this step
            self._shipping = [(self._jobs[rid], table) for rid, table in self.engine.step_finishing_prompts()
                              if rid in self._jobs]
        for job, table in self._shipping:
            if job.error:
                continue
            # Layers go as the sender takes them (one per call for the staged backends, a
            # group per launch for cuda_ipc); a group is handed over once its last layer is.
            due = kt.layers_due(layer, self.num_layers, job.sender.layers_per_launch)
            if due is None and layer:
                continue
            src = table[job.first_block:job.first_block + len(job.dst)]
            if due is None:   # layer 0 of a group still computing: the transfer's set-up, off the path
                try:
                    job.sender.prepare_blocks(job.kv_key, job.dst, src)
                except Exception as e:   # only a head start: the send redoes it (or says why not)
                    log.warning("prefill worker %s: %s: preparing the transfer failed: %s: %s",
                                self.worker_id, job.kv_key, type(e).__name__, e)
                continue
            try:
                job.sender.send_layers_blocks(job.kv_key, due, job.dst, self.engine.kv_cache, src)
                job.layers_sent += len(due)
            except Exception as e:
                self.counters["send_errors"] += 1
                job.error = f"sending layers {due.start}..{due.stop - 1} failed: {type(e).__name__}: {e}"
                log.warning("prefill worker %s: %s: %s", self.worker_id, job.kv_key, job.error)

    def _fail_victim(self, key: str, error: str) -> None:
        self._abort_job(key, error)

    def _step(self) -> None:
        self._shipping = []
        try:
            outputs = self._engine_step(on_layer_done=self._on_layer_done)
        finally:
            self._shipping = []
        for out in outputs or ():
            job = self._jobs.pop(out.request_id, None)
            if job is None:
                continue
            if not out.finished:   # prefill-only sequences always finish on their first token
                log.error("prefill worker %s: %s produced an unfinished output", self.worker_id, job.kv_key)
            try:
                if job.error is None and job.layers_sent == self.num_layers:
                    job.sender.send_done(job.kv_key, out.new_token_ids[0], self.num_layers)
                    self.counters["completed"] += 1
                    self.counters["prompt_tokens"] += out.num_prompt_tokens
                    self.counters["cached_tokens"] += out.num_cached_tokens
                else:
                    self._send_abort(job.sender, job.kv_key,
                                     job.error or f"only {job.layers_sent}/{self.num_layers} layers sent")
            except Exception as e:
                self.counters["send_errors"] += 1
                log.warning("prefill worker %s: done for %s not sent: %s", self.worker_id, job.kv_key, e)
                self._forget_sender(job.sender)
            finally:
                self.engine.release(job.kv_key)


def _dones_as_aborts(sender) -> int:
    """Dones a sender had to send as aborts (a copy failed after the done was handed over);
    only backends that copy after the done (cuda_ipc) count them."""
    stats = getattr(sender, "stats", None)
    return int(stats.get("dones_as_aborts", 0)) if isinstance(stats, dict) else 0


class _Refused(ValueError):
    pass
