"""Start and stop a broker as a child process (used by the demo, the benchmarks and the tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ipc import state
from ipc.errors import BrokerUnavailable, IPCError


class BrokerProcess:
    """A `turnstile serve` child process for one session."""

    def __init__(
        self,
        session: str,
        state_dir: Path,
        *,
        agent: str = "sim",
        agent_args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: str | None = None,
    ) -> None:
        self.session = session
        self.state_dir = state_dir
        self.argv = [
            sys.executable, "-m", "broker.cli", "serve", "--session", session, "--agent", agent,
            "--state-dir", str(state_dir), "--log-format", "json",
            *[f"--agent-arg={a}" for a in agent_args], *extra_args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or state_dir / f"broker-{session}.log"
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, timeout_s: float = 20.0) -> BrokerProcess:
        """Spawn the broker; with ``wait``, return once it serves (agent up)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     cwd=self.cwd)
        log.close()
        if wait:
            self.wait_ready(timeout_s)
        return self

    @property
    def pid(self) -> int:
        """The broker's pid."""
        assert self.proc is not None
        return self.proc.pid

    def snapshot(self) -> state.Snapshot | None:
        """The session's state block as now, or None."""
        try:
            block = state.StateBlock.open(self.session)
        except (FileNotFoundError, IPCError):
            return None
        try:
            return block.snapshot()
        except IPCError:
            return None
        finally:
            block.close()

    def wait_ready(self, timeout_s: float = 20.0) -> state.StateRecord:
        """Wait until this broker's state block says it is alive with its agent up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerUnavailable(f"broker exited with {self.proc.returncode}; log: {self.log_path}")
            snap = self.snapshot()
            if snap and snap.broker_alive and snap.record.broker_pid == self.pid and snap.record.agent_state == "up":
                return snap.record
            time.sleep(0.01)
        raise BrokerUnavailable(f"broker not ready after {timeout_s} s; log: {self.log_path}")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the broker (its agent dies with it through the parent-death signal)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        """The broker's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
