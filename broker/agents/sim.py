"""A simulated Claude Code CLI in ``-p`` stream-json mode, for tests and benchmarks.

Run it as ``python -m broker.agents.sim -p --input-format stream-json
--output-format stream-json --verbose [--session-id ID | --resume=ID]
[--model M] [sim flags]``.  It speaks the wire protocol recorded in
``shared/claude-stream-json.md`` (one JSON object per line on stdin and stdout,
``system/init`` at every turn, nested ``control_response`` ids, ``result``
lines whose first key is not ``type``, one malformed input line kills it) with
no network, in a few milliseconds per turn.

Where the real CLI may do one of several things, the sim does the simplest:
a user message written while a turn runs is queued and answered by its own
later turn (the real CLI may also merge queued messages into one turn, or fold
them into the running one; ``--merge-queued`` imitates merging).

Per-prompt directives (anywhere in the prompt text; several may be combined)
script a turn, so one process can serve differently scripted turns.  Each has
a global flag that applies it to every turn; a directive overrides the flag:

``[sim:turn_ms=N]`` / ``--turn-ms N``
    Stream the reply over N ms as evenly spaced text blocks (one per 20 ms
    unless ``chunks`` says otherwise); stdin stays served meanwhile.  Like the
    real CLI without ``--include-partial-messages``, each block is printed as
    one assistant line once it is complete, and nothing while it streams: a
    block's text arrives evenly over its share of the N ms, and an interrupt
    landing mid-block prints the text streamed so far as one assistant line
    (``"aborted": true``) after the interrupt's reply.
``[sim:chunks=K]`` / ``--chunks K``
    Split the reply into K blocks, K assistant lines (padded with dots if it
    is shorter).  ``[sim:turn_ms=N] [sim:chunks=1]`` is one block streaming
    for N ms: no assistant line until it ends, or until an interrupt.
``[sim:hang]`` / ``--hang``
    The reply never comes (an API stream that stalls before any text): after
    ``system/init`` the turn prints nothing until it is interrupted.
``[sim:bytes=N]`` / ``--bytes N``
    The reply text is exactly N bytes (truncated or padded with dots).
``[sim:huge=N]`` / ``--huge N``
    Reply with one assistant line of exactly N bytes (newline excluded); the
    result line repeats the text, like the real CLI.
``[sim:tool]`` / ``--tool``; ``[sim:tool_ms=N]`` / ``--tool-ms N``
    A tool phase first: an assistant ``tool_use`` line, N ms of "running", a
    user ``tool_result`` line.  An interrupt in it ends with ``aborted_tools``
    (a rejected ``tool_result`` line, then the marker).
``[sim:permission]`` / ``--permission``
    A tool phase that first asks ``can_use_tool`` on stdout and waits for the
    ``control_response``; the reply says ``permission: allowed`` or
    ``permission: denied (MESSAGE)``.
``[sim:error=api]`` (``api:CODE``, ``max_turns``, ``budget``) / ``--error K``
    End with the matching error result.
``[sim:ignore_interrupt]`` / ``--ignore-interrupts``
    Interrupts (and SIGINT) get no reply and no effect; the turn never ends.
``[sim:die]`` / ``--die``; ``[sim:die=MS]``
    Exit 1 without a result after streaming (or MS ms into the turn).
``[sim:garbage]`` / ``--garbage``
    Print a non-JSON line to stdout after ``system/init``, then go on.
``[sim:silent]`` / ``--silent``
    Stream, then never send a result (control requests are still answered).
``[sim:tool_child]`` / ``--tool-child``; ``[sim:tool_child=SECS]`` / ``--tool-child-secs``
    Fork a child (same process group, holding stdout) that sleeps SECS
    (default 600) seconds and exits, then exit 1 without a result.
``[sim:interrupt_ms=N]`` / ``--interrupt-ms N``
    Delay between an interrupt's reply and the interrupted result.
``[sim:history]``
    Append ``[history=N]`` to the reply, N being the number of earlier user
    messages in this session (resume keeps them).

Other sim flags: ``--sim-state-dir DIR`` (transcripts; default
``~/.sim-claude``), ``--stamp-file PATH``, ``--stats-file PATH`` (see
:class:`Sim`), ``--startup-ms N`` (stdin is not read for N ms after start),
``--set-model-ms N`` and ``--context-usage-ms N`` (delay those control
replies, so replies come out of order), ``--merge-queued``.

Behaviour copied from the real CLI (``claude-stream-json.md``, and the
CLI 2.1.330 binary where the notes are silent):

- Nothing is printed before the first input line, except the error result of
  an unknown ``--resume`` id, which comes at start-up, followed by exit 1.
- A uuid-stamped message gets ``command_lifecycle`` lines: ``queued`` on
  arrival, ``started`` before its ``system/init``, and after its result
  ``completed``, or ``cancelled`` when its turn was interrupted or aborted or
  ended in error, or when ``cancel_queued`` dropped it.  A repeated uuid is
  dropped silently (within one process only).  A uuid-stamped message whose
  content is neither a string nor a list (nor null) runs no turn and gets a
  lone ``completed`` (its uuid is not taken: it may be sent again).
- ``interrupt`` is answered ``{"still_queued": [...]}`` (plus ``cancelled``
  with ``cancel_queued``); a pending ``can_use_tool`` is withdrawn with
  ``control_cancel_request`` (before the reply).  A running turn then prints
  the partial text block, if one was streaming; if a tool was running or
  waiting for permission, a user ``tool_result`` line rejecting it
  (``is_error``); a user ``[Request interrupted by user]`` marker (``... for
  tool use]`` after a tool); and an ``error_during_execution`` result whose
  ``num_turns`` counts the marker (2 while streaming, 3 during a tool).
- A ``priority: "now"`` message aborts the running turn without a marker:
  while streaming, an ``error_during_execution`` result (``num_turns`` 1), or,
  when reply text had come, the partial block and a ``success`` result
  (``is_error`` false, ``terminal_reason`` ``aborted_streaming``) carrying
  that text; during a tool, the tool first finishes (a pending permission is
  withdrawn and its ``tool_result`` says so), then a ``success`` result with
  ``aborted_tools`` and empty text.  The message then runs as the next turn.
- ``set_model`` is preceded by an ``isReplay`` user line
  ``<local-command-stdout>Set model to `...`</local-command-stdout>`` when it
  changes the resolved model once a turn has begun; ``model: null`` (and
  ``"default"``) resets to the built-in default model (``DEFAULT_MODEL``,
  whatever ``--model`` said).  A running turn keeps its model.
- ``set_permission_mode`` is answered ``{"mode": MODE}``, followed by a
  ``system/status`` line when the mode changed.  Errors carry an
  ``error_code``: ``invalid_mode``, ``auto_mode_model`` (``auto`` with a
  4.5-generation model) or ``bypass_not_launched``.
- Results of the ``error_*`` subtypes carry ``errors`` and no ``result`` text.
- Stdin EOF: queued turns still run, then exit 1 if the last result was an
  error, else 0.  SIGTERM: exit 143 at once, no result.  SIGINT: the running
  turn's interrupted result, then exit 0.
- Transcripts live in ``<state dir>/<session id>.jsonl``; a turn's prompt is
  recorded when it starts, so a prompt killed mid-turn survives a
  ``--resume``.  ``--session-id`` refuses ("already in use") an id that has a
  transcript; ``--fork-session`` copies it under a new id.

Only the standard library is imported and no event loop library is used:
the process is spawned per test and per benchmark run, so start-up must be
cheap.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import select
import signal
import sys
import time
from collections import deque

# typing costs milliseconds to import and the sim needs it only for mypy.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any, NoReturn

SIM_VERSION = "2.1.330-sim"
"""Reported as ``claude_code_version``; the suffix tells logs it is not the real CLI."""

DEFAULT_MODEL = "claude-sonnet-4-5-20250929"
"""The model reported when neither ``--model`` nor ``set_model`` chose one."""

MODEL_ALIASES = {
    "default": DEFAULT_MODEL,
    "sonnet": DEFAULT_MODEL,
    "opus": "claude-opus-4-1-20250805",
    "haiku": "claude-haiku-4-5-20251001",
}
"""Aliases the sim resolves, as the real CLI resolves its own."""

CAPABILITIES = ["interrupt_receipt_v1", "interrupt_cancel_queued_v1", "msg_lifecycle_v1"]
"""Advertised on ``system/init``."""

TOOLS = ["Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "WebFetch", "TodoWrite"]
"""The ``tools`` list of ``system/init``."""

PERMISSION_MODES = {"default", "acceptEdits", "auto", "bypassPermissions", "plan", "dontAsk"}
"""Modes ``set_permission_mode`` and ``--permission-mode`` accept."""

_INVALID_MODE = "Cannot set permission mode: must be one of " + ", ".join(sorted(PERMISSION_MODES))

# Models the real CLI refuses "auto" permission mode for (the 4.5 generation:
# claude-sonnet-4-5, claude-haiku-4-5, claude-opus-4-5, dated or not).
_NO_AUTO_MODE = re.compile(r"-4-5(?:-|$)")

TOOL_REJECTED = (
    "The user doesn't want to proceed with this tool use. The tool use was rejected (eg. if it "
    "was a file edit, the new_string was NOT written to the file). STOP what you are doing and "
    "wait for the user to tell you how to proceed."
)
"""The ``tool_result`` the real CLI records for a tool an interrupt stopped
while it waited for permission."""

TOOL_STOPPED = (
    "Correction to the text above: this call was stopped while running, not refused before it "
    "ran. It may have run in part or in full, and its changes may have been written. No "
    "permission prompt was involved. Work it started elsewhere (a remote command, a background "
    "process) may still be running, so check before starting the same work again. The "
    "instruction to stop and wait still stands."
)
"""Appended to :data:`TOOL_REJECTED` when the tool was already running."""

_DIRECTIVE = re.compile(r"\[sim:([a-z_]+)(?:=([^\]\s]*))?\]")

# Flags of the real CLI that take a value and that the sim accepts and ignores,
# so a broker can pass its production argv unchanged.
_IGNORED_VALUE_FLAGS = {
    "--permission-prompt-tool",
    "--max-turns",
    "--max-budget-usd",
    "--append-system-prompt",
    "--system-prompt",
    "--allowedTools",
    "--allowed-tools",
    "--disallowedTools",
    "--disallowed-tools",
    "--mcp-config",
    "--setting-sources",
    "--settings",
    "--add-dir",
    "--fallback-model",
    "--agents",
    "--effort",
    "--debug-file",
}
_IGNORED_BOOL_FLAGS = {
    "--include-partial-messages",
    "--replay-user-messages",
    "--dangerously-skip-permissions",
    "--strict-mcp-config",
}
_VALUE_FLAGS = {
    "--input-format",
    "--output-format",
    "--session-id",
    "--resume",
    "-r",
    "--model",
    "--permission-mode",
    "--sim-state-dir",
    "--stamp-file",
    "--stats-file",
    "--turn-ms",
    "--chunks",
    "--bytes",
    "--huge",
    "--tool-ms",
    "--error",
    "--interrupt-ms",
    "--set-model-ms",
    "--context-usage-ms",
    "--startup-ms",
    "--tool-child-secs",
} | _IGNORED_VALUE_FLAGS
_BOOL_FLAGS = {
    "-p",
    "--print",
    "--verbose",
    "--fork-session",
    "--tool",
    "--permission",
    "--ignore-interrupts",
    "--die",
    "--garbage",
    "--silent",
    "--tool-child",
    "--merge-queued",
    "--hang",
} | _IGNORED_BOOL_FLAGS

# Global flags that set a per-turn directive default: flag -> directive name.
_FLAG_DIRECTIVES = {
    "--turn-ms": "turn_ms",
    "--chunks": "chunks",
    "--bytes": "bytes",
    "--huge": "huge",
    "--tool-ms": "tool_ms",
    "--error": "error",
    "--interrupt-ms": "interrupt_ms",
    "--tool": "tool",
    "--permission": "permission",
    "--ignore-interrupts": "ignore_interrupt",
    "--die": "die",
    "--garbage": "garbage",
    "--silent": "silent",
    "--tool-child": "tool_child",
    "--tool-child-secs": "tool_child",
    "--hang": "hang",
}

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class UsageError(Exception):
    """A command line the real CLI would refuse (the sim exits 1 with the message)."""


def new_uuid() -> str:
    """A random version-4 UUID string (``uuid`` is not imported: start-up cost)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def resolve_model(name: str | None, default: str = DEFAULT_MODEL) -> str:
    """Resolve an alias (``sonnet``, ``opus``, ``haiku``, ``default``) or ``None``.

    ``None`` and ``"default"`` give ``default``: the built-in default model,
    as in the real CLI, where ``set_model`` null ignores ``--model``.
    """
    if name is None or name == "default":
        return default
    return MODEL_ALIASES.get(name, name)


def parse_directives(text: str) -> dict[str, str]:
    """Return the ``[sim:NAME=VALUE]`` directives in ``text`` (``VALUE`` ``""`` if absent)."""
    return {m.group(1): m.group(2) or "" for m in _DIRECTIVE.finditer(text)}


def parse_argv(argv: list[str]) -> dict[str, str]:
    """Parse the command line into ``{flag: value}`` (``""`` for booleans).

    Raises :class:`UsageError` where the real CLI refuses to start.
    """
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            if flag not in _VALUE_FLAGS:
                raise UsageError(f"error: unknown option '{flag}'")
            opts[flag] = value
        elif arg in _VALUE_FLAGS:
            # A value that looks like a flag is a missing value: that is why
            # callers are told to use --resume=ID.
            if i >= len(argv) or argv[i].startswith("-"):
                raise UsageError(f"error: option '{arg} <value>' argument missing")
            opts[arg] = argv[i]
            i += 1
        elif arg in _BOOL_FLAGS:
            opts[arg] = ""
        elif arg.startswith("-"):
            raise UsageError(f"error: unknown option '{arg}'")
        else:
            raise UsageError(
                "error: the sim takes no prompt argument; write prompts to stdin (stream-json)"
            )
    if "-r" in opts:
        opts["--resume"] = opts.pop("-r")
    if "-p" not in opts and "--print" not in opts:
        raise UsageError("Error: the sim supports only -p (print) mode")
    if opts.get("--input-format") != "stream-json":
        raise UsageError("Error: the sim supports only --input-format stream-json")
    if opts.get("--output-format") != "stream-json":
        raise UsageError("Error: the sim supports only --output-format stream-json")
    if "--verbose" not in opts:
        raise UsageError(
            "Error: When using --print, --output-format=stream-json requires --verbose"
        )
    if "--session-id" in opts and not _UUID_RE.match(opts["--session-id"]):
        raise UsageError("Error: Invalid session ID. Must be a valid UUID.")
    mode = opts.get("--permission-mode")
    if mode is not None and mode not in PERMISSION_MODES:
        raise UsageError(f"error: option '--permission-mode <mode>' argument '{mode}' is invalid")
    return opts


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


class _Turn:
    """One turn in flight: its messages, script and progress."""

    def __init__(self, uuids: list[str], prompt: str, script: dict[str, str], model: str) -> None:
        self.uuids = uuids
        self.prompt = prompt
        self.script = script
        self.model = model
        self.started = time.monotonic()
        self.phase = "streaming"
        self.num_turns = 1
        self.out_chars = 0
        self.ignore_interrupts = "ignore_interrupt" in script
        self.wait_until: float | None = None
        self.perm_id: str | None = None
        self.stop_at: float | None = None
        self.stop_reason = ""
        self.die_timer: list[Any] | None = None
        self.gen: Generator[float | None, Any, dict[str, Any]] | None = None
        self.tool_id = ""
        self.tool_running = False
        # The text block streaming now: (text, start, end) on the monotonic clock.
        self.block: tuple[str, float, float] | None = None
        self.text_out = ""  # reply text printed so far (complete blocks)
        self.partial = ""  # a block cut short by an interrupt or priority "now"
        # How the turn was stopped: "" (not), "interrupt" (control request or
        # SIGINT: marker), "now" (a priority "now" message: no marker).
        self.abort = ""
        self.abort_after_tool = False  # priority "now" while the tool runs


class Sim:
    """The simulated CLI: one instance per process, driven by :meth:`run`.

    ``--stamp-file PATH`` gets one line per stdin line, written unbuffered as
    soon as the line is read: ``<time.perf_counter_ns()>\\t<kind>\\t<detail>``,
    kind being the line's ``type`` (or ``blank``, ``malformed``, ``array``,
    ``scalar``), detail the ``uuid`` of a user message, the subtype of a
    control request, the ``request_id`` of a control response, else ``-``.

    ``--stats-file PATH`` is a JSON object of counters, replaced atomically
    (temporary file, then rename) after every stdin line, turn start and
    result, and just before every control response: once a reader has seen
    the reply to a request it sent, the file counts everything before it.
    ``lines_read`` (every stdin line, blank ones too), ``malformed_lines``
    (0 or 1: the first kills the process), ``ignored_lines``,
    ``user_messages`` (well-formed user lines, duplicates included),
    ``user_messages_while_running`` (of those, the ones that arrived while a
    turn was running: a broker must keep it at 0), ``duplicate_uuids``,
    ``interrupts``, ``control_requests`` (interrupts included),
    ``control_responses``, ``turns``, ``results``, ``error_results``,
    ``interrupted_turns``, ``cancelled_messages``, and ``pid``.
    """

    def __init__(self, opts: dict[str, str]) -> None:
        self.opts = opts
        self.default_model = resolve_model(opts.get("--model"))
        self.model = self.default_model
        self.permission_mode = opts.get("--permission-mode", "default")
        if self.permission_mode == "auto" and _NO_AUTO_MODE.search(self.model):
            self.permission_mode = "default"  # the real CLI falls back silently
        self.bypass_allowed = (
            "--dangerously-skip-permissions" in opts or self.permission_mode == "bypassPermissions"
        )
        self.base_script: dict[str, str] = {}
        for flag, name in _FLAG_DIRECTIVES.items():
            if flag in opts:
                self.base_script[name] = opts[flag]
        self.merge_queued = "--merge-queued" in opts
        self.set_model_delay = _int(opts.get("--set-model-ms")) / 1000
        self.context_usage_delay = _int(opts.get("--context-usage-ms")) / 1000
        self.ready_at = time.monotonic() + _int(opts.get("--startup-ms")) / 1000
        self.state_dir = opts.get("--sim-state-dir") or os.path.join(
            os.path.expanduser("~"), ".sim-claude"
        )
        self.session_id = new_uuid()
        self.history = 0
        self.queue: deque[tuple[str | None, str, dict[str, str]]] = deque()
        self.seen_uuids: set[str] = set()
        self.turn: _Turn | None = None
        self.turns_begun = 0
        self.last_error = False
        self.eof = False
        self.exit_after_result = False
        self.sigint = False
        self.timers: list[list[Any]] = []
        self.timer_seq = 0
        self.inbuf = bytearray()
        self.scan_from = 0
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "lines_read",
                "malformed_lines",
                "ignored_lines",
                "user_messages",
                "user_messages_while_running",
                "duplicate_uuids",
                "interrupts",
                "control_requests",
                "control_responses",
                "turns",
                "results",
                "error_results",
                "interrupted_turns",
                "cancelled_messages",
            ),
            0,
        )
        self.stats["pid"] = os.getpid()
        stamp = opts.get("--stamp-file")
        self.stamp_fd = (
            os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            if stamp
            else -1
        )
        self.stats_path = opts.get("--stats-file")

    # ----------------------------------------------------------------- output

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(1, view)
            except BlockingIOError:
                select.select([], [1], [])
                continue
            except BrokenPipeError:
                self._exit(1, "sim: stdout closed")
            view = view[n:]

    def emit(self, obj: dict[str, Any]) -> None:
        """Write one compact JSON line to stdout, like ``JSON.stringify``."""
        try:
            text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from the input: escape it, as JSON.stringify does.
            data = json.dumps(obj, separators=(",", ":")).encode("ascii")
        self._write(data + b"\n")

    def _control_success(self, request_id: Any, response: dict[str, Any] | None) -> None:
        # Stats first: a reader that saw this reply (say, a test's barrier
        # request) then finds counters covering everything before it.
        self._write_stats()
        inner: dict[str, Any] = {"subtype": "success", "request_id": request_id}
        if response is not None:
            inner["response"] = response
        self.emit({"type": "control_response", "response": inner})

    def _control_error(
        self, request_id: Any, error: str, code: str | None = None, **extra: Any
    ) -> None:
        self._write_stats()
        inner: dict[str, Any] = {"subtype": "error", "request_id": request_id, "error": error}
        if code is not None:
            inner["error_code"] = code
        inner.update(extra)
        self.emit({"type": "control_response", "response": inner})

    def _lifecycle(self, command_uuid: str, state: str) -> None:
        self.emit(
            {
                "type": "command_lifecycle",
                "command_uuid": command_uuid,
                "state": state,
                "uuid": new_uuid(),
                "session_id": self.session_id,
            }
        )

    def _write_stats(self) -> None:
        if not self.stats_path:
            return
        tmp = f"{self.stats_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.stats, f)
            os.replace(tmp, self.stats_path)
        except OSError as exc:
            sys.stderr.write(f"sim: cannot write stats file: {exc}\n")
            self.stats_path = None

    def _exit(self, code: int, message: str | None = None) -> NoReturn:
        self._write_stats()
        if message:
            os.write(2, (message + "\n").encode("utf-8", "replace"))
        # os._exit: nothing is buffered (all output went through os.write) and
        # skipping interpreter teardown keeps exit as prompt as the real CLI's.
        os._exit(code)

    # --------------------------------------------------------------- sessions

    def _transcript(self, session_id: str) -> str:
        return os.path.join(self.state_dir, f"{session_id}.jsonl")

    def open_session(self) -> None:
        """Apply ``--session-id`` / ``--resume`` (exits like the real CLI on failure)."""
        resume = self.opts.get("--resume")
        if resume is not None:
            path = self._transcript(resume)
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.readlines()
            except FileNotFoundError:
                self.session_id = resume
                self._emit_result(
                    None,
                    subtype="error_during_execution",
                    terminal_reason=None,
                    errors=[f"No conversation found with session ID: {resume}"],
                )
                self._exit(1)
            self.history = sum(1 for line in lines if '"type":"user"' in line)
            if "--fork-session" in self.opts:
                self.session_id = self.opts.get("--session-id") or new_uuid()
                os.makedirs(self.state_dir, exist_ok=True)
                with open(self._transcript(self.session_id), "w", encoding="utf-8") as f:
                    f.writelines(lines)
            else:
                self.session_id = resume
        elif "--session-id" in self.opts:
            self.session_id = self.opts["--session-id"]
            # The real CLI writes its transcript lazily too: a process killed
            # before its first turn leaves nothing to --resume.
            if os.path.exists(self._transcript(self.session_id)):
                self._exit(1, f"Error: Session ID {self.session_id} is already in use.")

    def _record(self, entry: dict[str, Any]) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        fd = os.open(
            self._transcript(self.session_id),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- timers

    def _after(self, delay: float, fn: Callable[[], None]) -> list[Any]:
        self.timer_seq += 1
        timer: list[Any] = [time.monotonic() + delay, self.timer_seq, fn]
        heapq.heappush(self.timers, timer)
        return timer

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            if fn is not None:
                fn()

    # ------------------------------------------------------------------ input

    def _stamp(self, t_ns: int, kind: str, detail: Any) -> None:
        if self.stamp_fd >= 0:
            detail_s = str(detail).replace("\t", " ").replace("\n", " ") if detail else "-"
            os.write(self.stamp_fd, f"{t_ns}\t{kind}\t{detail_s}\n".encode("utf-8", "replace"))

    def _fatal(self, reason: str, line: bytes) -> NoReturn:
        self.stats["malformed_lines"] += 1
        shown = line[:200].decode("utf-8", "replace")
        self._exit(1, f"Error parsing stream-json input: {reason}: {shown!r}")

    def feed(self, data: bytes, t_ns: int) -> None:
        """Take bytes read from stdin and handle every complete line in them."""
        buf = self.inbuf
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", max(start, self.scan_from))
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            self.scan_from = start
            self.handle_line(line, t_ns)
        del buf[:start]
        # Remember how far was scanned so a 10 MB line arriving in 64 KiB
        # pieces is not rescanned from its start on every read.
        self.scan_from = len(buf)

    def handle_line(self, line: bytes, t_ns: int) -> None:
        """Validate one stdin line like the real CLI and act on it."""
        self.stats["lines_read"] += 1
        self._handle_line(line, t_ns)
        # The next queued turn starts before the next line is read, so a line
        # that follows (say, an interrupt) meets it running.
        self._maybe_start()
        self._write_stats()

    def _handle_line(self, line: bytes, t_ns: int) -> None:
        if not line.strip():
            self._stamp(t_ns, "blank", None)
            self.stats["ignored_lines"] += 1
            return
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            self._stamp(t_ns, "malformed", None)
            self._fatal(str(exc), line)
        if isinstance(obj, list):
            self._stamp(t_ns, "array", None)
            self.stats["ignored_lines"] += 1
            return
        if not isinstance(obj, dict):
            self._stamp(t_ns, "scalar", None)
            self.stats["ignored_lines"] += 1
            return
        kind = obj.get("type")
        if kind == "user":
            self._stamp(t_ns, "user", obj.get("uuid"))
            self._on_user(obj, line)
        elif kind == "control_request":
            request = obj.get("request")
            self._stamp(
                t_ns,
                "control_request",
                request.get("subtype") if isinstance(request, dict) else None,
            )
            if not isinstance(request, dict):
                self._fatal("control_request without request", line)
            self.stats["control_requests"] += 1
            self._on_control_request(obj.get("request_id"), request)
        elif kind == "control_response":
            response = obj.get("response")
            rid = response.get("request_id") if isinstance(response, dict) else None
            self._stamp(t_ns, "control_response", rid)
            self.stats["control_responses"] += 1
            if isinstance(response, dict):
                self._on_control_response(response)
        else:
            self._stamp(t_ns, str(kind), None)
            self.stats["ignored_lines"] += 1

    def _on_user(self, obj: dict[str, Any], line: bytes) -> None:
        message = obj.get("message")
        if not isinstance(message, dict):
            self._fatal("user message without message", line)
        self.stats["user_messages"] += 1
        if self.turn is not None:
            self.stats["user_messages_while_running"] += 1
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "\n".join(
                b["text"]
                for b in content
                if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
            )
        else:
            # The real CLI runs no turn for such a message; if it is stamped,
            # it reports the uuid "completed" at once (without taking it: the
            # uuid may be sent again).  A broker waiting for a result waits
            # forever.
            self.stats["ignored_lines"] += 1
            uid = obj.get("uuid")
            if content is not None and isinstance(uid, str) and uid:
                self._lifecycle(uid, "completed")
            return
        uid = obj.get("uuid")
        uid = uid if isinstance(uid, str) and uid else None
        if uid is not None:
            if uid in self.seen_uuids:
                self.stats["duplicate_uuids"] += 1
                return
            self.seen_uuids.add(uid)
            self._lifecycle(uid, "queued")
        entry = (uid, text, parse_directives(text))
        if obj.get("priority") == "now" and self.turn is not None:
            self.queue.appendleft(entry)
            self._abort_now()
        else:
            self.queue.append(entry)
        self._maybe_start()

    # ------------------------------------------------------- control requests

    def _on_control_request(self, request_id: Any, request: dict[str, Any]) -> None:
        subtype = request.get("subtype")
        if subtype == "interrupt":
            self._on_interrupt(request_id, request)
        elif subtype == "initialize":
            self._control_success(request_id, self._initialize_info())
        elif subtype == "set_model":
            model = request.get("model")
            if model is not None and not isinstance(model, str):
                self._control_error(
                    request_id, "set_model: model must be a string", "invalid_request", model=self.model
                )
                return

            def reply() -> None:
                resolved = resolve_model(model)
                changed = resolved != self.model
                self.model = resolved
                # The real CLI echoes the switch only when the model changes,
                # and not before the first turn.
                if changed and self.turns_begun > 0:
                    shown = resolved if model in (None, resolved) else f"{model} ({resolved})"
                    self.emit(
                        {
                            "type": "user",
                            "message": {
                                "role": "user",
                                "content": "<local-command-stdout>Set model to "
                                f"`{shown}`</local-command-stdout>",
                            },
                            "session_id": self.session_id,
                            "parent_tool_use_id": None,
                            "uuid": new_uuid(),
                            "timestamp": _timestamp(),
                            "isReplay": True,
                        }
                    )
                self._control_success(request_id, {"model": self.model})

            self._reply_later(self.set_model_delay, reply)
        elif subtype == "set_permission_mode":
            self._set_permission_mode(request_id, request.get("mode"))
        elif subtype == "get_context_usage":
            self._reply_later(
                self.context_usage_delay,
                lambda: self._control_success(request_id, self._context_usage()),
            )
        elif subtype == "mcp_status":
            self._control_success(request_id, {"mcpServers": []})
        else:
            self._control_error(
                request_id, f"Unsupported control request subtype: {subtype}", "unsupported_request"
            )

    def _set_permission_mode(self, request_id: Any, mode: Any) -> None:
        if not isinstance(mode, str) or mode not in PERMISSION_MODES:
            self._control_error(request_id, _INVALID_MODE, "invalid_mode")
        elif mode == "auto" and _NO_AUTO_MODE.search(self.model):
            self._control_error(
                request_id,
                "Cannot set permission mode to auto: auto mode unavailable for this model",
                "auto_mode_model",
            )
        elif mode == "bypassPermissions" and not self.bypass_allowed:
            self._control_error(
                request_id,
                "Cannot set permission mode to bypassPermissions because the session was not "
                "launched with --dangerously-skip-permissions",
                "bypass_not_launched",
            )
        else:
            changed = mode != self.permission_mode
            self.permission_mode = mode
            self._control_success(request_id, {"mode": mode})
            if changed:
                self.emit(
                    {
                        "type": "system",
                        "subtype": "status",
                        "status": None,
                        "permissionMode": mode,
                        "uuid": new_uuid(),
                        "session_id": self.session_id,
                    }
                )

    def _reply_later(self, delay: float, fn: Callable[[], None]) -> None:
        if delay > 0:
            self._after(delay, fn)
        else:
            fn()

    def _initialize_info(self) -> dict[str, Any]:
        return {
            "commands": [
                {"name": "compact", "description": "Compact the conversation", "argumentHint": ""},
                {"name": "context", "description": "Show context usage", "argumentHint": ""},
                {"name": "model", "description": "Set the model", "argumentHint": "[model]"},
            ],
            "agents": [],
            "output_style": "default",
            "available_output_styles": ["default"],
            "models": [
                {"value": "default", "displayName": "Default", "description": DEFAULT_MODEL},
                {"value": "opus", "displayName": "Opus", "description": MODEL_ALIASES["opus"]},
                {"value": "haiku", "displayName": "Haiku", "description": MODEL_ALIASES["haiku"]},
            ],
            "account": {},
            "pid": os.getpid(),
        }

    def _context_usage(self) -> dict[str, Any]:
        used = 4000 + 50 * self.history
        return {
            "model": self.model,
            "totalTokens": used,
            "maxTokens": 200000,
            "rawMaxTokens": 200000,
            "percentage": round(100 * used / 200000, 2),
            "categories": [{"name": "Messages", "tokens": used, "color": "purple"}],
        }

    def _on_interrupt(self, request_id: Any, request: dict[str, Any]) -> None:
        self.stats["interrupts"] += 1
        turn = self.turn
        if turn is not None and turn.ignore_interrupts:
            return
        if turn is not None and turn.perm_id is not None:
            # The real CLI withdraws its pending question before it replies.
            self.emit({"type": "control_cancel_request", "request_id": turn.perm_id})
            turn.perm_id = None
        cancelled: list[str] = []
        if request.get("cancel_queued") is True:
            while self.queue:
                uid = self.queue.popleft()[0]
                if uid is not None:
                    cancelled.append(uid)
        reply: dict[str, Any] = {"still_queued": [e[0] for e in self.queue if e[0] is not None]}
        if request.get("cancel_queued") is True:
            reply["cancelled"] = cancelled
        self._control_success(request_id, reply)
        for uid in cancelled:
            self.stats["cancelled_messages"] += 1
            self._lifecycle(uid, "cancelled")
        if turn is not None:
            self._interrupt_turn()

    def _interrupt_turn(self, kind: str = "interrupt") -> None:
        """Stop the running turn: its interrupted result follows (after ``interrupt_ms``).

        ``kind`` is ``"interrupt"`` (a control request or SIGINT: the marker
        follows) or ``"now"`` (a ``priority: "now"`` message: no marker).
        """
        turn = self.turn
        if turn is None or turn.ignore_interrupts or turn.stop_at is not None:
            return
        if kind == "now" and turn.phase == "tools" and turn.perm_id is None:
            # The real CLI lets a running tool finish, then ends the turn.
            turn.abort_after_tool = True
            return
        turn.abort = kind
        turn.stop_reason = "aborted_tools" if turn.phase == "tools" else "aborted_streaming"
        if turn.block is not None:
            # The block streaming now is cut short: what came of it so far.
            text, start, end = turn.block
            turn.block = None
            done = (time.monotonic() - start) / (end - start) if end > start else 1.0
            turn.partial = text[: int(len(text) * min(1.0, max(0.0, done)))]
        if turn.gen is not None:
            turn.gen.close()
            turn.gen = None
        if turn.perm_id is not None:
            # The real CLI withdraws its pending question; a late answer is ignored.
            self.emit({"type": "control_cancel_request", "request_id": turn.perm_id})
            turn.perm_id = None
        turn.wait_until = None
        if turn.die_timer is not None:
            turn.die_timer[2] = None
        if "silent" in turn.script:
            return
        turn.stop_at = time.monotonic() + _int(turn.script.get("interrupt_ms")) / 1000
        self._step()

    def _abort_now(self) -> None:
        """A ``priority: "now"`` message aborts the running turn (see :meth:`_interrupt_turn`)."""
        self._interrupt_turn("now")

    def _on_control_response(self, response: dict[str, Any]) -> None:
        turn = self.turn
        rid = response.get("request_id")
        if turn is None or turn.perm_id is None or rid != turn.perm_id:
            return
        turn.perm_id = None
        self._advance(response)

    # ------------------------------------------------------------------ turns

    def _maybe_start(self) -> None:
        # A loop, not recursion from _end_turn: a turn with no delays ends
        # inside _start, and a long queue must not grow the stack.
        while self.turn is None and self.queue:
            self._start()

    def _start(self) -> None:
        entries = [self.queue.popleft()]
        if self.merge_queued:
            while self.queue:
                entries.append(self.queue.popleft())
        uuids = [e[0] for e in entries if e[0] is not None]
        prompt = "\n".join(e[1] for e in entries)
        script = dict(self.base_script)
        for e in entries:
            script.update(e[2])
        turn = _Turn(uuids, prompt, script, self.model)
        self.turn = turn
        self.turns_begun += 1
        self.stats["turns"] += 1
        history = self.history
        for e in entries:
            self._record({"type": "user", "uuid": e[0], "prompt": e[1][:200]})
        self.history += len(entries)
        self._write_stats()
        for uid in uuids:
            self._lifecycle(uid, "started")
        if script.get("die"):
            turn.die_timer = self._after(_int(script["die"]) / 1000, self._die)
        turn.gen = self._script(turn, history)
        self._advance(None)

    def _advance(self, value: Any) -> None:
        """Run the turn's script until it waits; finish the turn when it returns."""
        turn = self.turn
        while turn is not None and turn.gen is not None:
            try:
                wait = turn.gen.send(value)
            except StopIteration as stop:
                turn.gen = None
                self._finish(turn, stop.value)
                return
            value = None
            if wait is not None and wait <= time.monotonic():
                continue
            turn.wait_until = wait
            return

    def _step(self) -> None:
        """Resume whatever in the running turn is due now."""
        turn = self.turn
        if turn is None:
            return
        now = time.monotonic()
        if turn.stop_at is not None:
            if turn.stop_at <= now:
                self._finish_interrupted(turn)
            return
        if turn.wait_until is not None and turn.wait_until <= now:
            turn.wait_until = None
            self._advance(None)

    def _die(self) -> None:
        self._exit(1, "sim: simulated crash ([sim:die])")

    def _assistant(self, turn: _Turn, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "type": "assistant",
            "message": {
                "id": "msg_sim_" + new_uuid().replace("-", "")[:24],
                "type": "message",
                "role": "assistant",
                "model": turn.model,
                "content": content,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1},
            },
            "parent_tool_use_id": None,
            "session_id": self.session_id,
            "uuid": new_uuid(),
        }

    def _reply_text(self, turn: _Turn, history: int) -> str:
        text = f"sim: {turn.prompt}"
        if "history" in turn.script:
            text += f" [history={history}]"
        if "bytes" in turn.script:
            n = max(0, _int(turn.script["bytes"]))
            raw = text.encode("utf-8")[:n].decode("utf-8", "ignore")
            text = raw + "." * (n - len(raw.encode("utf-8")))
        return text

    def _script(
        self, turn: _Turn, history: int
    ) -> Generator[float | None, Any, dict[str, Any]]:
        """The turn as a coroutine: yields a deadline to sleep until (``None``:
        until a control response arrives, or forever) and returns the outcome."""
        s = turn.script
        self.emit(
            {
                "type": "system",
                "subtype": "init",
                "cwd": os.getcwd(),
                "session_id": self.session_id,
                "tools": TOOLS,
                "mcp_servers": [],
                "model": turn.model,
                "permissionMode": self.permission_mode,
                "slash_commands": ["compact", "context", "model"],
                "apiKeySource": "none",
                "claude_code_version": SIM_VERSION,
                "output_style": "default",
                "agents": ["general-purpose"],
                "skills": [],
                "plugins": [],
                "capabilities": CAPABILITIES,
                "uuid": new_uuid(),
            }
        )
        if "garbage" in s:
            self._write(b"sim garbage: this line is not JSON {\n")
        if "hang" in s:
            while True:
                yield None
        suffix = ""
        if "tool" in s or "permission" in s:
            turn.phase = "tools"
            turn.num_turns = 2
            tool_id = turn.tool_id = "toolu_sim_" + new_uuid().replace("-", "")[:20]
            tool_input = {"command": "echo sim", "description": "sim tool"}
            self.emit(
                self._assistant(
                    turn, [{"type": "tool_use", "id": tool_id, "name": "Bash", "input": tool_input}]
                )
            )
            allowed, denial = True, ""
            if "permission" in s:
                turn.perm_id = "sim-perm-" + new_uuid()
                self.emit(
                    {
                        "type": "control_request",
                        "request_id": turn.perm_id,
                        "request": {
                            "subtype": "can_use_tool",
                            "tool_name": "Bash",
                            "input": tool_input,
                            "permission_suggestions": [],
                            "tool_use_id": tool_id,
                        },
                    }
                )
                answer = yield None
                allowed, denial = _decision(answer)
                suffix = " [permission: allowed]" if allowed else f" [permission: denied ({denial})]"
            tool_ms = _int(s.get("tool_ms"))
            if allowed and tool_ms > 0:
                turn.tool_running = True
                yield time.monotonic() + tool_ms / 1000
                turn.tool_running = False
            self._tool_result(turn, "sim tool output" if allowed else denial, not allowed)
            turn.phase = "streaming"
            if turn.abort_after_tool:
                return {"aborted_tools": True}

        error = s.get("error")
        if error is not None and error.startswith("api"):
            status = _int(error.partition(":")[2], 500)
            text = f"API Error: {status} {{\"type\":\"error\",\"error\":{{\"type\":\"api_error\"}}}}"
            self.emit(self._assistant(turn, [{"type": "text", "text": text}]))
            turn.out_chars = len(text)
            return {"text": text, "api_error_status": status}

        if "huge" in s:
            size = _int(s["huge"])
            line = self._assistant(turn, [{"type": "text", "text": ""}])
            overhead = len(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode())
            text = _filler(max(0, size - overhead))
            line["message"]["content"][0]["text"] = text
            self.emit(line)
            chunks = [text]
        else:
            text = self._reply_text(turn, history) + suffix
            turn_ms = _int(s.get("turn_ms"))
            k = max(1, _int(s.get("chunks"), max(1, turn_ms // 20)))
            if len(text) < k:
                text += "." * (k - len(text))
            bounds = [len(text) * i // k for i in range(k + 1)]
            chunks = [text[bounds[i] : bounds[i + 1]] for i in range(k)]
            for i, chunk in enumerate(chunks):
                if turn_ms > 0:
                    # Block i streams over its share of turn_ms; its line is
                    # printed when it is complete (see _interrupt_turn).
                    end = turn.started + turn_ms * (i + 1) / k / 1000
                    turn.block = (chunk, turn.started + turn_ms * i / k / 1000, end)
                    yield end
                    turn.block = None
                self.emit(self._assistant(turn, [{"type": "text", "text": chunk}]))
                turn.text_out += chunk
        turn.out_chars = len(text)

        if "tool_child" in s:
            self._fork_tool_child(_int(s["tool_child"], 600))
            self._exit(1, "sim: simulated crash with a tool child holding stdout")
        if "die" in s:
            self._die()
        if "silent" in s or turn.ignore_interrupts:
            while True:
                yield None
        return {"text": text}

    def _fork_tool_child(self, seconds: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked child
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.close(0)
                # The child keeps fd 1 (the agent's stdout) open on purpose and
                # stays in the process group: that is the fault being modelled.
                time.sleep(seconds)
            finally:
                os._exit(0)

    # ---------------------------------------------------------------- results

    def _emit_result(
        self,
        turn: _Turn | None,
        *,
        subtype: str,
        terminal_reason: str | None,
        is_error: bool = True,
        text: str | None = None,
        errors: list[str] | None = None,
        api_error_status: int | None = None,
    ) -> None:
        elapsed = int((time.monotonic() - turn.started) * 1000) if turn else 0
        out_tokens = (turn.out_chars // 4 + 1) if turn else 0
        in_tokens = (len(turn.prompt) // 4 + 10) if turn else 0
        cost = round(in_tokens * 3e-6 + out_tokens * 15e-6, 8) if turn else 0
        usage = {
            "input_tokens": in_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": out_tokens,
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
            "service_tier": "standard",
        }
        result: dict[str, Any]
        if turn is None:
            # A start-up failure (unknown --resume id): the real CLI's line for
            # it does start with "type" and names no turn or terminal reason.
            result = {
                "type": "result",
                "subtype": subtype,
                "duration_ms": 0,
                "duration_api_ms": 0,
                "is_error": is_error,
                "num_turns": 0,
                "stop_reason": None,
                "session_id": self.session_id,
                "total_cost_usd": 0,
                "usage": usage,
                "modelUsage": {},
                "permission_denials": [],
                "uuid": new_uuid(),
                "errors": errors or [],
                "result_index": self.stats["results"],
            }
        else:
            # Key order copied from the real CLI: "type" is in the middle, so a
            # client must parse the line rather than sniff its prefix.
            result = {
                "duration_api_ms": elapsed,
                "stop_reason": "end_turn" if terminal_reason == "completed" else None,
                "session_id": self.session_id,
                "total_cost_usd": cost,
                "usage": usage,
                "modelUsage": {
                    turn.model: {
                        "inputTokens": in_tokens,
                        "outputTokens": out_tokens,
                        "cacheReadInputTokens": 0,
                        "cacheCreationInputTokens": 0,
                        "webSearchRequests": 0,
                        "costUSD": cost,
                        "contextWindow": 200000,
                    }
                },
                "permission_denials": [],
                "terminal_reason": terminal_reason,
                "is_error": is_error,
                "num_turns": turn.num_turns,
                "subtype": subtype,
            }
            if api_error_status is not None:
                result["api_error_status"] = api_error_status
            if errors is not None:
                result["errors"] = errors
            if text is not None:
                result["result"] = text
            result["type"] = "result"
            result["duration_ms"] = elapsed
            result["uuid"] = new_uuid()
            if turn.uuids:
                result["user_message_uuid"] = turn.uuids[0]
            result["user_message_uuids"] = list(turn.uuids)
            result["queued_turn_count"] = 0
            result["result_index"] = self.stats["results"]
        self.emit(result)
        self.stats["results"] += 1
        if is_error:
            self.stats["error_results"] += 1
        self.last_error = is_error

    def _finish(self, turn: _Turn, outcome: dict[str, Any]) -> None:
        error = turn.script.get("error") or ""
        text = str(outcome.get("text", ""))
        if outcome.get("aborted_tools"):
            # A priority "now" message came while the tool ran.
            turn.abort = "now"
            self.stats["interrupted_turns"] += 1
            self._emit_result(
                turn, subtype="success", terminal_reason="aborted_tools", is_error=False, text=""
            )
        elif "api_error_status" in outcome:
            self._emit_result(
                turn,
                subtype="success",
                terminal_reason="api_error",
                text=text,
                api_error_status=outcome["api_error_status"],
            )
        elif error == "max_turns":
            self._emit_result(
                turn,
                subtype="error_max_turns",
                terminal_reason="max_turns",
                errors=["Reached maximum number of turns (1)"],
            )
        elif error == "budget":
            self._emit_result(
                turn,
                subtype="error_max_budget_usd",
                terminal_reason="budget_exhausted",
                errors=["Reached maximum budget"],
            )
        else:
            self._emit_result(
                turn, subtype="success", terminal_reason="completed", is_error=False, text=text
            )
        self._end_turn(turn)

    def _tool_result(self, turn: _Turn, content: str, is_error: bool, **extra: Any) -> None:
        self.emit(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {
                            "tool_use_id": turn.tool_id,
                            "type": "tool_result",
                            "content": content,
                            "is_error": is_error,
                        }
                    ],
                },
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": new_uuid(),
                "timestamp": _timestamp(),
                **extra,
            }
        )

    def _finish_interrupted(self, turn: _Turn) -> None:
        tools = turn.stop_reason == "aborted_tools"
        if turn.partial:
            # Without --include-partial-messages the real CLI prints a text
            # block only when it is complete, or cut short, as here.
            line = self._assistant(turn, [{"type": "text", "text": turn.partial}])
            line["aborted"] = True
            self.emit(line)
        self.stats["interrupted_turns"] += 1
        if turn.abort == "now":
            # A priority "now" message: no marker, and no error if the turn
            # had something to show.
            text = turn.text_out + turn.partial
            if tools:  # only with a permission pending: a running tool finishes first
                self._tool_result(turn, "Tool permission request aborted", True)
                self._emit_result(
                    turn, subtype="success", terminal_reason="aborted_tools", is_error=False, text=""
                )
            elif text:
                turn.out_chars = len(text)
                self._emit_result(
                    turn, subtype="success", terminal_reason="aborted_streaming", is_error=False, text=text
                )
            else:
                self._emit_result(
                    turn, subtype="error_during_execution", terminal_reason="aborted_streaming", errors=[]
                )
            self._end_turn(turn)
            return
        if tools:
            self._tool_result(
                turn,
                f"{TOOL_REJECTED} {TOOL_STOPPED}" if turn.tool_running else TOOL_REJECTED,
                True,
                tool_use_result="User rejected tool use",
                tool_result_meta=[{"id": turn.tool_id, "non_execution_kind": "user-rejected"}],
            )
        marker = "[Request interrupted by user for tool use]" if tools else "[Request interrupted by user]"
        self.emit(
            {
                "type": "user",
                "message": {"role": "user", "content": [{"type": "text", "text": marker}]},
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": new_uuid(),
                "timestamp": _timestamp(),
            }
        )
        turn.num_turns += 1  # the real CLI counts the marker
        self._emit_result(
            turn, subtype="error_during_execution", terminal_reason=turn.stop_reason, errors=[]
        )
        self._end_turn(turn)

    def _end_turn(self, turn: _Turn) -> None:
        self._record({"type": "result", "is_error": self.last_error})
        self.turn = None
        if turn.die_timer is not None:
            turn.die_timer[2] = None
        cancelled = self.last_error or bool(turn.abort)
        for uid in turn.uuids:
            self._lifecycle(uid, "cancelled" if cancelled else "completed")
        self._write_stats()
        if self.exit_after_result:
            self._exit(0)

    # ------------------------------------------------------------------- loop

    def _on_signals(self, wakeup_r: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(wakeup_r, 512)
        if not self.sigint:
            return
        self.sigint = False
        turn = self.turn
        if turn is None:
            self._exit(0)
        if turn.ignore_interrupts:
            return
        self.queue.clear()
        self.exit_after_result = True
        if "silent" in turn.script:
            self._exit(0)
        self._interrupt_turn()

    def _on_eof(self) -> None:
        self.eof = True
        if self.inbuf.strip():
            # A last line without a newline still counts, as it does for the CLI.
            line = bytes(self.inbuf)
            self.inbuf.clear()
            self.handle_line(line, time.perf_counter_ns())
        turn = self.turn
        if turn is not None and turn.perm_id is not None:
            # Nobody is left to answer the question: treat it as a denial.
            turn.perm_id = None
            self._advance({"subtype": "error", "error": "stdin closed"})

    def _timeout(self) -> float | None:
        deadlines: list[float] = []
        if self.timers:
            deadlines.append(self.timers[0][0])
        turn = self.turn
        if turn is not None:
            if turn.stop_at is not None:
                deadlines.append(turn.stop_at)
            elif turn.wait_until is not None:
                deadlines.append(turn.wait_until)
        if not self.eof and time.monotonic() < self.ready_at:
            deadlines.append(self.ready_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def run(self) -> NoReturn:
        """Serve stdin until EOF, a fatal line, a signal or a scripted fault."""
        wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w)
        signal.signal(signal.SIGTERM, _on_sigterm)

        def on_sigint(signum: int, frame: object) -> None:
            self.sigint = True

        signal.signal(signal.SIGINT, on_sigint)
        self.open_session()
        while True:
            fds = [wakeup_r]
            if not self.eof and time.monotonic() >= self.ready_at:
                fds.append(0)
            readable, _, _ = select.select(fds, [], [], self._timeout())
            if wakeup_r in readable or self.sigint:
                self._on_signals(wakeup_r)
            if 0 in readable:
                data = os.read(0, 1 << 20)
                if data:
                    self.feed(data, time.perf_counter_ns())
                else:
                    self._on_eof()
            self._run_timers()
            self._step()
            self._maybe_start()
            if self.eof and self.turn is None and not self.queue:
                self._exit(1 if self.last_error else 0)


def _decision(answer: Any) -> tuple[bool, str]:
    """Read a ``can_use_tool`` answer: (allowed, denial message)."""
    if not isinstance(answer, dict):
        return False, "no answer"
    if answer.get("subtype") != "success":
        return False, str(answer.get("error") or "permission request failed")
    inner = answer.get("response")
    if isinstance(inner, dict) and inner.get("behavior") == "allow":
        return True, ""
    if isinstance(inner, dict):
        return False, str(inner.get("message") or "denied")
    return False, "denied"


def _timestamp() -> str:
    """The current UTC time as the CLI writes it (ISO 8601 with milliseconds)."""
    now = time.time()
    ms = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms:03d}Z"


def _filler(n: int) -> str:
    """Deterministic ASCII text of exactly ``n`` characters."""
    unit = "sim filler text 0123456789 abcdefghijklmnopqrstuvwxyz. "
    return (unit * (n // len(unit) + 1))[:n]


def _reject_constant(name: str) -> NoReturn:
    # JSON.parse refuses NaN and Infinity; so must the sim.
    raise ValueError(f"invalid JSON constant {name}")


def _on_sigterm(signum: int, frame: object) -> None:
    # The real CLI dies at once with 143 and no result: the turn is lost.
    os._exit(143)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point for ``python -m broker.agents.sim``."""
    try:
        opts = parse_argv(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.stderr.flush()
        os._exit(1)
    Sim(opts).run()


if __name__ == "__main__":
    main()
