"""The router's state: worker registry, prefix index, routing decisions, and the token
plane that feeds per-request queues. asyncio + zmq.asyncio; no gRPC in here.

Faults and overload (what the gRPC layer maps to statuses):
  - admission control: a bounded number of in-flight requests per decode worker and a
    bounded number of admitted-but-not-yet-prefilled prompt tokens; past either bound
    :meth:`Router.submit` raises :class:`Overloaded` at once (RESOURCE_EXHAUSTED).
  - a decode worker is declared lost when its heartbeats stop (a ZeroMQ PUSH to a dead
    peer fails silently, so silence is the only signal the data plane gives) or when the
    cluster's supervisor says so (Ray reports the actor dead or restarted with new
    endpoints). Its requests are re-dispatched to a live decode worker as prompt + tokens
    already streamed, or failed with error_code "unavailable".
  - a request's deadline (monotonic) is enforced here too: past it the request is aborted
    on its worker and fails with "deadline_exceeded".
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from planes import messages
from planes.prefix_hash import BLOCK_SIZE, hash_prefix_blocks
from planes.sampling_params import SamplingParams
from router.policy import Decision, PolicyConfig, WorkerLoad, decide
from router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

TOKEN_POLL_MS = 100   # the token loop re-checks its socket at least this often


@dataclass
class RouterConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    block_size: int = BLOCK_SIZE
    kv_timeout_s: float = messages.KV_TIMEOUT_S
    bind_host: str = "127.0.0.1"
    # Admission control: past these bounds new requests are refused at once (Overloaded).
    max_inflight_per_decode: int = 256        # requests held by one decode worker
    max_queued_prefill_tokens: int = 1 << 20  # admitted prompt tokens not yet prefilled, all pools
    # A decode worker that sends nothing (it heartbeats every 0.5 s) for this long is lost.
    dead_after_s: float = 5.0
    monitor_interval_s: float = 0.25
    max_redispatches: int = 2                 # per request, then it fails with "unavailable"
    send_timeout_s: float = 5.0               # a request-plane send to a worker not reading gives up
    # Security: internal planes bind to bind_host only (never all interfaces by default);
    # curve: router.curve.CurveKeys to encrypt and authenticate them (None: off).
    curve: object | None = None
    # A JSONL trace of finished requests' lengths for `pdserve plan --trace` (router/trace.py).
    record_trace: str | None = None


@dataclass
class Worker:
    worker_id: str
    kind: str                      # "decode" | "prefill"
    request_endpoint: str
    sock: zmq.asyncio.Socket
    inflight: set[str] = field(default_factory=set)
    queued_tokens: int = 0
    load: dict = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    # Set by the autoscaler (deploy/controller.py) before a scale-down: route() no longer
    # picks it, its in-flight requests finish, then it is removed.
    draining: bool = False


class Overloaded(Exception):
    """Admission control refused the request (gRPC RESOURCE_EXHAUSTED); nothing was dispatched."""


@dataclass
class RequestHandle:
    rid: str
    decision: Decision
    prompt_len: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False
    # What a re-dispatch needs: the request as the client sent it and what was streamed.
    prompt_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    cache_salt: bytes = b""
    deadline: float | None = None  # time.monotonic() past which nobody waits for the answer
    decode_worker: str = ""        # where it runs now (differs from decision's after a re-dispatch)
    emitted: list[int] = field(default_factory=list)   # token ids handed to the client queue
    resume_offset: int = 0         # len(emitted) when the current worker got it
    redispatches: int = 0
    sent_at: float = field(default_factory=time.time)   # wall clock at submission (the trace's arrival)
    # Which counts still hold the request's prefill work, decision.uncached_tokens (the
    # prompt tokens its decode worker had not cached). Each is released once:
    #   Router.queued_prefill_tokens (admission), until the first token or the end;
    #   its prefill worker's queued_tokens (disaggregated route), until the decode worker
    #   first reports on it (the prefill is then done or abandoned), it moves, or it ends.
    counted_for_admission: bool = False
    counted_on_prefill_worker: bool = False


class Router:
    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.ctx = zmq.asyncio.Context()
        self.token_sock = self.ctx.socket(zmq.PULL)
        self.token_sock.setsockopt(zmq.MAXMSGSIZE, messages.MAX_MESSAGE_BYTES)
        self._zap = None
        if cfg.curve is not None:   # a CURVE server, and a ZAP handler that admits only cluster peers
            from router.curve import ZapHandler
            cfg.curve.make_server(self.token_sock)
            self._zap = ZapHandler(self.ctx, cfg.curve)
        port = self.token_sock.bind_to_random_port(f"tcp://{cfg.bind_host}")
        self.token_endpoint = f"tcp://{cfg.bind_host}:{port}"
        self.decode: dict[str, Worker] = {}
        self.prefill: dict[str, Worker] = {}
        self.index = PrefixIndex()
        self.requests: dict[str, RequestHandle] = {}
        self.decisions: dict[tuple[str, str], int] = {}   # (kind, reason) -> count, for metrics
        self.bad_messages = 0
        self._task: asyncio.Task | None = None
        self._monitor: asyncio.Task | None = None
        self._ids = itertools.count()
        # Workers attached to this router carry its epoch; a worker that sees a new epoch
        # drops the requests of the old router (their client streams are gone).
        self.epoch = secrets.randbits(48)
        self.queued_prefill_tokens = 0
        self._starved_since: float | None = None
        # The plane-wide silence clock starts with the first token batch: before it, workers
        # are still loading their models (their own registration-time clocks cover them).
        self._last_batch_at: float | None = None
        self._plane_silent_logged = False
        self.counters = dict(overloaded=0, workers_lost=0, redispatched=0, failed_unavailable=0,
                             deadline_exceeded=0, stale_batches=0)
        self.trace = None
        if cfg.record_trace:
            from router.trace import TraceRecorder
            self.trace = TraceRecorder(cfg.record_trace)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._token_loop())
        self._monitor = loop.create_task(self._monitor_loop())

    def fail_all(self, code: str = "unavailable", message: str = "router is shutting down") -> None:
        """End every in-flight request with an error (their streams get a status, not a hang)."""
        for h in list(self.requests.values()):
            self._fail(h, code, message)

    async def close(self) -> None:
        self.fail_all()
        for t in (self._task, self._monitor):
            if t:
                t.cancel()
        for w in list(self.decode.values()) + list(self.prefill.values()):
            w.sock.close(linger=0)
        self.token_sock.close(linger=0)
        if self.trace is not None:
            self.trace.close()
        if self._zap is not None:
            self._zap.stop()
        self.ctx.term()

    def add_worker(self, kind: str, worker_id: str, request_endpoint: str) -> None:
        old = (self.decode if kind == "decode" else self.prefill).get(worker_id)
        if old is not None and old.request_endpoint == request_endpoint:
            return   # registered twice (supervisor and autoscaler): keep its state
        if old is not None:   # another incarnation: callers should report it lost first
            log.warning("router: %s re-registered at %s while still held at %s", worker_id, request_endpoint,
                        old.request_endpoint)
            old.sock.close(linger=0)
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        if self.cfg.curve is not None:
            self.cfg.curve.make_client(sock)
        sock.connect(request_endpoint)
        pool = self.decode if kind == "decode" else self.prefill
        pool[worker_id] = Worker(worker_id, kind, request_endpoint, sock)
        if kind == "decode" and len(self.decode) == 1 and self._last_batch_at is not None:
            # The plane-wide silence clock restarts with the first decode worker (batches
            # seen before were heartbeats of workers not registered yet).
            self._last_batch_at = max(self._last_batch_at, time.monotonic())
        log.info("router: %s worker %s joined at %s", kind, worker_id, request_endpoint)

    def remove_worker(self, worker_id: str) -> None:
        w = self.decode.pop(worker_id, None) or self.prefill.pop(worker_id, None)
        if w is not None:
            w.sock.close(linger=0)
            self.index.forget(worker_id)

    def endpoint_of(self, worker_id: str) -> str | None:
        w = self.decode.get(worker_id) or self.prefill.get(worker_id)
        return w.request_endpoint if w is not None else None

    async def worker_lost(self, worker_id: str, reason: str) -> int:
        """A worker died (heartbeat silence, Ray says so, or it came back with new endpoints):
        take it out of routing and re-dispatch or fail its decode requests. Returns how many
        requests it held. Prefill workers hold nothing the router must move: the decode
        worker's KV timeout falls back to in-place prefill."""
        # Out of the pools before the first await, so a second report of the same loss
        # (monitor and supervisor) finds nothing to do.
        w = self.decode.pop(worker_id, None) or self.prefill.pop(worker_id, None)
        if w is None:
            return 0
        self.index.forget(worker_id)
        log.warning("router: %s worker %s lost (%s); %d requests in flight on it", w.kind, worker_id, reason,
                    len(w.inflight))
        self.counters["workers_lost"] += 1
        moved = [h for h in self.requests.values() if h.decode_worker == worker_id] if w.kind == "decode" else []
        # If it is only stalled, not dead, stop it wasting work on requests that move.
        for h in moved:
            try:
                await w.sock.send(messages.encode_abort(h.rid), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                break
        w.sock.close(linger=100 if moved else 0)
        for h in moved:
            await self._redispatch(h, f"decode worker {worker_id} lost ({reason})")
        return len(moved)

    # ---- routing -------------------------------------------------------------------------------------
    def route(self, prompt_ids: list[int], cache_salt: bytes = b"", admit: bool = False) -> Decision:
        """admit=True applies admission control: workers at their in-flight bound are not
        candidates, and Overloaded is raised when no worker (or no prefill budget) is left."""
        hashes = hash_prefix_blocks(prompt_ids, self.cfg.block_size, cache_salt)
        cap = self.cfg.max_inflight_per_decode
        decode = [WorkerLoad(w.worker_id, inflight=len(w.inflight), overlap_blocks=self.index.overlap(w.worker_id, hashes))
                  for w in self.decode.values() if not w.draining and (not admit or len(w.inflight) < cap)]
        serving = sum(not w.draining for w in self.decode.values())
        if admit and serving and not decode:   # (none serving: decide raises LookupError, UNAVAILABLE)
            raise Overloaded(f"all {serving} decode workers hold their limit of {cap} requests")
        prefill = [WorkerLoad(w.worker_id, inflight=len(w.inflight), queued_tokens=w.queued_tokens)
                   for w in self.prefill.values() if not w.draining]
        return decide(len(prompt_ids), self.cfg.block_size, decode, prefill, self.cfg.policy)

    def new_request_id(self) -> str:
        return f"req-{time.time_ns():x}-{next(self._ids)}"

    async def submit(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                     cache_salt: bytes = b"", deadline: float | None = None) -> RequestHandle:
        """Route and dispatch. Raises LookupError when no decode worker exists, KeyError
        when the request id is already in flight, Overloaded past the admission bounds.
        deadline: time.monotonic() after which the request is aborted everywhere."""
        if rid in self.requests:
            raise KeyError(rid)
        try:
            d = self.route(prompt_ids, cache_salt, admit=True)
        except Overloaded:
            self.counters["overloaded"] += 1
            raise
        budget = self.cfg.max_queued_prefill_tokens
        if self.queued_prefill_tokens and self.queued_prefill_tokens + d.uncached_tokens > budget:
            # (A lone prompt larger than the budget is admitted into an empty queue, so a
            # budget below the model's context cannot make some prompts unservable.)
            self.counters["overloaded"] += 1
            raise Overloaded(f"{self.queued_prefill_tokens} prompt tokens are waiting for prefill; "
                             f"the limit is {budget}")
        h = RequestHandle(rid, d, len(prompt_ids), prompt_ids=list(prompt_ids), params=params,
                          cache_salt=cache_salt, deadline=deadline, decode_worker=d.decode_worker,
                          counted_for_admission=True)
        self.queued_prefill_tokens += d.uncached_tokens
        dw = self.decode[d.decode_worker]
        msg = messages.GenerateMsg(rid, prompt_ids, params, mode="direct", cache_salt=cache_salt,
                                   kv_timeout_s=self.cfg.kv_timeout_s)
        if d.kind == "disaggregated":
            pw = self.prefill[d.prefill_worker]
            msg.mode, msg.prefill_endpoint, msg.prefill_worker = "disaggregated", pw.request_endpoint, pw.worker_id
            h.counted_on_prefill_worker = True
            pw.queued_tokens += d.uncached_tokens
            pw.inflight.add(rid)
        self.requests[rid] = h
        dw.inflight.add(rid)
        key = (d.kind, d.reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        try:
            await self._send(dw, msg.encode())
        except (zmq.ZMQError, asyncio.TimeoutError) as e:
            self._finish(h)
            raise LookupError(f"decode worker {dw.worker_id} is not accepting requests ({e!r})") from None
        return h

    async def _send(self, w: Worker, data: bytes) -> None:
        """A request-plane send that waits for a connection that is still forming (a PUSH
        just connected has no peer for a moment) but never hangs on a worker that stopped
        reading (a full high-water mark): it gives up after send_timeout_s."""
        await asyncio.wait_for(w.sock.send(data), self.cfg.send_timeout_s)

    async def abort(self, rid: str) -> None:
        """Client went away (cancel or deadline): stop the request on every worker."""
        h = self.requests.get(rid)
        if h is None or h.done:
            return
        dw = self.decode.get(h.decode_worker)
        if dw is not None:
            await self._send_abort(dw, rid)
        self._finish(h)

    async def _send_abort(self, w: Worker, rid: str) -> None:
        """Best effort and never blocking: a worker that is not reading its requests is
        stalled or dead (its heartbeat watch and orphan timeout free the request then).
        No send timeout here: the deadline sweep aborts many requests in one pass, and a
        wait per request on a stalled worker would hold up the health monitor."""
        try:
            await w.sock.send(messages.encode_abort(rid), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("router: abort of %s not delivered to %s: %r", rid, w.worker_id, e)

    def _finish(self, h: RequestHandle) -> None:
        h.done = True
        self.requests.pop(h.rid, None)
        dw = self.decode.get(h.decode_worker)
        if dw is not None:
            dw.inflight.discard(h.rid)
        self._prefill_done(h)
        self._prompt_done(h)

    def _prompt_done(self, h: RequestHandle) -> None:
        """The request's prompt is prefilled (its first token came) or it ended: it no
        longer counts against the admission bound on tokens waiting for prefill."""
        if h.counted_for_admission:
            h.counted_for_admission = False
            self.queued_prefill_tokens -= h.decision.uncached_tokens

    def _fail(self, h: RequestHandle, code: str, message: str) -> None:
        if h.done:
            return
        if code == "unavailable":
            self.counters["failed_unavailable"] += 1
        h.queue.put_nowait(messages.TokenItem(h.rid, [], finish_reason="abort", error=message, error_code=code))
        self._finish(h)

    async def _redispatch(self, h: RequestHandle, why: str) -> None:
        """Move a request whose decode worker is gone to a live one, as prompt + the tokens
        already streamed, with max_tokens reduced by them; or fail it with "unavailable".

        Greedy requests continue exactly (the new worker recomputes the same KV). A seeded
        sampled request continues with a seed derived from its own and the tokens streamed,
        so it stays reproducible but is not bit-identical to an undisturbed run. A request
        with stop strings that has streamed tokens is failed instead: the worker holds back
        text that could start a stop string, and a stop string straddling the hand-over
        point would be missed, so the continuation could not be exact. Token ids are exact;
        text is the new worker's decoding of the continuation alone, so a character whose
        bytes straddle the hand-over point (held back by the old worker's detokenizer) may
        come out as U+FFFD.
        """
        if h.done:
            return                  # the client went away while other requests were moved
        self._prefill_done(h)       # its prefill worker's queue no longer holds it
        old = self.decode.get(h.decode_worker)
        if old is not None:
            old.inflight.discard(h.rid)
        p, n = h.params, len(h.emitted)
        if h.deadline is not None and time.monotonic() >= h.deadline:
            self.counters["deadline_exceeded"] += 1
            self._fail(h, "deadline_exceeded", f"deadline exceeded while recovering: {why}")
            return
        if p is None or h.redispatches >= self.cfg.max_redispatches:
            self._fail(h, "unavailable", f"{why}; request already re-dispatched {h.redispatches} times")
            return
        if p.stop and n:
            self._fail(h, "unavailable", f"{why}; a request with stop strings cannot be resumed exactly "
                                         f"after {n} streamed tokens")
            return
        if n >= p.max_tokens:   # its last token was streamed; only the final marker was lost
            h.resume_offset = 0
            self._deliver(h, messages.TokenItem(h.rid, [], finish_reason="length", prompt_tokens=h.prompt_len,
                                                completion_tokens=n, fallback="redispatched"))
            return
        prompt = h.prompt_ids + h.emitted
        params = dataclasses.replace(p, max_tokens=p.max_tokens - n, stop=list(p.stop),
                                     stop_token_ids=list(p.stop_token_ids))
        if p.seed is not None and n:
            params.seed = (p.seed * 1_000_003 + n) % (1 << 63)
        try:
            d = self.route(prompt, h.cache_salt)
        except LookupError:
            self._fail(h, "unavailable", f"{why}; no other decode worker is available")
            return
        dw = self.decode[d.decode_worker]
        h.decode_worker, h.resume_offset = dw.worker_id, n
        h.redispatches += 1
        dw.inflight.add(h.rid)
        self.counters["redispatched"] += 1
        log.info("router: %s re-dispatched to %s with %d streamed tokens (%s)", h.rid, dw.worker_id, n, why)
        msg = messages.GenerateMsg(h.rid, prompt, params, mode="direct", cache_salt=h.cache_salt,
                                   kv_timeout_s=self.cfg.kv_timeout_s)
        try:
            await self._send(dw, msg.encode())
        except (zmq.ZMQError, asyncio.TimeoutError) as e:
            self._fail(h, "unavailable", f"{why}; {dw.worker_id} is not accepting requests ({e!r})")

    def _prefill_done(self, h: RequestHandle) -> None:
        """Its prefill worker no longer holds the request's prompt (it was sent, abandoned
        for an in-place prefill, or the request moved or ended)."""
        if h.counted_on_prefill_worker:
            h.counted_on_prefill_worker = False
            pw = self.prefill.get(h.decision.prefill_worker)
            # Only the worker object that counted it: a re-registered worker starts from 0.
            if pw is not None and h.rid in pw.inflight:
                pw.queued_tokens = max(0, pw.queued_tokens - h.decision.uncached_tokens)
                pw.inflight.discard(h.rid)

    # ---- token plane ----------------------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        """Heartbeat silence (a dead decode worker) and expired deadlines."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.cfg.monitor_interval_s)
            late = time.monotonic() - t - self.cfg.monitor_interval_s
            try:
                await self.check_health(starved=late > max(0.2, self.cfg.monitor_interval_s))
            except Exception:
                log.exception("router: health check failed")

    async def check_health(self, now: float | None = None, starved: bool = False) -> None:
        now = time.monotonic() if now is None else now
        # After the event loop was starved (this check ran late), unread batches may be the
        # heartbeats of the very workers that look silent: judge nobody until the token
        # loop has caught up, but defer at most dead_after_s, so a loop that stays busy
        # cannot hide a dead worker. (Peeking at the socket's ZMQ_EVENTS instead would
        # steal the edge-triggered wake-up of the asyncio reader.)
        if starved:
            self._starved_since = self._starved_since or now
        else:
            self._starved_since = None
        defer = self._starved_since is not None and now - self._starved_since < self.cfg.dead_after_s
        # One worker silent while others are heard is conclusive. Every worker silent at once
        # points at this side (the token socket, this process) as much as at the workers:
        # wait three times as long, so a real loss is still handled (Ray-reported deaths
        # reach worker_lost through the supervisor within seconds anyway).
        limit = self.cfg.dead_after_s
        silent = now - self._last_batch_at if self._last_batch_at is not None else 0.0
        if silent > limit and self.decode:
            # (Not while this loop was starved: the batches are likely waiting unread.)
            if not self._plane_silent_logged and not defer:
                log.error("router: no token batch from any decode worker for %.1fs", silent)
                self._plane_silent_logged = True
            limit *= 3
        else:
            self._plane_silent_logged = False
        for w in list(self.decode.values()) if not defer else []:
            if now - w.last_seen > limit:
                await self.worker_lost(w.worker_id, f"no heartbeat for {now - w.last_seen:.1f}s; last token batch "
                                                    f"from any worker {silent:.1f}s ago")
        for h in [h for h in self.requests.values() if h.deadline is not None and h.deadline <= now]:
            dw = self.decode.get(h.decode_worker)
            if dw is not None:
                await self._send_abort(dw, h.rid)
            self.counters["deadline_exceeded"] += 1
            self._fail(h, "deadline_exceeded", "deadline exceeded")

    async def _token_loop(self) -> None:
        # Wait with a timeout, then read what is there without blocking: a ZeroMQ socket's
        # wake-up is edge-triggered, and a lost edge would leave a blocking recv deaf while
        # batches pile up (every worker would then look silent and be declared lost). Here
        # a lost edge costs at most TOKEN_POLL_MS.
        while True:
            await self.token_sock.poll(TOKEN_POLL_MS, zmq.POLLIN)
            for _ in range(messages.MAX_ITEMS):   # then yield to the rest of the loop
                try:
                    buf = await self.token_sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._last_batch_at = time.monotonic()
                self._on_token_message(buf)

    def _on_token_message(self, buf: bytes) -> None:
        try:
            batch = messages.decode_tokens(buf)
        except messages.PlaneError as e:
            self.bad_messages += 1
            log.warning("router: dropped a malformed token batch: %s", e)
            return
        except Exception:   # a decoder bug: same treatment, but loud
            self.bad_messages += 1
            log.exception("router: decoding a token batch failed")
            return
        try:
            self.handle_batch(batch)
        except Exception:   # one bad batch must not end the loop (every worker would look dead)
            self.bad_messages += 1
            log.exception("router: handling a token batch from %r failed", batch.worker)

    def handle_batch(self, batch: messages.TokenBatch) -> None:
        w = self.decode.get(batch.worker)
        if w is None:
            # Heartbeats can arrive before a new worker is registered (or after it left).
            log.debug("router: token batch from unknown worker %r dropped", batch.worker)
            return
        endpoint = batch.load.get("endpoint") if isinstance(batch.load, dict) else None
        if endpoint is not None and endpoint != w.request_endpoint:
            # Another incarnation under the same id (Ray restarted it; the supervisor has not
            # re-registered it yet): it holds none of our requests and is not the worker
            # whose liveness the heartbeat would vouch for.
            self.counters["stale_batches"] += 1
            return
        w.last_seen = time.monotonic()
        w.load = batch.load
        if batch.kv_events:
            self.index.apply(batch.worker, batch.kv_events)
        for item in batch.items:
            h = self.requests.get(item.rid)
            if h is None or h.decode_worker != batch.worker:
                continue  # aborted by the client, or moved away from this worker: late tokens are dropped
            self._prefill_done(h)
            self._deliver(h, item)

    def _deliver(self, h: RequestHandle, item: messages.TokenItem) -> None:
        if item.token_ids:
            self._prompt_done(h)
        if h.redispatches and item.finish_reason is not None and item.error is None:
            # The worker counted the streamed tokens as prompt; report usage as the client sees it.
            item.prompt_tokens = h.prompt_len
            item.cached_tokens = min(item.cached_tokens, h.prompt_len)
            item.completion_tokens += h.resume_offset
            item.fallback = item.fallback or "redispatched"
        h.emitted.extend(item.token_ids)
        h.queue.put_nowait(item)
        if self.trace is not None and item.finish_reason in ("stop", "length") and item.error is None:
            self.trace.record(h.sent_at, h.prompt_len, item.cached_tokens, item.completion_tokens)
        if item.finish_reason is not None or item.error is not None:
            self._finish(h)

    # ---- introspection ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return dict(inflight=len(self.requests), decisions={f"{k}:{r}": n for (k, r), n in self.decisions.items()},
                    decode={w.worker_id: dict(inflight=len(w.inflight), load=w.load) for w in self.decode.values()},
                    prefill={w.worker_id: dict(inflight=len(w.inflight), queued_tokens=w.queued_tokens)
                             for w in self.prefill.values()},
                    bad_messages=self.bad_messages, queued_prefill_tokens=self.queued_prefill_tokens,
                    **self.counters)
