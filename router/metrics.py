"""The router's metrics: Prometheus exposition, and the load report the autoscaling
controller reads.

Two kinds of numbers:
  * measured per request in the gRPC handler (TTFT, TPOT): histograms for Prometheus plus
    a short sliding window of samples whose p90 feeds the autoscaling policy;
  * the router's live state (pool sizes, queues, decode workers' heartbeat load, routing
    decision counts): read at scrape time by a custom collector, so the hot path keeps no
    extra gauges in sync.

Every RouterMetrics has its own CollectorRegistry (a process may hold several routers,
as the tests do); `serve_http` exposes it on its own port.
"""
from __future__ import annotations

import collections
import logging
import math
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_WINDOW_SAMPLES = 4096          # bounded memory whatever the request rate



def _real(load: dict, key: str) -> float:
    """A worker's load field as a non-negative finite number; anything else (the token
    plane admits any scalar) counts as 0 rather than breaking a scrape or the autoscaler's
    report."""
    v = load.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return 0.0
    return float(v)


def _num(load: dict, key: str) -> int:
    """A worker's load field as a non-negative int (see _real)."""
    return int(_real(load, key))

class LatencyWindow:
    """Samples of the last `window_s` seconds (at most MAX_WINDOW_SAMPLES); p90 on demand."""

    def __init__(self, window_s: float, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=MAX_WINDOW_SAMPLES)

    def add(self, value: float) -> None:
        self._samples.append((self.clock(), value))

    def quantile(self, q: float = 0.9) -> float | None:
        cutoff = self.clock() - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        if not self._samples:
            return None
        vals = sorted(v for _, v in self._samples)
        return vals[min(len(vals) - 1, int(q * len(vals)))]


class RequestTimer:
    """One request's clock: TTFT at its first token, TPOT (mean inter-token time after the
    first) when it finishes."""

    def __init__(self, metrics: "RouterMetrics", route: str):
        self.m, self.route = metrics, route
        self.t0 = time.monotonic()
        self.t_first: float | None = None
        self.tokens = 0

    def on_tokens(self, n: int, finished: bool) -> None:
        now = time.monotonic()
        if n and self.t_first is None:
            self.t_first = now
            self.m.observe_ttft(self.route, now - self.t0)
        self.tokens += n
        if finished and self.t_first is not None and self.tokens > 1:
            self.m.observe_tpot((now - self.t_first) / (self.tokens - 1))


class RouterMetrics:
    """`router`: the Router, or a callable returning the current one (a restarted router
    replaces the object; the metrics follow it)."""

    def __init__(self, router, window_s: float = 20.0):
        self._router = router if callable(router) else (lambda: router)
        self.registry = CollectorRegistry()
        self.ttft = Histogram("pdserve_ttft_seconds", "Time to first token, by route", ["route"],
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("pdserve_tpot_seconds", "Mean time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft_window = {"direct": LatencyWindow(window_s), "disaggregated": LatencyWindow(window_s)}
        self.tpot_window = LatencyWindow(window_s)
        self.registry.register(_RouterStateCollector(self._router))
        self._http = None

    @property
    def router(self):
        return self._router()

    # ---- per request (called from the gRPC handler) -----------------------------------------
    def timer(self, route: str) -> RequestTimer:
        return RequestTimer(self, route)

    def observe_ttft(self, route: str, seconds: float) -> None:
        self.ttft.labels(route).observe(seconds)
        self.ttft_window.setdefault(route, LatencyWindow(self.tpot_window.window_s)).add(seconds)

    def observe_tpot(self, seconds: float) -> None:
        self.tpot.observe(seconds)
        self.tpot_window.add(seconds)

    # ---- for the autoscaling controller ---------------------------------------------------------
    def load_report(self) -> dict:
        """The router's view of both pools, as plain data (crosses a Ray call to the controller)."""
        r = self.router
        decode = {}
        for w in list(r.decode.values()):
            ld = w.load or {}
            decode[w.worker_id] = dict(inflight=len(w.inflight), draining=bool(getattr(w, "draining", False)),
                                       running=_num(ld, "running") + _num(ld, "waiting"),
                                       free_blocks=_num(ld, "free_blocks"),
                                       num_blocks=_num(ld, "num_blocks"))
        prefill = {w.worker_id: dict(inflight=len(w.inflight), queued_tokens=w.queued_tokens,
                                     draining=bool(getattr(w, "draining", False)))
                   for w in list(r.prefill.values())}
        return dict(time=time.time(), decode=decode, prefill=prefill,
                    ttft_disagg_p90_s=self.ttft_window["disaggregated"].quantile(0.9),
                    ttft_direct_p90_s=self.ttft_window["direct"].quantile(0.9),
                    tpot_p90_s=self.tpot_window.quantile(0.9))

    # ---- exposition -----------------------------------------------------------------------------------
    def text(self) -> bytes:
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint (a daemon thread); returns the bound port."""
        from prometheus_client import start_http_server
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _RouterStateCollector:
    """Reads the router's state at scrape time. Scrapes run on the HTTP thread while the
    router mutates its dicts on the event loop: take list() copies (atomic under the GIL)
    and skip a scrape's worth of state rather than fail it if a copy still races."""

    def __init__(self, get_router):
        self.get_router = get_router

    def collect(self):
        r = self.get_router()
        try:
            decode, prefill = list(r.decode.values()), list(r.prefill.values())
            decisions = list(r.decisions.items())
        except RuntimeError:
            return
        pool = GaugeMetricFamily("pdserve_pool_workers", "Workers registered with the router", labels=["pool", "state"])
        for name, ws in (("decode", decode), ("prefill", prefill)):
            draining = sum(1 for w in ws if getattr(w, "draining", False))
            pool.add_metric([name, "active"], len(ws) - draining)
            pool.add_metric([name, "draining"], draining)
        yield pool
        inflight = GaugeMetricFamily("pdserve_worker_inflight_requests", "Requests routed to a worker, not finished",
                                     labels=["pool", "worker"])
        for w in decode + prefill:
            inflight.add_metric([w.kind, w.worker_id], len(w.inflight))
        yield inflight
        q = GaugeMetricFamily("pdserve_prefill_queued_tokens", "Prompt tokens sent to a prefill worker, not yet done",
                              labels=["worker"])
        for w in prefill:
            q.add_metric([w.worker_id], w.queued_tokens)
        yield q
        running = GaugeMetricFamily("pdserve_decode_running_seqs", "Decode worker batch (heartbeat)",
                                    labels=["worker", "state"])
        kv = GaugeMetricFamily("pdserve_kv_blocks_used_ratio", "Fraction of a decode worker's KV blocks in use",
                               labels=["worker"])
        kv_bytes = CounterMetricFamily("pdserve_kv_transfer_received_bytes", "KV bytes a decode worker received",
                                       labels=["worker"])
        kv_done = CounterMetricFamily("pdserve_kv_transfers", "KV transfers a decode worker saw end, by outcome",
                                      labels=["worker", "outcome"])
        # Two names rather than a phase label: wire time is part of the wait, so a sum over
        # such a label would count it twice. Divided by rate(pdserve_kv_transfers_total
        # {outcome="completed"}) each gives a mean per completed transfer.
        kv_wait = CounterMetricFamily("pdserve_kv_transfer_seconds",
                                      "Seconds from a decode worker announcing a KV transfer to its completion, "
                                      "summed over completed transfers", labels=["worker"])
        kv_wire = CounterMetricFamily("pdserve_kv_transfer_wire_seconds",
                                      "Seconds from a KV transfer's first message to its completion, "
                                      "summed over completed transfers (layers stream as the prefill "
                                      "computes them, so this overlaps the prefill of the later layers)",
                                      labels=["worker"])
        for w in decode:
            ld = w.load or {}
            for state in ("running", "waiting", "awaiting_kv"):
                if state in ld:
                    running.add_metric([w.worker_id, state], _num(ld, state))
            if _num(ld, "num_blocks") > 0:
                kv.add_metric([w.worker_id], 1.0 - _num(ld, "free_blocks") / _num(ld, "num_blocks"))
            if "kv_bytes" in ld:     # cumulative counters of the worker's KV receiver
                kv_bytes.add_metric([w.worker_id], _num(ld, "kv_bytes"))
                for outcome in ("completed", "failed", "timed_out"):
                    kv_done.add_metric([w.worker_id, outcome], _num(ld, f"kv_{outcome}"))
            if "kv_seconds" in ld:   # (a worker of an older version does not send them)
                kv_wait.add_metric([w.worker_id], _real(ld, "kv_seconds"))
                kv_wire.add_metric([w.worker_id], _real(ld, "kv_wire_seconds"))
        yield running
        yield kv
        yield kv_bytes
        yield kv_done
        yield kv_wait
        yield kv_wire
        d = CounterMetricFamily("pdserve_route_decisions", "Routing decisions, by route and reason",
                                labels=["route", "reason"])
        for (kind, reason), n in decisions:
            d.add_metric([kind, reason], n)
        yield d
