"""The agent subprocess: spawn, the only stdin writer, line-split stdout, bounded stop.

The agent runs in its own session and process group, with a parent-death
signal, so a broker that dies by SIGKILL takes the agent with it and a tool
child that holds stdout open is reached by killing the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Callable
from typing import Any

from broker import log as blog
from broker.agents.base import AgentLaunch
from ipc import names
from ipc.errors import IPCError
from ipc.procstat import all_pids, read_proc_stat

PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the broker dies, even by SIGKILL, the agent gets SIGKILL: no orphan agent.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)  # the broker already died between fork and prctl


def _log_line_error(exc: Exception, line: bytes) -> None:
    blog.get("turnstile.agentproc").error(
        "agent.line_failed", error=repr(exc), bytes=len(line), head=line[:200].decode(errors="replace"),
    )


class LineSplitter:
    """Splits a byte stream into lines of at most ``max_line_bytes``; longer ones are dropped whole.

    The reader contract: whatever a handler does with one line, the next line
    is read exactly as if it had succeeded. A handler that raises costs only
    its own line (``on_error`` is told, default: an ``agent.line_failed`` log
    line); the buffer never keeps that line's bytes to glue them to the next.
    """

    def __init__(
        self,
        on_line: Callable[[bytes], None],
        on_overlong: Callable[[int], None],
        max_line_bytes: int,
        on_error: Callable[[Exception, bytes], None] = _log_line_error,
    ):
        self._buf = bytearray()
        self._skipping = 0  # bytes dropped of the current over-long line (0: not skipping)
        self.on_line = on_line
        self.on_overlong = on_overlong
        self.on_error = on_error
        self.max = max_line_bytes

    def feed(self, data: bytes) -> None:
        """Take a piece of the stream and emit every complete line in it."""
        buf = self._buf
        scan = len(buf)  # what is buffered holds no newline: search only the new bytes
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", scan)
            if nl < 0:
                break
            line_start, start = start, nl + 1
            scan = start
            try:
                if self._skipping:
                    skipped, self._skipping = self._skipping, 0
                    self.on_overlong(skipped + nl - line_start)
                elif nl - line_start > self.max:
                    # A whole over-long line can arrive in one read: the bound holds for it too.
                    self.on_overlong(nl - line_start)
                elif nl > line_start:
                    self.on_line(bytes(buf[line_start:nl]))
            except Exception as exc:  # the reader contract: one line's failure is that line's only
                self.on_error(exc, bytes(buf[line_start:nl]))
        if start:
            del buf[:start]
        if len(buf) > self.max:
            # Never hold an unbounded line: drop it and say so once its end arrives.
            self._skipping += len(buf)
            buf.clear()


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, proc: AgentProcess) -> None:
        self.proc = proc

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.proc._stdout.feed(data)
        elif fd == 2:
            self.proc.on_stderr(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 2:
            self.proc.stderr_closed.set()

    def process_exited(self) -> None:
        self.proc._exited()


class AgentProcess:
    """One running agent process."""

    def __init__(
        self,
        launch: AgentLaunch,
        *,
        on_line: Callable[[bytes], None],
        on_exit: Callable[[AgentProcess, int | None], None],
        on_overlong: Callable[[int], None],
        on_stderr: Callable[[bytes], None],
        max_line_bytes: int,
        on_line_error: Callable[[Exception, bytes], None] = _log_line_error,
    ) -> None:
        self.launch = launch
        self.on_exit = on_exit
        self.on_stderr = on_stderr
        self._stdout = LineSplitter(on_line, on_overlong, max_line_bytes, on_line_error)
        self.transport: asyncio.SubprocessTransport | None = None
        self._stdin: Any = None
        self.pid = 0
        self.start_time = 0
        self.returncode: int | None = None
        self.exited = asyncio.Event()
        #: Everything the agent wrote to stderr has been read (its exit may be seen before that).
        self.stderr_closed = asyncio.Event()

    async def start(self) -> None:
        """Spawn the agent in a new session (its own process group)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.subprocess_exec(
            lambda: _Protocol(self),
            *self.launch.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.launch.env,
            cwd=self.launch.cwd,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        self.transport = transport
        self.pid = transport.get_pid()
        self.start_time = names.proc_start_time(self.pid) or 0
        self._stdin = transport.get_pipe_transport(0)

    def write(self, data: bytes) -> bool:
        """Write bytes to stdin (ordered; asyncio buffers what the pipe does not take now)."""
        if self._stdin is None or self._stdin.is_closing() or self.returncode is not None:
            return False
        self._stdin.write(data)
        return True

    def _exited(self) -> None:
        assert self.transport is not None
        self.returncode = self.transport.get_returncode()
        self.exited.set()
        self.on_exit(self, self.returncode)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the agent's whole process group (tool children included)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    async def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL the group and wait for the exit to be reaped."""
        self.kill_group(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), timeout_s)
        self.close()

    async def stop(self, step_s: float = 2.0) -> None:
        """Bounded stop: close stdin → wait → SIGTERM group → wait → SIGKILL group."""
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                self.kill_group(sig)
            try:
                await asyncio.wait_for(self.exited.wait(), step_s)
                break
            except TimeoutError:
                continue
        # The leader may be gone while a tool child of its group lingers.
        self.kill_group(signal.SIGKILL)
        self.close()

    def close(self) -> None:
        """Release the transport."""
        if self.transport is not None:
            self.transport.close()


def reap_group(pgid: int, not_before: int) -> int:
    """Kill leftovers of a previous broker's agent group (started no earlier than ``not_before``).

    Walks /proc so that only processes of that session and group are signalled,
    never a process that merely reused a pid.
    """
    killed = 0
    for pid in all_pids():
        try:
            st = read_proc_stat(pid)
        except IPCError:
            continue
        if st is not None and st.pgrp == pgid and st.session == pgid and st.start_time >= not_before:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed
