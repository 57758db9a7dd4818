"""Small helpers the integration tests share: waiting on a condition, reading the state block."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.testing.launcher import BrokerProcess
from ipc import state
from ipc.procstat import all_pids, read_proc_stat


def wait_until(cond: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition", poll_s: float = 0.005) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)  # a polling interval inside a deadline, not a synchronisation


def rec(b: BrokerProcess) -> state.StateRecord:
    """The session's state record now (fails if there is no state block)."""
    snap = b.snapshot()
    assert snap is not None, "no state block"
    return snap.record


def published(
    b: BrokerProcess, cond: Callable[[state.StateRecord], Any], what: str = "the state block to show it",
    timeout_s: float = 20.0,
) -> state.StateRecord:
    """The state record once ``cond`` holds for it.

    The broker publishes its state block after the hot path (coalesced, on the
    next loop pass), so a client can see a result before the block counts it:
    a test reads a count or a lease the last step changed through this wait.
    """

    def settled() -> state.StateRecord | None:
        snap = b.snapshot()
        return snap.record if snap is not None and cond(snap.record) else None

    return wait_until(settled, timeout_s, what)


def processes_under(root: Path) -> list[int]:
    """Pids of live processes whose cwd is ``root`` or below it (a broker's agent and its tools run in HOME)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue  # gone, or a zombie
        if cwd == str(root) or cwd.startswith(str(root) + os.sep):
            found.append(int(entry))
    return found


def running(b: BrokerProcess, kind: str | None = None, phase: str = "running") -> Callable[[], bool]:
    """A condition: a turn (of ``kind``) is in ``phase`` in the broker's state block."""

    def cond() -> bool:
        snap = b.snapshot()
        if snap is None:
            return False
        r = snap.record
        return bool(r.turn) and r.turn_state == phase and (kind is None or r.holder_kind == kind)

    return cond


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (zombies excluded)."""
    found = []
    for pid in all_pids():
        st = read_proc_stat(pid)
        if st is not None and not st.zombie and st.pgrp == pgid:
            found.append(pid)
    return found


def _short(obj: Any, limit: int = 4000) -> str:
    """``repr`` cut to ``limit`` characters (agent lines can be megabytes)."""
    text = repr(obj)
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]}"


class ClientProc:
    """A running client process and the JSON lines it printed so far."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = {"ev": "junk", "line": line}
            with self._cv:
                self.lines.append(obj)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 20.0) -> dict[str, Any]:
        """The first line matching ``pred``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for obj in self.lines:
                    if pred(obj):
                        return obj
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no matching line in {timeout_s} s; lines: {_short(self.lines[-20:])}; "
                        f"stderr: {self.stderr[-3000:]}"
                    )
                self._cv.wait(min(left, 0.1))

    def ev(self, name: str, timeout_s: float = 20.0) -> dict[str, Any]:
        return self.wait_for(lambda o: o.get("ev") == name, timeout_s)

    def send(self, text: str = "go\n") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def finish(self, timeout_s: float = 30.0) -> int:
        """Wait for the process to exit (and its output to be read); returns the exit code."""
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"client did not exit; lines: {_short(self.lines[-20:])}; stderr: {self.stderr[-3000:]}"
            ) from None
        self._reader.join(5)
        self._err.join(5)
        return rc

    def kill(self) -> None:
        """SIGKILL the client process and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def results(self) -> list[dict[str, Any]]:
        return [o for o in self.lines if o.get("ev") == "result"]

    def events(self) -> list[dict[str, Any]]:
        """The agent objects this client printed, in order."""
        return [o["data"] for o in self.lines if o.get("ev") == "event"]
