"""Start and stop a `turnstile gateway` as a child process (used by the demo, the benchmarks and the tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class GatewayProcess:
    """A `turnstile gateway` child process."""

    def __init__(self, url: str, sessions: list[str], log_path: Path, *, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "broker.cli", "gateway", "--nats", url, "--log-format", "json",
                     *[a for s in sessions for a in ("--session", s)], *extra_args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, timeout_s: float = 20.0) -> GatewayProcess:
        """Spawn; with ``wait``, return once it serves its sessions."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            deadline = time.monotonic() + timeout_s
            while b"gateway.serving" not in self.log_path.read_bytes():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway not serving after {timeout_s} s: {self.log_text()[-3000:]}")
                time.sleep(0.01)  # polling inside a deadline
        return self

    def wait(self, timeout_s: float = 20.0) -> int:
        """Wait for the gateway to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        """The gateway's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
