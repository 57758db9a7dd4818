"""The real Claude Code CLI behind the broker, against the offline Messages API.

Per iteration: a worker turn streams (``[api:slow=...]``: the fake API
trickles deltas); once it streams, a webhook submits; we time the webhook's
prompt arriving at the API (its ``t_ns`` is ``perf_counter_ns`` at request
arrival, in the API's own process). On ``on_preempt="return"`` the worker's
request ends as preempted and the next iteration submits a fresh one.

The split of that time comes from the broker's log (wall-clock timestamps of
``turn.interrupt`` and ``turn.start``, converted to CLOCK_MONOTONIC with an
offset measured here) and the state block (``last_handoff_us``: result read →
prompt written):

* broker share = (interrupt written - webhook submit) + (result read → prompt written);
* CLI interrupt → result = result read - interrupt written;
* CLI prompt → API = API request - prompt written.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import StateView, wait_until, workspace
from benchmarks.scenarios import Progress, _quiet
from benchmarks.stats import Results
from broker.testing.offline_env import offline_cli_env, without_inherited_claude_settings
from clients import Client

MODEL = "claude-sonnet-4-5"
SLOW_MS = 30_000


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, from the tightest of several paired readings."""
    best: tuple[int, int] | None = None
    for _ in range(200):
        a = time.perf_counter_ns()
        r = time.time_ns()
        b = time.perf_counter_ns()
        if best is None or b - a < best[0]:
            best = (b - a, r - (a + b) // 2)
    assert best is not None
    return best[1]


class _Tail:
    """Tails a JSON-lines file (the API's request record, the broker's log)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: Any = None
        self.rest = ""
        self.items: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        if self.f is None:
            if not self.path.exists():
                return self.items
            self.f = open(self.path, encoding="utf-8")  # noqa: SIM115 - kept open while tailing
        data = self.rest + self.f.read()
        lines = data.split("\n")
        self.rest = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    self.items.append(json.loads(line))
                except ValueError:
                    continue
        return self.items

    def find(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float, what: str) -> dict[str, Any]:
        def look() -> dict[str, Any] | None:
            for item in self.poll():
                if pred(item):
                    return item
            return None

        got: dict[str, Any] = wait_until(look, timeout_s, what, poll_s=0.0005)
        return got

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _log_ns(entry: dict[str, Any], offset_ns: int) -> int:
    ts = datetime.datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00"))
    unix_us = round(ts.timestamp() * 1_000_000)
    return unix_us * 1000 - offset_ns


def run(res: Results, n: int, warmup: int, progress: Progress = _quiet) -> None:
    """Webhook submit → its prompt at the API, while a worker turn streams, through the real CLI."""
    from broker.agents.claude import bundled_claude_bin

    claude = bundled_claude_bin()
    if claude is None:
        res.errors["real_cli"] = "skipped: the Claude Code CLI bundled in claude_agent_sdk is not installed"
        return
    total: list[int] = []
    broker_share: list[int] = []
    cli_int: list[int] = []
    cli_api: list[int] = []
    broker_pre: list[int] = []
    with workspace("realcli") as ws:
        record = ws.path("api-requests.jsonl")
        api = ws.spawn([sys.executable, "-m", "broker.testing.fake_api", "--record", str(record)],
                       stdout=subprocess.PIPE, text=True)
        assert api.stdout is not None
        info = json.loads(api.stdout.readline())
        given = offline_cli_env(info["url"], str(ws.home))
        env = {**without_inherited_claude_settings(os.environ, given), **given}
        broker = ws.start_broker(agent="claude", claude_bin=claude, extra_args=["--model", MODEL], replace_env=env,
                                 timeout_s=90)
        api_tail = _Tail(record)
        log_tail = _Tail(broker.log_path)
        sv = StateView(ws.session)
        worker = Client(ws.session, "worker", on_preempt="return")
        hook = Client(ws.session, "webhook")
        rng = random.Random(1)
        offset0 = realtime_offset_ns()
        try:
            for i in range(warmup + n):
                wt = worker.prompt(f"[api:slow={SLOW_MS}] worker turn {i}")
                api_tail.find(lambda r, i=i: r.get("path") == "/v1/messages"
                              and str(r.get("latest", "")).endswith(f"worker turn {i}"), 60, "the worker's request")
                for _ev in wt.events(timeout_s=60):  # system/init: the broker knows the turn started
                    if wt.turn_id:
                        break
                # Let the stream run a little (deltas every 20 ms), at a random phase.
                time.sleep(0.05 + rng.random() * 0.05)
                wturn = wt.turn_id
                t0 = time.perf_counter_ns()
                ht = hook.prompt(f"webhook {i}")
                req = api_tail.find(lambda r, i=i: r.get("path") == "/v1/messages"
                                    and r.get("latest") == f"webhook {i}", 60, "the webhook's request")
                hr = ht.result(timeout_s=120)
                wr = wt.result(timeout_s=120)
                if hr.status != "ok" or wr.status != "preempted":
                    raise RuntimeError(f"iteration {i}: webhook {hr.status} {hr.error}, worker {wr.status} {wr.error}")
                rec = sv.wait(lambda r: r.turn_state == "idle", 30, "idle")
                t_int = _log_ns(log_tail.find(lambda e, t=wturn: e.get("event") == "turn.interrupt"
                                              and e.get("turn") == t, 10, "turn.interrupt in the log"), offset0)
                t_start = _log_ns(log_tail.find(lambda e, r=ht.request_id: e.get("event") == "turn.start"
                                                and e.get("req") == r, 10, "the webhook's turn.start"), offset0)
                handoff_ns = rec.latencies["last_handoff_us"] * 1000
                t_api = int(req["t_ns"])
                if i < warmup:
                    continue
                total.append(t_api - t0)
                broker_share.append((t_int - t0) + handoff_ns)
                cli_int.append(t_start - handoff_ns - t_int)
                cli_api.append(t_api - t_start)
                broker_pre.append(rec.latencies["last_preempt_signal_us"] * 1000)
                if (i + 1 - warmup) % 10 == 0:
                    progress(f"real CLI: {i + 1 - warmup}/{n}")
            drift_us = (realtime_offset_ns() - offset0) / 1000
        finally:
            worker.close()
            hook.close()
            sv.close()
            api_tail.close()
            log_tail.close()
            api.terminate()
            api.wait(10)
    note = f"clock offset drift over the run {drift_us:.0f} µs"
    res.add_latency("realcli.webhook_to_api", "Real CLI: webhook submit → its prompt at the API", total)
    res.add_latency("realcli.broker_share", "  broker's share (submit → interrupt written + handoff)", broker_share,
                    note=note)
    res.add_latency("realcli.broker_preempt", "  broker-internal: frame read → interrupt written", broker_pre)
    res.add_latency("realcli.cli_interrupt_to_result", "  CLI: interrupt written → result read", cli_int, note=note)
    res.add_latency("realcli.cli_prompt_to_api", "  CLI: prompt written → request at the API", cli_api, note=note)
