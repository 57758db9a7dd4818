"""The fleet with the real Claude Code CLI (offline Messages API): a remote webhook over NATS preempts a
streaming worker turn and its prompt reaches the API."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from clients import Client
from tests.realcli import needs_claude
from tests.test_e2e_claude import T, claude_broker, streaming, turn_request  # noqa: F401 - a fixture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90), needs_claude]


def test_remote_cli_webhook_preempts_streaming_worker_and_reaches_the_api(
    claude_broker, api, nats_factory, gateway_factory, session_name  # noqa: F811 - fixtures
):
    n = nats_factory()
    claude_broker()
    gateway_factory(n.url)
    worker_text = "[api:slow=6000] worker: refactor the billing module"
    hook_text = "remote webhook: a review comment arrived on PR 12"
    with Client(session_name, "worker") as w:
        wt = w.prompt(worker_text)
        wrec = streaming(api, worker_text)
        t0 = time.perf_counter()
        hook = subprocess.run(
            [sys.executable, "-m", "broker.cli", "prompt", "--nats", n.url, "--session", session_name,
             "--kind", "webhook", "--json", hook_text],
            capture_output=True, text=True, timeout=T,
        )
        elapsed_ms = (time.perf_counter() - t0) * 1000
        hrec = turn_request(api, hook_text)
        events = list(wt.events(timeout_s=T))
        wres = wt.result(timeout_s=T)
    assert hook.returncode == 0, hook.stderr
    lines = [json.loads(line) for line in hook.stdout.splitlines()]
    assert lines[0]["event"] == "accepted"
    (res,) = [o for o in lines if o["event"] == "result"]
    assert res["status"] == "ok" and res["text"] == f"echo: {hook_text}"
    assert any(o["event"] == "agent" and o["data"].get("type") == "system" for o in lines)
    assert hrec.seq > wrec.seq
    assert [e for e in events if e.get("subtype") == "preempted"], "the worker was preempted"
    assert wres.ok and wres.preemptions == 1 and wres.turn > res["turn"]
    print(f"E2E-FIGURES remote CLI webhook, process start to result: {elapsed_ms:.0f} ms")
