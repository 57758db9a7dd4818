"""Helpers the integration tests share: waiting on a condition, the state block, client processes, /proc.

One home for them: test modules import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipc import state
from ipc.procstat import all_pids, read_proc_stat

if TYPE_CHECKING:  # only for annotations: ipc test children import this module, and start fast
    from broker.testing.launcher import BrokerProcess

_BIN = Path(sys.executable).with_name("turnstile")
#: The ``turnstile`` command of this environment.
TURNSTILE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "broker.cli"]


def ts(*args: str, timeout_s: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``turnstile ARGS`` to completion, output captured."""
    return subprocess.run(
        [*TURNSTILE, *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, **kw
    )


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
    for pid in all_pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue  # gone, or a zombie
        if cwd == str(root) or cwd.startswith(str(root) + os.sep):
            found.append(pid)
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
        """The first line whose ``ev`` is ``name``, waiting up to ``timeout_s``."""
        return self.wait_for(lambda o: o.get("ev") == name, timeout_s)

    def send(self, text: str = "go\n") -> None:
        """Write ``text`` to the client's stdin (a line it may be waiting for)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        """Close the client's stdin (EOF ends a ``linger``)."""
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

    def close(self) -> None:
        """Teardown: kill the process if it still runs, reap it, join the readers, close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        self._err.join(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                with contextlib.suppress(BrokenPipeError):
                    f.close()

    def results(self) -> list[dict[str, Any]]:
        """The result lines printed so far."""
        return [o for o in self.lines if o.get("ev") == "result"]

    def events(self) -> list[dict[str, Any]]:
        """The agent objects this client printed, in order."""
        return [o["data"] for o in self.lines if o.get("ev") == "event"]


# ---------------------------------------------------------------- processes, logs, transcripts


def procs_with_home(home: Path, *, marker: str = "") -> list[int]:
    """Live processes whose environment says HOME=``home`` (and whose argv contains ``marker``).

    The broker factory gives each test's brokers (and through them, agents and
    tool children) a HOME of their own, so this finds exactly this test's
    broker-side processes, whoever their parent is now.
    """
    want = f"HOME={home}".encode()
    found = []
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        st = read_proc_stat(pid)
        if want in env and st is not None and not st.zombie and marker.encode() in argv:
            found.append(pid)
    return found


def sim_agents(home: Path) -> list[int]:
    """This test's live sim agent processes (tool children included: they share the argv)."""
    return procs_with_home(home, marker="broker.testing.fake_cli")


def vm_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def broker_log(b: BrokerProcess) -> list[dict[str, Any]]:
    """The broker's JSON log lines so far."""
    out = []
    for line in b.log_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def all_logs(tmp_path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of every broker this test started (the factory logs to tmp_path/broker<N>.log)."""
    out = []
    for p in sorted(tmp_path.glob("broker*.log")):
        for line in p.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def shm_objects(session: str) -> list[str]:
    """The shared-memory names of ``session`` that exist now (rings and state block)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.{session}."))


def sim_stats(path: Path) -> dict[str, int]:
    """The sim's --stats-file counters (of its latest process), or {}."""
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def transcript_entries(home: Path) -> list[dict[str, Any]]:
    """The sim's transcript entries (every session file under ``home``), in order."""
    out = []
    for p in sorted((home / ".sim-claude").glob("*.jsonl")):
        for line in p.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def turn_outcomes(home: Path) -> list[tuple[str, str]]:
    """(prompt head, outcome) of every turn the sim began: ``ok``, ``error`` or ``lost`` (no result).

    The sim runs one turn at a time and records a prompt when its turn starts
    and a result when it ends, so a user entry followed by another user
    entry is a turn whose process died under it.
    """
    out: list[tuple[str, str]] = []
    pending: str | None = None
    for e in transcript_entries(home):
        if e.get("type") == "user":
            if pending is not None:
                out.append((pending, "lost"))
            pending = str(e.get("prompt", ""))
        elif e.get("type") == "result" and pending is not None:
            out.append((pending, "error" if e.get("is_error") else "ok"))
            pending = None
    if pending is not None:
        out.append((pending, "lost"))
    return out


def completions(home: Path, token: str) -> int:
    """How many turns whose prompt has the word ``token`` the agent ran to a successful end."""
    return sum(1 for prompt, outcome in turn_outcomes(home) if token in prompt.split() and outcome == "ok")


def began(home: Path, token: str) -> int:
    """How many turns whose prompt has the word ``token`` the agent began."""
    return sum(1 for prompt, _ in turn_outcomes(home) if token in prompt.split())


def wait_completed_once(home: Path, token: str) -> None:
    """Wait until the agent recorded the end of ``token``'s turn (a client may see the result first); fail on 2."""
    wait_until(lambda: completions(home, token) >= 1, timeout_s=10, what=f"{token}'s turn recorded")
    assert completions(home, token) == 1, f"{token} ran to completion more than once: {turn_outcomes(home)}"


def session_objects(session: str) -> list[str]:
    """Every shared-memory and queue name of ``session`` that exists now."""
    found = shm_objects(session)
    with contextlib.suppress(OSError):
        found += [n for n in os.listdir("/dev/mqueue") if n.startswith(f"turnstile.{session}.")]
    return sorted(found)


def home_of(b: BrokerProcess) -> Path:
    """The HOME the factory gave this broker (its agent's transcripts live under it)."""
    return Path(b.env["HOME"])


@contextlib.contextmanager
def processes() -> Iterator[Callable[[list[str]], ClientProc]]:
    """Start commands (argv) with their JSON stdout read by :class:`ClientProc`; SIGKILLed and reaped on exit."""
    started: list[ClientProc] = []

    def start(argv: list[str]) -> ClientProc:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        started.append(ClientProc(proc))
        return started[-1]

    try:
        yield start
    finally:
        for cp in started:
            if cp.proc.poll() is None:
                cp.kill()
            for f in (cp.proc.stdout, cp.proc.stderr):
                if f is not None:
                    f.close()
