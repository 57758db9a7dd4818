"""``turnstile metrics``: a Prometheus exporter for every session on the host.

It reads the sessions' shared-memory state blocks at scrape time and talks to
no broker, so a stuck, stopped or dead broker is still reported (``broker_up``
0, its last counters kept). Nothing runs between scrapes: the collector lists
the state blocks in ``/dev/shm`` and reads each one when Prometheus asks.

Counters are the broker's own and restart from zero with each broker; the
``turnstile_broker_start_time_seconds`` gauge tells Prometheus when that happened
(``rate()`` already treats a drop as a reset).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ipc import histogram, names, state
from ipc.errors import IPCError

#: How long one scrape waits for a block that stays mid-write before it reports it unreadable.
READ_TIMEOUT_S = 0.05

#: Result counters, exported as one counter labelled by status.
RESULT_STATUSES = {"ok": "results_ok", "error": "results_error", "cancelled": "results_cancelled",
                   "preempted": "results_preempted"}
#: Every other state-block counter, by exported name (without the ``turnstile_`` prefix and ``_total``).
COUNTERS = {
    "turns_started": "turns",
    "requests": "requests",
    "preemptions": "preempts",
    "requeues": "requeues",
    "cancels": "cancels",
    "stale_cancels": "stale_cancels",
    "rejected_frames": "rejected_frames",
    "client_deaths": "client_deaths",
    "clients_failed_slow": "clients_failed_slow",
    "agent_restarts": "agent_restarts",
    "drain_timeouts": "drain_timeouts",
    "model_switches": "model_switches",
    "unrouted_lines": "unrouted_lines",
}
HISTOGRAM_HELP = {
    "queue_wait_ms": ("queue_wait_seconds", "Time from a request's submit to the start of its turn."),
    "preempt_signal_us": ("preempt_signal_seconds",
                          "Webhook submit received to interrupt written to the agent (broker side)."),
    "handoff_us": ("handoff_seconds", "A turn's result read to the next holder's message written."),
    "turn_ms": ("turn_seconds", "Turn start to its result, by every result the broker delivered."),
}
HOLDER_KINDS = ("webhook", "worker", "none")


class SessionCollector(Collector):
    """Reads every session's state block at scrape time; one metric family per figure, labelled by session."""

    def __init__(self, sessions: Iterable[str] | None = None, shm_dir: str = names.SHM_DIR) -> None:
        self._sessions = list(sessions) if sessions is not None else None
        self._shm_dir = shm_dir

    def _read(self, session: str) -> state.Snapshot | None:
        try:
            block = state.StateBlock.open(session)
        except (FileNotFoundError, ValueError):
            return None
        try:
            rec = block.read_record(timeout_s=READ_TIMEOUT_S)
            alive = not rec.closed and names.is_alive(rec.broker_pid, rec.broker_start)
            return state.Snapshot(record=rec, broker_alive=alive, cancel_incarnation="", cancel_turn=0)
        finally:
            block.close()

    def collect(self) -> Iterator[Metric]:
        """One pass over the blocks; a block that cannot be read is reported, not fatal."""
        t0 = time.perf_counter()
        sessions = self._sessions if self._sessions is not None else names.sessions_on_host(self._shm_dir)
        g = _Families()
        for session in sessions:
            try:
                snap = self._read(session)
            except IPCError:
                # Damaged, another user's, or stuck mid-write: say the block is unreadable, keep going.
                g.readable.add_metric([session], 0)
                continue
            if snap is None:
                continue
            g.readable.add_metric([session], 1)
            g.add(session, snap)
        yield from g.all()
        scrape = GaugeMetricFamily("turnstile_scrape_duration_seconds", "Time this scrape spent reading the blocks.")
        scrape.add_metric([], time.perf_counter() - t0)
        yield scrape


class _Families:
    """The metric families of one scrape, filled session by session."""

    def __init__(self) -> None:
        s = ["session"]
        self.readable = GaugeMetricFamily("turnstile_state_readable", "1 when the state block could be read.",
                                          labels=s)
        self.broker_up = GaugeMetricFamily("turnstile_broker_up", "1 while the block's broker process is alive.",
                                           labels=s)
        self.agent_up = GaugeMetricFamily("turnstile_agent_up", "1 while the agent process is up.", labels=s)
        self.broker_start = GaugeMetricFamily("turnstile_broker_start_time_seconds",
                                              "Unix time the broker started (its counters start at zero).",
                                              labels=s)
        self.heartbeat_age = GaugeMetricFamily("turnstile_heartbeat_age_seconds",
                                               "Seconds since the broker last published its record.", labels=s)
        self.clients = GaugeMetricFamily("turnstile_clients", "Connected clients.", labels=s)
        self.queue = GaugeMetricFamily("turnstile_queue_depth", "Requests waiting, by kind.", labels=[*s, "kind"])
        self.holder = GaugeMetricFamily("turnstile_holder", "1 for the kind holding the session (none when idle).",
                                        labels=[*s, "kind"])
        self.results = CounterMetricFamily("turnstile_turns", "Turns ended, by result status.",
                                           labels=[*s, "status"])
        self.counters = {
            name: CounterMetricFamily(f"turnstile_{name}", f"State-block counter {field}.", labels=s)
            for name, field in COUNTERS.items()
        }
        self.histograms = {
            h: HistogramMetricFamily(f"turnstile_{name}", doc, labels=s) for h, (name, doc) in HISTOGRAM_HELP.items()
        }

    def add(self, session: str, snap: state.Snapshot) -> None:
        rec = snap.record
        self.broker_up.add_metric([session], 1 if snap.broker_alive else 0)
        self.agent_up.add_metric([session], 1 if snap.broker_alive and rec.agent_state == "up" else 0)
        self.broker_start.add_metric([session], rec.started_unix_ns / 1e9)
        self.heartbeat_age.add_metric([session], max(0.0, (time.time_ns() - rec.heartbeat_unix_ns) / 1e9))
        self.clients.add_metric([session], rec.clients)
        self.queue.add_metric([session, "webhook"], rec.webhooks_queued)
        self.queue.add_metric([session, "worker"], rec.workers_queued)
        held = rec.holder_kind if rec.holder_kind in ("webhook", "worker") else "none"
        for kind in HOLDER_KINDS:
            self.holder.add_metric([session, kind], 1 if kind == held else 0)
        for status, field in RESULT_STATUSES.items():
            self.results.add_metric([session, status], rec.counters.get(field, 0))
        for name, field in COUNTERS.items():
            self.counters[name].add_metric([session], rec.counters.get(field, 0))
        for h, fam in self.histograms.items():
            hist = rec.histograms[h]
            unit = histogram.unit_seconds(h)
            bounds = [_le(b * unit) for b in histogram.BOUNDS[h]] + ["+Inf"]
            fam.add_metric([session], buckets=list(zip(bounds, hist.buckets, strict=True)),
                           sum_value=hist.total * unit)

    def all(self) -> Iterator[Metric]:
        yield from (self.readable, self.broker_up, self.agent_up, self.broker_start, self.heartbeat_age,
                    self.clients, self.queue, self.holder, self.results)
        yield from self.counters.values()
        yield from self.histograms.values()


def _le(seconds: float) -> str:
    """A bucket bound as Prometheus prints it (no float noise: 0.0001, not 0.00010000000000000002)."""
    return repr(float(f"{seconds:.9g}"))


def registry(sessions: Iterable[str] | None = None) -> CollectorRegistry:
    """A registry with only the session collector (no process or platform metrics of the exporter itself)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SessionCollector(sessions))
    return reg


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Prometheus scrapes every few seconds: no access log line each time."""


def serve(
    host: str, port: int, sessions: Iterable[str] | None = None, *, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve ``/metrics`` on host:port in the foreground until SIGTERM or SIGINT.

    Port 0 picks a free port; ``on_ready(url)`` is called once it listens.
    """
    httpd: WSGIServer = make_server(host, port, make_wsgi_app(registry(sessions)), handler_class=_QuietHandler)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        if on_ready is not None:
            on_ready(f"http://{host}:{httpd.server_port}/metrics")
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
