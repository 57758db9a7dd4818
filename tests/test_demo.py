"""`turnstile demo --plain`: the whole story end to end, short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_BIN = Path(sys.executable).with_name("turnstile")
TURNSTILE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "broker.cli"]


def test_demo_plain_exits_0_with_summary(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "160"}
    p = subprocess.Popen(
        [*TURNSTILE, "demo", "--plain", "--worker-ms", "1500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    print(out)
    assert p.returncode == 0, out + err
    assert "broker ready" in out
    assert "worker PREEMPTED" in out
    for name in ("worker", "webhook-1", "webhook-2", "webhook-3"):
        assert f"{name} finished: ok" in out
    assert "summary" in out
    assert "OK: 3 webhooks ran first-in first-out ahead of the worker" in out
    assert "FAILED" not in out
    assert "broker latency: last preempt signal" in out
    # The demo's private session and temporary directory are gone.
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.demo-{p.pid}.")]
    assert not list(tmp_path.glob("turnstile-demo-*"))
