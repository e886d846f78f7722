"""The router's state: worker registry, prefix index, routing decisions, and the token
plane that feeds per-request queues. asyncio + zmq.asyncio; no gRPC in here."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from engine.block_manager import hash_prefix_blocks
from engine.sampling_params import SamplingParams
from router import planes
from router.policy import Decision, PolicyConfig, WorkerLoad, decide
from router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)


@dataclass
class RouterConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    block_size: int = 16
    kv_timeout_s: float = 30.0
    bind_host: str = "127.0.0.1"


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


@dataclass
class RequestHandle:
    rid: str
    decision: Decision
    prompt_len: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    prefill_pending: int = 0       # tokens counted against the prefill worker until the first token
    done: bool = False


class Router:
    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.ctx = zmq.asyncio.Context()
        self.token_sock = self.ctx.socket(zmq.PULL)
        self.token_sock.setsockopt(zmq.MAXMSGSIZE, planes.MAX_MESSAGE_BYTES)
        port = self.token_sock.bind_to_random_port(f"tcp://{cfg.bind_host}")
        self.token_endpoint = f"tcp://{cfg.bind_host}:{port}"
        self.decode: dict[str, Worker] = {}
        self.prefill: dict[str, Worker] = {}
        self.index = PrefixIndex()
        self.requests: dict[str, RequestHandle] = {}
        self.decisions: dict[tuple[str, str], int] = {}   # (kind, reason) -> count, for metrics
        self.bad_messages = 0
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._token_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for w in list(self.decode.values()) + list(self.prefill.values()):
            w.sock.close(linger=0)
        self.token_sock.close(linger=0)
        self.ctx.term()

    def add_worker(self, kind: str, worker_id: str, request_endpoint: str) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(request_endpoint)
        pool = self.decode if kind == "decode" else self.prefill
        pool[worker_id] = Worker(worker_id, kind, request_endpoint, sock)
        log.info("router: %s worker %s joined at %s", kind, worker_id, request_endpoint)

    def remove_worker(self, worker_id: str) -> None:
        w = self.decode.pop(worker_id, None) or self.prefill.pop(worker_id, None)
        if w is not None:
            w.sock.close(linger=0)
            self.index.forget(worker_id)

    # ---- routing -------------------------------------------------------------------------------------
    def route(self, prompt_ids: list[int], cache_salt: bytes = b"") -> Decision:
        hashes = hash_prefix_blocks(prompt_ids, self.cfg.block_size, cache_salt)
        decode = [WorkerLoad(w.worker_id, inflight=len(w.inflight), overlap_blocks=self.index.overlap(w.worker_id, hashes))
                  for w in self.decode.values()]
        prefill = [WorkerLoad(w.worker_id, inflight=len(w.inflight), queued_tokens=w.queued_tokens)
                   for w in self.prefill.values()]
        return decide(len(prompt_ids), self.cfg.block_size, decode, prefill, self.cfg.policy)

    def new_request_id(self) -> str:
        return f"req-{time.time_ns():x}-{next(self._ids)}"

    async def submit(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                     cache_salt: bytes = b"") -> RequestHandle:
        """Route and dispatch. Raises LookupError when no decode worker exists, KeyError
        when the request id is already in flight."""
        if rid in self.requests:
            raise KeyError(rid)
        d = self.route(prompt_ids, cache_salt)
        h = RequestHandle(rid, d, len(prompt_ids))
        dw = self.decode[d.decode_worker]
        msg = planes.GenerateMsg(rid, prompt_ids, params, mode="direct", cache_salt=cache_salt,
                                 kv_timeout_s=self.cfg.kv_timeout_s)
        if d.kind == "disaggregated":
            pw = self.prefill[d.prefill_worker]
            msg.mode, msg.prefill_endpoint, msg.prefill_worker = "disagg", pw.request_endpoint, pw.worker_id
            h.prefill_pending = d.uncached_tokens
            pw.queued_tokens += d.uncached_tokens
            pw.inflight.add(rid)
        self.requests[rid] = h
        dw.inflight.add(rid)
        key = (d.kind, d.reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        await dw.sock.send(msg.encode())
        return h

    async def abort(self, rid: str) -> None:
        """Client went away (cancel or deadline): stop the request on every worker."""
        h = self.requests.get(rid)
        if h is None or h.done:
            return
        dw = self.decode.get(h.decision.decode_worker)
        if dw is not None:
            await dw.sock.send(planes.encode_abort(rid))
        self._finish(h)

    def _finish(self, h: RequestHandle) -> None:
        h.done = True
        self.requests.pop(h.rid, None)
        dw = self.decode.get(h.decision.decode_worker)
        if dw is not None:
            dw.inflight.discard(h.rid)
        self._prefill_done(h)

    def _prefill_done(self, h: RequestHandle) -> None:
        if h.decision.prefill_worker and h.prefill_pending:
            pw = self.prefill.get(h.decision.prefill_worker)
            if pw is not None:
                pw.queued_tokens -= h.prefill_pending
                pw.inflight.discard(h.rid)
            h.prefill_pending = 0

    # ---- token plane ----------------------------------------------------------------------------------
    async def _token_loop(self) -> None:
        while True:
            buf = await self.token_sock.recv()
            try:
                batch = planes.decode_tokens(buf)
            except planes.PlaneError as e:
                self.bad_messages += 1
                log.warning("router: dropped a malformed token batch: %s", e)
                continue
            self.handle_batch(batch)

    def handle_batch(self, batch: planes.TokenBatch) -> None:
        w = self.decode.get(batch.worker)
        if w is None:
            # Heartbeats can arrive before a new worker is registered (or after it left).
            log.debug("router: token batch from unknown worker %r dropped", batch.worker)
            return
        w.last_seen = time.monotonic()
        w.load = batch.load
        if batch.kv_events:
            self.index.apply(batch.worker, batch.kv_events)
        for item in batch.items:
            h = self.requests.get(item.rid)
            if h is None:
                continue  # aborted by the client: late tokens are dropped
            self._prefill_done(h)
            h.queue.put_nowait(item)
            if item.finish_reason is not None or item.error is not None:
                self._finish(h)

    # ---- introspection ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return dict(inflight=len(self.requests), decisions={f"{k}:{r}": n for (k, r), n in self.decisions.items()},
                    decode={w.worker_id: dict(inflight=len(w.inflight), load=w.load) for w in self.decode.values()},
                    prefill={w.worker_id: dict(inflight=len(w.inflight), queued_tokens=w.queued_tokens)
                             for w in self.prefill.values()},
                    bad_messages=self.bad_messages)
