"""Test support: run the real Claude Code CLI offline against :class:`OfflineAPI`.

Each CLI gets a fresh temporary HOME (also its cwd and TMPDIR, so transcripts
and its ``cc-socks`` unix socket vanish with it), its own process group, and a
reader thread that turns stdout into a queue of parsed JSON objects.  Cleanup
kills the whole group (a tool child can hold stdout open after the CLI dies)
and removes the directory, even when the test fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import pytest

from broker.agents.claude import ClaudeAgent, bundled_claude_bin
from broker.testing.fake_api import OfflineAPI
from broker.testing.offline_env import offline_cli_env, without_inherited_claude_settings

DEFAULT_MODEL = "claude-sonnet-4-5"


_MISSING_REASON = (
    "the Claude Code CLI bundled in claude_agent_sdk is missing "
    "(pip install 'turnstile-broker[claude]' to run real-CLI tests)"
)

#: Decorator form of :func:`require_claude_bin`: ``@needs_claude``.
needs_claude = pytest.mark.skipif(bundled_claude_bin() is None, reason=_MISSING_REASON)


def require_claude_bin() -> str:
    """Return the bundled CLI's path, or skip the test with the reason."""
    found = bundled_claude_bin()
    if found is None:
        pytest.skip(_MISSING_REASON)
    return found


@dataclass(frozen=True)
class Line:
    """One stdout line: its parsed object and ``perf_counter_ns`` when read."""

    obj: dict[str, Any]
    t_ns: int

    @property
    def kind(self) -> str:
        """``type`` or ``type/subtype``."""
        t = str(self.obj.get("type"))
        sub = self.obj.get("subtype")
        return f"{t}/{sub}" if sub else t


class CLIExited(AssertionError):
    """stdout reached EOF while a test was still waiting for a line."""


def user_message(content: Any, msg_uuid: str, **extra: Any) -> dict[str, Any]:
    """A stream-json user message line (as an object) stamped with ``msg_uuid``."""
    return {
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": None,
        "session_id": "default",
        "uuid": msg_uuid,
        **extra,
    }


def control_request(subtype: str, request_id: str, **fields: Any) -> dict[str, Any]:
    """A stream-json control request line (as an object)."""
    return {"type": "control_request", "request_id": request_id, "request": {"subtype": subtype, **fields}}


class PipedChild:
    """A child in its own process group; threads read its stdout line by line and drain its stderr.

    ``on_line(t_ns, raw)`` gets every stdout line as bytes with
    ``perf_counter_ns`` at its arrival, then ``(t_ns, None)`` at EOF. The one
    process driver behind :class:`StdioProcess` (the real CLI and the sim, as
    the conformance tests drive them) and the sim's own tests' ``SimProc``.
    """

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
        on_line: Callable[[int, bytes | None], None],
    ) -> None:
        self.t_spawn_ns = time.perf_counter_ns()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env), cwd=cwd, start_new_session=True,
        )
        self.stderr_chunks: list[bytes] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read_stdout, args=(self.proc.stdout, on_line), daemon=True)
        self._err_reader = threading.Thread(target=self._read_stderr, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        self._err_reader.start()

    def _read_stdout(self, stream: IO[bytes], on_line: Callable[[int, bytes | None], None]) -> None:
        # readline has no length cap: result lines exceed 1.5 MB.
        for raw in iter(stream.readline, b""):
            on_line(time.perf_counter_ns(), raw)
        on_line(time.perf_counter_ns(), None)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        # Drained so a chatty child never blocks on a full pipe.
        try:
            for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
                self.stderr_chunks.append(chunk)
        except (OSError, ValueError):
            return  # closed under us: the child is gone

    def stderr_text(self) -> str:
        """Everything the child wrote to stderr so far (all of it once it exited: the reader is joined)."""
        if self.proc.poll() is not None:
            self._err_reader.join(timeout=5)
        return b"".join(self.stderr_chunks).decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.proc.pid

    def write(self, data: bytes) -> int:
        """Write raw bytes to stdin; return ``perf_counter_ns`` after the write."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        return time.perf_counter_ns()

    def close_stdin(self) -> None:
        """Close stdin (end of input: the child finishes its turn and exits)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the child to exit; return its code."""
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the whole process group, reap the child, join the readers, close the pipes."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        # The readers see EOF once the whole group is gone; join them before closing
        # their streams, or a reader can hit a closed file.
        for reader in (self._reader, self._err_reader):
            reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class StdioProcess(PipedChild):
    """A JSON-lines child process: write objects to stdin, read objects from stdout.

    Shared by the real CLI and the simulated agent, so conformance tests drive
    both the same way.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        self.lines: list[Line] = []  # every line read so far, in order
        # Optional: busy_hook(prompt, text_started, timeout_s) returns once the
        # turn of `prompt` is mid-stream (see tests.conformance_script.Busy).
        self.busy_hook: Callable[[str, bool, float], None] | None = None
        self._queue: queue.Queue[Line | None] = queue.Queue()
        self._eof = False
        super().__init__(argv, env, cwd, self._on_line)

    def _on_line(self, t_ns: int, raw: bytes | None) -> None:
        if raw is None:
            self._queue.put(None)
            return
        text = raw.strip()
        if not text:
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = {"type": "_unparsed", "raw": text.decode("utf-8", "replace")}
        if not isinstance(obj, dict):
            obj = {"type": "_unparsed", "raw": obj}
        self._queue.put(Line(obj, t_ns))

    @property
    def stderr(self) -> str:
        """Everything the child wrote to stderr so far."""
        return b"".join(self.stderr_chunks).decode("utf-8", "replace")

    # -- writing ------------------------------------------------------------

    def send(self, obj: Mapping[str, Any]) -> int:
        """Write one object as one line; return ``perf_counter_ns`` after the write."""
        return self.send_raw(json.dumps(obj, separators=(",", ":")) + "\n")

    def send_raw(self, text: str) -> int:
        """Write raw text (for malformed-input tests); return the write time."""
        return self.write(text.encode())

    def send_user(self, content: str | list[Any], *, msg_uuid: str | None = None, **extra: Any) -> str:
        """Send a user message stamped with a uuid; return the uuid."""
        msg_uuid = msg_uuid or str(uuid.uuid4())
        self.send(user_message(content, msg_uuid, **extra))
        return msg_uuid

    def send_control(self, subtype: str, *, request_id: str | None = None, **fields: Any) -> str:
        """Send a control request; return its request id."""
        request_id = request_id or f"req_{uuid.uuid4().hex[:12]}"
        self.send(control_request(subtype, request_id, **fields))
        return request_id

    # -- reading ------------------------------------------------------------

    def read(self, timeout_s: float) -> Line:
        """Next stdout line; ``TimeoutError`` after ``timeout_s``, ``CLIExited`` at EOF."""
        if self._eof:
            raise CLIExited(f"stdout closed; stderr: {self.stderr[-2000:]}")
        try:
            item = self._queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            raise TimeoutError(f"no stdout line within {timeout_s} s") from None
        if item is None:
            self._eof = True
            raise CLIExited(f"stdout closed; stderr: {self.stderr[-2000:]}")
        self.lines.append(item)
        return item

    def read_until(self, predicate: Callable[[Line], bool], timeout_s: float) -> tuple[Line, list[Line]]:
        """Read until a line matches; return it and every line read on the way
        (the match included)."""
        deadline = time.monotonic() + timeout_s
        seen: list[Line] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = [ln.kind for ln in seen]
                raise TimeoutError(f"no matching line within {timeout_s} s; saw {kinds}")
            line = self.read(left)
            seen.append(line)
            if predicate(line):
                return line, seen

    def read_kind(self, kind: str, timeout_s: float) -> tuple[Line, list[Line]]:
        """Read until a line whose ``type[/subtype]`` is ``kind`` (or whose type is)."""
        return self.read_until(lambda ln: kind in (ln.kind, ln.obj.get("type")), timeout_s)

    def read_control_response(self, request_id: str, timeout_s: float) -> tuple[Line, list[Line]]:
        """Read until the control_response whose nested ``request_id`` matches."""
        return self.read_until(
            lambda ln: (
                ln.obj.get("type") == "control_response"
                and (ln.obj.get("response") or {}).get("request_id") == request_id
            ),
            timeout_s,
        )

    def read_all(self, timeout_s: float) -> list[Line]:
        """Read to EOF (after ``close_stdin``); ``TimeoutError`` if it takes longer."""
        deadline = time.monotonic() + timeout_s
        seen: list[Line] = []
        while True:
            try:
                seen.append(self.read(deadline - time.monotonic()))
            except CLIExited:
                return seen

    def drain_nowait(self) -> list[Line]:
        """Lines already queued, without waiting."""
        seen: list[Line] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return seen
            if item is None:
                self._eof = True
                return seen
            self.lines.append(item)
            seen.append(item)


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> StdioProcess:
    """Start a JSON-lines child in its own process group."""
    return StdioProcess(argv, env, cwd)


@contextlib.contextmanager
def temp_home(prefix: str = "turnstile-home-") -> Iterator[str]:
    """A fresh directory to serve as HOME, cwd and TMPDIR; removed afterwards."""
    home = tempfile.mkdtemp(prefix=prefix)
    try:
        os.mkdir(os.path.join(home, "tmp"))
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def real_cli(
    api: OfflineAPI,
    *,
    model: str | None = DEFAULT_MODEL,
    session_id: str | None = None,
    resume: bool = False,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    home: str | None = None,
) -> Iterator[StdioProcess]:
    """Run the real CLI against ``api``; kill its group and clean up on exit.

    ``home`` reuses a directory (e.g. to ``resume`` a session in a second
    process); by default a fresh one is made and removed.
    """
    bin_path = require_claude_bin()
    with contextlib.ExitStack() as stack:
        if home is None:
            home = stack.enter_context(temp_home())
        agent = ClaudeAgent(
            bin_path,
            extra_args=extra_args,
            env={**offline_cli_env(api.url, home), **(env or {})},
            cwd=home,
        )
        launch = agent.launch(session_id=session_id or str(uuid.uuid4()), resume=resume, model=model)
        # Inherited CLAUDE*/ANTHROPIC* settings (say, from a developer's shell
        # or an enclosing Claude Code session) would leak into the test.
        given = {**offline_cli_env(api.url, home), **(env or {})}
        run_env = without_inherited_claude_settings(launch.env, given)
        proc = spawn(launch.argv, run_env, launch.cwd)
        stack.callback(proc.kill)
        proc.busy_hook = functools.partial(_wait_streaming, api)
        yield proc


def _wait_streaming(api: OfflineAPI, prompt: str, text_started: bool, timeout_s: float) -> None:
    """Return once the API is streaming the answer to ``prompt``.

    The CLI prints nothing while the model streams, so the fake's side is the
    only place to see it.  With ``text_started``, wait for a few deltas: the
    first one has then surely been parsed by the CLI.
    """
    deadline = time.monotonic() + timeout_s
    want = prompt.strip()
    rec = api.wait_for(lambda r: r.stream and r.latest == want, timeout_s)
    left = max(0.0, deadline - time.monotonic())
    if text_started:
        api.wait_for_sent(rec, "content_block_delta", left, count=5)
    else:
        api.wait_for_sent(rec, "message_start", left)
