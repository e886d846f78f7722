"""Discrete-event simulation of a pdserve cluster on a request stream: the router, decode
workers (colocated engines when there is no prefill pool) and prefill workers, on a
simulated clock (a heap of timed events; nothing sleeps).

What each part does, as the code it stands for does it:

  router     decides per request with router.policy.decide (imported and looked up at
             call time, not copied), from WorkerLoad values kept as router/core.py keeps
             them: a decode worker's in-flight requests (from dispatch to its last token),
             a prefill worker's queued tokens (the uncached prompt tokens dispatched to it,
             until the request's first token reaches the router), and the decode worker's
             cached leading blocks of the prompt (its prefix cache, read directly: the real
             router learns it from KV events a batch later). Admission control as
             Router.submit: in-flight cap per decode worker, queued-prefill-token budget;
             a refused request fails (bench counts it as not ok).
  decode     DecodeWorker.run_once in a loop: take the requests that arrived, then the KV
             transfers that landed, run one engine step (engine_model.EngineModel, priced by
             the cost model), send one token batch at its end. An idle worker wakes at
             once on a request or a landed transfer; a busy one sees them when its step
             ends. A disaggregated request reserves its blocks and is forwarded to its
             prefill worker when the decode worker takes it in (a worker in a long step
             forwards it late, as the real one does); with no blocks free it is prefilled in
             place (fallback "no_free_blocks"). A landed prompt joins the batch with the
             prefill worker's first token, which goes out with the batch of the next step.
  prefill    PrefillWorker.run_once: prefill-only sequences through the same engine model;
             after the step that computes a prompt's last chunk the loop spends
             cost.prefill_serial_s on each such prompt, one after another (that much of the
             disaggregated path is taken off the request's latency: the deployed probe's
             bursts measure it), and as each prompt's turn ends its KV transfer starts,
             landing cost.transfer_time(tokens shipped) later (the blocks past the decode
             worker's cached prefix).
  overheads  as the profile measures them (planner/overhead_probe.py): a request reaches its
             decode worker cost.router_direct_s or cost.router_disaggregated_s after it is
             sent (the router path's whole per-request cost: front end, routing, dispatch,
             hops, the first token's way back), and a token batch reaches the client when
             the worker sends it. cost.per_token_stream_s is the decode worker loop's own
             work per iteration (the token batch, polling for requests and KV): after each
             step the worker is busy that much longer before its next step (on a CPU host
             as work on the shared cores, see devices), so it adds to every gap between a
             request's tokens (TPOT), as measured; cost.per_stream_s
             more for each further request in the batch it sent (measured with concurrent
             streams: what more streams cost beyond the engine's batching and the front
             end's share of the cores). The path of each request also gets its share of
             the scatter lone requests measured about those medians (cost.path_jitter_s,
             per route; none without it).

  devices   engines placed on one device (ClusterConfig.layout) slow each other while they
             compute at the same time: processor sharing of their steps' device work
             (planner/shared_device.py); alone, a step takes CostModel.step_time.
  overlap    a decode worker whose profiled engine scheduled overlapped (engine/overlap.py)
             launches step n+1 before it hands out step n's tokens: they leave when step n's
             device work and step n+1's launches are done (_OverlappedDecodeWorker).

The records are bench's (deploy/bench.py `_result`): TTFT is the client's first token-bearing
message minus the send time, E2E the last, TPOT (E2E - TTFT) / (tokens - 1), ITL the gaps
between messages; `deploy.bench.summarise` turns them into the same summary a measured run
gets (percentiles, goodput under the SLOs).
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from planner.engine_model import EngineModel, SimSeq
from planner.shared_device import DeviceLayout, SharedDevice
from planner.workload import Request
from router import policy as router_policy

MODES = ("colocated", "disaggregated", "conditional")
_INV_GOLDEN = 0.6180339887498949


@dataclass
class ClusterConfig:
    """One deployment: `decode` decode workers (colocated engines when prefill == 0) and
    `prefill` prefill workers; the router's threshold and bounds (RouterConfig defaults)."""
    mode: str = "colocated"
    decode: int = 1
    prefill: int = 0
    threshold: int = 256
    max_prefill_queue_tokens: int = 65536
    load_penalty_tokens: int = 16
    max_inflight_per_decode: int = 256
    max_queued_prefill_tokens: int = 1 << 20
    layout: DeviceLayout = field(default_factory=DeviceLayout)   # engines per device (shared_device.py)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.decode < 1 or self.prefill < 0 or (self.mode != "colocated" and self.prefill < 1):
            raise ValueError(f"{self.name}: needs >= 1 decode worker, and >= 1 prefill worker unless colocated")
        if self.mode == "colocated":
            self.prefill = 0
        if self.mode == "disaggregated":
            self.threshold = 0     # every uncached prompt goes remote (bench's "disagg" mode)

    @property
    def gpus(self) -> int:
        """Devices the engines occupy (GPUs, or hosts for a CPU layout)."""
        return -(-(self.decode + self.prefill) // self.layout.engines_per_device)

    @property
    def name(self) -> str:
        if self.mode == "colocated":
            return f"colocated x{self.decode}"
        if self.mode == "disaggregated":
            return f"{self.prefill}P{self.decode}D"
        return f"{self.prefill}P{self.decode}D t={self.threshold}"

    def policy(self) -> router_policy.PolicyConfig:
        return router_policy.PolicyConfig(disagg_threshold=self.threshold,
                                          max_prefill_queue_tokens=self.max_prefill_queue_tokens,
                                          load_penalty_tokens=self.load_penalty_tokens)


@dataclass
class _ReqState:
    req: Request
    rid: int
    route: str = "direct"
    decode_worker: str = ""
    prefill_worker: str | None = None
    uncached: int = 0                    # counted against the router's prefill budget until the first token
    prefill_pending: int = 0             # counted against its prefill worker until the first token
    stamps: list[tuple[float, int]] = field(default_factory=list)   # (client time, tokens) per message
    error: str | None = None
    fallback: str | None = None          # disaggregated but prefilled in place (no free blocks)


class _Worker:
    """A worker's loop: requests and landed transfers wait in inboxes until its next
    iteration; an iteration runs one engine step (synchronously: its results are known when
    it ends). `device`: the SharedDevice it shares with other engines, or None (alone)."""

    def __init__(self, sim: Simulation, worker_id: str, device: SharedDevice | None = None):
        self.sim, self.worker_id, self.device = sim, worker_id, device
        c = sim.cost
        self.engine = EngineModel(block_size=c.block_size, max_num_batched_tokens=c.max_num_batched_tokens,
                                  max_num_seqs=c.max_num_seqs, num_kv_blocks=c.num_kv_blocks,
                                  enable_chunked_prefill=getattr(c, "enable_chunked_prefill", True),
                                  enable_prefix_caching=getattr(c, "enable_prefix_caching", True))
        self.inbox: list = []
        self.busy = False
        self.busy_s = 0.0
        self.steps = 0

    def wake(self) -> None:
        if not self.busy:
            self.iterate()

    def iterate(self) -> None:
        self.take_inbox()
        scheduled = self.engine.schedule() if self.engine.has_work() else []
        if not scheduled:
            self.idle()
            return
        self.busy = True
        self.steps += 1
        t0 = self.sim.now

        def ended():
            self.busy_s += self.sim.now - t0
            self.step_end(scheduled)
        self.run_step(scheduled, ended)

    def run_step(self, scheduled, on_done, device_free=None) -> float:
        """Price a step and run it from now; on_done() when its results are ready. The step is
        (serial, host, device) seconds (CostModel.step_parts): serial host work first, then
        the launches (host) with the device work beside them, shared with the engines on the
        same device (planner/shared_device.py); the results are ready when both are done,
        serial + max(host, device) after the start for an engine alone. device_free(cb), if
        given, calls cb once the engine's previous step is off the device (one stream: its
        kernels run in order). Returns the time its launches end."""
        serial, host, device = self.sim.step_parts(*EngineModel.step_shape(scheduled))
        sim = self.sim
        host_end = sim.now + serial + host

        def device_done():
            if sim.now >= host_end:
                on_done()
            else:
                sim.at(host_end, on_done)

        def start_device():
            if self.device is None:
                sim.at(sim.now + device, device_done)
            else:
                self.device.run(device, device_done)
        def after_serial():
            if device_free is None:
                start_device()
            else:
                device_free(start_device)
        if serial > 0:
            sim.at(sim.now + serial, after_serial)
        else:
            after_serial()
        return host_end

    loop_overhead_s = 0.0                 # the loop's own work after a step, before the next

    def step_end(self, scheduled) -> None:
        self.finish_step(scheduled)
        self.after_loop()

    def loop_overhead(self) -> float:
        return self.loop_overhead_s

    def after_loop(self) -> None:
        self.loop_work(self.loop_overhead(), self.resume)

    def loop_work(self, seconds: float, then) -> None:
        """The loop's own work (sending the batch, polling), then `then()`."""
        if seconds <= 0:
            then()
        elif self.device is not None and self.sim.cfg.layout.on_cpu_host:
            # On a CPU host it computes on the same cores as the engines and the front end,
            # so it takes its share of them.
            self.device.run(seconds, then)
        else:
            self.sim.at(self.sim.now + seconds, then)

    def resume(self) -> None:
        self.busy = False
        self.iterate()

    def _seq(self, st: _ReqState, prefill_only: bool = False) -> SimSeq:
        r, bs = st.req, self.engine.bs
        return SimSeq(st.rid, r.prompt_tokens, 1 if prefill_only else r.output_tokens, prefill_only=prefill_only,
                      prefix_key=r.prefix_key, prefix_blocks=min(r.prefix_tokens, r.prompt_tokens) // bs,
                      fixed_hit_blocks=r.cached_tokens // bs)


class _DecodeWorker(_Worker):
    def __init__(self, sim, worker_id, device=None):
        super().__init__(sim, worker_id, device)
        self.loop_overhead_s = sim.cost.per_token_stream_s
        self.per_stream_s = getattr(sim.cost, "per_stream_s", 0.0)
        self.per_stream_upto = getattr(sim.cost, "per_stream_upto", 0)
        self.last_batch = 0                  # requests in the batch the loop sent last
        self.landed: list[int] = []
        self.items: list[tuple[int, int, bool]] = []   # (rid, tokens, finished) for the next batch

    def take_inbox(self) -> None:
        inbox, self.inbox = self.inbox, []
        for st in inbox:
            if st.route == "disaggregated":
                seq = self._seq(st)
                if self.engine.reserve_for_remote(seq):
                    # The blocks past its cached prefix are the ones the prefill worker ships.
                    first_block = seq.computed // self.engine.bs
                    self.sim.prefill_workers[st.prefill_worker].submit(st, self.worker_id, first_block)
                    continue
                st.fallback = "no_free_blocks"
            self.engine.add(self._seq(st))
        landed, self.landed = self.landed, []
        for rid in landed:
            seq = self.engine.remote_kv_landed(rid)
            self.items.append((rid, 1, seq.status == "finished"))

    def idle(self) -> None:
        if self.items:          # (a landed prompt that needs no decode step: max_tokens 1)
            self.send_batch()

    def finish_step(self, scheduled) -> None:
        sampled, finished = self.engine.step_done(scheduled)
        done = {s.rid for s in finished}
        self.items += [(s.rid, 1, s.rid in done) for s in sampled]
        self.send_batch()

    def loop_overhead(self) -> float:
        # Each further request in the batch costs the loop and the path behind it more
        # (cost.per_stream_s: the deployed probe's concurrent streams).
        n = min(self.last_batch, self.per_stream_upto) if self.per_stream_upto else self.last_batch
        return self.loop_overhead_s + self.per_stream_s * max(0, n - 1)

    def send_batch(self) -> None:
        items, self.items = self.items, []
        # Requests, not items: a landed prompt's first token and its next one can share a batch.
        self.last_batch = len({rid for rid, _, _ in items})
        self.sim.token_batch(self.worker_id, items)

    def kv_landed(self, rid: int) -> None:
        self.landed.append(rid)
        self.wake()


class _Launched:
    """A step launched by an overlapped engine: its results are on the device until `ready`."""
    __slots__ = ("items", "ready", "_waiting")

    def __init__(self, items):
        self.items, self.ready, self._waiting = items, False, []

    def set_ready(self) -> None:
        self.ready = True
        waiting, self._waiting = self._waiting, []
        for cb in waiting:
            cb()

    def when_ready(self, cb) -> None:
        if self.ready:
            cb()
        else:
            self._waiting.append(cb)


class _OverlappedDecodeWorker(_DecodeWorker):
    """A decode worker whose engine schedules overlapped (engine/overlap.py, the default on
    CUDA): each engine.step() call schedules and launches step n+1, then waits for step n
    and returns its tokens, which the worker sends. So step n's tokens leave when step n's
    device work is done and step n+1's launches are (an eager prefill chunk's launches can
    hold back the tokens of the decode step before it), and new requests are taken in while
    step n still runs. The engine's bookkeeping advances at launch (placeholder tokens), so
    what it schedules is what a synchronous engine would."""

    def __init__(self, sim, worker_id, device=None):
        super().__init__(sim, worker_id, device)
        self.launched: _Launched | None = None

    def iterate(self) -> None:
        self.take_inbox()
        scheduled = self.engine.schedule() if self.engine.has_work() else []
        prev = self.launched
        if not scheduled and prev is None:
            self.idle()
            return
        self.busy = True
        sim, t0 = self.sim, self.sim.now
        waiting = {"launch": bool(scheduled), "prev": prev is not None}
        new = None

        def done(what):
            waiting[what] = False
            if not any(waiting.values()):
                self.busy_s += sim.now - t0
                self.launched = new
                if prev is not None:
                    self.items += prev.items
                self.send_batch()
                self.after_loop()
        if scheduled:
            self.steps += 1
            sampled, finished = self.engine.step_done(scheduled)
            ids = {s.rid for s in finished}
            new = _Launched([(s.rid, 1, s.rid in ids) for s in sampled])
            host_end = self.run_step(scheduled, new.set_ready, prev.when_ready if prev is not None else None)
            sim.at(host_end, done, "launch")
        if prev is not None:
            prev.when_ready(lambda: done("prev"))


class _PrefillWorker(_Worker):
    def __init__(self, sim, worker_id, device=None):
        super().__init__(sim, worker_id, device)
        self.jobs: dict[int, tuple[str, int]] = {}    # rid -> (decode worker, first block to ship)
        self.serial_s = getattr(sim.cost, "prefill_serial_s", 0.0)
        self.finished: list[SimSeq] = []      # prompts of the last step, shipped once the loop is through

    def submit(self, st: _ReqState, decode_worker: str, first_block: int) -> None:
        self.jobs[st.rid] = (decode_worker, first_block)
        self.inbox.append(st)
        self.wake()

    def take_inbox(self) -> None:
        inbox, self.inbox = self.inbox, []
        for st in inbox:
            self.engine.add(self._seq(st, prefill_only=True))

    def idle(self) -> None:
        pass

    def finish_step(self, scheduled) -> None:
        self.finished = self.engine.step_done(scheduled)[1]

    def after_loop(self) -> None:
        # What the loop does per prompt after its step (cost.prefill_serial_s), one prompt
        # after another, each shipped when its turn is through: a burst's later prompts wait
        # for the earlier ones', where a lone prompt sees it as latency.
        finished, self.finished = self.finished, []
        if self.serial_s <= 0:
            for seq in finished:
                self._ship(seq)
            self.resume()
            return
        queue = iter(finished)

        def turn() -> None:   # each turn is a later event (loop_work of > 0 s): no recursion
            seq = next(queue, None)
            if seq is None:
                self.resume()
                return
            self.loop_work(self.serial_s, lambda: (self._ship(seq), turn()))
        turn()

    def _ship(self, seq: SimSeq) -> None:
        """Start the transfer of a computed prompt's KV to its decode worker."""
        dw, first_block = self.jobs.pop(seq.rid)
        shipped = seq.prompt - first_block * self.engine.bs
        self.sim.at(self.sim.now + self.sim.cost.transfer_time(shipped), self.sim.decode_workers[dw].kv_landed,
                    seq.rid)


class Simulation:
    """One run: `Simulation(cost, cfg, requests).run()` -> bench-style records."""

    def __init__(self, cost, cfg: ClusterConfig, reqs: list[Request]):
        self.cost, self.cfg, self.reqs = cost, cfg, reqs
        # (serial, host, device) of a step; a cost model with only step_time is all device work.
        self.step_parts = getattr(cost, "step_parts", None) or (lambda ch, ctx: (0.0, 0.0, cost.step_time(ch, ctx)))
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()
        # Engines fill devices in order, decode workers first (shared_device.DeviceLayout).
        lay = cfg.layout
        self.devices = [SharedDevice(self, lay.capacity, lay.weight) for _ in range(cfg.gpus)] if lay.shared else []
        slots = iter(range(cfg.decode + cfg.prefill))
        device = lambda: self.devices[next(slots) // lay.engines_per_device] if self.devices else None  # noqa: E731
        # A decode worker's engine steps overlapped when the profiled one did (engine/overlap.py);
        # a prefill worker's always synchronously (its per-layer KV callback).
        decode_cls = _OverlappedDecodeWorker if getattr(cost, "overlapped_scheduling", False) else _DecodeWorker
        self.decode_workers = {f"decode-{i}": decode_cls(self, f"decode-{i}", device()) for i in range(cfg.decode)}
        self.prefill_workers = {f"prefill-{i}": _PrefillWorker(self, f"prefill-{i}", device())
                                for i in range(cfg.prefill)}
        self.policy = cfg.policy()
        # The router's books (router/core.py: Worker.inflight, Worker.queued_tokens,
        # Router.queued_prefill_tokens).
        self.inflight = {w: 0 for w in self.decode_workers}
        self.prefill_queued = {w: 0 for w in self.prefill_workers}
        self.prefill_inflight = {w: 0 for w in self.prefill_workers}
        self.queued_prefill_tokens = 0
        self.states: list[_ReqState] = []
        self.decisions: dict[str, int] = {}
        # Where each request's path falls in the probe's scatter (CostModel.path_jitter_s):
        # request i at quantile frac(0.5 + i / golden ratio), an evenly spread, fixed sequence
        # (no random state: a run's figures stay a function of its requests).
        self.jitter_u = [(0.5 + i * _INV_GOLDEN) % 1.0 for i in range(len(reqs))]

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn, args))

    def run(self) -> list[dict]:
        for i, r in enumerate(self.reqs):
            st = _ReqState(r, i)
            self.states.append(st)
            self.at(r.arrival_s, self.arrive, st)
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)
        return [self.record(st) for st in self.states]

    # ---- router ---------------------------------------------------------------------------------
    def overlap_blocks(self, worker: _DecodeWorker, r: Request) -> int:
        """The router's prefix-index overlap: the prompt's leading blocks the worker caches."""
        bs = worker.engine.bs
        hit = r.cached_tokens // bs
        if r.prefix_key is not None:
            e = worker.engine.entries.get(r.prefix_key)
            if e is not None:
                hit = max(hit, min(e.resident, min(r.prefix_tokens, r.prompt_tokens) // bs))
        return hit

    def arrive(self, st: _ReqState) -> None:
        r, cap = st.req, self.cfg.max_inflight_per_decode
        decode = [router_policy.WorkerLoad(w, inflight=self.inflight[w],
                                           overlap_blocks=self.overlap_blocks(dw, r))
                  for w, dw in self.decode_workers.items() if self.inflight[w] < cap]
        if not decode:
            st.error = "overloaded"
            return
        prefill = [router_policy.WorkerLoad(w, inflight=self.prefill_inflight[w], queued_tokens=self.prefill_queued[w])
                   for w in self.prefill_workers]
        d = router_policy.decide(r.prompt_tokens, self.cost.block_size, decode, prefill, self.policy)
        budget = self.cfg.max_queued_prefill_tokens
        if self.queued_prefill_tokens and self.queued_prefill_tokens + d.uncached_tokens > budget:
            st.error = "overloaded"
            return
        key = f"{d.kind}:{d.reason}"
        self.decisions[key] = self.decisions.get(key, 0) + 1
        st.route, st.decode_worker, st.uncached = d.kind, d.decode_worker, d.uncached_tokens
        self.queued_prefill_tokens += d.uncached_tokens
        self.inflight[d.decode_worker] += 1
        # The request path: front end and router (the profile's overheads; a prompt's
        # tokens add their parsing, hashing and messages).
        path = self.cost.request_path_s(r.prompt_tokens, d.uncached_tokens)
        self.frontend_cpu(getattr(self.cost, "frontend_cpu_per_request_s", 0.0)
                          + getattr(self.cost, "frontend_cpu_per_prompt_token_s", 0.0) * r.prompt_tokens)
        overhead = self.cost.router_direct_s + path
        if d.kind == "disaggregated":
            st.prefill_worker, st.prefill_pending = d.prefill_worker, d.uncached_tokens
            self.prefill_queued[d.prefill_worker] += d.uncached_tokens
            self.prefill_inflight[d.prefill_worker] += 1
            overhead = self.cost.router_disaggregated_s + path
        jitter = getattr(self.cost, "path_jitter_s", None)
        if jitter is not None:
            overhead = max(0.0, overhead + jitter(d.kind, self.jitter_u[st.rid]))
        if d.kind == "disaggregated":
            # Less the part the prefill worker's loop serves after the step (_PrefillWorker):
            # the whole path, its draw included, stays what a lone request pays. A request
            # that then falls back to in-place prefill (no free blocks) never pays that part.
            overhead = max(0.0, overhead - getattr(self.cost, "prefill_serial_s", 0.0))
        self.at(self.now + overhead, self.dispatch, st)

    def dispatch(self, st: _ReqState) -> None:
        dw = self.decode_workers[st.decode_worker]
        dw.inbox.append(st)
        dw.wake()

    def frontend_cpu(self, seconds: float) -> None:
        """The front end's CPU work, on the host's cores when it shares them with the engines."""
        if seconds > 0 and self.devices and self.cfg.layout.frontend_on_device:
            self.devices[0].add_background(seconds)

    def token_batch(self, worker_id: str, items: list[tuple[int, int, bool]]) -> None:
        """A decode worker's batch reaches the router and the client now."""
        t = self.now
        self.frontend_cpu(getattr(self.cost, "frontend_cpu_per_token_s", 0.0) * sum(n for _, n, _ in items))
        for rid, n, finished in items:
            st = self.states[rid]
            if st.prefill_pending:         # Router._prefill_done: the first token is back
                self.prefill_queued[st.prefill_worker] -= st.prefill_pending
                self.prefill_inflight[st.prefill_worker] -= 1
                st.prefill_pending = 0
            if st.uncached:                # Router._prompt_done
                self.queued_prefill_tokens -= st.uncached
                st.uncached = 0
            if st.stamps and st.stamps[-1][0] == t:
                st.stamps[-1] = (t, st.stamps[-1][1] + n)   # one message per batch and request
            else:
                st.stamps.append((t, n))
            if finished:
                self.inflight[worker_id] -= 1

    # ---- results ------------------------------------------------------------------------------------
    def record(self, st: _ReqState) -> dict:
        """bench's per-request record (deploy/bench.py _result), on the simulated clock."""
        sent = st.req.arrival_s
        if st.error is not None or not st.stamps:
            return dict(ok=False, error=st.error or "no tokens", sent=sent)
        stamps = st.stamps
        ttft, e2e = stamps[0][0] - sent, stamps[-1][0] - sent
        tokens = sum(n for _, n in stamps)
        return dict(ok=True, sent=sent, done=stamps[-1][0], ttft=ttft, e2e=e2e, tokens=tokens,
                    tpot=(e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0, route=st.route,
                    itl=[b[0] - a[0] for a, b in zip(stamps, stamps[1:])], expected=st.req.output_tokens,
                    decode_worker=st.decode_worker or None)

    def utilisation(self) -> dict[str, float]:
        """Each worker's share of the run spent in engine steps (a loop's own work, e.g. a
        prefill worker's prefill_serial_s, is not counted)."""
        span = max(self.now, 1e-12)
        return {w.worker_id: w.busy_s / span for w in [*self.decode_workers.values(), *self.prefill_workers.values()]}


def simulate(cost, cfg: ClusterConfig, reqs: list[Request]) -> tuple[list[dict], Simulation]:
    sim = Simulation(cost, cfg, reqs)
    return sim.run(), sim
