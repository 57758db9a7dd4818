"""The fake CLI's process: its event loop, control requests and turns.

See :mod:`broker.testing.fake_cli` for what it imitates and
docs/testing-kit.md for its directives and flags.  Only the standard library
is imported and no event loop library is used: the process is spawned per
test and per benchmark run, so start-up must be cheap.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import select
import signal
import sys
import time
from collections import deque

from broker.testing.fake_cli import control, wire
from broker.testing.fake_cli.argv import UsageError, parse_argv
from broker.testing.fake_cli.script import (
    HOOK_EVENTS,
    Turn,
    as_int,
    base_script,
    decision,
    filler,
    fork_tool_child,
    hook_outcome,
    parse_directives,
    reply_text,
    split_reply,
)
from broker.testing.fake_cli.stats import StampFile, StatsFile, new_counters
from broker.testing.fake_cli.transcript import Transcripts, user_messages
from broker.testing.fake_cli.wire import (
    ERROR_RESULTS,
    TOOL_REJECTED,
    TOOL_STOPPED,
    Stdout,
    StdoutClosed,
    new_uuid,
    resolve_model,
)

TYPE_CHECKING = False  # not from typing: importing typing costs the fake CLI ~5 ms per start
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any, NoReturn


class FakeCLI:
    """The fake CLI: one instance per process, driven by :meth:`run`.

    Reads stdin lines, answers control requests, queues user messages and runs
    them one turn at a time; each turn is a generator (:meth:`_script`) that
    yields the deadline it waits for, so one ``select`` loop serves stdin,
    timers and the running turn without threads.
    """

    def __init__(self, opts: dict[str, str]) -> None:
        self.opts = opts
        self.default_model = resolve_model(opts.get("--model"))
        self.model = self.default_model
        self.permission_mode = opts.get("--permission-mode", "default")
        if self.permission_mode == "auto" and wire.NO_AUTO_MODE.search(self.model):
            self.permission_mode = "default"  # the real CLI falls back silently
        self.bypass_allowed = (
            "--dangerously-skip-permissions" in opts or self.permission_mode == "bypassPermissions"
        )
        self.base_script = base_script(opts)
        self.merge_queued = "--merge-queued" in opts
        self.set_model_delay = as_int(opts.get("--set-model-ms")) / 1000
        self.context_usage_delay = as_int(opts.get("--context-usage-ms")) / 1000
        self.ready_at = time.monotonic() + as_int(opts.get("--startup-ms")) / 1000
        self.transcripts = Transcripts(opts.get("--sim-state-dir"))
        self.session_id = new_uuid()
        self.history = 0
        self.queue: deque[tuple[str | None, str, dict[str, str]]] = deque()
        self.seen_uuids: set[str] = set()
        self.turn: Turn | None = None
        # Hooks registered by initialize: event -> [(matcher, callback ids)].
        self.hooks: dict[str, list[tuple[Any, list[str]]]] = {}
        self.turns_begun = 0
        self.last_error = False
        self.eof = False
        self.exit_after_result = False
        self.sigint = False
        self.timers: list[list[Any]] = []
        self.timer_seq = 0
        self.inbuf = bytearray()
        self.scan_from = 0
        self.stats = new_counters()
        self.stamp_file = StampFile(opts.get("--stamp-file"))
        self.stats_file = StatsFile(opts.get("--stats-file"))
        self.stdout = Stdout()

    # ----------------------------------------------------------------- output

    def _write(self, data: bytes) -> None:
        try:
            self.stdout.write(data)
        except StdoutClosed:
            self._exit(1, "sim: stdout closed")

    def emit(self, obj: dict[str, Any]) -> None:
        """Write one compact JSON line to stdout, like ``JSON.stringify``."""
        self._write(Stdout.encode(obj))

    def _control_success(self, request_id: Any, response: dict[str, Any] | None) -> None:
        # Stats first: a reader that saw this reply (say, a test's barrier
        # request) then finds counters covering everything before it.
        self._write_stats()
        self.emit(wire.control_success(request_id, response))

    def _control_error(
        self, request_id: Any, error: str, code: str | None = None, **extra: Any
    ) -> None:
        self._write_stats()
        self.emit(wire.control_error(request_id, error, code, extra))

    def _lifecycle(self, command_uuid: str, state: str) -> None:
        self.emit(wire.lifecycle(self.session_id, command_uuid, state))

    def _write_stats(self) -> None:
        self.stats_file.write(self.stats)

    def _exit(self, code: int, message: str | None = None) -> NoReturn:
        self._write_stats()
        if message:
            os.write(2, (message + "\n").encode("utf-8", "replace"))
        # os._exit: nothing is buffered (all output went through os.write) and
        # skipping interpreter teardown keeps exit as prompt as the real CLI's.
        os._exit(code)

    # --------------------------------------------------------------- sessions

    def open_session(self) -> None:
        """Apply ``--session-id`` / ``--resume`` (exits like the real CLI on failure)."""
        resume = self.opts.get("--resume")
        if resume is not None:
            lines = self.transcripts.read(resume)
            if lines is None:
                self.session_id = resume
                self._emit_result(
                    None,
                    subtype="error_during_execution",
                    terminal_reason=None,
                    errors=[f"No conversation found with session ID: {resume}"],
                )
                self._exit(1)
            self.history = user_messages(lines)
            if "--fork-session" in self.opts:
                self.session_id = self.opts.get("--session-id") or new_uuid()
                self.transcripts.write(self.session_id, lines)
            else:
                self.session_id = resume
        elif "--session-id" in self.opts:
            self.session_id = self.opts["--session-id"]
            if self.transcripts.exists(self.session_id):
                self._exit(1, f"Error: Session ID {self.session_id} is already in use.")

    def _record(self, entry: dict[str, Any]) -> None:
        self.transcripts.append(self.session_id, entry)

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
        self.stamp_file.stamp(t_ns, kind, detail)

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
            obj = json.loads(line, parse_constant=wire.reject_constant)
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
            # An initialize without hooks (a test's barrier) keeps those registered before.
            for event, matchers in control.registered_hooks(request).items():
                self.hooks.setdefault(event, []).extend(matchers)
            self._control_success(request_id, control.initialize_info())
        elif subtype == "set_model":
            model = request.get("model")
            if model is not None and not isinstance(model, str):
                self._control_error(
                    request_id, "set_model: model must be a string", "invalid_request", model=self.model
                )
                return

            def reply() -> None:
                resolved = resolve_model(model)
                if not resolved.startswith("claude-"):
                    # The real CLI probes the API with the new model and, refused, keeps the old one.
                    self._control_error(request_id, f"Model '{model}' not found", "not_found", model=self.model)
                    return
                changed = resolved != self.model
                self.model = resolved
                # The real CLI echoes the switch only when the model changes,
                # and not before the first turn.
                if changed and self.turns_begun > 0:
                    shown = resolved if model in (None, resolved) else f"{model} ({resolved})"
                    self.emit(wire.model_switch(self.session_id, shown))
                self._control_success(request_id, {"model": self.model})

            self._reply_later(self.set_model_delay, reply)
        elif subtype == "set_permission_mode":
            self._set_permission_mode(request_id, request.get("mode"))
        elif subtype == "get_context_usage":
            self._reply_later(
                self.context_usage_delay,
                lambda: self._control_success(request_id, control.context_usage(self.model, self.history)),
            )
        elif subtype == "mcp_status":
            self._control_success(request_id, {"mcpServers": []})
        else:
            self._control_error(
                request_id, f"Unsupported control request subtype: {subtype}", "unsupported_request"
            )

    def _set_permission_mode(self, request_id: Any, mode: Any) -> None:
        refusal = control.permission_mode_refusal(mode, self.model, self.bypass_allowed)
        if refusal is not None:
            self._control_error(request_id, *refusal)
            return
        changed = mode != self.permission_mode
        self.permission_mode = mode
        self._control_success(request_id, {"mode": mode})
        if changed:
            self.emit(control.status_line(self.session_id, mode))

    def _reply_later(self, delay: float, fn: Callable[[], None]) -> None:
        if delay > 0:
            self._after(delay, fn)
        else:
            fn()

    def _on_interrupt(self, request_id: Any, request: dict[str, Any]) -> None:
        self.stats["interrupts"] += 1
        turn = self.turn
        if turn is not None and turn.ignore_interrupts:
            return
        if turn is not None and turn.pending_id is not None:
            # The real CLI withdraws its pending question before it replies.
            self.emit({"type": "control_cancel_request", "request_id": turn.pending_id})
            turn.pending_id = None
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
        if kind == "now" and turn.phase == "tools" and turn.pending_id is None:
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
        if turn.pending_id is not None:
            # The real CLI withdraws its pending question; a late answer is ignored.
            self.emit({"type": "control_cancel_request", "request_id": turn.pending_id})
            turn.pending_id = None
        turn.wait_until = None
        if turn.die_timer is not None:
            turn.die_timer[2] = None
        if "silent" in turn.script:
            return
        turn.stop_at = time.monotonic() + as_int(turn.script.get("interrupt_ms")) / 1000
        self._step()

    def _abort_now(self) -> None:
        """A ``priority: "now"`` message aborts the running turn (see :meth:`_interrupt_turn`)."""
        self._interrupt_turn("now")

    def _on_control_response(self, response: dict[str, Any]) -> None:
        turn = self.turn
        rid = response.get("request_id")
        if turn is None or turn.pending_id is None or rid != turn.pending_id:
            return
        turn.pending_id = None
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
        turn = Turn(uuids, prompt, script, self.model)
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
            turn.die_timer = self._after(as_int(script["die"]) / 1000, self._die)
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

    def _assistant(self, turn: Turn, content: list[dict[str, Any]]) -> dict[str, Any]:
        return wire.assistant(self.session_id, turn.model, content)

    def _script(
        self, turn: Turn, history: int
    ) -> Generator[float | None, Any, dict[str, Any]]:
        """The turn as a coroutine: yields a deadline to sleep until (``None``:
        until a control response arrives, or forever) and returns the outcome."""
        s = turn.script
        self.emit(wire.system_init(self.session_id, turn.model, self.permission_mode))
        if "garbage" in s:
            self._write(b"sim garbage: this line is not JSON {\n")
        if "hang" in s:
            while True:
                yield None
        suffix = ""
        if "tool" in s or "permission" in s or "hook" in s:
            suffix = yield from self._tool_phase(turn)
            if turn.abort_after_tool:
                return {"aborted_tools": True}
            if turn.hook_stopped:
                return {"hook_stopped": True}

        error = s.get("error")
        if error is not None and error.startswith("api"):
            status = as_int(error.partition(":")[2], 500)
            text = f"API Error: {status} {{\"type\":\"error\",\"error\":{{\"type\":\"api_error\"}}}}"
            self.emit(self._assistant(turn, [{"type": "text", "text": text}]))
            turn.out_chars = len(text)
            return {"text": text, "api_error_status": status}

        if "huge" in s:
            size = as_int(s["huge"])
            line = self._assistant(turn, [{"type": "text", "text": ""}])
            overhead = len(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode())
            text = filler(max(0, size - overhead))
            line["message"]["content"][0]["text"] = text
            self.emit(line)
            chunks = [text]
        else:
            text = reply_text(turn.prompt, s, history) + suffix
            turn_ms = as_int(s.get("turn_ms"))
            k = max(1, as_int(s.get("chunks"), max(1, turn_ms // 20)))
            text, chunks = split_reply(text, k)
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
            fork_tool_child(as_int(s["tool_child"], 600))
            self._exit(1, "sim: simulated crash with a tool child holding stdout")
        if "die" in s:
            self._die()
        if "silent" in s or turn.ignore_interrupts:
            while True:
                yield None
        return {"text": text}

    def _tool_phase(self, turn: Turn) -> Generator[float | None, Any, str]:
        """The tool call: ``tool_use``, then hooks, permission and run as scripted, then
        ``tool_result``; returns what the reply says about the hook and permission answers.

        The order is the real CLI's: PreToolUse hooks, the permission question,
        the tool, PostToolUse hooks, the ``tool_result`` line.
        """
        s = turn.script
        turn.phase = "tools"
        turn.num_turns = 2
        tool_id = turn.tool_id = "toolu_sim_" + new_uuid().replace("-", "")[:20]
        tool_input = {"command": "echo sim", "description": "sim tool"}
        self.emit(self._assistant(turn, [{"type": "tool_use", "id": tool_id, "name": "Bash", "input": tool_input}]))
        events, suffix = self._hook_events(s)
        denial: str | None = None
        if "PreToolUse" in events:
            blocked, notes = yield from self._hooks(turn, "PreToolUse", tool_input)
            suffix += notes
            if blocked is not None:
                denial = f"PreToolUse:Bash hook error: {blocked}"  # the real CLI's wording
        if denial is None and "permission" in s:
            turn.pending_id = "sim-perm-" + new_uuid()
            self.emit(wire.can_use_tool(turn.pending_id, "Bash", tool_input, tool_id))
            answer = yield None
            allowed, message = decision(answer)
            denial = None if allowed else message
            suffix += " [permission: allowed]" if allowed else f" [permission: denied ({message})]"
        tool_ms = as_int(s.get("tool_ms"))
        if denial is None and tool_ms > 0:
            turn.tool_running = True
            yield time.monotonic() + tool_ms / 1000
            turn.tool_running = False
        if "PostToolUse" in events and denial is None:
            response = {"stdout": "sim tool output", "stderr": "", "interrupted": False, "isImage": False,
                        "noOutputExpected": False}
            _, notes = yield from self._hooks(turn, "PostToolUse", tool_input, response)
            suffix += notes
        self._tool_result(turn, "sim tool output" if denial is None else denial, denial is not None)
        turn.phase = "streaming"
        return suffix

    def _hook_events(self, script: dict[str, str]) -> tuple[list[str], str]:
        """The hook events the turn's tool call fires, and what the reply says if it fires none.

        ``[sim:hook]`` fires every tool event a callback is registered for, as
        the real CLI does; ``[sim:hook=EVENT]`` only EVENT.  An event with no
        registered callback fires nothing: the CLI only calls back ids it was given.
        """
        if "hook" not in script:
            return [], ""
        named = script["hook"]
        if named and named not in HOOK_EVENTS:
            return [], f" [hook: {named} is not simulated]"
        fired = [e for e in ([named] if named else HOOK_EVENTS) if control.hook_callback_ids(self.hooks, e, "Bash")]
        if fired:
            return fired, ""
        return [], f" [hook: {named} not registered]" if named else " [hook: none registered]"

    def _hooks(
        self, turn: Turn, event: str, tool_input: dict[str, Any], tool_response: dict[str, Any] | None = None
    ) -> Generator[float | None, Any, tuple[str | None, str]]:
        """Send ``hook_callback`` for each id registered for ``event``, one at a time, each awaited.

        Returns (why the tool is blocked, or None; the reply's notes).
        """
        ids = control.hook_callback_ids(self.hooks, event, "Bash")
        turn.prompt_id = turn.prompt_id or new_uuid()
        hook_input = wire.hook_input(
            event, self.session_id, self.transcripts.path(self.session_id), turn.prompt_id, self.permission_mode,
            "Bash", tool_input, turn.tool_id, tool_response,
        )
        notes = ""
        for callback_id in ids:
            turn.pending_id = "sim-hook-" + new_uuid()
            self.emit(wire.hook_callback(turn.pending_id, callback_id, hook_input, turn.tool_id))
            answer = yield None
            outcome, reason = hook_outcome(answer)
            notes += f" [hook: {outcome}: {reason}]" if reason else f" [hook: {outcome}]"
            if outcome == "stopped":
                # The real CLI still runs the tool, then ends the turn (terminal_reason hook_stopped).
                turn.hook_stopped = True
            elif outcome == "blocked":
                return reason, notes
        return None, notes

    # ---------------------------------------------------------------- results

    def _emit_result(
        self,
        turn: Turn | None,
        *,
        subtype: str,
        terminal_reason: str | None,
        is_error: bool = True,
        text: str | None = None,
        errors: list[str] | None = None,
        api_error_status: int | None = None,
    ) -> None:
        result = wire.result(
            self.session_id,
            turn,
            self.stats["results"],
            subtype=subtype,
            terminal_reason=terminal_reason,
            is_error=is_error,
            text=text,
            errors=errors,
            api_error_status=api_error_status,
        )
        self.emit(result)
        self.stats["results"] += 1
        if is_error:
            self.stats["error_results"] += 1
        self.last_error = is_error

    def _finish(self, turn: Turn, outcome: dict[str, Any]) -> None:
        error = turn.script.get("error") or ""
        text = str(outcome.get("text", ""))
        if outcome.get("hook_stopped"):
            # As the real CLI ends a turn a hook stopped: no reply, an empty success.
            self._emit_result(turn, subtype="success", terminal_reason="hook_stopped", is_error=False, text="")
        elif outcome.get("aborted_tools"):
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
        elif error in ERROR_RESULTS:
            subtype, reason, message = ERROR_RESULTS[error]
            self._emit_result(turn, subtype=subtype, terminal_reason=reason, errors=[message])
        else:
            self._emit_result(
                turn, subtype="success", terminal_reason="completed", is_error=False, text=text
            )
        self._end_turn(turn)

    def _tool_result(self, turn: Turn, content: str, is_error: bool, **extra: Any) -> None:
        self.emit(wire.tool_result(self.session_id, turn.tool_id, content, is_error, **extra))

    def _finish_interrupted(self, turn: Turn) -> None:
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
        self.emit(wire.user(self.session_id, [{"type": "text", "text": marker}]))
        turn.num_turns += 1  # the real CLI counts the marker
        self._emit_result(
            turn, subtype="error_during_execution", terminal_reason=turn.stop_reason, errors=[]
        )
        self._end_turn(turn)

    def _end_turn(self, turn: Turn) -> None:
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
        if turn is not None and turn.pending_id is not None:
            # Nobody is left to answer the question: treat it as a denial.
            turn.pending_id = None
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


def _on_sigterm(signum: int, frame: object) -> None:
    # The real CLI dies at once with 143 and no result: the turn is lost.
    os._exit(143)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point for ``python -m broker.testing.fake_cli``."""
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        # Like the real CLI, help wins over everything else on the line; the usage is the package's docstring.
        from broker.testing import fake_cli

        sys.stdout.write(f"usage: python -m broker.testing.fake_cli [options]\n\n{fake_cli.__doc__}")
        sys.stdout.flush()
        os._exit(0)
    try:
        opts = parse_argv(args)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.stderr.flush()
        os._exit(1)
    FakeCLI(opts).run()
