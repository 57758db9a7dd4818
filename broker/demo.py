"""`turnstile demo`: one worker with a long task, webhooks arriving during it, shown live.

Starts a broker on a private session (the simulated agent by default, or the
real Claude Code CLI against the offline Messages API), runs one worker
client and N webhook clients, each in its own thread with its own client
connection, and shows who holds the session, the line, every preemption and
handoff with the broker's latency in µs, then a summary. Exits 0 when every
request got its result in the right order: webhooks first-in first-out, all
before the worker's request completes, the worker preempted and rerun.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.testing.launcher import BrokerProcess
from broker.testing.offline_env import offline_cli_env, without_inherited_claude_settings
from clients.client import Client
from clients.core import TurnResult


@dataclass
class Row:
    """One request in the demo."""

    name: str
    kind: str
    submitted_s: float = 0.0
    finished_s: float = 0.0
    result: TurnResult | None = None
    preemptions: int = 0
    error: str = ""


@dataclass
class DemoState:
    """Shared between the client threads and the view."""

    t0: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    finish_order: list[str] = field(default_factory=list)
    submit_order: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    submit_lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, text: str) -> None:
        with self.lock:
            self.log.append(f"{time.monotonic() - self.t0:6.2f}s  {text}")


def _prompts(agent: str, worker_ms: int) -> tuple[str, str]:
    if agent == "sim":
        return (f"[sim:turn_ms={worker_ms}] worker: refactor the billing module",
                "[sim:turn_ms=150] webhook {i}: a review comment arrived on PR {i}")
    return (f"[api:slow={worker_ms}] worker: refactor the billing module",
            "webhook {i}: a review comment arrived on PR {i}")


def _run_client(st: DemoState, session: str, row: Row, text: str) -> None:
    try:
        with Client(session, row.kind, connect_timeout_s=10) as c:  # type: ignore[arg-type]
            # Submissions are serialised so that submit_order is the order the
            # broker's queue got them in: FIFO is checked against that, not
            # against the order the threads were started (they race to connect).
            with st.submit_lock:
                row.submitted_s = time.monotonic() - st.t0
                turn = c.prompt(text)
                st.submit_order.append(row.name)
            st.say(f"{row.name} submitted ({row.kind})")
            for ev in turn.events(timeout_s=120):
                if ev.get("type") == "turnstile" and ev.get("subtype") == "preempted":
                    row.preemptions += 1
                    st.say(f"{row.name} PREEMPTED in turn {ev.get('turn')}; requeued at the head of the worker line")
            row.result = turn.result(timeout_s=120)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    row.finished_s = time.monotonic() - st.t0
    with st.lock:
        st.finish_order.append(row.name)
    status = row.result.status if row.result else "error"
    st.say(f"{row.name} finished: {status}")


@contextlib.contextmanager
def _offline_api(agent: str, home: Path) -> Iterator[tuple[dict[str, str], Any]]:
    """The environment for the agent and, for the real CLI, the offline Messages API it talks to."""
    if agent != "claude":
        yield {}, None
        return
    from broker.testing.fake_api import OfflineAPI

    with OfflineAPI() as api:
        yield offline_cli_env(api.url, str(home)), api


def _wait_worker_streaming(api: Any, worker_text: str, timeout_s: float) -> None:
    """Return once the offline API streams the worker's answer.

    The real CLI takes a second or two before its first turn reaches the API; a
    webhook sent before that is only interrupted once the turn starts, which
    shows neither a live preemption nor the broker's preempt-signal latency.
    """
    rec = api.wait_for(lambda r: r.stream and r.latest == worker_text, timeout_s)
    api.wait_for_sent(rec, "content_block_delta", timeout_s, count=5)


def run_demo(*, agent: str = "sim", webhooks: int = 3, worker_ms: int = 3000, plain: bool = False) -> int:
    """Run the demo; returns the exit code (0: every result in the right order)."""
    tmp = Path(tempfile.mkdtemp(prefix="turnstile-demo-"))
    session = f"demo-{os.getpid()}"
    st = DemoState()
    rows = [Row("worker", "worker")] + [Row(f"webhook-{i}", "webhook") for i in range(1, webhooks + 1)]
    st.rows = rows
    worker_text, hook_text = _prompts(agent, worker_ms)
    broker: BrokerProcess | None = None
    code = 1
    try:
        with _offline_api(agent, tmp) as (env, api):
            given = {**env, "HOME": str(tmp)}
            broker = BrokerProcess(session, tmp / "state", agent=agent, env=given, cwd=str(tmp))
            if api is not None:
                broker.env = without_inherited_claude_settings(broker.env, given)
            st.say(f"starting broker (agent: {agent}) on private session {session}")
            broker.start(timeout_s=60)
            st.say("broker ready")
            threads = [threading.Thread(target=_run_client, args=(st, session, rows[0], worker_text), daemon=True)]
            threads[0].start()
            if api is not None:
                _wait_worker_streaming(api, worker_text, 60)
            else:
                _wait_for(lambda: _turn_running(broker), 30)
                time.sleep(min(0.5, worker_ms / 6000))  # let the worker stream a little: the demo is for eyes
            for i, row in enumerate(rows[1:], start=1):
                th = threading.Thread(target=_run_client, args=(st, session, row, hook_text.format(i=i)), daemon=True)
                th.start()
                threads.append(th)
                time.sleep(0.02)  # arrivals a few ms apart, so the order is visible
            _show(st, broker, threads, plain)
            code = _summary(st, broker, rows)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return code


def _turn_running(broker: BrokerProcess) -> bool:
    snap = broker.snapshot()
    return bool(snap and snap.record.turn)


def _wait_for(cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo's worker never started")
        time.sleep(0.01)


def _view(st: DemoState, broker: BrokerProcess) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    snap = broker.snapshot()
    top = Table.grid(padding=(0, 2))
    if snap is not None:
        r = snap.record
        holder = f"{r.holder_kind} {r.holder_client}" if r.holder_client else "-"
        top.add_row("holder", holder, "turn", f"{r.turn} {r.turn_state}")
        line = f"{r.webhooks_queued} webhook(s), {r.workers_queued} worker(s)"
        top.add_row("line", line, "model", r.model or "default")
        top.add_row("preempt signal", f"{r.latencies['last_preempt_signal_us']} µs",
                    "handoff", f"{r.latencies['last_handoff_us']} µs")
        top.add_row("preempts", str(r.counters["preempts"]), "requeues", str(r.counters["requeues"]))
    with st.lock:
        log = "\n".join(st.log[-14:])
    return Group(Panel(top, title="turnstile session"), Panel(log, title="events"))


def _show(st: DemoState, broker: BrokerProcess, threads: list[threading.Thread], plain: bool) -> None:
    if plain or not sys.stdout.isatty():
        printed = 0
        while any(t.is_alive() for t in threads):
            time.sleep(0.05)
            with st.lock:
                new, printed = st.log[printed:], len(st.log)
            for line in new:
                print(line, flush=True)
        with st.lock:
            for line in st.log[printed:]:
                print(line, flush=True)
        return
    from rich.live import Live

    with Live(_view(st, broker), refresh_per_second=20) as live:
        while any(t.is_alive() for t in threads):
            time.sleep(0.05)
            live.update(_view(st, broker))
        live.update(_view(st, broker))


def _summary(st: DemoState, broker: BrokerProcess, rows: list[Row]) -> int:
    from rich.console import Console
    from rich.table import Table

    snap = broker.snapshot()
    table = Table(title="summary")
    for col in ("request", "kind", "status", "submitted s", "finished s", "queued ms", "turn ms", "preempted"):
        table.add_column(col)
    for row in rows:
        res = row.result
        table.add_row(
            row.name, row.kind, res.status if res else f"error: {row.error}", f"{row.submitted_s:.2f}",
            f"{row.finished_s:.2f}", f"{res.queued_ms:.1f}" if res else "-", f"{res.turn_ms:.1f}" if res else "-",
            str(row.preemptions),
        )
    # Off a terminal nobody resizes the output: rich's default of 80 columns would cut the table's cells.
    console = Console() if sys.stdout.isatty() else Console(width=1000)
    console.print(table)
    hooks = [r.name for r in rows if r.kind == "webhook"]
    order = [n for n in st.finish_order]
    problems = []
    if any(r.result is None or r.result.status != "ok" for r in rows):
        problems.append("not every request ended ok")
    submitted = [n for n in st.submit_order if n in hooks]
    if [n for n in order if n in hooks] != submitted:
        problems.append(f"webhooks finished out of order: {order}, submitted {submitted}")
    if order and order[-1] != "worker":
        problems.append(f"the worker finished before a webhook: {order}")
    if rows[0].preemptions < 1:
        problems.append("the worker was never preempted")
    if snap is not None:
        lat = snap.record.latencies
        console.print(f"broker latency: last preempt signal {lat['last_preempt_signal_us']} µs "
                      f"(webhook frame read → interrupt written), last handoff {lat['last_handoff_us']} µs "
                      f"(result read → next prompt written)")
    if problems:
        console.print("[bold red]FAILED[/]: " + "; ".join(problems))
        return 1
    console.print(f"[bold green]OK[/]: {len(hooks)} webhooks ran first-in first-out ahead of the worker, "
                  "which was preempted, requeued and completed")
    return 0
