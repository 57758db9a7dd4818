"""``turnstile metrics`` as a real process, scraped over HTTP, against a real broker (sim agent)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.testing.launcher import BrokerProcess
from tests.support import TURNSTILE, ClientProc, processes, running, ts, wait_until

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def metrics_server() -> Iterator[Callable[..., str]]:
    """Start ``turnstile metrics --port 0``; returns its URL. SIGTERMed (then SIGKILLed) at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> str:
        p = subprocess.Popen([*TURNSTILE, "metrics", "--port", "0", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()  # the exporter prints its URL once it listens
        assert "serving http://" in line, (line, p.stderr.read() if p.poll() is not None and p.stderr else "")
        return line.split("serving ", 1)[1].strip()

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def scrape(url: str, session: str) -> Samples:
    """Every sample labelled with ``session``, keyed by (name, other labels)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("session") != session:
                continue
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "session")
            out[(s.name, labels)] = s.value
    return out


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _prompt(bg: Callable[..., ClientProc], session: str, kind: str, text: str) -> ClientProc:
    return bg("prompt", "--session", session, "--kind", kind, "--json", text)


@pytest.fixture
def bg() -> Iterator[Callable[..., ClientProc]]:
    """Background ``turnstile`` commands, reaped at teardown."""
    with processes() as start:
        yield lambda *args: start([*TURNSTILE, *args])


def test_scrape_after_a_preemption(
    broker_factory: Callable[..., BrokerProcess], session_name: str, metrics_server: Callable[..., str],
    bg: Callable[..., ClientProc],
) -> None:
    b = broker_factory()
    worker = _prompt(bg, session_name, "worker", "[sim:turn_ms=1500] long")
    wait_until(running(b, "worker"), what="the worker's turn running")
    assert ts("prompt", "--session", session_name, "--kind", "webhook", "hook").returncode == 0
    assert worker.finish() == 0, worker.stderr
    assert worker.wait_for(lambda o: o.get("event") == "result")["preemptions"] == 1

    url = metrics_server()  # every session on the host, discovered at scrape time
    t0 = time.perf_counter()
    m = scrape(url, session_name)
    scrape_ms = (time.perf_counter() - t0) * 1000
    print(f"scrape took {scrape_ms:.1f} ms")

    assert one(m, "turnstile_broker_up") == 1 and one(m, "turnstile_agent_up") == 1
    assert one(m, "turnstile_state_readable") == 1
    assert one(m, "turnstile_turns_total", status="ok") == 2
    assert one(m, "turnstile_turns_total", status="preempted") == 0
    assert one(m, "turnstile_preemptions_total") == 1
    assert one(m, "turnstile_requeues_total") == 1
    assert one(m, "turnstile_cancels_total") == 0 and one(m, "turnstile_client_deaths_total") == 0
    assert one(m, "turnstile_agent_restarts_total") == 0
    assert one(m, "turnstile_queue_depth", kind="webhook") == 0 and one(m, "turnstile_queue_depth", kind="worker") == 0
    assert one(m, "turnstile_holder", kind="none") == 1 and one(m, "turnstile_holder", kind="worker") == 0
    # Two results delivered (the webhook's, then the worker's rerun); one preempt signal; the
    # handoff from the preempted turn's result to the webhook's prompt at least.
    assert one(m, "turnstile_turn_seconds_count") == 2
    assert one(m, "turnstile_queue_wait_seconds_count") == 2
    assert one(m, "turnstile_preempt_signal_seconds_count") == 1
    assert one(m, "turnstile_handoff_seconds_count") >= 1
    # The worker's rerun lasts its 1.5 s: the turn-time sum holds at least that, and the buckets are cumulative.
    assert one(m, "turnstile_turn_seconds_sum") >= 1.4
    assert one(m, "turnstile_turn_seconds_bucket", le="+Inf") == 2
    assert one(m, "turnstile_turn_seconds_bucket", le="1.0") == 1
    signal_s = one(m, "turnstile_preempt_signal_seconds_sum")
    assert 0 < signal_s < 1


def test_scrape_while_the_broker_is_stopped_and_after_it_died(
    broker_factory: Callable[..., BrokerProcess], session_name: str, metrics_server: Callable[..., str],
) -> None:
    b = broker_factory()
    assert ts("prompt", "--session", session_name, "--kind", "worker", "one").returncode == 0
    url = metrics_server("--session", session_name)
    wait_until(lambda: one(scrape(url, session_name), "turnstile_turns_total", status="ok") == 1,
               what="the result counted in the published record")
    os.kill(b.pid, signal.SIGSTOP)
    try:
        stopped = scrape(url, session_name)
    finally:
        os.kill(b.pid, signal.SIGCONT)
    assert one(stopped, "turnstile_broker_up") == 1  # alive, only stopped: its heartbeat age tells
    assert one(stopped, "turnstile_turns_total", status="ok") == 1
    assert one(stopped, "turnstile_turn_seconds_count") == 1

    os.kill(b.pid, signal.SIGKILL)
    wait_until(lambda: one(scrape(url, session_name), "turnstile_broker_up") == 0, what="broker_up 0")
    dead = scrape(url, session_name)
    assert one(dead, "turnstile_agent_up") == 0
    assert one(dead, "turnstile_turns_total", status="ok") == 1  # the last published counters stay


def test_metrics_refuses_a_port_in_use(metrics_server: Callable[..., str]) -> None:
    url = metrics_server()
    port = url.split(":")[2].split("/")[0]
    cp = ts("metrics", "--port", port, timeout_s=30)
    assert cp.returncode == 2 and "cannot listen" in cp.stderr, cp.stderr


