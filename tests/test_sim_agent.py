"""The simulated Claude Code CLI (``broker.testing.fake_cli``) tested as a real subprocess.

Other tests use the sim in place of the real CLI, so these pin down that it
behaves as ``docs/claude-stream-json.md`` says the real one does: a fake
that quietly diverged could make a broker test pass for the wrong reason.

Every sim runs in its own process group and temporary directories and is
killed (the whole group) when the test ends, pass or fail.  Nothing waits by
sleeping: reads have deadlines, and "nothing happened" is checked with a
barrier (a request whose reply must come first).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realcli import PipedChild, control_request, user_message

REPO = Path(__file__).resolve().parent.parent
BASE_ARGV = [
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
]
TIMEOUT = 5.0


class SimExited(AssertionError):
    """The sim's stdout ended while a line was expected."""


class SimProc:
    """One sim subprocess (driven by :class:`tests.realcli.PipedChild`), read as raw lines and parsed objects."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: queue.Queue[tuple[float, bytes | None]] = queue.Queue()  # (perf_counter, raw line)
        self.seen: list[dict[str, Any]] = []
        self.eof = False
        self.child = PipedChild(argv, env, str(cwd), self._on_line)
        self.proc = self.child.proc
        self.t_spawn = self.child.t_spawn_ns / 1e9  # perf_counter seconds, as the line times

    def _on_line(self, t_ns: int, raw: bytes | None) -> None:
        self.lines.put((t_ns / 1e9, raw))

    @property
    def pid(self) -> int:
        """The sim's pid (also its process group id)."""
        return self.child.pid

    def stderr(self) -> str:
        """Everything the sim wrote to stderr so far (complete once it exited)."""
        return self.child.stderr_text()

    def write(self, data: bytes) -> None:
        """Write raw bytes to the sim's stdin."""
        self.child.write(data)

    def send(self, obj: Any) -> None:
        """Write one JSON line."""
        self.write(json.dumps(obj).encode() + b"\n")

    def user(self, text: Any, uid: str | None = None, **extra: Any) -> str:
        """Send a user message; returns its uuid."""
        uid = uid or str(uuid.uuid4())
        self.send(user_message(text, uid, **extra))
        return uid

    def control(self, subtype: str, request_id: str | None = None, **fields: Any) -> str:
        """Send a control request; returns its id."""
        rid = request_id or f"req-{uuid.uuid4().hex[:8]}"
        self.send(control_request(subtype, rid, **fields))
        return rid

    def close_stdin(self) -> None:
        """Close the sim's stdin (EOF)."""
        self.child.close_stdin()

    def read_raw(self, timeout: float = TIMEOUT) -> tuple[float, bytes]:
        """The next stdout line as (arrival perf_counter, bytes)."""
        try:
            t, raw = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no stdout line within {timeout}s; seen: {self.seen[-5:]}") from None
        if raw is None:
            self.eof = True
            self.lines.put((t, None))
            raise SimExited(f"stdout closed; stderr: {self.stderr()!r}")
        return t, raw

    def read(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next stdout line, parsed (a non-JSON line comes back as ``{"_raw": text}``)."""
        _, raw = self.read_raw(timeout)
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = {"_raw": raw.decode("utf-8", "replace")}
        self.seen.append(obj)
        return obj  # type: ignore[no-any-return]

    def read_until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Read lines until one matches ``pred``; return all of them, the match last."""
        deadline = time.monotonic() + timeout
        out: list[dict[str, Any]] = []
        while True:
            obj = self.read(max(0.0, deadline - time.monotonic()))
            out.append(obj)
            if pred(obj):
                return out

    def result(self, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Read up to and including the next ``result`` line."""
        return self.read_until(is_result, timeout)

    def reply(self, rid: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Read up to and including the control_response for ``rid``."""
        return self.read_until(lambda o: reply_id(o) == rid, timeout)

    def barrier(self) -> list[dict[str, Any]]:
        """Lines written before the reply to a fresh ``initialize`` (excluded)."""
        rid = self.control("initialize")
        return self.reply(rid)[:-1]

    def expect_eof(self, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Read until stdout closes; return the lines read."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        with contextlib.suppress(SimExited):
            while True:
                out.append(self.read(max(0.0, deadline - time.monotonic())))
        return out

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the sim to exit; return its exit status."""
        return self.child.wait_exit(timeout)

    def kill(self) -> None:
        """Kill the whole process group and release every resource."""
        self.child.kill()


def is_result(obj: dict[str, Any]) -> bool:
    """Whether ``obj`` is a ``result`` line."""
    return obj.get("type") == "result"


def reply_id(obj: dict[str, Any]) -> Any:
    """The nested request id of a control_response, else ``None``."""
    if obj.get("type") != "control_response":
        return None
    return obj.get("response", {}).get("request_id")


def of_type(lines: list[dict[str, Any]], kind: str, subtype: str | None = None) -> list[dict[str, Any]]:
    """The lines of one type (and subtype)."""
    return [o for o in lines if o.get("type") == kind and (subtype is None or o.get("subtype") == subtype)]


def lifecycle(lines: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(command_uuid, state)`` of each command_lifecycle line."""
    return [(o["command_uuid"], o["state"]) for o in of_type(lines, "command_lifecycle")]


def read_stats(path: Path) -> dict[str, int]:
    """The sim's stats file."""
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., SimProc]]:
    """Start sims with the real CLI's argv plus ``args``; all are killed afterwards."""
    procs: list[SimProc] = []
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()

    def start(*args: str, state_dir: bool = True, base: list[str] | None = None, home_dir: Path = home) -> SimProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE", "ANTHROPIC"))}
        env["HOME"] = str(home_dir)
        env["PYTHONPATH"] = str(REPO)
        argv = [sys.executable, "-m", "broker.testing.fake_cli", *(BASE_ARGV if base is None else base)]
        if state_dir:
            argv += ["--sim-state-dir", str(tmp_path / "state")]
        proc = SimProc([*argv, *args], work, env)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for p in procs:
            p.kill()


# ---------------------------------------------------------------- command line


def test_refuses_without_verbose(spawn: Callable[..., SimProc]) -> None:
    sim = spawn(base=BASE_ARGV[:-1])
    assert sim.wait() == 1
    assert sim.expect_eof() == []
    assert "--verbose" in sim.stderr()


@pytest.mark.parametrize(
    "extra",
    [["--no-such-flag"], ["a prompt"], ["--resume"], ["--session-id", "not-a-uuid"]],
)
def test_refuses_bad_command_lines(spawn: Callable[..., SimProc], extra: list[str]) -> None:
    sim = spawn(*extra)
    assert sim.wait() == 1
    assert sim.stderr()


def test_accepts_real_cli_flags_it_does_not_simulate(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--permission-prompt-tool", "stdio", "--max-turns=5", "--include-partial-messages")
    sim.user("hi")
    assert sim.result()[-1]["result"] == "sim: hi"


# ----------------------------------------------------------------- turn shapes


def test_prints_nothing_before_input_then_a_full_turn(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--model", "opus")
    uid = sim.user("hello")
    lines = sim.result()
    # The very first line answers the input: nothing was printed at start-up.
    assert lines[0] == {**lines[0], "type": "command_lifecycle", "state": "queued"}
    assert lifecycle(lines) == [(uid, "queued"), (uid, "started")]
    init = lines[2]
    assert (init["type"], init["subtype"]) == ("system", "init")
    assert init["model"] == "claude-opus-4-1-20250805"
    assert "interrupt_receipt_v1" in init["capabilities"]
    assert init["tools"] and init["session_id"]
    assistants = of_type(lines, "assistant")
    assert [a["message"]["content"] for a in assistants] == [[{"type": "text", "text": "sim: hello"}]]
    assert assistants[0]["message"]["model"] == init["model"]
    result = lines[-1]
    assert next(iter(result)) != "type"
    assert result["subtype"] == "success"
    assert result["is_error"] is False
    assert result["terminal_reason"] == "completed"
    assert result["result"] == "sim: hello"
    assert result["user_message_uuids"] == [uid]
    assert result["session_id"] == init["session_id"]
    for key in ("duration_ms", "num_turns", "total_cost_usd", "usage", "uuid"):
        assert key in result
    assert lifecycle([sim.read()]) == [(uid, "completed")]


def test_init_at_every_turn_and_session_id_flag(spawn: Callable[..., SimProc]) -> None:
    sid = str(uuid.uuid4())
    sim = spawn("--session-id", sid)
    for text in ("one", "two", "three"):
        sim.user(text)
        lines = sim.result()
        inits = of_type(lines, "system", "init")
        assert len(inits) == 1
        assert inits[0]["session_id"] == sid
        assert lines[-1]["session_id"] == sid
        assert lines[-1]["result"] == f"sim: {text}"


def test_content_blocks_are_read(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user([{"type": "text", "text": "a"}, {"type": "image", "source": {}}, {"type": "text", "text": "b"}])
    assert sim.result()[-1]["result"] == "sim: a\nb"


# ------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "line",
    [
        b"not json at all\n",
        b'{"type":"user","message":{"role":"user","content":"trunc\n',
        b'{"type":"keep_alive"}{"type":"keep_alive"}\n',
        b'{"type":"user","uuid":"x"}\n',
        b'{"type":"control_request","request_id":"r"}\n',
        b'{"type":"keep_alive","n":NaN}\n',
    ],
    ids=["not-json", "truncated", "two-objects", "user-no-message", "control-no-request", "nan"],
)
def test_malformed_line_kills_it_and_loses_the_turn(spawn: Callable[..., SimProc], line: bytes) -> None:
    sim = spawn()
    sim.user("long [sim:turn_ms=3000]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    t0 = time.monotonic()
    sim.write(line)
    rest = sim.expect_eof()
    assert sim.wait() == 1
    assert time.monotonic() - t0 < 1.0
    assert not [o for o in rest if is_result(o)]
    assert sim.stderr()


@pytest.mark.parametrize(
    "line",
    [
        b"\n",
        b"   \r\n",
        b"[1, 2, 3]\n",
        b'[{"type":"user","message":{"role":"user","content":"in an array"}}]\n',
        b'{"type":"no_such_type","x":1}\n',
        b'{"type":"user","message":{"role":"user","content":42},"uuid":"u42"}\n',
        b'{"type":"user","message":{"role":"user","content":null}}\n',
    ],
    ids=["blank", "crlf-blank", "array", "array-of-user", "unknown-type", "content-42", "content-null"],
)
def test_ignored_lines(spawn: Callable[..., SimProc], tmp_path: Path, line: bytes) -> None:
    stats = tmp_path / "stats.json"
    sim = spawn("--stats-file", str(stats))
    sim.write(line)
    before = sim.barrier()
    if b'"uuid":"u42"' in line:
        # Stamped: the real CLI reports the uuid "completed" at once (no turn).
        assert lifecycle(before) == [("u42", "completed")] and len(before) == 1
    else:
        # Nothing at all came out for the ignored line: the barrier's reply is first.
        assert before == []
    uid = sim.user("after")
    lines = sim.result()
    assert lines[-1]["user_message_uuids"] == [uid]
    assert len(of_type(lines, "system", "init")) == 1
    sim.barrier()
    counters = read_stats(stats)
    assert counters["ignored_lines"] == 1
    assert counters["malformed_lines"] == 0
    assert counters["results"] == 1


def test_ignored_content_does_not_take_its_uuid(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user({"an": "object"}, uid="obj")
    assert lifecycle(sim.barrier()) == [("obj", "completed")]
    sim.user("now with text", uid="obj")
    lines = sim.result()
    assert lifecycle(lines) == [("obj", "queued"), ("obj", "started")]
    assert lines[-1]["user_message_uuids"] == ["obj"]


def test_crlf_terminated_message_is_served(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.write(b'{"type":"user","message":{"role":"user","content":"crlf"},"uuid":"c1"}\r\n')
    assert sim.result()[-1]["user_message_uuids"] == ["c1"]


def test_repeated_uuid_is_dropped_silently(spawn: Callable[..., SimProc], tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    sim = spawn("--stats-file", str(stats))
    sim.user("first", uid="dup")
    sim.result()
    sim.user("again", uid="dup")
    assert [o for o in sim.barrier() if o.get("type") != "command_lifecycle"] == []
    sim.user("next", uid="n1")
    assert sim.result()[-1]["user_message_uuids"] == ["n1"]
    assert read_stats(stats)["duplicate_uuids"] == 1


def test_last_line_without_newline_is_served_at_eof(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.write(b'{"type":"user","message":{"role":"user","content":"tail"},"uuid":"t1"}')
    sim.close_stdin()
    lines = sim.expect_eof()
    assert [o["user_message_uuids"] for o in lines if is_result(o)] == [["t1"]]
    assert sim.wait() == 0


# ---------------------------------------------------------------------- queueing


def test_message_during_a_turn_is_queued_and_answered_by_its_own_turn(
    spawn: Callable[..., SimProc], tmp_path: Path
) -> None:
    stats = tmp_path / "stats.json"
    sim = spawn("--stats-file", str(stats))
    a = sim.user("a [sim:turn_ms=300]")
    sim.read_until(lambda o: o.get("subtype") == "init")
    b = sim.user("b")
    first = sim.result()
    assert first[-1]["user_message_uuids"] == [a]
    assert (b, "queued") in lifecycle(first)
    second = sim.result()
    assert second[-1]["user_message_uuids"] == [b]
    assert second[-1]["result"] == "sim: b"
    assert len(of_type(second, "system", "init")) == 1
    sim.barrier()
    counters = read_stats(stats)
    assert counters["user_messages_while_running"] == 1
    assert counters["turns"] == counters["results"] == 2


def test_merge_queued_flag(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--merge-queued")
    sim.user("a [sim:turn_ms=300]")
    sim.read_until(lambda o: o.get("subtype") == "init")
    b = sim.user("b")
    c = sim.user("c")
    sim.result()
    merged = sim.result()[-1]
    assert merged["user_message_uuids"] == [b, c]
    assert merged["result"] == "sim: b\nc"


def test_sequential_turns_never_count_as_while_running(spawn: Callable[..., SimProc], tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    stamp = tmp_path / "stamp.tsv"
    sim = spawn("--stats-file", str(stats), "--stamp-file", str(stamp))
    before = time.perf_counter_ns()
    uids = []
    for i in range(3):
        uids.append(sim.user(f"m{i}"))
        sim.result()
    rid = sim.control("get_context_usage")
    sim.reply(rid)
    after = time.perf_counter_ns()
    sim.write(b"\n")
    sim.barrier()
    counters = read_stats(stats)
    assert counters["user_messages_while_running"] == 0
    assert counters["user_messages"] == 3
    assert counters["lines_read"] == 6
    assert counters["control_requests"] == 2
    assert counters["turns"] == counters["results"] == 3
    rows = [line.split("\t") for line in stamp.read_text().splitlines()]
    assert [r[1:] for r in rows] == [
        *(["user", u] for u in uids),
        ["control_request", "get_context_usage"],
        ["blank", "-"],
        ["control_request", "initialize"],
    ]
    times = [int(r[0]) for r in rows]
    assert times == sorted(times)
    # perf_counter_ns is CLOCK_MONOTONIC: comparable with this process's clock.
    assert before < times[0] and times[3] < after


# ------------------------------------------------------------- control requests


def test_initialize_reply_is_nested(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    rid = sim.control("initialize", hooks=None)
    reply = sim.read()
    assert reply["type"] == "control_response"
    assert "request_id" not in reply
    inner = reply["response"]
    assert inner["subtype"] == "success" and inner["request_id"] == rid
    assert inner["response"]["commands"] and inner["response"]["models"]


def test_unsupported_and_duplicate_requests(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.control("rewind_files", request_id="x1")
    err = sim.read()["response"]
    assert err["subtype"] == "error"
    assert err["request_id"] == "x1"
    assert err["error_code"] == "unsupported_request"
    assert err["error"]
    sim.control("initialize", request_id="same")
    sim.control("initialize", request_id="same")
    assert [reply_id(sim.read()), reply_id(sim.read())] == ["same", "same"]


def test_set_permission_mode_and_context_usage(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.control("set_permission_mode", request_id="p1", mode="acceptEdits")
    ok = sim.read()["response"]
    assert ok == {"subtype": "success", "request_id": "p1", "response": {"mode": "acceptEdits"}}
    status = sim.read()
    assert (status["type"], status["subtype"], status["permissionMode"]) == ("system", "status", "acceptEdits")
    assert status["status"] is None and status["session_id"]
    # Unchanged: the reply alone.
    sim.control("set_permission_mode", request_id="p1b", mode="acceptEdits")
    assert [reply_id(o) for o in sim.barrier()] == ["p1b"]
    for rid, mode in (("p2", "bogus"), ("p3", 5), ("p4", None)):
        sim.control("set_permission_mode", request_id=rid, mode=mode)
        assert sim.read()["response"] == {
            "subtype": "error",
            "request_id": rid,
            "error": "Cannot set permission mode: must be one of acceptEdits, auto, "
            "bypassPermissions, default, dontAsk, plan",
            "error_code": "invalid_mode",
        }
    sim.user("x")
    assert of_type(sim.result(), "system", "init")[0]["permissionMode"] == "acceptEdits"
    sim.control("get_context_usage", request_id="c1")
    usage = sim.reply("c1")[-1]["response"]
    assert usage["request_id"] == "c1" and usage["response"]["maxTokens"] > 0


@pytest.mark.parametrize(
    ("args", "mode", "code"),
    [
        ((), "auto", "auto_mode_model"),  # the default model is a 4.5 one
        (("--model", "claude-haiku-4-5"), "auto", "auto_mode_model"),
        (("--model", "opus"), "auto", None),
        (("--model", "claude-opus-4-6"), "auto", None),
        ((), "bypassPermissions", "bypass_not_launched"),
        (("--dangerously-skip-permissions",), "bypassPermissions", None),
        ((), "plan", None),
        ((), "dontAsk", None),
    ],
)
def test_set_permission_mode_refusals(
    spawn: Callable[..., SimProc], args: tuple[str, ...], mode: str, code: str | None
) -> None:
    sim = spawn(*args)
    sim.control("set_permission_mode", request_id="m", mode=mode)
    reply = sim.read()["response"]
    if code is None:
        assert reply == {"subtype": "success", "request_id": "m", "response": {"mode": mode}}
        assert sim.read()["permissionMode"] == mode
    else:
        assert (reply["subtype"], reply["error_code"]) == ("error", code)
        assert reply["error"].startswith(f"Cannot set permission mode to {mode}")
        sim.user("x")
        assert of_type(sim.result(), "system", "init")[0]["permissionMode"] == "default"


def test_permission_mode_auto_flag_falls_back_for_a_4_5_model(spawn: Callable[..., SimProc]) -> None:
    for model, shown in (("claude-sonnet-4-5", "default"), ("claude-opus-4-6", "auto")):
        sim = spawn("--model", model, "--permission-mode", "auto")
        sim.user("x")
        assert of_type(sim.result(), "system", "init")[0]["permissionMode"] == shown


def test_slow_replies_are_not_fifo(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--context-usage-ms", "200", "--set-model-ms", "100")
    sim.control("get_context_usage", request_id="slow")
    sim.control("set_model", request_id="model", model="opus")
    sim.control("mcp_status", request_id="fast")
    got = [reply_id(sim.read()) for _ in range(3)]
    assert got == ["fast", "model", "slow"]


def test_set_model_before_first_turn_has_no_replay(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.control("set_model", request_id="m1", model="haiku")
    reply = sim.read()
    assert reply["response"] == {
        "subtype": "success",
        "request_id": "m1",
        "response": {"model": "claude-haiku-4-5-20251001"},
    }
    sim.user("x")
    lines = sim.result()
    assert of_type(lines, "system", "init")[0]["model"] == "claude-haiku-4-5-20251001"
    assert of_type(lines, "assistant")[0]["message"]["model"] == "claude-haiku-4-5-20251001"


def test_set_model_after_a_turn_replays_only_when_the_model_changes(
    spawn: Callable[..., SimProc],
) -> None:
    sim = spawn("--model", "claude-sonnet-4-5")
    sim.user("x")
    sim.result()
    sim.read()  # lifecycle completed
    sim.control("set_model", request_id="m1", model="claude-sonnet-4-5")
    assert [reply_id(o) for o in sim.reply("m1")] == ["m1"]  # the current model: no replay
    sim.control("set_model", request_id="m2", model="opus")
    replay, reply = sim.read(), sim.read()
    assert replay["type"] == "user" and replay["isReplay"] is True
    assert replay["message"]["content"] == (
        "<local-command-stdout>Set model to `opus (claude-opus-4-1-20250805)`</local-command-stdout>"
    )
    assert reply_id(reply) == "m2"
    assert reply["response"]["response"] == {"model": "claude-opus-4-1-20250805"}
    sim.control("set_model", request_id="m2b", model="claude-opus-4-1-20250805")
    assert [reply_id(o) for o in sim.reply("m2b")] == ["m2b"]  # an alias's target: the same model
    # null resets to the built-in default model, not to --model's: a change, so a replay.
    sim.control("set_model", request_id="m3", model=None)
    replay, reply = sim.read(), sim.read()
    assert replay["isReplay"] is True
    assert replay["message"]["content"] == (
        "<local-command-stdout>Set model to `claude-sonnet-4-5-20250929`</local-command-stdout>"
    )
    assert reply["response"]["response"] == {"model": "claude-sonnet-4-5-20250929"}
    sim.control("set_model", request_id="m4", model=None)
    assert [reply_id(o) for o in sim.reply("m4")] == ["m4"]  # already on the default
    sim.control("set_model", request_id="m5", model="default")
    assert [reply_id(o) for o in sim.reply("m5")] == ["m5"]
    sim.user("y")
    assert of_type(sim.result(), "system", "init")[0]["model"] == "claude-sonnet-4-5-20250929"


def test_set_model_refuses_a_non_string_model(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--model", "opus")
    sim.control("set_model", request_id="bad", model=42)
    assert sim.read()["response"] == {
        "subtype": "error",
        "request_id": "bad",
        "error": "set_model: model must be a string",
        "error_code": "invalid_request",
        "model": "claude-opus-4-1-20250805",
    }


def test_set_model_mid_turn_keeps_the_running_turns_model(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--model", "sonnet")
    sim.user("a [sim:turn_ms=200]")
    sim.read_until(lambda o: o.get("subtype") == "init")
    rid = sim.control("set_model", model="haiku")
    lines = sim.reply(rid)
    assert lines[-2].get("isReplay") is True
    rest = sim.result()
    assert {a["message"]["model"] for a in of_type(rest, "assistant")} == {"claude-sonnet-4-5-20250929"}
    sim.user("b")
    assert of_type(sim.result(), "system", "init")[0]["model"] == "claude-haiku-4-5-20251001"


# -------------------------------------------------------------------- interrupts


def test_interrupt_while_streaming(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    uid = sim.user("long [sim:turn_ms=5000]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    t0 = time.perf_counter()
    rid = sim.control("interrupt")
    before = sim.reply(rid)
    # Complete blocks (one per 20 ms) may still come before the reply.
    assert {o["type"] for o in before[:-1]} <= {"assistant"}
    reply = before[-1]
    assert reply["response"]["response"] == {"still_queued": []}
    lines = sim.result()
    t_result = time.perf_counter()
    result = lines[-1]
    assert result["subtype"] == "error_during_execution"
    assert result["is_error"] is True
    assert result["terminal_reason"] == "aborted_streaming"
    assert result["user_message_uuids"] == [uid]
    assert result["num_turns"] == 2  # the real CLI counts the interrupt marker
    assert next(iter(result)) != "type"
    markers = of_type(lines, "user")
    assert [m["message"]["content"] for m in markers] == [[{"type": "text", "text": "[Request interrupted by user]"}]]
    assert t_result - t0 < 1.0
    assert lifecycle([sim.read()]) == [(uid, "cancelled")]


def test_interrupt_mid_block_prints_the_partial_block_after_the_reply(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    # One block of 1 MB streaming over 10 s: 100 characters a millisecond, so
    # some have surely come by the time the interrupt is read.
    prompt = "one block [sim:turn_ms=10000][sim:chunks=1][sim:bytes=1000000]"
    sim.user(prompt)
    sim.read_until(lambda o: o.get("subtype") == "init")
    rid = sim.control("interrupt")
    # Like the real CLI without --include-partial-messages: nothing while the block streams.
    assert [o["type"] for o in sim.reply(rid)] == ["control_response"]
    lines = sim.result()
    assert [o["type"] for o in lines] == ["assistant", "user", "result"]
    partial = lines[0]
    assert partial["aborted"] is True
    text = partial["message"]["content"][0]["text"]
    assert 0 < len(text) < 1_000_000
    assert f"sim: {prompt}".startswith(text) or text.startswith(f"sim: {prompt}")
    assert lines[1]["message"]["content"][0]["text"] == "[Request interrupted by user]"
    result = lines[2]
    assert (result["subtype"], result["terminal_reason"], result["num_turns"]) == (
        "error_during_execution",
        "aborted_streaming",
        2,
    )


def test_hang_directive_streams_nothing_until_interrupted(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    uid = sim.user("h [sim:hang]")
    sim.read_until(lambda o: o.get("subtype") == "init")
    assert sim.barrier() == []
    rid = sim.control("interrupt")
    assert [o["type"] for o in sim.reply(rid)] == ["control_response"]
    lines = sim.result()
    assert [o["type"] for o in lines] == ["user", "result"]
    assert (lines[-1]["terminal_reason"], lines[-1]["num_turns"]) == ("aborted_streaming", 2)
    assert lifecycle([sim.read()]) == [(uid, "cancelled")]


def test_interrupt_during_tool_phase(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("t [sim:tool][sim:tool_ms=5000]")
    tool_use = sim.read_until(lambda o: o.get("type") == "assistant")[-1]
    assert tool_use["message"]["content"][0]["type"] == "tool_use"
    rid = sim.control("interrupt")
    sim.reply(rid)
    lines = sim.result()
    assert [o["type"] for o in lines] == ["user", "user", "result"]
    rejected = lines[0]["message"]["content"][0]
    assert rejected["type"] == "tool_result" and rejected["is_error"] is True
    assert rejected["tool_use_id"] == tool_use["message"]["content"][0]["id"]
    assert rejected["content"].startswith("The user doesn't want to proceed with this tool use.")
    assert "stopped while running" in rejected["content"]
    assert lines[0]["tool_use_result"] == "User rejected tool use"
    assert lines[1]["message"]["content"] == [{"type": "text", "text": "[Request interrupted by user for tool use]"}]
    result = lines[-1]
    assert result["subtype"] == "error_during_execution"
    assert result["terminal_reason"] == "aborted_tools"
    assert result["num_turns"] == 3


def test_idle_interrupt_gets_a_reply_only(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    rid = sim.control("interrupt")
    assert reply_id(sim.read()) == rid
    assert sim.barrier() == []
    sim.user("after")
    lines = sim.result()
    assert lines[-1]["subtype"] == "success"


def test_two_interrupts_two_replies_one_result(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    uid = sim.user("long [sim:turn_ms=5000][sim:interrupt_ms=50]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    r1 = sim.control("interrupt")
    r2 = sim.control("interrupt")
    lines = sim.result()
    lines += sim.barrier()
    assert [reply_id(o) for o in lines if reply_id(o)] == [r1, r2]
    assert [o["user_message_uuids"] for o in lines if is_result(o)] == [[uid]]


def test_interrupt_keeps_queued_messages_unless_cancel_queued(
    spawn: Callable[..., SimProc],
) -> None:
    sim = spawn()
    sim.user("a [sim:turn_ms=5000]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    b = sim.user("b")
    rid = sim.control("interrupt")
    reply = sim.reply(rid)[-1]
    assert reply["response"]["response"]["still_queued"] == [b]
    assert sim.result()[-1]["terminal_reason"] == "aborted_streaming"
    assert sim.result()[-1]["user_message_uuids"] == [b]

    c = sim.user("c [sim:turn_ms=5000]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    d = sim.user("d")
    rid = sim.control("interrupt", cancel_queued=True)
    reply = sim.reply(rid)[-1]["response"]["response"]
    assert reply["still_queued"] == []
    assert reply["cancelled"] == [d]
    lines = sim.result()
    assert lines[-1]["user_message_uuids"] == [c]
    assert (d, "cancelled") in lifecycle(lines)
    e = sim.user("e")
    # d never runs: the next result is e's.
    assert sim.result()[-1]["user_message_uuids"] == [e]


def test_priority_now_aborts_the_running_turn(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    a = sim.user("a [sim:turn_ms=5000]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    b = sim.user("b", priority="now")
    first = sim.result()[-1]
    assert first["user_message_uuids"] == [a]
    assert first["terminal_reason"] == "aborted_streaming"
    assert sim.result()[-1]["user_message_uuids"] == [b]


def test_priority_now_before_reply_text_has_no_marker(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    a = sim.user("a [sim:hang]")
    sim.read_until(lambda o: o.get("subtype") == "init")
    b = sim.user("b", priority="now")
    lines = sim.result()
    assert [o["type"] for o in lines] == ["command_lifecycle", "result"]
    first = lines[-1]
    assert (first["subtype"], first["is_error"], first["terminal_reason"], first["num_turns"]) == (
        "error_during_execution",
        True,
        "aborted_streaming",
        1,
    )
    assert first["user_message_uuids"] == [a]
    assert lifecycle([sim.read()]) == [(a, "cancelled")]
    assert sim.result()[-1]["user_message_uuids"] == [b]


def test_priority_now_after_reply_text_gives_the_partial_text(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    a = sim.user("a [sim:turn_ms=10000][sim:chunks=1][sim:bytes=1000000]")
    sim.read_until(lambda o: o.get("subtype") == "init")
    b = sim.user("b", priority="now")
    lines = sim.result()
    assert [o["type"] for o in lines] == ["command_lifecycle", "assistant", "result"]
    text = lines[1]["message"]["content"][0]["text"]
    assert lines[1]["aborted"] is True and 0 < len(text) < 1_000_000
    first = lines[-1]
    # No marker, and no error: the turn had something to show.
    assert (first["subtype"], first["is_error"], first["terminal_reason"], first["num_turns"]) == (
        "success",
        False,
        "aborted_streaming",
        1,
    )
    assert first["result"] == text
    assert lifecycle([sim.read()]) == [(a, "cancelled")]
    assert sim.result()[-1]["user_message_uuids"] == [b]


def test_priority_now_lets_a_running_tool_finish(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    a = sim.user("t [sim:tool][sim:tool_ms=300]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    t0 = time.monotonic()
    b = sim.user("b", priority="now")
    lines = sim.result()
    assert time.monotonic() - t0 > 0.2
    assert [o["type"] for o in lines] == ["command_lifecycle", "user", "result"]
    tool_result = lines[1]["message"]["content"][0]
    assert (tool_result["type"], tool_result["is_error"], tool_result["content"]) == (
        "tool_result",
        False,
        "sim tool output",
    )
    first = lines[-1]
    assert (first["subtype"], first["is_error"], first["terminal_reason"], first["num_turns"]) == (
        "success",
        False,
        "aborted_tools",
        2,
    )
    assert first["result"] == "" and first["user_message_uuids"] == [a]
    assert lifecycle([sim.read()]) == [(a, "cancelled")]
    assert sim.result()[-1]["user_message_uuids"] == [b]


def test_priority_now_while_permission_pending(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    a = sim.user("p [sim:permission]")
    ask = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    b = sim.user("b", priority="now")
    lines = sim.result()
    assert [o["request_id"] for o in of_type(lines, "control_cancel_request")] == [ask["request_id"]]
    tool_result = of_type(lines, "user")[0]["message"]["content"][0]
    assert (tool_result["is_error"], tool_result["content"]) == (True, "Tool permission request aborted")
    first = lines[-1]
    assert (first["subtype"], first["is_error"], first["terminal_reason"], first["num_turns"]) == (
        "success",
        False,
        "aborted_tools",
        2,
    )
    assert first["user_message_uuids"] == [a]
    assert sim.result()[-1]["user_message_uuids"] == [b]


def test_ignore_interrupt_turn_never_answers_or_ends(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("stuck [sim:ignore_interrupt]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    sim.control("interrupt", request_id="ignored")
    os.kill(sim.pid, signal.SIGINT)
    before = sim.barrier()
    assert [reply_id(o) for o in before] == []
    assert not [o for o in before if is_result(o)]
    os.kill(sim.pid, signal.SIGTERM)
    assert sim.wait() == 143


def test_ignore_interrupts_flag(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--ignore-interrupts")
    sim.user("x")
    sim.read_until(lambda o: o.get("type") == "assistant")
    sim.control("interrupt")
    assert not [o for o in sim.barrier() if reply_id(o) or is_result(o)]


# ----------------------------------------------------------------- permissions


@pytest.mark.parametrize("allow", [True, False])
def test_permission_round_trip(spawn: Callable[..., SimProc], allow: bool) -> None:
    sim = spawn()
    sim.user("p [sim:permission]")
    ask = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    assert ask["request"]["subtype"] == "can_use_tool"
    rid = ask["request_id"]
    assert rid
    # An answer with the id at the top level is not an answer: nothing happens.
    sim.send({"type": "control_response", "request_id": rid, "response": {"behavior": "allow"}})
    assert not [o for o in sim.barrier() if is_result(o)]
    decision = (
        {"behavior": "allow", "updatedInput": ask["request"]["input"]}
        if allow
        else {"behavior": "deny", "message": "nope"}
    )
    sim.send(
        {
            "type": "control_response",
            "response": {"subtype": "success", "request_id": rid, "response": decision},
        }
    )
    lines = sim.result()
    tool_result = of_type(lines, "user")[0]["message"]["content"][0]
    assert tool_result["type"] == "tool_result"
    assert tool_result["is_error"] is (not allow)
    text = lines[-1]["result"]
    assert ("permission: allowed" in text) if allow else ("permission: denied (nope)" in text)


def test_interrupt_while_permission_pending(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("p [sim:permission]")
    ask = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    rid = sim.control("interrupt")
    lines = sim.result()
    # The question is withdrawn before the interrupt's reply, as by the real CLI.
    assert [o["type"] for o in lines] == ["control_cancel_request", "control_response", "user", "user", "result"]
    assert lines[0]["request_id"] == ask["request_id"] and reply_id(lines[1]) == rid
    rejected = lines[2]["message"]["content"][0]
    assert rejected["is_error"] is True
    assert rejected["content"].startswith("The user doesn't want to proceed with this tool use.")
    assert "stopped while running" not in rejected["content"]  # it never ran
    assert lines[3]["message"]["content"][0]["text"] == "[Request interrupted by user for tool use]"
    assert (lines[-1]["terminal_reason"], lines[-1]["num_turns"]) == ("aborted_tools", 3)


# --------------------------------------------------------------- error results


@pytest.mark.parametrize(
    ("directive", "subtype", "reason"),
    [
        ("api", "success", "api_error"),
        ("max_turns", "error_max_turns", "max_turns"),
        ("budget", "error_max_budget_usd", "budget_exhausted"),
    ],
)
def test_error_results_then_keeps_serving(
    spawn: Callable[..., SimProc], directive: str, subtype: str, reason: str
) -> None:
    sim = spawn()
    sim.user(f"boom [sim:error={directive}]")
    result = sim.result()[-1]
    assert (result["subtype"], result["is_error"], result["terminal_reason"]) == (
        subtype,
        True,
        reason,
    )
    if directive == "api":
        assert result["api_error_status"] == 500
    sim.user("fine")
    assert sim.result()[-1]["is_error"] is False
    sim.user(f"boom again [sim:error={directive}]")
    sim.result()
    sim.close_stdin()
    sim.expect_eof()
    # The last result was an error: exit status 1.
    assert sim.wait() == 1


def test_error_flag_and_custom_status(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--error", "api:429")
    sim.user("x")
    assert sim.result()[-1]["api_error_status"] == 429


# -------------------------------------------------------------- output shaping


def test_turn_ms_and_chunks(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("slow [sim:turn_ms=200][sim:chunks=4]")
    while True:
        t0, raw = sim.read_raw()
        if b'"subtype":"init"' in raw:
            break
    stamps = []
    while True:
        t, raw = sim.read_raw()
        obj = json.loads(raw)
        if obj.get("type") == "assistant":
            stamps.append((t, obj["message"]["content"][0]["text"]))
        if is_result(obj):
            break
    assert len(stamps) == 4
    assert "".join(s for _, s in stamps) == obj["result"] == "sim: slow [sim:turn_ms=200][sim:chunks=4]"
    assert stamps[-1][0] - t0 >= 0.15
    assert obj["duration_ms"] >= 190


def test_chunks_pad_a_short_reply(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--chunks", "40")
    sim.user("x")
    lines = sim.result()
    texts = [a["message"]["content"][0]["text"] for a in of_type(lines, "assistant")]
    assert len(texts) == 40 and all(texts)
    assert "".join(texts) == lines[-1]["result"]


def test_bytes_sets_reply_size(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("sized [sim:bytes=5000]")
    assert len(sim.result()[-1]["result"].encode()) == 5000
    sim.user("short [sim:bytes=3]")
    assert sim.result()[-1]["result"] == "sim"


def test_huge_assistant_line(spawn: Callable[..., SimProc]) -> None:
    size = 2_000_000
    sim = spawn()
    sim.user(f"big [sim:huge={size}]")
    sizes = {}
    while True:
        _, raw = sim.read_raw()
        obj = json.loads(raw)
        sizes[obj["type"]] = len(raw.rstrip(b"\n"))
        if is_result(obj):
            break
    assert sizes["assistant"] == size
    assert sizes["result"] > size * 0.9


def test_history_directive_and_transcript(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("a")
    sim.result()
    sim.user("b [sim:history]")
    assert "[history=1]" in sim.result()[-1]["result"]


def test_garbage_line_then_carries_on(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("g [sim:garbage]")
    lines = sim.result()
    raws = [o["_raw"] for o in lines if "_raw" in o]
    assert len(raws) == 1
    with pytest.raises(ValueError):
        json.loads(raws[0])
    assert lines[-1]["subtype"] == "success"


def test_tool_phase_shapes(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--tool")
    sim.user("t")
    lines = sim.result()
    kinds = [(o["type"], o["message"]["content"][0]["type"]) for o in lines if o["type"] in ("assistant", "user")]
    assert kinds == [("assistant", "tool_use"), ("user", "tool_result"), ("assistant", "text")]
    assert lines[-1]["num_turns"] == 2


# ------------------------------------------------------------------------ faults


def test_die_exits_without_result(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("d [sim:die]")
    rest = sim.expect_eof()
    assert not [o for o in rest if is_result(o)]
    assert sim.wait() == 1


def test_die_after_ms_mid_stream(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("d [sim:turn_ms=5000][sim:die=100]")
    t0 = time.monotonic()
    rest = sim.expect_eof()
    assert time.monotonic() - t0 < 2.0
    assert of_type(rest, "assistant") and not [o for o in rest if is_result(o)]
    assert sim.wait() == 1


def test_die_flag(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--die")
    sim.user("x")
    sim.expect_eof()
    assert sim.wait() == 1


def test_global_flags_apply_to_every_turn(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--turn-ms", "100", "--bytes", "64", "--garbage")
    for _ in range(2):
        sim.user("x")
        lines = sim.result()
        assert lines[-1]["duration_ms"] >= 90
        assert len(lines[-1]["result"]) == 64
        assert len([o for o in lines if "_raw" in o]) == 1
    # A directive overrides the flag for its turn.
    sim.user("y [sim:bytes=8][sim:turn_ms=0]")
    assert len(sim.result()[-1]["result"]) == 8


def test_silent_and_huge_flags(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--silent", "--huge", "5000")
    sim.user("x")
    lines = sim.barrier()
    assert of_type(lines, "assistant") and not [o for o in lines if is_result(o)]
    assert len(json.dumps(of_type(lines, "assistant")[0], separators=(",", ":"))) == 5000


def test_silent_turn_never_results_but_answers_requests(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("s [sim:silent]")
    lines = sim.barrier()
    assert of_type(lines, "assistant") and not [o for o in lines if is_result(o)]
    rid = sim.control("interrupt")
    assert not [o for o in sim.reply(rid) if is_result(o)]
    assert not [o for o in sim.barrier() if is_result(o)]
    assert sim.proc.poll() is None


def test_tool_child_holds_stdout_after_death(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("tc [sim:tool_child]")
    assert sim.wait() == 1
    # The leader is gone but its group still has a member: the child.
    os.killpg(sim.pid, 0)
    assert None not in [raw for _, raw in list(sim.lines.queue)]
    os.killpg(sim.pid, signal.SIGKILL)
    rest = sim.expect_eof()
    assert not [o for o in rest if is_result(o)]


def test_tool_child_ends_itself(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("tc [sim:tool_child=1]")
    assert sim.wait() == 1
    # stdout closes only when the child's sleep is over.
    sim.expect_eof(timeout=10)
    assert sim.eof


# ------------------------------------------------------------- EOF and signals


def test_eof_when_idle_exits_zero(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.close_stdin()
    assert sim.expect_eof() == []
    assert sim.wait() == 0


def test_eof_mid_turn_finishes_the_turn(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    a = sim.user("a [sim:turn_ms=200]")
    b = sim.user("b")
    sim.read_until(lambda o: o.get("subtype") == "init")
    sim.close_stdin()
    rest = sim.expect_eof()
    assert [o["user_message_uuids"] for o in rest if is_result(o)] == [[a], [b]]
    assert sim.wait() == 0


def test_eof_while_permission_pending_denies(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("p [sim:permission]")
    sim.read_until(lambda o: o.get("type") == "control_request")
    sim.close_stdin()
    rest = sim.expect_eof()
    assert "permission: denied" in next(o for o in rest if is_result(o))["result"]


def test_sigterm_mid_turn(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("a [sim:turn_ms=5000]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    sim.proc.send_signal(signal.SIGTERM)
    rest = sim.expect_eof()
    assert sim.wait() == 143
    assert not [o for o in rest if is_result(o)]


def test_sigint_mid_turn_gives_interrupted_result(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    uid = sim.user("a [sim:turn_ms=5000]")
    sim.read_until(lambda o: o.get("type") == "assistant")
    sim.proc.send_signal(signal.SIGINT)
    rest = sim.expect_eof()
    results = [o for o in rest if is_result(o)]
    assert len(results) == 1
    assert results[0]["subtype"] == "error_during_execution"
    assert results[0]["user_message_uuids"] == [uid]
    assert sim.wait() == 0


def test_sigint_idle_exits_zero(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    sim.user("x")
    sim.result()
    sim.proc.send_signal(signal.SIGINT)
    sim.expect_eof()
    assert sim.wait() == 0


# ---------------------------------------------------------------------- sessions


def test_resume_keeps_the_conversation(spawn: Callable[..., SimProc], tmp_path: Path) -> None:
    sid = str(uuid.uuid4())
    first = spawn("--session-id", sid)
    first.user("one")
    first.result()
    first.user("two [sim:turn_ms=5000]")
    first.read_until(lambda o: o.get("type") == "assistant")
    first.kill()  # killed mid-turn: the prompt is kept, its answer lost

    second = spawn(f"--resume={sid}")
    second.user("three [sim:history]")
    lines = second.result()
    assert of_type(lines, "system", "init")[0]["session_id"] == sid
    assert lines[-1]["session_id"] == sid
    assert "[history=2]" in lines[-1]["result"]

    third = spawn("--resume", sid)
    third.user("four [sim:history]")
    assert "[history=3]" in third.result()[-1]["result"]


def test_fork_session_copies_history_under_a_new_id(spawn: Callable[..., SimProc]) -> None:
    sid = str(uuid.uuid4())
    first = spawn("--session-id", sid)
    first.user("one")
    first.result()
    forked = spawn(f"--resume={sid}", "--fork-session")
    forked.user("two [sim:history]")
    result = forked.result()[-1]
    assert result["session_id"] != sid
    assert "[history=1]" in result["result"]


def test_unknown_resume_is_an_error_result(spawn: Callable[..., SimProc]) -> None:
    sid = str(uuid.uuid4())
    sim = spawn(f"--resume={sid}")
    lines = sim.expect_eof()
    assert sim.wait() == 1
    assert len(lines) == 1 and is_result(lines[0])
    assert lines[0]["is_error"] is True
    assert sid in lines[0]["errors"][0]


def test_session_id_already_in_use(spawn: Callable[..., SimProc]) -> None:
    sid = str(uuid.uuid4())
    first = spawn("--session-id", sid)
    first.user("x")
    first.result()
    second = spawn("--session-id", sid)
    assert second.wait() == 1
    assert "already in use" in second.stderr()


def test_default_state_dir_is_under_home(spawn: Callable[..., SimProc], tmp_path: Path) -> None:
    sid = str(uuid.uuid4())
    home = tmp_path / "other-home"
    home.mkdir()
    sim = spawn("--session-id", sid, state_dir=False, home_dir=home)
    sim.user("x")
    sim.result()
    assert (home / ".sim-claude" / f"{sid}.jsonl").is_file()


# ------------------------------------------------------------------------ timing


def test_startup_ms_delays_reading(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--startup-ms", "300")
    sim.user("x")
    t, _ = sim.read_raw()
    assert t - sim.t_spawn >= 0.3


def test_interrupt_to_result_is_fast(spawn: Callable[..., SimProc], tmp_path: Path) -> None:
    stamp = tmp_path / "stamp.tsv"
    sim = spawn("--stamp-file", str(stamp))
    sim.user("warm")
    sim.result()
    worst = 0.0
    for _ in range(5):
        sim.user("long [sim:turn_ms=5000]")
        sim.read_until(lambda o: o.get("type") == "assistant")
        sim.control("interrupt")
        while True:
            t, raw = sim.read_raw()
            if b'"type":"result"' in raw:
                break
        t_in = int(stamp.read_text().splitlines()[-1].split("\t")[0])
        worst = max(worst, t - t_in / 1e9)
    # Generous for a loaded CI box; typically well under a millisecond.
    assert worst < 0.1


# ----------------------------------------------------------------------- hooks


def register_hooks(sim: SimProc, hooks: dict[str, Any]) -> None:
    """Register hooks the way the broker and the Agent SDK do: with ``initialize``."""
    sim.reply(sim.control("initialize", hooks=hooks))


def answer(sim: SimProc, rid: str, response: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Send the control_response to the sim's own request ``rid``."""
    body: dict[str, Any] = (
        {"subtype": "success", "request_id": rid, "response": response}
        if error is None
        else {"subtype": "error", "request_id": rid, "error": error}
    )
    sim.send({"type": "control_response", "response": body})


@pytest.mark.parametrize(
    ("output", "note", "tool_ran"),
    [
        ({}, "[hook: continue]", True),
        ({"decision": "block", "reason": "nope"}, "[hook: blocked: nope]", False),
        (
            {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                                    "permissionDecisionReason": "not here"}},
            "[hook: blocked: not here]",
            False,
        ),
    ],
)
def test_hook_round_trip(spawn: Callable[..., SimProc], output: dict[str, Any], note: str, tool_ran: bool) -> None:
    sim = spawn("--permission-mode", "acceptEdits")
    register_hooks(sim, {"PreToolUse": [{"matcher": None, "hookCallbackIds": ["cb-pre"]}],
                         "PostToolUse": [{"matcher": None, "hookCallbackIds": ["cb-post"]}]})
    sim.user("p [sim:hook=PreToolUse]")
    lines = sim.read_until(lambda o: o.get("type") == "control_request")
    tool_use = of_type(lines, "assistant")[0]["message"]["content"][0]
    ask = lines[-1]
    req = ask["request"]
    # The request as the real CLI sends it (field names as in claude_agent_sdk's SDKHookCallbackRequest).
    assert list(req) == ["subtype", "callback_id", "input", "tool_use_id"]
    assert (req["subtype"], req["callback_id"], req["tool_use_id"]) == ("hook_callback", "cb-pre", tool_use["id"])
    hook_input = req["input"]
    # The keys, in order, of the real CLI 2.1.330's PreToolUse input.
    assert list(hook_input) == ["session_id", "transcript_path", "cwd", "prompt_id", "permission_mode",
                                "hook_event_name", "tool_name", "tool_input", "tool_use_id"]
    assert hook_input["hook_event_name"] == "PreToolUse"
    assert (hook_input["tool_name"], hook_input["tool_input"], hook_input["tool_use_id"]) == (
        "Bash", tool_use["input"], tool_use["id"])
    assert hook_input["session_id"] == lines[0]["session_id"] and hook_input["permission_mode"] == "acceptEdits"
    assert hook_input["transcript_path"].endswith(f"{hook_input['session_id']}.jsonl") and hook_input["cwd"]
    answer(sim, ask["request_id"], output)
    rest = sim.result()
    tool_result = of_type(rest, "user")[0]["message"]["content"][0]
    assert tool_result["is_error"] is (not tool_ran)
    if not tool_ran:  # the real CLI's wording
        assert tool_result["content"].startswith("PreToolUse:Bash hook error: "), tool_result
    assert rest[-1]["result"].endswith(f"p [sim:hook=PreToolUse] {note}"), rest[-1]["result"]
    assert not of_type(rest, "control_request")  # only the event named fires


@pytest.mark.parametrize("block", [False, True])
def test_bare_hook_directive_fires_every_registered_tool_event(spawn: Callable[..., SimProc], block: bool) -> None:
    """``[sim:hook]``: PreToolUse, the tool, PostToolUse, then the tool_result, as the real CLI; a block at
    PreToolUse keeps the tool, and so its PostToolUse, from running."""
    sim = spawn()
    register_hooks(sim, {"PreToolUse": [{"matcher": None, "hookCallbackIds": ["pre"]}],
                         "PostToolUse": [{"matcher": None, "hookCallbackIds": ["post"]}]})
    sim.user("p [sim:hook]")
    pre = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    assert pre["request"]["callback_id"] == "pre"
    if block:
        answer(sim, pre["request_id"], {"decision": "block", "reason": "no"})
        rest = sim.result()
        assert not of_type(rest, "control_request")
        assert rest[-1]["result"].endswith("p [sim:hook] [hook: blocked: no]")
        return
    answer(sim, pre["request_id"], {})
    post = sim.read_until(lambda o: o.get("type") == "control_request")
    assert [o["type"] for o in post] == ["control_request"] and post[0]["request"]["callback_id"] == "post"
    answer(sim, post[0]["request_id"], {})
    assert sim.result()[-1]["result"].endswith("p [sim:hook] [hook: continue] [hook: continue]")


def test_hook_answering_continue_false_ends_the_turn_after_the_tool(spawn: Callable[..., SimProc]) -> None:
    """As the real CLI does: the tool still runs, then an empty success result with terminal_reason hook_stopped."""
    sim = spawn()
    register_hooks(sim, {"PreToolUse": [{"matcher": "*", "hookCallbackIds": ["pre"]}]})
    sim.user("p [sim:hook]")
    ask = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    answer(sim, ask["request_id"], {"continue": False, "stopReason": "halt"})
    rest = sim.result()
    assert [o["type"] for o in rest if o["type"] != "command_lifecycle"] == ["user", "result"]
    assert rest[0]["message"]["content"][0]["is_error"] is False
    res = rest[-1]
    assert (res["subtype"], res["is_error"], res["terminal_reason"], res["result"]) == (
        "success", False, "hook_stopped", "")


def test_hook_error_answer_is_a_failed_hook_and_the_tool_runs(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    register_hooks(sim, {"PreToolUse": [{"matcher": "Bash", "hookCallbackIds": ["a", "b"]}]})
    sim.user("p [sim:hook]")
    first = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    answer(sim, first["request_id"], error="handler broke")
    second = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    assert [first["request"]["callback_id"], second["request"]["callback_id"]] == ["a", "b"]
    answer(sim, second["request_id"], {})
    rest = sim.result()
    assert of_type(rest, "user")[0]["message"]["content"][0]["is_error"] is False
    assert rest[-1]["result"].endswith(" [hook: failed: handler broke] [hook: continue]"), rest[-1]["result"]


def test_post_tool_use_hook_gets_the_tool_response_after_the_tool_result(spawn: Callable[..., SimProc]) -> None:
    sim = spawn()
    register_hooks(sim, {"PostToolUse": [{"matcher": "Edit|Bash", "hookCallbackIds": ["post"]}]})
    sim.user("p [sim:hook=PostToolUse] [sim:permission]")
    perm = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    assert perm["request"]["subtype"] == "can_use_tool"
    answer(sim, perm["request_id"], {"behavior": "allow", "updatedInput": perm["request"]["input"]})
    lines = sim.read_until(lambda o: o.get("type") == "control_request")
    assert [o["type"] for o in lines] == ["control_request"]  # as the real CLI: the hook before the tool_result
    req = lines[-1]["request"]
    assert req["input"]["hook_event_name"] == "PostToolUse"
    assert list(req["input"])[-3:] == ["tool_response", "tool_use_id", "duration_ms"]
    assert req["input"]["tool_response"]["stdout"] == "sim tool output"
    answer(sim, lines[-1]["request_id"], {"decision": "block", "reason": "bad output"})
    rest = sim.result()
    # A PostToolUse block comes too late to stop the tool: its result stands.
    assert rest[0]["message"]["content"][0] == {
        "tool_use_id": req["tool_use_id"], "type": "tool_result", "content": "sim tool output", "is_error": False}
    assert rest[-1]["result"].endswith(" [permission: allowed] [hook: blocked: bad output]")


@pytest.mark.parametrize(
    ("hooks", "prompt", "note"),
    [
        (None, "[sim:hook]", "[hook: none registered]"),
        (None, "[sim:hook=PreToolUse]", "[hook: PreToolUse not registered]"),
        ({"PreToolUse": [{"matcher": "Edit", "hookCallbackIds": ["e"]}]}, "[sim:hook]", "[hook: none registered]"),
        ({"PreToolUse": [{"matcher": None, "hookCallbackIds": ["x"]}]}, "[sim:hook=PostToolUse]",
         "[hook: PostToolUse not registered]"),
        ({"Stop": [{"matcher": None, "hookCallbackIds": ["s"]}]}, "[sim:hook=Stop]", "[hook: Stop is not simulated]"),
    ],
)
def test_hook_without_a_matching_registration_sends_nothing(
    spawn: Callable[..., SimProc], hooks: dict[str, Any] | None, prompt: str, note: str
) -> None:
    sim = spawn()
    if hooks is not None:
        register_hooks(sim, hooks)
    sim.user(f"p {prompt}")
    lines = sim.result()
    assert not of_type(lines, "control_request")
    assert of_type(lines, "user")[0]["message"]["content"][0]["is_error"] is False
    assert lines[-1]["result"].endswith(f"p {prompt} {note}"), lines[-1]["result"]


def test_interrupt_while_hook_pending_withdraws_it(spawn: Callable[..., SimProc]) -> None:
    sim = spawn("--hook", "PreToolUse")
    register_hooks(sim, {"PreToolUse": [{"matcher": None, "hookCallbackIds": ["cb"]}]})
    sim.user("p")
    ask = sim.read_until(lambda o: o.get("type") == "control_request")[-1]
    assert ask["request"]["subtype"] == "hook_callback"
    rid = sim.control("interrupt")
    lines = sim.result()
    assert lines[0] == {"type": "control_cancel_request", "request_id": ask["request_id"]}
    assert reply_id(lines[1]) == rid
    assert lines[-1]["subtype"] == "error_during_execution" and lines[-1]["terminal_reason"] == "aborted_tools"
    answer(sim, ask["request_id"], {})  # a late answer is ignored
    assert not [o for o in sim.barrier() if o.get("type") in ("result", "assistant")]
