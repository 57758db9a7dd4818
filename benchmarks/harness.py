"""What every scenario needs: a private workspace, a broker driving the stamped sim, stamp files, waits.

Nothing here measures anything; the scenarios do. Every process started here
is stopped by the :class:`Workspace` that started it (by its own pid), and
every IPC object of the workspace's session is swept at the end, even when a
scenario fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.testing.launcher import BrokerProcess
from ipc import state, sweep

#: The project root: benchmark modules run as ``python -m benchmarks.X`` from any cwd with it on sys.path.
ROOT = Path(__file__).resolve().parents[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for benchmark child processes: ours, with the project importable."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.update(extra or {})
    return env


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.0002) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


# ---------------------------------------------------------------- stamps


@dataclass(frozen=True)
class Stamp:
    """One line of a sim stamp file: CLOCK_MONOTONIC ns, what was read (or written), detail."""

    t_ns: int
    kind: str
    detail: str


class StampReader:
    """Tails a sim ``--stamp-file`` (the sim appends whole lines with one write each)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None
        self._rest = b""
        self._pending: list[Stamp] = []

    def _open(self) -> bool:
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115 - kept open while tailing
            except FileNotFoundError:
                return False
        return True

    def _read(self) -> list[Stamp]:
        out, self._pending = self._pending, []
        if not self._open():
            return out
        data = self._rest + self._f.read()
        lines = data.split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            t, kind, detail = line.decode().split("\t")
            out.append(Stamp(int(t), kind, detail))
        return out

    def read_new(self) -> list[Stamp]:
        """Every stamp not returned yet."""
        return self._read()

    def wait_for(self, pred: Callable[[Stamp], bool], timeout_s: float, what: str) -> tuple[Stamp, list[Stamp]]:
        """Read until a stamp matches; return it and every stamp read on the way (the match included).

        Stamps after the match are kept for the next call.
        """
        seen: list[Stamp] = []
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self._read()
            for i, s in enumerate(batch):
                seen.append(s)
                if pred(s):
                    self._pending = batch[i + 1:]
                    return s, seen
            if time.monotonic() > deadline:
                raise TimeoutError(f"no stamp for {what} within {timeout_s:g} s; saw {[x.kind for x in seen][-20:]}")
            time.sleep(0.0001)

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None


def first(stamps: Sequence[Stamp], kind: str, after_ns: int = 0, detail: str | None = None) -> Stamp | None:
    """The first stamp of ``kind`` (and ``detail``) at or after ``after_ns``."""
    for s in stamps:
        if s.kind == kind and s.t_ns >= after_ns and (detail is None or s.detail == detail):
            return s
    return None


# ---------------------------------------------------------------- workspace


def sim_argv(stamp_file: Path, sim_state_dir: Path, *extra: str) -> list[str]:
    """argv of the stamped sim spawned directly (the baselines), as the broker would spawn it."""
    return [
        sys.executable, "-m", "benchmarks.stamped_sim",
        "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
        "--session-id", str(uuidlib.uuid4()),
        "--stamp-file", str(stamp_file), "--sim-state-dir", str(sim_state_dir), *extra,
    ]


class Workspace:
    """A temporary HOME, state dir and session name for one scenario; cleans up what it started."""

    def __init__(self, tag: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"turnstile-bench-{tag}-"))
        self.home = self.dir / "home"
        self.home.mkdir()
        (self.home / "tmp").mkdir()
        self.session = f"bench{os.getpid()}{tag[:6]}{secrets.token_hex(3)}"
        self.brokers: list[BrokerProcess] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self._n = 0

    def path(self, name: str) -> Path:
        """A fresh path inside the workspace."""
        self._n += 1
        return self.dir / f"{self._n:03d}-{name}"

    def sim_wrapper(self) -> Path:
        """An executable that runs the stamped sim: the broker's ``--claude-bin``."""
        path = self.dir / "stamped-sim"
        if not path.exists():
            path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m benchmarks.stamped_sim "$@"\n')
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return path

    def start_broker(
        self,
        stamp_file: Path | None = None,
        *,
        agent_args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        agent: str = "stamped-sim",
        claude_bin: str | None = None,
        timeout_s: float = 30.0,
        replace_env: dict[str, str] | None = None,
    ) -> BrokerProcess:
        """Start a broker process on this workspace's session and wait until it serves."""
        args = list(agent_args)
        xargs = list(extra_args)
        if agent == "stamped-sim":
            assert stamp_file is not None
            args += ["--stamp-file", str(stamp_file), "--sim-state-dir", str(self.dir / "sim-state")]
            xargs += ["--claude-bin", str(self.sim_wrapper())]
        elif claude_bin is not None:
            xargs += ["--claude-bin", claude_bin]
        b = BrokerProcess(
            self.session, self.dir / "state", agent="claude", agent_args=args, extra_args=xargs,
            env=child_env({"HOME": str(self.home), **(env or {})}),
            log_path=self.path("broker.log"), cwd=str(self.home),
        )
        if replace_env is not None:
            b.env = replace_env
        self.brokers.append(b)
        b.start(wait=True, timeout_s=timeout_s)
        return b

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a child process that this workspace kills (by pid) at the end."""
        kw.setdefault("env", child_env())
        kw.setdefault("cwd", str(self.home))
        p = subprocess.Popen(list(argv), **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        """Stop every process started here, sweep the session's IPC objects, remove the directory."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        for b in self.brokers:
            b.stop(timeout_s=10)
        sweep.sweep(session=self.session, force=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def workspace(tag: str) -> Iterator[Workspace]:
    """A :class:`Workspace`, closed on exit."""
    ws = Workspace(tag)
    try:
        yield ws
    finally:
        ws.close()


# ---------------------------------------------------------------- broker state


class StateView:
    """Reads a session's state block (the broker's own latency figures and counters)."""

    def __init__(self, session: str) -> None:
        self.block = state.StateBlock.open(session)

    def record(self) -> state.StateRecord:
        """The current record."""
        return self.block.read_record()

    def wait(self, pred: Callable[[state.StateRecord], bool], timeout_s: float, what: str) -> state.StateRecord:
        """Poll until the record satisfies ``pred``; return it."""
        rec: list[state.StateRecord] = []

        def check() -> bool:
            r = self.block.read_record()
            if pred(r):
                rec.append(r)
                return True
            return False

        wait_until(check, timeout_s, what, poll_s=0.0001)
        return rec[0]

    def close(self) -> None:
        """Unmap."""
        self.block.close()


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts (RssAnon, RssFile, RssShmem) of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
