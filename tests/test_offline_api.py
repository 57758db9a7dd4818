"""Tests of the offline Messages API fake, alone (plain HTTP on loopback) and
under the real Claude Code CLI (``e2e``), so the fake cannot make another test
pass for the wrong reason."""

from __future__ import annotations

import http.client
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker.testing.fake_api import (
    CLIENT_GONE,
    Directives,
    OfflineAPI,
    big_text,
    parse_directives,
    prompt_text,
)
from tests.realcli import StdioProcess, real_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def body(prompt: Any, *, stream: bool | None = True, model: str = "claude-test", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "max_tokens": 1024, "messages": [user(prompt)], **extra}
    if stream is not None:
        out["stream"] = stream
    return out


def connect(api: OfflineAPI, timeout_s: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", api.port, timeout=timeout_s)


def post(
    api: OfflineAPI, payload: Any, path: str = "/v1/messages?beta=true", timeout_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    conn = connect(api, timeout_s)
    try:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split an SSE body into (event, data) pairs, checking the framing."""
    events: list[tuple[str, dict[str, Any]]] = []
    for record in raw.decode().split("\n\n"):
        if not record.strip():
            continue
        lines = record.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), record[:200]
        name, data = lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


def stream(api: OfflineAPI, prompt: Any, **kw: Any) -> list[tuple[str, dict[str, Any]]]:
    status, headers, raw = post(api, body(prompt, **kw))
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    return parse_sse(raw)


def streamed_text(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(
        d["delta"]["text"] for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "text_delta"
    )


# -- prompt extraction and directive parsing -----------------------------------


def test_prompt_text_takes_text_and_tool_results_and_drops_cli_injections() -> None:
    content = [
        {"type": "text", "text": "<system-reminder>\nToday's date is 2026-01-01.\n</system-reminder>"},
        {"type": "text", "text": "[Request interrupted by user]\n"},
        {"type": "text", "text": "<local-command-stdout>Set model to x</local-command-stdout>\n"},
        {"type": "image", "source": {}},
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "tool says hi"}]},
        {"type": "tool_result", "tool_use_id": "t2", "content": "plain"},
        {"type": "text", "text": "the prompt"},
    ]
    assert prompt_text(content) == "tool says hi\nplain\nthe prompt"
    assert prompt_text("just a string") == "just a string"
    assert prompt_text(42) == ""
    # Only whole-line markers are the CLI's: a user quoting one keeps it.
    assert prompt_text("see [Request interrupted by user] here") == "see [Request interrupted by user] here"


def test_parse_directives() -> None:
    assert parse_directives("plain") == Directives()
    d = parse_directives('a [api:slow=250] b [api:tool=Bash:{"command":"echo ]["}] [api:hang] [api:big=10]')
    assert d == Directives(slow_ms=250, tool=("Bash", {"command": "echo ]["}), big=10, hang=True)
    assert parse_directives("[api:status=503]") == Directives(status=503, status_times=None)
    assert parse_directives("[api:status=500*2]") == Directives(status=500, status_times=2)
    # Malformed or unknown directives are ignored, never an error.
    assert parse_directives("[api:slow=x] [api:tool=Bash:{bad] [api:nope=1] [api:status=") == Directives()


def test_big_text_is_exact_and_deterministic() -> None:
    for n in (0, 1, 79, 80, 81, 12345):
        assert len(big_text(n).encode()) == n
    assert big_text(1000) == big_text(1000)
    assert big_text(100)[:80] == big_text(80)


# -- the HTTP surface -------------------------------------------------------------


def test_streaming_event_sequence_and_shapes(api: OfflineAPI) -> None:
    events = stream(api, "hello there", model="claude-x")
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["type"] == "message" and start["role"] == "assistant" and start["model"] == "claude-x"
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["id"].startswith("msg_") and isinstance(start["usage"]["input_tokens"], int)
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[2][1]["index"] == 0 and events[2][1]["delta"]["type"] == "text_delta"
    assert events[3][1] == {"type": "content_block_stop", "index": 0}
    delta = events[4][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] >= 1
    assert streamed_text(events) == "echo: hello there"


def test_non_streaming_json(api: OfflineAPI) -> None:
    for flag in (False, None):
        status, headers, raw = post(api, body([{"type": "text", "text": "hi"}], stream=flag))
        assert status == 200 and headers["content-type"] == "application/json"
        msg = json.loads(raw)
        assert msg["type"] == "message" and msg["role"] == "assistant" and msg["model"] == "claude-test"
        assert msg["content"] == [{"type": "text", "text": "echo: hi"}]
        assert msg["stop_reason"] == "end_turn" and msg["usage"]["output_tokens"] >= 1


def test_answers_from_last_user_message(api: OfflineAPI) -> None:
    payload = {
        "model": "claude-m",
        "stream": True,
        "messages": [
            user("first"),
            {"role": "assistant", "content": [{"type": "text", "text": "echo: first"}]},
            user(
                [{"type": "text", "text": "<system-reminder>x</system-reminder>"}, {"type": "text", "text": "second"}]
            ),
            # The CLI appends system-role messages after the user's.
            {"role": "system", "content": "<total_tokens>1 left</total_tokens>"},
        ],
    }
    status, _, raw = post(api, payload)
    assert status == 200 and streamed_text(parse_sse(raw)) == "echo: second"
    assert api.requests[-1].prompt == "second"


def test_count_tokens(api: OfflineAPI) -> None:
    status, _, raw = post(api, body("count me", stream=None), path="/v1/messages/count_tokens?beta=true")
    assert status == 200
    reply = json.loads(raw)
    assert set(reply) == {"input_tokens"} and reply["input_tokens"] > 0


def test_unknown_paths_and_bad_bodies(api: OfflineAPI) -> None:
    status, _, raw = post(api, body("x"), path="/v1/complete")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    conn = connect(api)
    conn.request("GET", "/v1/models")
    resp = conn.getresponse()
    assert resp.status == 404 and json.loads(resp.read())["type"] == "error"
    conn.close()
    status, _, raw = post(api, b"{not json")
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_keep_alive_connection_serves_several_requests(api: OfflineAPI) -> None:
    conn = connect(api)
    for word in ("one", "two", "three"):
        conn.request("POST", "/v1/messages", body=json.dumps(body(word)))
        resp = conn.getresponse()
        assert streamed_text(parse_sse(resp.read())) == f"echo: {word}"
    conn.close()
    assert api.active_connections <= 1


# -- directives -----------------------------------------------------------------


def test_slow_streams_many_deltas_over_the_duration(api: OfflineAPI) -> None:
    t0 = time.monotonic()
    events = stream(api, "[api:slow=600] " + "x" * 200)
    elapsed = time.monotonic() - t0
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert len(deltas) >= 20
    assert streamed_text(events) == "echo: [api:slow=600] " + "x" * 200
    assert 0.5 <= elapsed < 3.0


def test_slow_stream_stops_promptly_when_client_disconnects(api: OfflineAPI) -> None:
    conn = connect(api)
    conn.request("POST", "/v1/messages", body=json.dumps(body("[api:slow=20000] long")))
    resp = conn.getresponse()
    assert resp.status == 200
    rec = api.wait_for(lambda r: r.prompt.endswith("long"), 5)
    api.wait_for_sent(rec, "content_block_delta", 5)
    t0 = time.monotonic()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    api.wait_for_sent(rec, CLIENT_GONE, 2)
    assert time.monotonic() - t0 < 0.5
    assert "message_stop" not in api.sent_events(rec)
    api.wait_idle(2)


def test_tool_directive_then_tool_result_answers_text(api: OfflineAPI) -> None:
    events = stream(api, '[api:tool=Bash:{"command":"echo hi"}] do it')
    block = events[1][1]["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "Bash" and block["input"] == {}
    assert block["id"].startswith("toolu_")
    partial = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert json.loads(partial) == {"command": "echo hi"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    # The follow-up carries the tool_result; the original prompt (with its
    # directive) is still in the history and must not be replayed.
    follow_up = {
        "model": "claude-m",
        "stream": True,
        "messages": [
            user('[api:tool=Bash:{"command":"echo hi"}] do it'),
            {"role": "assistant", "content": [{**block, "input": {"command": "echo hi"}}]},
            user([{"type": "tool_result", "tool_use_id": block["id"], "content": "hi", "is_error": False}]),
        ],
    }
    status, _, raw = post(api, follow_up)
    events = parse_sse(raw)
    assert status == 200 and streamed_text(events) == "echo: hi"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"

    status, _, raw = post(api, body('[api:tool=Read:{"file_path":"a.txt"}]', stream=False))
    msg = json.loads(raw)
    assert msg["stop_reason"] == "tool_use"
    assert msg["content"][0]["input"] == {"file_path": "a.txt"}


@pytest.mark.parametrize(
    ("code", "kind"), [(400, "invalid_request_error"), (500, "api_error"), (529, "overloaded_error")]
)
def test_status_directive(api: OfflineAPI, code: int, kind: str) -> None:
    for flag in (True, False):
        status, headers, raw = post(api, body(f"[api:status={code}] fail", stream=flag))
        assert status == code
        assert json.loads(raw) == {"type": "error", "error": {"type": kind, "message": "scripted error"}}
        # Without this the CLI backs off for minutes on 5xx.
        assert headers["x-should-retry"] == "false"


def test_unknown_model_is_refused_like_the_real_api() -> None:
    """A model the API does not serve gets the real API's 404 (the CLI's set_model probe relies on it)."""
    with OfflineAPI() as default_api:
        for flag in (True, False):
            status, _headers, raw = post(default_api, body("hi", stream=flag, model="not-a-model"))
            assert status == 404
            assert json.loads(raw) == {"type": "error", "error": {"type": "not_found_error",
                                                                 "message": "model: not-a-model"}}
        assert post(default_api, body("hi", model="claude-anything"))[0] == 200
    with OfflineAPI(models=["claude-a"]) as listed:
        assert post(listed, body("hi", model="claude-a"))[0] == 200
        assert post(listed, body("hi", model="claude-b"))[0] == 404


def test_status_times_fails_n_attempts_of_the_same_request(api: OfflineAPI) -> None:
    payload = body("[api:status=500*2] flaky")
    first, second, third = (post(api, payload) for _ in range(3))
    assert [first[0], second[0], third[0]] == [500, 500, 200]
    assert "x-should-retry" not in first[1]
    assert streamed_text(parse_sse(third[2])) == "echo: [api:status=500*2] flaky"
    # A different conversation carrying the same prompt is counted afresh.
    other = body("[api:status=500*2] flaky", model="claude-other")
    other["messages"].insert(0, user("earlier"))
    other["messages"].insert(1, {"role": "assistant", "content": "ok"})
    assert post(api, other)[0] == 500


def test_answers_and_directives_come_from_the_newest_piece_only(api: OfflineAPI) -> None:
    # After an API error or an early interrupt the CLI sends the unanswered
    # prompt again, merged in front of the next one.
    merged = [
        {"type": "text", "text": "[api:status=400] bad\n"},
        {"type": "text", "text": "[Request interrupted by user]\n"},
        {"type": "text", "text": "recovered"},
    ]
    events = stream(api, merged)
    assert streamed_text(events) == "echo: recovered"
    rec = api.requests[-1]
    assert (rec.prompt, rec.latest) == ("[api:status=400] bad\nrecovered", "recovered")


def test_big_reply_is_exact(api: OfflineAPI) -> None:
    n = 1_600_000
    events = stream(api, f"[api:big={n}]")
    text = streamed_text(events)
    assert len(text.encode()) == n and text == big_text(n)
    assert sum(1 for name, _ in events if name == "content_block_delta") > 1
    status, _, raw = post(api, body(f"[api:big={n}]", stream=False))
    assert status == 200
    assert json.loads(raw)["content"][0]["text"] == big_text(n)


def test_hang_sends_message_start_then_waits_for_disconnect(api: OfflineAPI) -> None:
    conn = connect(api)
    conn.request("POST", "/v1/messages", body=json.dumps(body("[api:hang]")))
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline() + resp.readline()
    assert first.startswith(b"event: message_start\n")
    rec = api.wait_for(lambda r: r.prompt == "[api:hang]", 5)
    api.wait_for_sent(rec, "message_start", 5)
    assert api.sent_events(rec) == ["message_start"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    api.wait_for_sent(rec, CLIENT_GONE, 2)
    api.wait_idle(2)


def test_stop_releases_hung_streams_and_idle_connections() -> None:
    api = OfflineAPI().start()
    port = api.port
    outcomes: list[str] = []

    def hang(i: int) -> None:
        c = connect(api)
        c.request("POST", "/v1/messages", body=json.dumps(body(f"[api:hang] {i}")))
        r = c.getresponse()
        try:
            r.read()
            outcomes.append("eof")
        except (http.client.IncompleteRead, OSError):
            outcomes.append("cut")
        c.close()

    threads = [threading.Thread(target=hang, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    idle = connect(api)  # a keep-alive connection parked between requests
    idle.request("POST", "/v1/messages", body=json.dumps(body("x")))
    idle.getresponse().read()
    for want in (f"[api:hang] {i}" for i in range(3)):
        rec = api.wait_for(lambda r: r.prompt == want, 5)  # noqa: B023 (used at once, in this iteration)
        api.wait_for_sent(rec, "message_start", 5)
    assert api.active_connections == 4

    t0 = time.monotonic()
    api.stop()
    assert time.monotonic() - t0 < 2.0
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert len(outcomes) == 3
    assert api.active_connections == 0
    api.stop()  # idempotent
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# -- recording and concurrency ------------------------------------------------------


def test_recording_fields_and_wait_for(api: OfflineAPI) -> None:
    before = time.perf_counter_ns()
    post(api, body("recorded", model="claude-rec"))
    after = time.perf_counter_ns()
    rec = api.wait_for(lambda r: r.prompt == "recorded", 1)
    assert rec.path == "/v1/messages" and rec.method == "POST"
    assert rec.model == "claude-rec" and rec.stream is True
    assert rec.messages == [user("recorded")]
    assert before <= rec.t_ns <= after
    assert rec.seq == 0 and rec.to_json()["t_ns"] == rec.t_ns
    # wait_for also sees requests that arrive later.
    timer = threading.Timer(0.05, post, args=(api, body("later", stream=False)))
    timer.start()
    try:
        assert api.wait_for(lambda r: r.prompt == "later", 5).stream is False
    finally:
        timer.join()
    with pytest.raises(TimeoutError):
        api.wait_for(lambda r: r.prompt == "never", 0.05)
    assert [r.prompt for r in api.requests] == ["recorded", "later"]
    assert api.sent_events(rec)[-1] == "message_stop"


def test_concurrent_requests_are_served_in_parallel(api: OfflineAPI) -> None:
    n = 8
    texts: dict[int, str] = {}

    def worker(i: int) -> None:
        texts[i] = streamed_text(stream(api, f"[api:slow=400] req {i}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - t0
    assert texts == {i: f"echo: [api:slow=400] req {i}" for i in range(n)}
    assert elapsed < n * 0.4 / 2  # serial would take n * 0.4 s
    assert len(api.requests) == n


def test_command_line_entry_serves_records_and_exits_on_signal(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.testing.fake_api", "--record", str(record)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, "no ready line"
            info = json.loads(proc.stdout.readline())
            assert info["url"] == f"http://127.0.0.1:{info['port']}"
            conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=10)
            conn.request("POST", "/v1/messages?beta=true", body=json.dumps(body(f"via cli {sig.name}")))
            assert streamed_text(parse_sse(conn.getresponse().read())) == f"echo: via cli {sig.name}"
            conn.close()
            proc.send_signal(sig)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream_ in (proc.stdout, proc.stderr):
                if stream_ is not None:
                    stream_.close()
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["via cli SIGTERM", "via cli SIGINT"]
    assert all(isinstance(r["t_ns"], int) and r["path"] == "/v1/messages" for r in lines)


# -- under the real Claude Code CLI ----------------------------------------------------


def turn(cli: StdioProcess, prompt: str, timeout_s: float = 10.0) -> tuple[str, dict[str, Any], list[str]]:
    """Send one prompt, read to its result; return (uuid, result, kinds seen)."""
    msg_uuid = cli.send_user(prompt)
    result, seen = cli.read_kind("result", timeout_s)
    return msg_uuid, result.obj, [ln.kind for ln in seen]


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_cli_one_prompt(api: OfflineAPI) -> None:
    with real_cli(api, model="claude-sonnet-4-5") as cli:
        msg_uuid, result, kinds = turn(cli, "hello offline world", timeout_s=20)
        assert kinds.index("system/init") < kinds.index("assistant") < kinds.index("result/success")
        assert result["result"] == "echo: hello offline world"
        assert result["is_error"] is False and result["terminal_reason"] == "completed"
        assert msg_uuid in result["user_message_uuids"]
        init = next(ln.obj for ln in cli.lines if ln.kind == "system/init")
        assert init["model"] == "claude-sonnet-4-5"
        rec = api.wait_for(lambda r: r.stream and r.latest == "hello offline world", 1)
        assert rec.path == "/v1/messages" and rec.model == "claude-sonnet-4-5"
        cli.close_stdin()
        cli.read_all(10)
        assert cli.wait_exit(10) == 0


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_cli_interrupt_during_slow_stream(api: OfflineAPI) -> None:
    with real_cli(api) as cli:
        msg_uuid = cli.send_user("[api:slow=8000] a long answer")
        rec = api.wait_for(lambda r: r.stream and r.latest.endswith("a long answer"), 20)
        api.wait_for_sent(rec, "content_block_delta", 5)
        t0 = time.perf_counter_ns()
        request_id = cli.send_control("interrupt")
        reply, _ = cli.read_control_response(request_id, 5)
        assert reply.obj == {
            "type": "control_response",
            "response": {"subtype": "success", "request_id": request_id, "response": {"still_queued": []}},
        }
        result, _ = cli.read_kind("result", 5)
        assert (result.t_ns - t0) / 1e9 < 2.0  # well before the 8 s stream would end
        r = result.obj
        assert r["subtype"] == "error_during_execution" and r["is_error"] is True
        assert r["terminal_reason"] == "aborted_streaming"
        assert msg_uuid in r["user_message_uuids"]
        # The CLI dropped the HTTP stream and the fake noticed.
        api.wait_for_sent(rec, CLIENT_GONE, 5)
        # The process keeps serving after an error result.
        _, after, _ = turn(cli, "still there?")
        assert after["result"] == "echo: still there?"


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_cli_set_model_switches_the_next_request(api: OfflineAPI) -> None:
    with real_cli(api, model="claude-sonnet-4-5") as cli:
        turn(cli, "before", timeout_s=20)
        request_id = cli.send_control("set_model", model="claude-haiku-4-5")
        reply, seen = cli.read_control_response(request_id, 5)
        replays = [ln.obj for ln in seen if ln.obj.get("type") == "user" and ln.obj.get("isReplay")]
        assert len(replays) == 1 and "Set model to" in json.dumps(replays[0]["message"]["content"])
        assert seen.index(next(ln for ln in seen if ln.obj.get("isReplay"))) < seen.index(reply)
        assert reply.obj["response"] == {
            "subtype": "success",
            "request_id": request_id,
            "response": {"model": "claude-haiku-4-5"},
        }
        _, result, _ = turn(cli, "after")
        # The /model record merged into this prompt is not echoed.
        assert result["result"] == "echo: after"
        rec = api.wait_for(lambda r: r.stream and r.latest == "after", 1)
        assert rec.model == "claude-haiku-4-5"


@pytest.mark.e2e
@pytest.mark.timeout(40)
def test_cli_scripted_directives(api: OfflineAPI) -> None:
    with real_cli(api) as cli:
        _, r, kinds = turn(cli, '[api:tool=Bash:{"command":"echo hi"}] run it', timeout_s=20)
        assert kinds.count("assistant") == 2 and "user" in kinds
        assert r["result"] == "echo: hi" and r["num_turns"] == 2

        t0 = time.monotonic()
        _, r, _ = turn(cli, "[api:status=500] down")
        assert time.monotonic() - t0 < 3.0  # no minutes of backoff
        assert (r["subtype"], r["is_error"], r["terminal_reason"], r["api_error_status"]) == (
            "success",
            True,
            "api_error",
            500,
        )

        _, r, kinds = turn(cli, "[api:status=529*1] flaky")
        assert "system/api_retry" in kinds and r["is_error"] is False
        assert r["result"].endswith("[api:status=529*1] flaky")

        _, r, _ = turn(cli, "[api:big=1600000]")
        assert r["result"] == big_text(1_600_000)


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_cli_hang_then_interrupt(api: OfflineAPI) -> None:
    with real_cli(api) as cli:
        cli.send_user("[api:hang] wait forever")
        rec = api.wait_for(lambda r: r.stream and r.latest.endswith("wait forever"), 20)
        api.wait_for_sent(rec, "message_start", 5)
        cli.send_control("interrupt")
        result, _ = cli.read_kind("result", 5)
        assert result.obj["terminal_reason"] == "aborted_streaming"
        api.wait_for_sent(rec, CLIENT_GONE, 5)
