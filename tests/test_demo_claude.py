"""`turnstile demo --agent claude --plain`: the demo with the real Claude Code CLI, offline.

The demo starts its own offline Messages API and a broker on a private
session; here it must finish with exit code 0 (every result in the right
order) and leave no process, shared-memory object or temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.realcli import needs_claude
from tests.support import processes_under

_BIN = Path(sys.executable).with_name("turnstile")
TURNSTILE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "broker.cli"]


@pytest.mark.e2e
@pytest.mark.timeout(60)
@needs_claude
def test_demo_with_real_claude_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE", "ANTHROPIC"))}
    env.update({"TMPDIR": str(tmp_path), "COLUMNS": "160"})
    p = subprocess.Popen([*TURNSTILE, "demo", "--agent", "claude", "--plain", "--worker-ms", "3000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         stdin=subprocess.DEVNULL, cwd=str(tmp_path))
    try:
        out, err = p.communicate(timeout=50)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    print(out)
    assert p.returncode == 0, out + err
    assert "starting broker (agent: claude)" in out
    assert "broker ready" in out
    assert "worker PREEMPTED" in out
    for name in ("worker", "webhook-1", "webhook-2", "webhook-3"):
        assert f"{name} finished: ok" in out
    assert "OK: 3 webhooks ran first-in first-out ahead of the worker" in out
    assert "FAILED" not in out
    # The webhooks preempted a worker that was streaming, so the broker measured its signal.
    m = re.search(r"last preempt signal (\d+) µs", out)
    assert m is not None, out
    assert int(m.group(1)) > 0, "the interrupt was not written on the webhook's arrival"
    # Nothing left: no broker or CLI (their cwd was the demo's temporary directory),
    # no shared-memory object of the demo's session, no temporary directory.
    deadline = time.monotonic() + 5
    while (left := processes_under(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for exits, with a deadline
    for pid in left:  # ours (the demo's children): do not let them outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.demo-{p.pid}.")]
    assert not list(tmp_path.glob("turnstile-demo-*"))
