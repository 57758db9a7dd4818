"""End to end with the real Claude Code CLI: a real broker (``--agent claude``),
real clients, and the offline Messages API as the model.

Every assertion is about what reached the fake API (its recorded requests),
what the clients got back, and the broker's state block. The CLI runs offline
(see :mod:`tests.realcli`): ``ANTHROPIC_BASE_URL`` points at an in-process
:class:`OfflineAPI`, HOME (also the agent's cwd) is a per-test temporary
directory, and inherited ``CLAUDE*``/``ANTHROPIC*`` variables are removed.

Nothing here sleeps to synchronise: tests wait on the API's records
(``wait_for`` / ``wait_for_sent``), on client results, or poll the state block
with a deadline. Latencies are printed, never asserted (run with ``-rP`` or
``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from broker.scheduler import RESUME_NOTE
from broker.testing.fake_api import CLIENT_GONE, OfflineAPI, RecordedRequest, big_text
from broker.testing.launcher import BrokerProcess
from broker.testing.offline_env import offline_cli_env
from clients import Client, ModelRefused
from tests.realcli import needs_claude, require_claude_bin
from tests.support import ClientProc, processes_under, published, wait_until
from tests.support import rec as record

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60), needs_claude]

#: Longest wait for anything one CLI turn does (its first turn takes ~2 s on a busy machine).
T = 30.0


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True)
def nothing_left_behind(session_name: str, tmp_path: Path) -> Iterator[None]:
    """After the brokers stopped (and before the session sweep): no CLI, no tool child, no IPC name left.

    Set up before ``broker_factory`` and ``client``, so torn down after them; it
    depends on ``session_name``, so it checks before that fixture's forced sweep.
    """
    yield
    home = tmp_path / "home"
    deadline = time.monotonic() + 5
    while (left := processes_under(home)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for exits, with a deadline
    for pid in left:  # started by this test (the broker's agent or its tools): end them
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    names_left = [n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.{session_name}.")]
    assert not left, f"processes left behind in the agent's HOME: {left}"
    assert not names_left, f"shared-memory objects left behind: {names_left}"


@pytest.fixture
def claude_broker(
    api: OfflineAPI, broker_factory: Callable[..., BrokerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., BrokerProcess]:
    """Start a broker with ``--agent claude`` pointed at ``api`` (HOME = the fixture's temp home).

    ``api`` is set up before ``broker_factory``, so brokers stop (draining
    their turn against a live API) before the API does.
    """
    # The broker inherits this process's environment, and the CLI the broker's:
    # settings of an enclosing Claude Code session must not leak into the test.
    for key in list(os.environ):
        if key.startswith(("CLAUDE", "ANTHROPIC")):
            monkeypatch.delenv(key)
    home = tmp_path / "home"  # made by broker_factory, used as HOME and cwd
    (home / "tmp").mkdir(exist_ok=True)

    # The bundled CLI, whose behaviour these tests are written against, even if
    # another `claude` is on PATH (the broker would prefer that one).
    bin_args = ("--claude-bin", require_claude_bin())

    def start(agent_args: tuple[str, ...] = (), extra_args: tuple[str, ...] = ()) -> BrokerProcess:
        return broker_factory(
            agent="claude", agent_args=agent_args, extra_args=(*bin_args, *extra_args),
            env=offline_cli_env(api.url, str(home)), timeout_s=T,
        )

    return start


def turn_request(api: OfflineAPI, text: str, timeout_s: float = T, after: int = -1) -> RecordedRequest:
    """The streaming request (the turn itself, not a probe) whose newest prompt piece is ``text``."""
    return api.wait_for(lambda r: r.stream and r.seq > after and r.latest == text, timeout_s)


def streaming(api: OfflineAPI, text: str, deltas: int = 3, timeout_s: float = T) -> RecordedRequest:
    """Return once the API is streaming the answer to ``text`` (a few deltas sent)."""
    rec = turn_request(api, text, timeout_s)
    api.wait_for_sent(rec, "content_block_delta", timeout_s, count=deltas)
    return rec


def history(rec: RecordedRequest) -> str:
    """Every message of a request, as one JSON string (to look for earlier turns in it)."""
    return json.dumps(rec.messages)


def tool_results(rec: RecordedRequest) -> list[dict[str, Any]]:
    """The tool_result blocks of a request's messages."""
    out = []
    for m in rec.messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            out += [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    return out


def tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def client_output(p: ClientProc, timeout_s: float = T) -> None:
    """Wait for a client process to finish; it must exit 0."""
    rc = p.finish(timeout_s)
    assert rc == 0, f"client failed (rc {rc}): {p.stderr[-3000:]}"


def report(**figures: Any) -> None:
    print("E2E-FIGURES " + json.dumps(figures))


# ---------------------------------------------------------------- 1. preemption


def test_webhook_preempts_worker_turn_which_reruns(claude_broker, api, session_name):
    """A webhook interrupts a streaming worker turn; the worker is requeued, rerun and completes."""
    b = claude_broker()
    worker_text = "[api:slow=4000] worker: refactor the billing module"
    hook_text = "webhook: a review comment arrived on PR 12"
    with Client(session_name, "worker") as w, Client(session_name, "webhook") as h:
        wt = w.prompt(worker_text)
        wrec = streaming(api, worker_text)
        t_submit = time.perf_counter_ns()
        ht = h.prompt(hook_text)
        hrec = turn_request(api, hook_text)
        arrive_ms = (hrec.t_ns - t_submit) / 1e6
        hres = ht.result(timeout_s=T)
        events = list(wt.events(timeout_s=T))
        wres = wt.result(timeout_s=T)
        lat = record(b).latencies

    # The interrupt happened: the worker's stream was cut, and the worker was told.
    assert api.sent_events(wrec)[-1] == CLIENT_GONE
    assert "message_stop" not in api.sent_events(wrec)
    preempted = [e for e in events if e.get("type") == "turnstile" and e.get("subtype") == "preempted"]
    assert len(preempted) == 1 and preempted[0]["requeued"] is True
    # The webhook's prompt reached the model after the worker's, and its turn succeeded.
    assert hrec.seq > wrec.seq
    assert hres.ok and hres.text == f"echo: {hook_text}", hres
    # The worker's request ran again after the webhook (with the resume note) and completed.
    rerun = api.wait_for(lambda r: r.stream and r.seq > hrec.seq and worker_text in r.latest, 5)
    assert rerun.latest == RESUME_NOTE + worker_text
    assert "message_stop" in api.sent_events(rerun)
    assert wres.ok, wres
    assert wres.preemptions == 1
    assert wres.text == f"echo: {RESUME_NOTE}{worker_text}"
    assert wres.turn > hres.turn > preempted[0]["turn"]
    assert wres.raw is not None and wres.raw.get("subtype") == "success"
    report(test="preempt", webhook_submit_to_api_ms=round(arrive_ms, 2),
           broker_frame_read_to_interrupt_us=lat["last_preempt_signal_us"],
           broker_result_read_to_webhook_written_us=lat["last_handoff_us"],
           since_submit_ms=milestones(b, t_submit, preempted[0]["turn"], hres.turn))


def milestones(b: BrokerProcess, t_submit_ns: int, worker_turn: int, hook_turn: int) -> dict[str, float]:
    """Where the time from a webhook's submit went, from the broker's log (wall clock, µs resolution)."""
    offset_ns = time.time_ns() - time.perf_counter_ns()  # perf_counter → wall clock, for printing only
    t0 = (t_submit_ns + offset_ns) / 1e6
    out: dict[str, float] = {}
    for line in b.log_text().splitlines():
        try:
            ev = json.loads(line)
            t = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp() * 1000
        except (ValueError, KeyError):
            continue
        if ev.get("event") == "turn.interrupt" and ev.get("turn") == worker_turn:
            out["interrupt_written"] = round(t - t0, 2)
        elif ev.get("event") == "turn.preempted" and ev.get("turn") == worker_turn:
            out["preempted_notice_sent"] = round(t - t0, 2)  # just after the webhook was written
        elif ev.get("event") == "turn.start" and ev.get("turn") == hook_turn:
            out["webhook_prompt_written"] = round(t - t0, 2)
    return out


# ---------------------------------------------------------------- 2. FIFO


def test_three_webhooks_fifo_ahead_of_worker(claude_broker, api, session_name, client):
    """Three webhooks submitted in a row while a worker streams run first-in first-out; the worker ends last."""
    b = claude_broker()
    worker_text = "[api:slow=3000] worker: write the release notes"
    # The rerun need not stream slowly again: the client gives a resume prompt.
    resume_text = "worker: continue the release notes"
    wproc = client("worker", prompts=[{"text": worker_text, "resume_prompt": resume_text}])
    wrec = streaming(api, worker_text)
    hook_texts = [f"webhook {i}: CI failed on build {i}" for i in (1, 2, 3)]
    with Client(session_name, "webhook") as h1, Client(session_name, "webhook") as h2, \
            Client(session_name, "webhook") as h3:
        t_submit = time.perf_counter_ns()
        turns = [c.prompt(text) for c, text in zip((h1, h2, h3), hook_texts, strict=True)]
        results = [t.result(timeout_s=T) for t in turns]
    client_output(wproc)
    wres = wproc.results()[-1]

    hook_recs = [turn_request(api, text, 5) for text in hook_texts]
    rerun = turn_request(api, resume_text, 5)
    # Every webhook ok, with its own answer, in submission order, all after the worker started.
    for text, res in zip(hook_texts, results, strict=True):
        assert res.ok and res.text == f"echo: {text}", res
    assert [r.turn for r in results] == sorted(r.turn for r in results)
    assert wrec.seq < hook_recs[0].seq < hook_recs[1].seq < hook_recs[2].seq < rerun.seq
    # Only the first webhook preempted; the worker ran last and completed.
    preempts = [e for e in wproc.events() if e.get("type") == "turnstile"]
    assert [e["subtype"] for e in preempts] == ["preempted", "rerun"]
    assert preempts[1]["cause"] == "preempted" and preempts[1]["attempt"] == 2
    assert wres["status"] == "ok" and wres["text"] == f"echo: {resume_text}", wres
    assert wres["turn"] > results[-1].turn
    assert record(b).counters["preempts"] == 1
    report(test="fifo", webhook_submit_to_api_ms=round((hook_recs[0].t_ns - t_submit) / 1e6, 2),
           broker_frame_read_to_interrupt_us=record(b).latencies["last_preempt_signal_us"])


# ---------------------------------------------------------------- 3. cancel


def test_cancel_then_clean_next_turn(claude_broker, api, session_name):
    """A cancelled turn ends 'cancelled'; the next turn is a clean success with its own text."""
    b = claude_broker()
    slow_text = "[api:slow=5000] a long answer nobody wants any more"
    with Client(session_name, "worker") as c:
        t1 = c.prompt(slow_text)
        rec1 = streaming(api, slow_text)
        t1.cancel()
        res1 = t1.result(timeout_s=T)
        assert res1.status == "cancelled", res1
        # The stream was cut: the fake API notices the CLI's disconnect on its own thread.
        wait_until(lambda: api.sent_events(rec1)[-1] == CLIENT_GONE, T, what="the API stream to be cut")
        inc, cancelled_turn = c.incarnation, res1.turn
        # A second cancel naming the finished turn is stale: it must not touch the next one.
        c.cancel_turn(inc, cancelled_turn)
        t2 = c.prompt("after the cancel: say something")
        res2 = t2.result(timeout_s=T)
    assert res2.ok, res2
    assert res2.text == "echo: after the cancel: say something"
    assert res2.raw is not None
    assert res2.raw["subtype"] == "success" and res2.raw["is_error"] is False
    assert res2.turn > cancelled_turn
    rec2 = turn_request(api, "after the cancel: say something", 5)
    assert "message_stop" in api.sent_events(rec2)
    # Both results are counted when the broker publishes, which may be after the client saw them.
    counters = published(b, lambda r: r.counters["stale_cancels"] >= 1 and r.counters["results_ok"] >= 1,
                         timeout_s=T, what="the stale cancel and the second result to be counted").counters
    assert counters["results_cancelled"] == 1 and counters["results_ok"] == 1


# ---------------------------------------------------------------- 4. model switch


def test_model_switch_mid_session(claude_broker, api, session_name):
    """A prompt naming another model switches the session: the API sees the new model from then on."""
    b = claude_broker()
    with Client(session_name, "webhook") as c:
        res1 = c.prompt("before the switch").result(timeout_s=T)
        res2 = c.prompt("after the switch", model="claude-haiku-4-5").result(timeout_s=T)
        res3 = c.prompt("still switched").result(timeout_s=T)
    assert res1.ok and res2.ok and res3.ok, (res1, res2, res3)
    before = turn_request(api, "before the switch", 5)
    after = turn_request(api, "after the switch", 5)
    still = turn_request(api, "still switched", 5)
    assert before.model != "claude-haiku-4-5"
    assert after.model == "claude-haiku-4-5"
    assert still.model == "claude-haiku-4-5"
    assert res2.model == res3.model == "claude-haiku-4-5"
    assert res2.text == "echo: after the switch"
    assert "before the switch" in history(after)  # same conversation, new model
    r = record(b)
    assert r.model == "claude-haiku-4-5" and r.counters["model_switches"] == 1


def test_refused_model_is_a_typed_error_and_the_session_keeps_its_model(claude_broker, api, session_name):
    """A model the API does not serve: the CLI's set_model probe fails, the request gets ModelRefused,
    the next turns (and the next broker) run on the model the session had."""
    b = claude_broker()
    with Client(session_name, "webhook") as c:
        before = c.prompt("on the first model").result(timeout_s=T)
        refused = c.prompt("never sent to the model", model="not-a-model").result(timeout_s=T)
        with pytest.raises(ModelRefused) as info:
            refused.raise_for_status()
        with pytest.raises(ModelRefused):
            c.set_model("also-not-a-model").raise_for_status()
        after = c.prompt("still on the first model").result(timeout_s=T)
    assert before.ok and after.ok, (before, after)
    assert refused.error_code == "model_refused" and "not-a-model" in str(info.value)
    assert info.value.model == before.model  # the model the session kept
    assert after.model == before.model and after.model != "not-a-model"
    assert turn_request(api, "still on the first model", 5).model == before.model
    assert not any(r.latest == "never sent to the model" for r in api.requests)
    assert record(b).model == before.model
    b.stop()
    b2 = claude_broker()
    assert record(b2).model == before.model
    with Client(session_name, "webhook") as c:
        again = c.prompt("after a broker restart").result(timeout_s=T)
    assert again.ok and again.model == before.model
    assert turn_request(api, "after a broker restart", 5).model == before.model


# ---------------------------------------------------------------- 5. permissions


def test_permission_request_routed_to_holder_allow_and_deny(claude_broker, api, session_name, tmp_path):
    """``can_use_tool`` goes to the turn's holder; its allow runs the tool, its deny does not.

    The commands write a file: a read-only one (``echo hi``) is approved by the
    CLI itself and never asks.
    """
    claude_broker()  # no flag passed by hand: the broker launches the CLI so that it asks
    home = tmp_path / "home"  # the agent's cwd
    asked: list[dict[str, Any]] = []

    def on_permission(req: dict[str, Any]) -> dict[str, Any]:
        asked.append(req)
        if "allowed.txt" in req.get("input", {}).get("command", ""):
            return {"behavior": "allow", "updatedInput": req["input"]}
        return {"behavior": "deny", "message": "denied by the e2e test"}

    allow_cmd = "echo hi > allowed.txt && cat allowed.txt"
    deny_cmd = "echo hi > denied.txt && cat denied.txt"
    allow_text = f'[api:tool=Bash:{{"command":"{allow_cmd}"}}] run it'
    deny_text = f'[api:tool=Bash:{{"command":"{deny_cmd}"}}] run this one too'
    with Client(session_name, "webhook", on_permission=on_permission) as c:
        res_allow = c.prompt(allow_text).result(timeout_s=T)
        res_deny = c.prompt(deny_text).result(timeout_s=T)

    assert [a.get("subtype") for a in asked] == ["can_use_tool", "can_use_tool"]
    assert [a.get("tool_name") for a in asked] == ["Bash", "Bash"]
    assert [a["input"]["command"] for a in asked] == [allow_cmd, deny_cmd]
    # Allowed: the tool ran, and its output went back to the model in a tool_result.
    first = turn_request(api, allow_text, 5)
    follow = api.wait_for(lambda r: r.stream and r.seq > first.seq and bool(tool_results(r)), 5)
    ran = tool_results(follow)[-1]
    assert not ran.get("is_error"), ran
    assert tool_result_text(ran).strip() == "hi"
    assert (home / "allowed.txt").read_text() == "hi\n"
    assert res_allow.ok and res_allow.text == "echo: hi", res_allow
    # Denied: the model got an error tool_result with the holder's message; nothing ran.
    second = turn_request(api, deny_text, 5)
    follow2 = api.wait_for(lambda r: r.stream and r.seq > second.seq and len(tool_results(r)) > 1, 5)
    refused = tool_results(follow2)[-1]
    assert refused.get("is_error") is True, refused
    assert "denied by the e2e test" in tool_result_text(refused)
    assert not (home / "denied.txt").exists()
    assert res_deny.ok, res_deny


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_holder_without_handler_gets_the_serve_default_permission(claude_broker, api, session_name, tmp_path,
                                                                  policy):
    """No on_permission: ``serve --default-permission`` decides (deny unless told allow)."""
    claude_broker(extra_args=() if policy == "deny" else ("--default-permission", "allow"))
    home = tmp_path / "home"
    cmd = "echo hi > wrote.txt && cat wrote.txt"
    text = f'[api:tool=Bash:{{"command":"{cmd}"}}] run it without a handler'
    with Client(session_name, "webhook") as c:
        res = c.prompt(text).result(timeout_s=T)
    assert res.ok, res
    first = turn_request(api, text, 5)
    follow = api.wait_for(lambda r: r.stream and r.seq > first.seq and bool(tool_results(r)), 5)
    block = tool_results(follow)[-1]
    if policy == "deny":
        assert block.get("is_error") is True, block
        assert "no permission handler" in tool_result_text(block)
        assert not (home / "wrote.txt").exists()
    else:
        assert not block.get("is_error"), block
        assert (home / "wrote.txt").read_text() == "hi\n"


def test_hook_callbacks_reach_the_holders_on_hook(claude_broker, api, session_name, tmp_path):
    """The broker registers PreToolUse/PostToolUse hooks: the holder's on_hook sees both around a tool call."""
    claude_broker()
    seen: list[dict[str, Any]] = []

    def on_hook(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        return {}

    cmd = "echo hooked > hooked.txt"
    text = f'[api:tool=Bash:{{"command":"{cmd}"}}] run it with hooks'
    with Client(session_name, "webhook", on_hook=on_hook,
                on_permission=lambda req: {"behavior": "allow", "updatedInput": req["input"]}) as c:
        res = c.prompt(text).result(timeout_s=T)
    assert res.ok, res
    events = [(r.get("subtype"), (r.get("input") or {}).get("hook_event_name")) for r in seen]
    assert ("hook_callback", "PreToolUse") in events and ("hook_callback", "PostToolUse") in events, seen
    assert all(r.get("callback_id", "").startswith("turnstile:") for r in seen)
    assert (tmp_path / "home" / "hooked.txt").exists()


# ---------------------------------------------------------------- 6. agent killed


def test_agent_sigkilled_mid_turn_resumes_same_session(claude_broker, api, session_name):
    """SIGKILL the CLI mid-turn: the broker restarts it with --resume; the conversation survives."""
    b = claude_broker()
    with Client(session_name, "worker") as c:
        res1 = c.prompt("remember the word kumquat").result(timeout_s=T)
        assert res1.ok, res1
        before = record(b)
        sid = before.session_id
        assert res1.session_id == sid

        slow_text = "[api:slow=2000] long task interrupted by a crash"
        t2 = c.prompt(slow_text)
        rec2 = streaming(api, slow_text)
        t_kill = time.perf_counter_ns()
        os.kill(before.agent_pid, signal.SIGKILL)
        # The worker's request is rerun on the restarted agent.
        # The rerun carries the resume note before the original text.
        rerun = api.wait_for(
            lambda r: r.stream and r.seq > rec2.seq and r.latest.endswith(slow_text) and r.latest != slow_text, T
        )
        res2 = t2.result(timeout_s=T)
        events = list(t2.events(timeout_s=1))
        after = record(b)

    assert res2.ok, res2
    # The rerun carries the resume note: the resumed conversation still holds the lost prompt.
    assert res2.text.startswith("echo: ") and res2.text.endswith(slow_text), res2.text
    assert RESUME_NOTE.strip() in res2.text
    assert res2.session_id == sid
    assert any(e.get("subtype") == "preempted" for e in events)  # told its first run was lost
    reruns = [e for e in events if e.get("subtype") == "rerun"]
    assert [(e["cause"], e["attempt"]) for e in reruns] == [("agent_restarted", 2)]
    assert after.session_id == sid
    assert after.agent_pid != before.agent_pid
    assert after.counters["agent_restarts"] == 1
    with open(f"/proc/{after.agent_pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert f"--resume={sid}".encode() in argv
    # The resumed CLI sent the earlier exchange as history.
    h = history(rerun)
    assert "remember the word kumquat" in h and "echo: remember the word kumquat" in h
    report(test="agent_kill", kill_to_rerun_at_api_ms=round((rerun.t_ns - t_kill) / 1e6, 1))


# ---------------------------------------------------------------- 7. big reply


def test_big_reply_delivered_intact(claude_broker, api, session_name):
    """A 1.6 MB answer (stdout lines over 1.5 MB) reaches the client whole."""
    claude_broker()
    n = 1_600_000
    with Client(session_name, "webhook") as c:
        turn = c.prompt(f"[api:big={n}]")
        events = list(turn.events(timeout_s=T))
        res = turn.result(timeout_s=T)
    assert res.ok, res.error
    assert len(res.text) == n
    assert res.text == big_text(n)
    assert events[-1]["type"] == "result" and events[-1]["result"] == res.text
    texts = [blk.get("text", "") for e in events if e.get("type") == "assistant"
             for blk in e["message"]["content"] if isinstance(blk, dict)]
    assert big_text(n) in texts


# ---------------------------------------------------------------- 8. broker restart


def test_broker_restart_resumes_conversation(claude_broker, api, session_name):
    """SIGTERM the broker, start a new one on the same session: the conversation goes on."""
    b1 = claude_broker()
    with Client(session_name, "webhook") as c:
        res1 = c.prompt("first broker: remember the colour teal").result(timeout_s=T)
    assert res1.ok, res1
    sid = record(b1).session_id
    agent1 = record(b1).agent_pid
    assert b1.stop() == 0

    b2 = claude_broker()
    r2 = record(b2)
    assert r2.session_id == sid
    assert r2.incarnation != "" and r2.agent_pid != agent1
    with Client(session_name, "webhook") as c:
        res2 = c.prompt("second broker: which colour?").result(timeout_s=T)
    assert res2.ok, res2
    assert res2.session_id == sid
    assert res2.text == "echo: second broker: which colour?"
    rec = turn_request(api, "second broker: which colour?", 5)
    h = history(rec)
    assert "first broker: remember the colour teal" in h
    assert "echo: first broker: remember the colour teal" in h


def test_broker_killed_before_it_saved_resumable_next_broker_resumes(claude_broker, api, session_name):
    """A broker SIGKILLed after the CLI wrote its first turn but before session.json said
    ``resumable``: the next broker's ``--session-id`` start is refused by the CLI ("already
    in use"); the broker switches to ``--resume`` and the conversation goes on, no restart loop.
    """
    b1 = claude_broker()
    with Client(session_name, "webhook") as c:
        assert c.prompt("first broker: remember the word quince").result(timeout_s=T).ok
    sid = record(b1).session_id
    b1.kill()
    # Exactly what a kill in that window leaves: the id on disk, not yet marked resumable.
    saved = b1.state_dir / session_name / "session.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "resumable": False}))

    b2 = claude_broker()
    with Client(session_name, "webhook") as c:
        res = c.prompt("second broker: which word?").result(timeout_s=T)
    after = record(b2)
    assert res.ok, (res, b2.log_text()[-3000:])
    assert res.session_id == sid
    assert "first broker: remember the word quince" in history(turn_request(api, "second broker: which word?", 5))
    assert after.counters["agent_restarts"] <= 1, after.counters
    with open(f"/proc/{after.agent_pid}/cmdline", "rb") as f:
        assert f"--resume={sid}".encode() in f.read().split(b"\0")
    assert json.loads(saved.read_text())["resumable"] is True


def test_turn_in_flight_at_broker_stop_is_resubmitted_to_the_next_broker(claude_broker, api, session_name):
    """A broker stopped mid-turn drains it; the client resubmits to the next broker, which runs it."""
    b1 = claude_broker()
    slow_text = "[api:slow=1500] in flight when the broker stops"
    with Client(session_name, "webhook", reconnect_timeout_s=T) as c:
        assert c.prompt("warm up: remember the number 42").result(timeout_s=T).ok
        inc1 = c.incarnation
        turn = c.prompt(slow_text)
        rec1 = streaming(api, slow_text)
        assert b1.stop() == 0
        assert api.sent_events(rec1)[-1] == CLIENT_GONE  # drained: interrupted, not finished
        b2 = claude_broker()
        res = turn.result(timeout_s=T)
        assert c.incarnation == record(b2).incarnation != inc1
        res_next = c.prompt("and after that?").result(timeout_s=T)
    assert res.ok, res
    assert res.request_id == turn.request_id
    assert res.text == f"echo: {slow_text}"
    again = turn_request(api, slow_text, after=rec1.seq)
    assert "warm up: remember the number 42" in history(again)
    assert res_next.ok and res_next.text == "echo: and after that?", res_next


def test_big_prompt_reaches_the_model_intact(claude_broker, api, session_name):
    """A 300 kB prompt travels in chunks through the request queue and reaches the API whole."""
    claude_broker()
    text = "big prompt " + big_text(300_000)
    with Client(session_name, "worker") as c:
        res = c.prompt(text).result(timeout_s=T)
    assert res.ok, res.error
    rec = api.wait_for(lambda r: r.stream and r.latest.startswith("big prompt "), 5)
    assert rec.latest == text.strip()
    assert res.text == f"echo: {text.strip()}"


def test_webhook_preempts_worker_during_a_tool_call(claude_broker, api, session_name):
    """A webhook arriving while the worker's tool runs interrupts the tool (aborted_tools) at once."""
    b = claude_broker()
    tool_cmd = "sleep 9; echo slept-through"  # the CLI refuses sleeps of 10 s or more
    worker_text = f'[api:tool=Bash:{{"command":"{tool_cmd}"}}] run the long job'
    resume_text = "worker: the job was interrupted; summarise instead"
    hook_text = "webhook: deploy finished"
    with Client(session_name, "worker") as w, Client(session_name, "webhook") as h:
        wt = w.prompt(worker_text, resume_prompt=resume_text)
        wrec = turn_request(api, worker_text)
        api.wait_for_sent(wrec, "message_stop", T)
        tool_pids = wait_until(lambda: tool_processes(tool_cmd), T, what="the tool to run")
        t_submit = time.perf_counter_ns()
        hres = h.prompt(hook_text).result(timeout_s=T)
        hrec = turn_request(api, hook_text, 5)
        events = list(wt.events(timeout_s=T))
        wres = wt.result(timeout_s=T)

    assert hres.ok and hres.text == f"echo: {hook_text}", hres
    # The aborted attempt's own result (aborted_tools) is withheld: the stream's one result is the rerun's.
    results = [e for e in events if e.get("type") == "result"]
    assert [r["terminal_reason"] for r in results] == ["completed"], results
    withheld = [json.loads(ln) for ln in b.log_text().splitlines() if "turn.attempt_result_withheld" in ln]
    assert [w["terminal_reason"] for w in withheld] == ["aborted_tools"]
    notices = [e["subtype"] for e in events if e.get("type") == "turnstile"]
    assert notices == ["preempted", "rerun"], notices
    assert wres.ok and wres.text == f"echo: {resume_text}", wres
    assert turn_request(api, resume_text, 5).seq > hrec.seq
    # The tool never finished: its output reached no request, and its process is gone.
    outputs = [tool_result_text(b) for r in api.messages_requests() for b in tool_results(r)]
    assert outputs and not any("slept-through" in o for o in outputs), outputs
    wait_until(lambda: not tool_processes(tool_cmd), 3, what=f"the interrupted tool {tool_pids} to end")
    report(test="preempt_during_tool", webhook_submit_to_api_ms=round((hrec.t_ns - t_submit) / 1e6, 2))


def tool_processes(command: str) -> list[int]:
    """Pids of live processes whose command line contains ``command``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if command.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_client_killed_mid_turn_then_next_turn_is_clean(claude_broker, api, session_name, client):
    """A client SIGKILLed while its turn streams: the turn is interrupted, the next client's turn is clean."""
    b = claude_broker()
    doomed = "[api:slow=5000] a turn whose client dies"
    p = client("worker", doomed)
    rec = streaming(api, doomed)
    p.kill()
    with Client(session_name, "worker") as c:
        res = c.prompt("the next client's turn").result(timeout_s=T)
    assert res.ok and res.text == "echo: the next client's turn", res
    assert res.raw is not None and res.raw["subtype"] == "success"
    assert api.sent_events(rec)[-1] == CLIENT_GONE  # the dead client's turn was interrupted
    nxt = turn_request(api, "the next client's turn", 5)
    assert nxt.seq > rec.seq
    assert record(b).counters["client_deaths"] == 1


def test_api_error_ends_turn_with_error_then_session_goes_on(claude_broker, api, session_name):
    """An API error (400) ends the turn with an error result; the next turn succeeds with its own text."""
    claude_broker()
    with Client(session_name, "webhook") as c:
        bad = c.prompt("[api:status=400] this request is refused").result(timeout_s=T)
        good = c.prompt("a request that works").result(timeout_s=T)
    assert bad.status == "error", bad
    assert bad.error_code == "api_error", bad
    assert bad.raw is not None and bad.raw.get("api_error_status") == 400
    assert good.ok and good.text == "echo: a request that works", good


def test_cancel_before_the_turn_streams_then_clean_next_turn(claude_broker, api, session_name):
    """A cancel sent right after submit (the turn not started in the CLI yet) still ends only that turn."""
    claude_broker()
    slow_text = "[api:slow=5000] cancelled before it got going"
    with Client(session_name, "worker") as c:
        t1 = c.prompt(slow_text)
        t1.cancel()
        res1 = t1.result(timeout_s=T)
        res2 = c.prompt("the turn after an early cancel").result(timeout_s=T)
    assert res1.status == "cancelled", res1
    assert res2.ok and res2.text == "echo: the turn after an early cancel", res2
    for r in api.messages_requests():
        if r.stream and r.latest == slow_text:
            assert "message_stop" not in api.sent_events(r)  # if it reached the model, it was cut
