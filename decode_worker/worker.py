"""The decode worker: an engine in decode mode (with in-place prefill), fed by the router
over the request plane, streaming token batches back over the token plane, and receiving
prompt KV from prefill workers over the KV plane.

No Ray in here: :class:`DecodeWorker` is a plain object that tests drive with
:meth:`DecodeWorker.run_once` (or :meth:`DecodeWorker.start` for a background thread);
:mod:`decode_worker.actor` wraps it in a Ray actor. The loop thread, the request-plane drain,
the step-failure cleanup and the shutdown are :class:`worker_base.worker.WorkerBase`'s.

Sockets (all ZeroMQ, msgpack messages from :mod:`planes.messages`, never pickle)::

    router ──PUSH──► [PULL request]  GenerateMsg, abort, drain, prefill_failed
    [PUSH token] ──► router PULL     one TokenBatch per loop iteration (+ heartbeats)
    [PUSH] ──► prefill worker PULL   PrefillMsg, abort(kv_key)       (one socket per endpoint)
    prefill worker ──► [PULL kv]     KV layers + done/abort          (kv_transfer receiver)

KV backends (``kv_backend``): "zmq", "nccl", "cuda_ipc", or "auto": on a GPU, cuda_ipc for
prefill workers on this host (their request endpoint's host is this worker's) and NCCL
pairs for the others; ZeroMQ on the CPU. A prefill worker that cannot open this worker's
cache (a GPU it cannot see) makes its transfers fail at once; with "auto" later transfers
from it then go over NCCL.

Every socket is used only by the thread that runs the loop.

Router faults: the worker belongs to one router *epoch* at a time. Heartbeats carry the
worker's request endpoint and epoch (in ``load``), so a router can tell this incarnation
from an older one with the same id. :meth:`DecodeWorker.attach_router` moves the token
plane to a new router: requests of the old epoch are dropped at once (nobody streams them
any more). With ``orphan_timeout_s`` set, requests are also dropped when the router has
not been heard from (request-plane message or :meth:`router_contact`) for that long, so a
router that died without a successor frees its requests' blocks in bounded time.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import time
from dataclasses import dataclass

import zmq

import kv_transfer as kt
from engine import CapacityError, InvalidRequestError, RequestOutput
from kv_transfer.wire import KVLayout
from planes import messages
from planes.sockets import PushPool, advertised_host
from worker_base.worker import WorkerBase

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5               # a batch (maybe empty) at least this often, carrying load
WEDGED_AFTER_S = 60.0           # a loop iteration this long is a hang: the heartbeat thread goes quiet
MAX_OUTBOX = 4096               # token batches kept while the router is not draining
KV_KEY_MAX = messages.MAX_ID_CHARS


def _error_code(e: BaseException) -> str:
    if isinstance(e, CapacityError):
        return "resource_exhausted"
    if isinstance(e, InvalidRequestError):
        return "invalid_argument"
    return "internal"


@dataclass
class _Req:
    rid: str
    mode: str                       # "direct" | "disaggregated" (as asked; fallback says what happened)
    kv_key: str | None = None       # current transfer, while awaiting KV
    prefill_endpoint: str | None = None
    deadline: float = 0.0
    fallback: str | None = None
    disaggregated: bool = False     # its prompt KV came from a prefill worker
    rx: object = None               # the kv_transfer receiver of the current transfer


class DecodeWorker(WorkerBase):
    KIND = "decode"
    WORK = messages.GenerateMsg

    def __init__(self, worker_id: str, model: str, token_endpoint: str, *, engine_kwargs: dict | None = None,
                 device=None, dtype=None, bind_host: str = "127.0.0.1", kv_bind: str = "tcp",
                 kv_timeout_s: float = messages.KV_TIMEOUT_S, advertise_host: str | None = None,
                 context: zmq.Context | None = None, router_epoch: int | None = None,
                 orphan_timeout_s: float | None = None, curve=None, kv_backend: str = "zmq"):
        super().__init__(worker_id, model, engine_kwargs=engine_kwargs, device=device, dtype=dtype,
                         bind_host=bind_host, advertise_host=advertise_host, context=context, curve=curve)
        self.router_epoch = router_epoch
        self.orphan_timeout_s = orphan_timeout_s
        self._router_seen = time.monotonic()
        self._attach: tuple[str, int] | None = None   # set by attach_router, applied by the loop thread
        self.kv_timeout_s = float(kv_timeout_s)
        self._tok_sock = self._ctx.socket(zmq.PUSH)
        self._tok_sock.setsockopt(zmq.SNDHWM, 100_000)
        self._tok_sock.setsockopt(zmq.LINGER, 2000)
        self._tok_sock.connect(token_endpoint)
        self._token_endpoint = token_endpoint   # read by the heartbeat thread
        if kv_bind == "tcp":
            kv_bind = f"tcp://{bind_host}:*"
        self._kv_bind, self._bind_host = kv_bind, bind_host
        self._host = advertised_host(bind_host, advertise_host)
        self._kv_waitable = True
        self._receivers: dict[str, kt.KVReceiver] = {}
        self._auto = kv_backend == "auto" and self.engine.device.type == "cuda"
        if kv_backend == "auto":
            kv_backend = "cuda_ipc" if self._auto else "zmq"
        self.receiver = self._make_receiver(kv_backend)   # the primary one (same-host peers under "auto")
        self._ipc_unusable: set[str] = set()   # prefill endpoints that could not open this cache
        self._prefill = PushPool(self._ctx)
        self._reqs: dict[str, _Req] = {}
        self._by_key: dict[str, str] = {}      # kv_key -> rid, while awaiting KV
        self._held: dict[str, tuple[str, object]] = {}   # kv_key -> (rid, receiver): aborted, blocks held until released
        self._attempts = itertools.count(1)
        self._items: list[messages.TokenItem] = []
        self._outbox: list[bytes] = []
        self._last_sent = 0.0
        self._loop_at = time.monotonic()     # end of the loop's last iteration (read by the heartbeat thread)
        self.counters = dict(requests=0, disaggregated=0, fallbacks=0, rejected=0, aborted=0, errors=0,
                             dropped_messages=0, batches_sent=0, orphaned=0)

    def _make_receiver(self, backend: str) -> kt.KVReceiver:
        rx = self._receivers.get(backend)
        if rx is not None:
            return rx
        layout, writer = KVLayout.from_engine(self.engine), kt.engine_writer(self.engine)
        if backend == "nccl":   # kv_transfer/p2p_backend.py: its endpoint carries the pair store's address
            rx = kt.make_receiver("nccl", layout, writer, bind_host=self._bind_host, advertise_host=self._host,
                                  device=self.engine.device, default_timeout_s=self.kv_timeout_s)
        elif backend == "cuda_ipc":   # kv_transfer/ipc_backend.py: senders copy into this cache themselves
            rx = kt.make_receiver("cuda_ipc", layout, writer, cache=self.engine.kv_cache,
                                  bind_host=self._bind_host, advertise_host=self._host, context=self._srv_ctx,
                                  default_timeout_s=self.kv_timeout_s)
        else:
            bind = self._kv_bind
            rx = kt.make_receiver("zmq", layout, writer, bind=bind,
                                  advertise_host=self._host if bind.startswith("tcp://") else None,
                                  context=self._srv_ctx, default_timeout_s=self.kv_timeout_s)
        kv_sock = rx.waitable_socket   # to sleep on every plane at once
        if kv_sock is not None:
            self._poller.register(kv_sock, zmq.POLLIN)
        else:
            self._kv_waitable = False
        self._receivers[backend] = rx
        return rx

    def _receiver_for(self, prefill_endpoint: str) -> kt.KVReceiver:
        """Under "auto": cuda_ipc for a prefill worker on this host that could open this
        cache, NCCL pairs otherwise; else the one configured receiver."""
        if not self._auto:
            return self.receiver
        host = prefill_endpoint.rpartition(":")[0].removeprefix("tcp://")
        if host == self._host and prefill_endpoint not in self._ipc_unusable:
            return self.receiver
        return self._make_receiver("nccl")

    # ---- API -----------------------------------------------------------------------------------
    def endpoints(self) -> dict:
        return {"request": self._req_ep, "kv": self.receiver.endpoint}

    def stats(self) -> dict:
        return {**self.engine.stats(), **self.counters, "in_flight": len(self._reqs),
                "draining": self._draining, "kv": self._kv_stats(), "router_epoch": self.router_epoch,
                "kv_blocks_held": len(self._held)}

    def _kv_stats(self) -> dict:
        """Every receiver's counters, summed (one receiver unless "auto" added NCCL)."""
        out: dict = {}
        for rx in self._receivers.values():
            for k, v in rx.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def num_in_flight(self) -> int:
        return len(self._reqs)

    def token_plane_state(self) -> dict:
        """For the supervisor's logs: is the token plane moving?"""
        return dict(batches_sent=self.counters["batches_sent"], outbox=len(self._outbox),
                    since_last_send_s=round(time.monotonic() - self._last_sent, 2))

    def router_contact(self, epoch: int | None = None) -> int | None:
        """The router (through its supervisor) is alive; returns this worker's epoch. A
        contact from another epoch does not count. Safe from any thread."""
        if epoch is None or epoch == self.router_epoch:
            self._router_seen = time.monotonic()
        return self.router_epoch

    def attach_router(self, token_endpoint: str, epoch: int) -> None:
        """Stream to a (new) router. Safe from any thread: the loop applies it before it
        reads the next request, so requests of the new router always see the new epoch."""
        self._attach = (token_endpoint, epoch)
        self._router_seen = time.monotonic()

    def start(self) -> None:
        super().start()
        self._start_side_thread(self._beat, "beat")

    def _close_sockets(self) -> None:
        self._tok_sock.close()
        self._prefill.close()
        for rx in self._receivers.values():
            rx.close()

    def _beat(self) -> None:
        """Heartbeats while the loop thread is busy in one long engine step (a big prefill
        chunk on a loaded CPU can take seconds, a first numba compile longer): the router
        judges a decode worker dead by token-plane silence, and a busy worker is not dead.
        Own PUSH socket (ZeroMQ sockets belong to one thread); beats carry load only, no
        tokens, so their order against the loop's batches does not matter. torch ops and
        the numba kernels release the GIL, so this thread runs during a step."""
        sock, endpoint = None, None
        try:
            while not self._stop.wait(HEARTBEAT_S):
                now = time.monotonic()
                if now - self._last_sent < 2 * HEARTBEAT_S:
                    continue   # the loop is sending on its own
                if now - self._loop_at > WEDGED_AFTER_S:
                    continue   # no iteration for a minute: a hang, let the router's silence watch see it
                if endpoint != self._token_endpoint:
                    if sock is not None:
                        sock.close(linger=0)
                    endpoint = self._token_endpoint
                    sock = self._ctx.socket(zmq.PUSH)
                    sock.setsockopt(zmq.SNDHWM, 16)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(endpoint)
                try:
                    sock.send(messages.TokenBatch(self.worker_id, [], [], self._load()).encode(), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass   # router away or slow: the next beat tries again
                except Exception:   # a load snapshot taken mid-update; never kill the thread
                    log.debug("decode worker %s: heartbeat skipped", self.worker_id, exc_info=True)
        finally:
            if sock is not None:
                sock.close(linger=0)

    # ---- one loop iteration ------------------------------------------------------------------------
    def run_once(self, timeout_ms: int = 0) -> None:
        """Receive requests and KV, run at most one engine step, send one token batch.
        Blocks up to timeout_ms only when there is nothing to compute."""
        if timeout_ms > 0 and not self.engine.has_unfinished() and not self._outbox:
            self._wait(timeout_ms)
        if self._attach is not None:
            self._apply_attach()
        self._drain_requests()
        self._check_orphans()
        self._poll_kv()
        if self.engine.has_unfinished():
            self._step()
        self._send_batch()
        self._loop_at = time.monotonic()

    def _apply_attach(self) -> None:
        endpoint, epoch = self._attach
        self._attach = None
        if epoch != self.router_epoch and self.router_epoch is not None:
            self._drop_all(f"router epoch changed ({self.router_epoch} -> {epoch})")
        self.router_epoch = epoch
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(endpoint)
        self._tok_sock.close(linger=0)
        self._tok_sock = sock
        self._token_endpoint = endpoint
        self._outbox.clear()     # batches for the old router: nobody reads them
        self._items.clear()
        self._last_sent = 0.0    # introduce ourselves to the new router at once
        log.info("decode worker %s: attached to router %s (epoch %s)", self.worker_id, endpoint, epoch)

    def _check_orphans(self) -> None:
        if self.orphan_timeout_s is None or not self._reqs:
            return
        silent = time.monotonic() - self._router_seen
        if silent > self.orphan_timeout_s:
            self._drop_all(f"router silent for {silent:.1f}s")
            self._router_seen = time.monotonic()

    def _drop_all(self, why: str) -> None:
        """Abort every request: their router is gone, nobody will read their tokens."""
        rids = list(self._reqs)
        if rids:
            log.warning("decode worker %s: dropping %d orphaned requests: %s", self.worker_id, len(rids), why)
        for rid in rids:
            self._on_abort(rid)
            self.counters["orphaned"] += 1
        self._items.clear()

    def _wait(self, timeout_ms: int) -> None:
        now = time.monotonic()
        wait_s = min(timeout_ms / 1000, max(0.0, self._last_sent + HEARTBEAT_S - now))
        if self._by_key:
            nearest = min(self._reqs[r].deadline for r in self._by_key.values())
            wait_s = min(wait_s, max(0.0, nearest - now))
            if not self._kv_waitable:
                wait_s = min(wait_s, 0.005)
            for rx in self._receivers.values():
                soon = rx.wake_within_s()
                if soon is not None:
                    wait_s = min(wait_s, soon)
        if wait_s >= 0.001:
            self._poller.poll(int(wait_s * 1000))
        elif wait_s > 0:   # finer than the poller's milliseconds: a receiver's doorbell, say
            time.sleep(wait_s)

    def _heard_from_peer(self) -> None:
        self._router_seen = time.monotonic()

    def _on_control(self, msg) -> bool:
        if msg[0] != "prefill_failed":
            return False
        rid = self._by_key.get(msg[1])
        if rid is not None:
            # The prefill worker never took it, so nothing of it was written: no fence.
            self._reqs[rid].rx.cancel(msg[1])
            self._kv_failed(rid, "prefill_failed")
        return True

    def _handling_failed(self, msg, error: str) -> None:
        if isinstance(msg, messages.GenerateMsg):
            self._fail_request(msg.rid, error, "internal")

    def _on_work(self, msg: messages.GenerateMsg) -> None:
        rid = msg.rid
        if rid in self._reqs:
            self.counters["dropped_messages"] += 1
            log.warning("decode worker %s: request %r is already in flight; duplicate dropped", self.worker_id, rid)
            return
        self.counters["requests"] += 1
        if self._draining:
            self.counters["rejected"] += 1
            self._items.append(messages.TokenItem(rid, [], finish_reason="abort", error="worker is draining",
                                                  error_code="unavailable"))
            return
        req = self._reqs[rid] = _Req(rid, msg.mode)
        try:
            if msg.mode == "disaggregated":
                if not msg.prefill_endpoint:
                    req.fallback = "no_prefill_endpoint"
                elif self._start_disagg(req, msg):
                    return
            self.engine.add_request(rid, msg.prompt_ids, msg.params, cache_salt=msg.cache_salt)
        except (InvalidRequestError, CapacityError) as e:
            del self._reqs[rid]
            self.counters["rejected"] += 1
            self._items.append(messages.TokenItem(rid, [], finish_reason="abort", error=str(e),
                                                  error_code=_error_code(e)))
            return
        if req.fallback:
            self.counters["fallbacks"] += 1

    def _new_kv_key(self, rid: str) -> str:
        n = next(self._attempts)
        key = f"{rid}#{n}"
        if len(key) > KV_KEY_MAX:
            key = f"{hashlib.sha256(rid.encode()).hexdigest()[:32]}#{n}"
        return key

    def _start_disagg(self, req: _Req, msg: messages.GenerateMsg) -> bool:
        """Reserve blocks and ask the prefill worker; False (with req.fallback set) means
        "prefill in place" and nothing is left reserved."""
        seq = self.engine.add_remote_prefill(msg.rid, msg.prompt_ids, msg.params, cache_salt=msg.cache_salt)
        if seq is None:
            req.fallback = "no_free_blocks"
            return False
        first_block = seq.num_computed_tokens // self.block_size
        dst = list(seq.block_table[first_block:])
        if not dst:   # nothing to ship (cannot happen with the engine's prefix rule; be safe)
            self.engine.remote_kv_failed(msg.rid)
            return True
        key = self._new_kv_key(msg.rid)
        req.deadline = time.monotonic() + min(self.kv_timeout_s, msg.kv_timeout_s)
        req.kv_key, req.prefill_endpoint = key, msg.prefill_endpoint
        req.rx = self._receiver_for(msg.prefill_endpoint)
        req.rx.expect(key, dst, self.num_layers, deadline=req.deadline)
        self._by_key[key] = msg.rid
        pm = messages.PrefillMsg(msg.rid, key, msg.prompt_ids, msg.params, kv_endpoint=req.rx.endpoint,
                                 dst_block_ids=dst, first_block=first_block, reply_to=self._req_ep,
                                 cache_salt=msg.cache_salt)
        try:
            self._prefill.send(msg.prefill_endpoint, pm.encode())
        except zmq.ZMQError as e:
            log.warning("decode worker %s: cannot reach prefill worker %s: %s", self.worker_id,
                        msg.prefill_endpoint, e)
            req.rx.cancel(key)
            self._kv_failed(msg.rid, f"prefill_unreachable: {e}")
        return True

    def _forward_abort(self, req: _Req) -> None:
        if req.kv_key and req.prefill_endpoint:
            try:
                self._prefill.send(req.prefill_endpoint, messages.encode_abort(req.kv_key))
            except zmq.ZMQError as e:
                log.info("decode worker %s: abort for %s not forwarded: %s", self.worker_id, req.kv_key, e)

    def _kv_failed(self, rid: str, reason: str) -> None:
        """The transfer for rid is over without data: prefill it in place."""
        req = self._reqs[rid]
        self._by_key.pop(req.kv_key, None)
        self.engine.remote_kv_failed(rid)
        if req.fallback is None:
            req.fallback = reason
            self.counters["fallbacks"] += 1

    def _cancel_kv(self, req: _Req) -> bool:
        """Stop req's transfer; True when a sender may still write its blocks, so the
        engine must keep them until the receiver releases them (see _poll_kv)."""
        self._by_key.pop(req.kv_key)
        req.rx.cancel(req.kv_key)
        self._forward_abort(req)
        if req.rx.write_pending(req.kv_key):
            self._held[req.kv_key] = (req.rid, req.rx)
            return True
        return False

    def _on_abort(self, rid: str) -> None:
        req = self._reqs.pop(rid, None)
        held = req is not None and req.kv_key in self._by_key and self._cancel_kv(req)
        known = True if held else self.engine.abort(rid)
        if req is not None or known:
            self.counters["aborted"] += 1
            self._items.append(messages.TokenItem(rid, [], finish_reason="abort"))

    def _fail_request(self, rid: str, error: str, code: str) -> None:
        """End one request with an error, whatever state it is in."""
        self.counters["errors"] += 1
        req = self._reqs.pop(rid, None)
        try:
            held = req is not None and req.kv_key in self._by_key and self._cancel_kv(req)
            if not held:
                self.engine.abort(rid)
        except Exception:
            log.exception("decode worker %s: cleaning up %s failed", self.worker_id, rid)
        self._items.append(messages.TokenItem(rid, [], finish_reason="abort", error=error, error_code=code))

    def _poll_kv(self) -> None:
        for rx in list(self._receivers.values()):
            try:
                res = rx.poll(0)
            except Exception:
                log.exception("decode worker %s: kv receiver poll failed", self.worker_id)
                continue
            self._on_kv_results(res)

    def _on_kv_results(self, res: kt.PollResult) -> None:
        for key in res.released:   # no sender writes them any more: now the aborted request's blocks go
            rid, _ = self._held.pop(key, (None, None))
            if rid is not None:
                self.engine.abort(rid)
        for c in res.completed:
            rid = self._by_key.pop(c.request_id, None)
            if rid is None:
                continue
            try:
                out = self.engine.remote_kv_landed(rid, c.first_token)
                req = self._reqs[rid]
                req.disaggregated = True
                self.counters["disaggregated"] += 1
                self._emit(out)
            except Exception as e:
                log.exception("decode worker %s: admitting %s after its KV landed failed", self.worker_id, rid)
                self._fail_request(rid, f"internal error: {type(e).__name__}: {e}", "internal")
        for f in res.failed:
            rid = self._by_key.get(f.request_id)
            if rid is None:
                continue
            reason = "kv_timeout" if f.reason.startswith("deadline") else f"kv_error: {f.reason}"
            req = self._reqs.get(rid)
            if self._auto and req is not None and "cannot use the receiver's cache" in f.reason:
                self._ipc_unusable.add(req.prefill_endpoint)   # e.g. a GPU it cannot see: NCCL from now on
            if req is not None and reason == "kv_timeout":
                self._forward_abort(req)    # stop the prefill worker wasting work on it
            try:
                self._kv_failed(rid, reason)
            except Exception as e:
                log.exception("decode worker %s: falling back for %s failed", self.worker_id, rid)
                self._fail_request(rid, f"internal error: {type(e).__name__}: {e}", "internal")

    def _step(self) -> None:
        for out in self._engine_step() or ():
            self._emit(out)

    def _fail_victim(self, rid: str, error: str) -> None:
        self._fail_request(rid, error, "internal")

    def _emit(self, out: RequestOutput) -> None:
        item = messages.TokenItem(out.request_id, list(out.new_token_ids), out.text_delta, out.finish_reason,
                                  list(out.new_logprobs))
        if out.finished:
            req = self._reqs.pop(out.request_id, None)
            item.prompt_tokens = out.num_prompt_tokens
            item.cached_tokens = out.num_cached_tokens
            item.completion_tokens = out.num_output_tokens
            item.fallback = req.fallback if req is not None else None
        self._items.append(item)

    def _load(self) -> dict:
        q = self.engine.queue_stats()
        return dict(running=q["running"], waiting=q["waiting"], free_blocks=self.engine.num_free_blocks(),
                    num_blocks=self.engine.num_blocks, awaiting_kv=q["awaiting_kv"],
                    draining=self._draining, endpoint=self._req_ep, epoch=self.router_epoch,
                    **self._kv_counters())

    def _kv_counters(self) -> dict:
        # Flat numbers (the token plane's load map holds scalars only) for the router's metrics.
        st = self._kv_stats()
        out = {f"kv_{k}": int(st.get(k, 0)) for k in ("bytes", "completed", "failed", "timed_out")}
        # Summed durations of the completed transfers: seconds / completed is the mean.
        out.update({f"kv_{k}": float(st.get(k, 0.0)) for k in ("seconds", "wire_seconds")})
        return out

    def _send_batch(self) -> None:
        events = [(e.kind, e.block_hash, e.parent_hash) for e in self.engine.take_kv_events()]
        now = time.monotonic()
        items, self._items = self._items, []
        if items or events or now - self._last_sent >= HEARTBEAT_S:
            for i in range(0, max(1, len(items)), messages.MAX_ITEMS):
                batch = messages.TokenBatch(self.worker_id, items[i:i + messages.MAX_ITEMS],
                                            events if i == 0 else [], self._load())
                if not batch.items and not batch.kv_events and self._outbox:
                    continue   # a heartbeat behind a backlog says nothing new
                self._outbox.append(self._encode(batch))
            self._last_sent = now
        while self._outbox:
            try:
                self._tok_sock.send(self._outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as e:
                log.error("decode worker %s: token plane send failed: %s", self.worker_id, e)
                break
            self._outbox.pop(0)
            self.counters["batches_sent"] += 1
        if len(self._outbox) > MAX_OUTBOX:
            log.error("decode worker %s: router not draining the token plane; dropping %d batches",
                      self.worker_id, len(self._outbox) - MAX_OUTBOX)
            del self._outbox[:len(self._outbox) - MAX_OUTBOX]

    def _encode(self, batch: messages.TokenBatch) -> bytes:
        try:
            return batch.encode()
        except Exception:
            log.exception("decode worker %s: a token batch did not encode; isolating the bad items", self.worker_id)
        ok = []
        for it in batch.items:
            try:
                messages.TokenBatch(self.worker_id, [it]).encode()
                ok.append(it)
            except Exception as e:
                self._reqs.pop(it.rid, None)
                self.engine.abort(it.rid)
                self.counters["errors"] += 1
                ok.append(messages.TokenItem(it.rid, [], finish_reason="abort", error_code="internal",
                                             error=f"internal error: output not encodable ({type(e).__name__})"))
        try:
            return messages.TokenBatch(self.worker_id, ok, batch.kv_events, batch.load).encode()
        except Exception:
            log.exception("decode worker %s: kv events did not encode; dropped", self.worker_id)
            return messages.TokenBatch(self.worker_id, ok, [], batch.load).encode()
