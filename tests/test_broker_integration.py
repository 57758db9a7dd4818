"""Broker integration: a real broker process, the simulated agent and real client processes.

Every client here is a separate process (the ``client`` fixture) running
``tests/client_proc.py``, which prints one JSON line per thing it saw, stamped with
``time.monotonic()`` (one clock for every process on the machine, so orders
and delays can be compared across processes). The tests wait for conditions
with deadlines, never for fixed times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from broker.scheduler import RESUME_NOTE
from broker.testing.launcher import BrokerProcess
from ipc import frames, mailbox, names, rqueue
from tests.support import ClientProc, broker_log, group_members, rec, running, shm_objects, sim_stats, wait_until

# ---------------------------------------------------------------- helpers

def idle(b: BrokerProcess) -> Callable[[], bool]:
    def cond() -> bool:
        snap = b.snapshot()
        return bool(snap and snap.record.turn == 0 and snap.record.agent_state == "up")

    return cond


def agent_text(events: list[dict[str, Any]]) -> str:
    """The assistant text of a turn's events, joined."""
    out = []
    for e in events:
        if e.get("type") == "assistant":
            for block in e["message"]["content"]:
                if block.get("type") == "text":
                    out.append(block["text"])
    return "".join(out)


LONG = "[sim:turn_ms=5000]"


def reruns(c: ClientProc) -> list[tuple[str, int]]:
    """The (cause, attempt) of every rerun notice a client saw."""
    return [(o["data"]["cause"], o["data"]["attempt"]) for o in c.lines
            if o.get("ev") == "event" and o["data"].get("type") == "turnstile" and o["data"].get("subtype") == "rerun"]


# ---------------------------------------------------------------- preemption


def test_webhook_preempts_worker_then_worker_reruns_with_resume_note(broker_factory, client):
    b = broker_factory()
    h = client("webhook", "hook-task", go=True)
    h.ev("connected")
    w = client("worker", "[sim:turn_ms=3000] worker-task")
    first = w.ev("event")
    assert first["data"]["type"] == "system" and first["data"]["subtype"] == "init"
    wait_until(running(b, "worker"), what="worker turn running")
    h.send()
    hres = h.ev("result")
    assert hres["status"] == "ok" and hres["text"] == "sim: hook-task"
    wres = w.ev("result", timeout_s=20)
    assert wres["status"] == "ok"
    assert wres["preemptions"] == 1
    # The preemption reached the worker as an event, before its rerun's events.
    kinds = [(o["data"].get("type"), o["data"].get("subtype")) for o in w.lines if o.get("ev") == "event"]
    i = kinds.index(("turnstile", "preempted"))
    assert ("system", "init") in kinds[i + 1 :]
    # Exactly one rerun notice, between the preemption and the rerun's first line; the interrupted
    # attempt's own result (error_during_execution) is not in the stream: it would read as the end.
    assert reruns(w) == [("preempted", 2)]
    assert kinds.index(("turnstile", "rerun")) == i + 1
    assert [k for k in kinds if k[0] == "result"] == [("result", "success")], kinds
    # The rerun's prompt carried the resume note (the sim echoes its prompt).
    assert wres["text"].startswith("sim: " + RESUME_NOTE)
    assert "worker-task" in wres["text"]
    # One turn at a time, ids in start order: the webhook's turn ended before the rerun began.
    assert hres["turn"] < wres["turn"], "the webhook finished after the worker"
    assert w.finish() == 0 and h.finish() == 0
    r = rec(b)
    assert r.counters["preempts"] == 1 and r.counters["requeues"] == 1
    print(f"preempt signal {r.latencies['last_preempt_signal_us']} us, handoff {r.latencies['last_handoff_us']} us")


def test_on_preempt_return_gives_status_preempted(broker_factory, client):
    b = broker_factory()
    h = client("webhook", "hook", go=True)
    h.ev("connected")
    w = client("worker", prompts=[{"text": f"{LONG} worker", "on_preempt": "return"}])
    w.ev("event")
    wait_until(running(b, "worker"), what="worker turn running")
    h.send()
    wres = w.ev("result")
    assert wres["status"] == "preempted"
    assert h.ev("result")["status"] == "ok"
    assert w.finish() == 0 and h.finish() == 0
    assert rec(b).counters["results_preempted"] == 1


def test_three_webhooks_fifo_before_worker_resumes(broker_factory, client, session_name):
    b = broker_factory()
    w = client("worker", prompts=[{"text": f"{LONG} worker", "resume_prompt": "worker-resumed"}])
    w.ev("event")
    wait_until(running(b, "worker"), what="worker turn running")
    # Connect all three first, then release them one by one so the submit order is known.
    # The first webhook's turn is long enough for the other two to be submitted during it.
    hooks = [client("webhook", f"[sim:turn_ms={800 if i == 0 else 100}] hook-{i}", go=True) for i in range(3)]
    for h in hooks:
        h.ev("connected")
    for h in hooks:
        h.send()
        h.ev("submitted")
    results = [h.ev("result", timeout_s=20) for h in hooks]
    wres = w.ev("result", timeout_s=20)
    assert [r["status"] for r in results] == ["ok"] * 3
    assert wres["status"] == "ok"
    turns = [r["turn"] for r in results]
    # Turn ids are given in start order, one turn at a time: FIFO, then the worker's rerun.
    assert turns == [turns[0], turns[0] + 1, turns[0] + 2], f"webhooks ran out of order: turns {turns}"
    assert wres["turn"] == turns[2] + 1 and wres["preemptions"] == 1
    for p in [w, *hooks]:
        assert p.finish() == 0
    assert rec(b).counters["preempts"] == 1


# ---------------------------------------------------------------- cancel


def test_cancel_is_scoped_to_its_turn(broker_factory, client):
    b = broker_factory()
    a = client("worker", prompts=[{"text": f"{LONG} cancel-me", "cancel_after_event": 1}, {"text": "after-cancel"}])
    results = [a.ev("result"), a.wait_for(lambda o: o.get("ev") == "result" and "after-cancel" in o["text"])]
    assert results[0]["status"] == "cancelled"
    assert results[1]["status"] == "ok" and results[1]["text"] == "sim: after-cancel"
    other = client("webhook", "other-client")
    assert other.ev("result")["status"] == "ok"
    assert a.finish() == 0 and other.finish() == 0
    r = rec(b)
    assert r.counters["cancels"] == 1 and r.counters["results_cancelled"] == 1
    assert r.counters["results_ok"] == 2


def test_stale_cancel_by_turn_does_nothing(broker_factory, client, session_name):
    from clients import Client

    b = broker_factory()
    first = client("worker", "short-one")
    done = first.ev("result")
    assert done["status"] == "ok"
    inc = rec(b).incarnation
    long = client("worker", "[sim:turn_ms=1500] long-one")
    long.ev("event")
    wait_until(running(b), what="second turn running")
    assert rec(b).turn == done["turn"] + 1
    with Client(session_name, "webhook") as c:
        c.cancel_turn(inc, done["turn"])  # names the finished turn
        wait_until(lambda: rec(b).counters["stale_cancels"] == 1, what="stale cancel counted")
    res = long.ev("result")
    assert res["status"] == "ok" and "long-one" in res["text"]
    assert rec(b).counters["cancels"] == 0
    assert first.finish() == 0 and long.finish() == 0


def test_cli_cancel_holder_cancels_running_turn(broker_factory, client, session_name):
    import sys

    b = broker_factory()
    w = client("worker", f"{LONG} cancel-by-cli")
    w.ev("event")
    wait_until(running(b), what="turn running")
    turn = rec(b).turn
    cp = subprocess.run(
        [sys.executable, "-m", "broker.cli", "cancel", "--session", b.session, "--holder"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert cp.returncode == 0, cp.stderr
    assert f"turn {turn}" in cp.stdout
    res = w.ev("result")
    assert res["status"] == "cancelled" and res["turn"] == turn
    assert w.finish() == 0


# ---------------------------------------------------------------- leases


def test_lease_runs_two_prompts_in_a_row_while_another_worker_waits(broker_factory, client):
    b = broker_factory()
    prompts = [{"text": "[sim:turn_ms=400] lease-1"}, {"text": "[sim:turn_ms=200] lease-2"}]
    a = client("worker", prompts=prompts, lease=True, lease_go=True)
    a.ev("lease_granted")
    other = client("worker", "waiting-worker")
    other.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 1, what="other worker queued")
    assert rec(b).turn == 0, "the other worker ran although the lease was held"
    a.send()
    ra = [a.ev("result"), a.wait_for(lambda o: o.get("ev") == "result" and "lease-2" in o["text"])]
    ro = other.ev("result")
    assert [r["status"] for r in ra] == ["ok", "ok"] and ro["status"] == "ok"
    assert ra[1]["turn"] == ra[0]["turn"] + 1, "another turn ran between the lease's two prompts"
    assert ro["turn"] > ra[1]["turn"]
    assert a.finish() == 0 and other.finish() == 0


def test_worker_lease_yields_to_webhook_between_turns(broker_factory, client):
    b = broker_factory()
    a = client("worker", "lease-turn", lease=True, hold_lease=True)
    a.ev("result")
    wait_until(lambda: rec(b).lease_client != "", what="lease held")
    h = client("webhook", "hook-during-lease")
    assert h.ev("result")["status"] == "ok"
    assert rec(b).lease_client != "", "the webhook ended the worker's lease"
    a.send()
    a.ev("lease_released")
    assert a.finish() == 0 and h.finish() == 0
    wait_until(lambda: rec(b).lease_client == "", what="lease released")


def test_release_then_close_rejects_no_frame(broker_factory, session_name):
    """Releasing a lease and closing at once: the broker reads the release before the bye, rejects nothing.

    The broker is stopped while the client releases and closes, so both frames
    wait in the queue together and the queue's priorities alone decide which is
    read first (a bye overtaking the release left it from an unknown client).
    """
    from clients import Client

    b = broker_factory()
    with Client(session_name, "worker") as c:
        with c.lease(timeout_s=20):
            assert c.prompt("leased turn").result(timeout_s=20).ok
            os.kill(b.pid, signal.SIGSTOP)
        try:
            c.close()
        finally:
            os.kill(b.pid, signal.SIGCONT)
    # A later worker's prompt is read after every frame the first client sent.
    with Client(session_name, "worker") as s:
        assert s.prompt("after the release").result(timeout_s=20).ok
    after_ns = time.time_ns()
    r = wait_until(lambda: (x := rec(b)).heartbeat_unix_ns > after_ns and x, what="a record published after it")
    assert r.counters["rejected_frames"] == 0, b.log_text()[-3000:]
    assert "frame.unknown_client" not in b.log_text()


def test_lease_idle_timeout_releases(broker_factory, client):
    b = broker_factory(extra_args=("--lease-idle-s", "1.0"))
    other = client("worker", "after-idle-lease", go=True)
    other.ev("connected")
    a = client("worker", lease=True, hold_lease=True)
    a.ev("lease_granted")
    other.send()
    other.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 1 and rec(b).lease_client != "", what="other waiting for the lease")
    res = other.ev("result")
    assert res["status"] == "ok"
    assert rec(b).lease_client == ""
    a.send()
    assert a.finish() == 0 and other.finish() == 0


# ---------------------------------------------------------------- model switch


def test_prompt_with_model_switches_model(broker_factory, client):
    b = broker_factory()
    w = client("worker", "before", prompts=[{"text": "switched", "model": "claude-m2"}])
    # prompts run in order: "switched" (m2) first, then "before" on m2 still.
    res = w.ev("result")
    assert res["status"] == "ok" and res["model"] == "claude-m2"
    evs = [o["data"] for o in w.lines if o.get("ev") == "event"]
    init = next(e for e in evs if e.get("subtype") == "init")
    assert init["model"] == "claude-m2"
    assert all(e["message"]["model"] == "claude-m2" for e in evs if e.get("type") == "assistant")
    assert w.finish() == 0
    r = rec(b)
    assert r.model == "claude-m2" and r.counters["model_switches"] == 1 and r.counters["agent_restarts"] == 0


def test_model_switch_without_reply_restarts_agent_with_new_model(broker_factory, client):
    b = broker_factory(agent_args=("--set-model-ms=60000",), extra_args=("--model-timeout-s", "0.5"))
    pid0 = rec(b).agent_pid
    w = client("worker", prompts=[{"text": "on-new-model", "model": "claude-m3"}])
    res = w.ev("result")
    assert res["status"] == "ok" and res["model"] == "claude-m3" and "on-new-model" in res["text"]
    init = next(e for e in w.events() if e.get("subtype") == "init")
    assert init["model"] == "claude-m3"
    r = rec(b)
    assert r.model == "claude-m3" and r.counters["agent_restarts"] == 1 and r.agent_pid != pid0
    assert w.finish() == 0


# ---------------------------------------------------------------- drain timeout, agent death


def test_drain_timeout_restarts_agent_and_serves_both(broker_factory, client):
    b = broker_factory(extra_args=("--drain-timeout-s", "0.5"))
    pid0 = rec(b).agent_pid
    w = client("worker", prompts=[{"text": "[sim:ignore_interrupt] stubborn", "resume_prompt": "resumed-worker"}])
    w.ev("event")
    wait_until(running(b, "worker"), what="worker turn running")
    h = client("webhook", "urgent")
    hres = h.ev("result")
    assert hres["status"] == "ok" and hres["text"] == "sim: urgent"
    wres = w.ev("result")
    assert wres["status"] == "ok" and wres["text"] == "sim: resumed-worker"
    assert wres["preemptions"] == 1 and hres["turn"] < wres["turn"]
    r = rec(b)
    assert r.counters["drain_timeouts"] == 1 and r.counters["agent_restarts"] == 1
    assert r.agent_pid != pid0
    assert wres["session_id"] == hres["session_id"]
    assert w.finish() == 0 and h.finish() == 0


def test_agent_crash_fails_webhook_turn_and_session_resumes(broker_factory, client):
    b = broker_factory()
    first = client("webhook", "[sim:history] one")
    r1 = first.ev("result")
    assert r1["status"] == "ok" and "[history=0]" in r1["text"]
    crash = client("webhook", "[sim:die] crash")
    rc = crash.ev("result")
    assert rc["status"] == "error" and rc["error_code"] == "agent_restarted"
    after = client("webhook", "[sim:history] three")
    r3 = after.ev("result")
    assert r3["status"] == "ok"
    assert r3["session_id"] == r1["session_id"], "the restart did not resume the session"
    assert "[history=2]" in r3["text"], "the conversation did not survive the crash"
    assert rec(b).counters["agent_restarts"] == 1
    for p in (first, crash, after):
        assert p.finish() == 0


def test_agent_killed_under_worker_turn_reruns_it(broker_factory, client):
    b = broker_factory()
    w = client("worker", prompts=[{"text": "[sim:history] one"}, {"text": "[sim:turn_ms=2500] [sim:history] two"}])
    r1 = w.ev("result")
    # Turn two's system/init reached the client: the sim has recorded its prompt.
    w.wait_for(lambda o: o.get("ev") == "event" and o["t"] > r1["t"] and o["data"].get("subtype") == "init")
    agent = rec(b).agent_pid
    os.killpg(agent, signal.SIGKILL)
    r2 = w.wait_for(lambda o: o.get("ev") == "result" and "two" in o["text"], timeout_s=20)
    assert r2["status"] == "ok" and r2["preemptions"] == 1
    assert reruns(w) == [("agent_restarted", 2)]
    assert r2["session_id"] == r1["session_id"]
    assert "[history=2]" in r2["text"]  # turn one, and turn two's killed first attempt
    assert rec(b).counters["agent_restarts"] == 1
    assert w.finish() == 0


def test_broker_restarted_before_any_turn_starts_a_fresh_conversation(broker_factory, client):
    # The agent writes its transcript at its first turn: a session id that never ran
    # one cannot be --resume'd, so the next broker must not try.
    b = broker_factory()
    assert b.stop() == 0
    b2 = broker_factory()
    w = client("worker", "[sim:history] first-ever")
    res = w.ev("result")
    assert res["status"] == "ok" and "[history=0]" in res["text"]
    assert rec(b2).counters["agent_restarts"] == 0
    assert w.finish() == 0


# ---------------------------------------------------------------- client death


def test_client_sigkill_mid_turn_frees_session_fast(broker_factory, client, session_name):
    b = broker_factory()
    a = client("worker", f"{LONG} doomed")
    conn = a.ev("connected")
    a.ev("event")
    wait_until(running(b, "worker"), what="doomed turn running")
    nxt = client("worker", "next-in-line")
    nxt.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 1, what="next worker queued")
    assert any(n.endswith(conn["client"]) for n in shm_objects(session_name))
    t_kill = time.monotonic()
    a.proc.send_signal(signal.SIGKILL)
    first = nxt.ev("event")
    res = nxt.ev("result")
    assert res["status"] == "ok" and res["text"] == "sim: next-in-line"
    free_s = first["t"] - t_kill
    # Broker time: from noticing the death to writing the next turn's prompt.
    log = broker_log(b)
    gone = next(e for e in log if e["event"] == "client.gone" and e["client"] == conn["client"])
    start = next(e for e in log if e["event"] == "turn.start" and e["turn"] == res["turn"])
    from datetime import datetime

    broker_ms = (
        datetime.fromisoformat(start["timestamp"]) - datetime.fromisoformat(gone["timestamp"])
    ).total_seconds() * 1000
    print(
        f"client SIGKILL -> next client's first event: {free_s * 1000:.1f} ms; "
        f"broker: death seen -> next prompt written: {broker_ms:.1f} ms"
    )
    assert free_s < 1.0
    assert broker_ms < 1000
    wait_until(
        lambda: not any(n.endswith(conn["client"]) for n in shm_objects(session_name)),
        timeout_s=5,
        what="dead client's mailbox removed",
    )
    # (client_deaths also counts clients that left with a bye, so nxt may be in it.)
    assert rec(b).counters["client_deaths"] >= 1
    assert nxt.finish() == 0


def test_client_sigkill_while_queued_never_runs(broker_factory, client, tmp_path):
    st = tmp_path / "sim-stats.json"
    b = broker_factory(agent_args=(f"--stats-file={st}",))
    q = client("worker", "QUEUED-TOKEN-never", go=True)
    q.ev("connected")
    a = client("worker", "[sim:turn_ms=2000] running-one")
    a.ev("event")
    wait_until(running(b, "worker"), what="first turn running")
    q.send()
    q.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 1, what="queued")
    q.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: rec(b).workers_queued == 0, what="dead client's request dropped")
    assert a.ev("result")["status"] == "ok"
    after = client("worker", "after-both")
    assert after.ev("result")["status"] == "ok"
    assert a.finish() == 0 and after.finish() == 0
    assert sim_stats(st)["user_messages"] == 2
    assert "QUEUED-TOKEN" not in b.log_text()
    sim_state = Path(b.env["HOME"]) / ".sim-claude"
    assert not any("QUEUED-TOKEN" in f.read_text() for f in sim_state.glob("*.jsonl"))
    assert rec(b).counters["turns"] == 2


# ---------------------------------------------------------------- broker death and stop


def test_broker_sigkill_then_new_broker_serves_request_once(broker_factory, client, session_name):
    b = broker_factory()
    w = client("worker", prompts=[{"text": "[sim:turn_ms=2000] survive-the-broker"}], reconnect_timeout_s=30)
    w.ev("event")
    wait_until(running(b, "worker"), what="turn running")
    agent = rec(b).agent_pid
    assert group_members(agent)
    b.kill()
    # The agent dies with its broker (parent-death signal), tool children and all.
    wait_until(lambda: not group_members(agent), timeout_s=5, what="old agent group gone")
    b2 = broker_factory()
    assert rec(b2).incarnation != ""
    res = w.ev("result", timeout_s=20)
    assert res["status"] == "ok" and "survive-the-broker" in res["text"]
    assert reruns(w) == [("broker_restarted", 2)]
    assert w.finish() == 0
    assert len(w.results()) == 1
    assert rec(b2).counters["requests"] == 1


def test_frames_sent_while_no_broker_runs_are_served_by_the_next(broker_factory, session_name):
    b = broker_factory()
    b.kill()
    assert rqueue.exists(session_name)
    cid = names.new_client_id()
    mb = mailbox.MailboxReader(session_name, cid)
    try:
        rq = rqueue.RequestQueue.open(session_name)
        pid, start = names.self_identity()
        rq.send_frame(frames.Hello(client=cid, kind="webhook", pid=pid, start_time=start))
        rq.send_frame(frames.Prompt(client=cid, req="offline-1", kind="webhook", content="sent-while-down"))
        rq.close()
        broker_factory()
        got: list[frames.ReplyFrame] = []

        def result() -> frames.Result | None:
            got.extend(frames.decode_reply(d) for d in mb.read_frames())
            return next((f for f in got if isinstance(f, frames.Result)), None)

        res = wait_until(result, what="result from the new broker")
        assert res.status == "ok" and res.text == "sim: sent-while-down" and res.req == "offline-1"
        assert isinstance(got[0], frames.Accepted)
    finally:
        mb.close()


def test_sigterm_exits_clean(broker_factory, client, session_name):
    b = broker_factory()
    w = client("worker", "before-stop")
    assert w.ev("result")["status"] == "ok"
    assert w.finish() == 0
    agent = rec(b).agent_pid
    assert b.stop() == 0
    assert not group_members(agent), "the agent outlived its broker"
    assert shm_objects(session_name) == []
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(names.request_queue(session_name))


# ---------------------------------------------------------------- agent output routing


def test_output_of_no_turn_is_never_delivered(broker_factory, client):
    b = broker_factory()
    # A set_model after a turn makes the agent echo an isReplay user line that
    # belongs to no turn; every result is followed by a command_lifecycle line
    # for the message it answered, which the next holder must not see.
    a = client("worker", "first", prompts=[{"text": "second", "model": "claude-m2"}])
    ra = [a.ev("result"), a.wait_for(lambda o: o.get("ev") == "result" and o["text"] == "sim: first")]
    h = client("webhook", "third")
    assert h.ev("result")["status"] == "ok"
    assert all(r["status"] == "ok" for r in ra)
    for p in (a, h):
        assert p.finish() == 0
        for e in p.events():
            assert not e.get("isReplay"), e
            assert e.get("type") != "command_lifecycle", e
    # Each turn's stream starts with system/init and ends with its result.
    evs = a.events()
    inits = [i for i, e in enumerate(evs) if e.get("subtype") == "init"]
    assert evs[0].get("subtype") == "init" and evs[-1]["type"] == "result"
    assert evs[inits[1] - 1]["type"] == "result"
    assert rec(b).counters["unrouted_lines"] >= 3


def test_garbage_line_is_logged_and_turn_completes(broker_factory, client):
    b = broker_factory()
    w = client("webhook", "[sim:garbage] messy")
    res = w.ev("result")
    assert res["status"] == "ok" and res["text"] == "sim: [sim:garbage] messy"
    assert w.finish() == 0
    assert any(e["event"] == "agent.bad_line" and "sim garbage" in e["head"] for e in broker_log(b))
    assert rec(b).counters["agent_restarts"] == 0


@pytest.mark.parametrize(
    ("handler", "expect"),
    [
        ("allow", "[permission: allowed]"),
        ("deny", "[permission: denied (no-from-test)]"),
        (None, "[permission: denied (turnstile: the turn holder registered no permission handler)]"),
    ],
)
def test_permission_request_routed_to_holder(broker_factory, client, handler, expect):
    b = broker_factory()
    w = client("webhook", "[sim:permission] tool please", permission=handler)
    res = w.ev("result")
    assert res["status"] == "ok"
    assert res["text"].endswith(expect), res["text"]
    assert w.finish() == 0
    events = [e["event"] for e in broker_log(b)]
    assert ("agent.request_relayed" in events) == (handler is not None)
    assert ("agent.request_default" in events) == (handler is None)


# ---------------------------------------------------------------- bad input


def test_bad_frames_are_rejected_and_broker_stays_up(broker_factory, client, session_name, tmp_path):
    import msgspec

    st = tmp_path / "sim-stats.json"
    b = broker_factory(agent_args=(f"--stats-file={st}",))
    cid = names.new_client_id()
    mb = mailbox.MailboxReader(session_name, cid)
    try:
        rq = rqueue.RequestQueue.open(session_name)
        pid, start = names.self_identity()
        rq.send_frame(frames.Hello(client=cid, kind="worker", pid=pid, start_time=start))
        rq.send_bytes(b"\xc1 not msgpack at all", 0)
        bad = {"t": "prompt", "v": 1, "client": cid, "req": "bad-1", "kind": "worker", "content": 42}
        rq.send_bytes(msgspec.msgpack.encode(bad), 0)
        # A prompt of the wrong kind for this client (it said hello as a worker).
        rq.send_frame(frames.Prompt(client=cid, req="bad-2", kind="webhook", content="wrong kind"))
        rq.close()
        got: list[frames.ReplyFrame] = []

        def errors() -> list[frames.Error] | None:
            got.extend(frames.decode_reply(d) for d in mb.read_frames())
            errs = [f for f in got if isinstance(f, frames.Error)]
            return errs if len(errs) >= 2 else None

        errs = wait_until(errors, what="two error frames")
        by_req = {e.req: e for e in errs}
        assert by_req["bad-1"].code == "invalid"
        assert by_req["bad-2"].code == "kind_mismatch"
        assert not any(isinstance(f, frames.Accepted | frames.Result) for f in got)
        wait_until(lambda: rec(b).counters["rejected_frames"] >= 3, what="rejected frames counted")
    finally:
        mb.close()
    # Still serving, and nothing of the bad frames reached the agent.
    w = client("worker", "still-serving")
    assert w.ev("result")["status"] == "ok"
    assert w.finish() == 0
    assert sim_stats(st)["user_messages"] == 1
    assert sim_stats(st)["malformed_lines"] == 0
    assert b.proc.poll() is None


def test_library_prompt_of_another_kind_is_refused(broker_factory, session_name):
    from clients import Client

    broker_factory()
    with Client(session_name, "worker") as c:
        st = c._conn.submit(frames.Prompt(client=c.client_id, req="wrong-kind", kind="webhook", content="x"))
        from clients.client import Turn

        res = Turn(c, st).result(timeout_s=10)
    assert res.status == "error" and res.error_code == "kind_mismatch"


# ---------------------------------------------------------------- many clients


@pytest.mark.xdist_group("many_queues")  # the system-wide count of queues (256) is shared
def test_fifty_clients_each_get_only_their_own_events(broker_factory, client):
    b = broker_factory()
    procs = []
    for i in range(50):
        kind = "webhook" if i % 3 == 0 else "worker"
        procs.append((f"tok{i:02d}x{os.urandom(3).hex()}", kind))
    cs = [(tok, client(kind, f"[sim:chunks=3] {tok}")) for tok, kind in procs]
    t0 = time.monotonic()
    for tok, c in cs:
        assert c.finish(timeout_s=60) == 0, c.stderr[-2000:]
        res = c.results()
        assert len(res) == 1 and res[0]["status"] == "ok"
        assert res[0]["text"].startswith(f"sim: [sim:chunks=3] {tok}")
        evs = c.events()
        assert evs[0]["subtype"] == "init" and evs[-1]["type"] == "result"
        text = agent_text(evs)
        assert tok in text
        others = [t for t, _ in procs if t != tok and t in json.dumps(evs)]
        assert not others, f"{tok} saw events of {others}"
    print(f"50 clients done in {time.monotonic() - t0:.1f} s after spawn")
    r = rec(b)
    assert r.counters["results_ok"] == 50 and r.counters["rejected_frames"] == 0


def test_worker_turn_that_kills_agent_is_rerun_then_failed(broker_factory, client):
    b = broker_factory()
    w = client("worker", "[sim:die] always-crashes")
    res = w.ev("result", timeout_s=20)
    assert res["status"] == "error" and res["error_code"] == "agent_restarted"
    notices = [o for o in w.lines if o.get("ev") == "event" and o["data"].get("subtype") == "preempted"]
    assert len(notices) == 2  # rerun twice, failed at the third death
    wait_until(lambda: rec(b).counters["agent_restarts"] == 3, what="three restarts")
    after = client("worker", "fine-again")
    assert after.ev("result")["status"] == "ok"
    assert w.finish() == 0 and after.finish() == 0


def test_sigterm_mid_turn_request_served_by_next_broker(broker_factory, client):
    b = broker_factory()
    w = client("worker", prompts=[{"text": f"{LONG} across-sigterm"}], reconnect_timeout_s=30)
    w.ev("event")
    wait_until(running(b), what="turn running")
    agent = rec(b).agent_pid
    assert b.stop() == 0
    assert not group_members(agent)
    broker_factory()
    res = w.ev("result", timeout_s=20)
    assert res["status"] == "ok" and "across-sigterm" in res["text"]
    assert len(w.results()) == 1
    assert w.finish() == 0


def test_client_sigkill_holding_lease_releases_it(broker_factory, client):
    b = broker_factory()
    a = client("worker", lease=True, hold_lease=True)
    a.ev("lease_granted")
    other = client("worker", "waits-for-lease")
    other.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 1, what="other queued behind the lease")
    t_kill = time.monotonic()
    a.proc.send_signal(signal.SIGKILL)
    res = other.ev("result")
    assert res["status"] == "ok"
    print(f"lease holder SIGKILL -> waiting worker's result: {(res['t'] - t_kill) * 1000:.1f} ms")
    assert res["t"] - t_kill < 5.0
    assert other.finish() == 0


def test_webhook_during_model_switch_goes_first(broker_factory, client):
    b = broker_factory(agent_args=("--set-model-ms=2000",))
    client("worker", "warm-up").ev("result")  # a turn first, so set_model echoes a replay line
    h = client("webhook", "during-switch", go=True)
    h.ev("connected")
    w = client("worker", prompts=[{"text": "on-m2", "model": "claude-m2"}])
    wait_until(running(b, phase="switching"), what="model switch under way")
    h.send()
    h.ev("submitted")
    assert rec(b).turn_state == "switching", "the switch ended before the webhook came (machine too slow?)"
    hres = h.ev("result")
    wres = w.ev("result")
    assert hres["status"] == "ok" and wres["status"] == "ok"
    assert hres["turn"] < wres["turn"] and wres["model"] == "claude-m2"
    assert wres["preemptions"] == 0  # nothing of the worker's had run yet
    assert not any(e.get("isReplay") for e in w.events() + h.events())
    assert w.finish() == 0 and h.finish() == 0


def test_tool_child_holding_stdout_does_not_wedge_session(broker_factory, client):
    # The agent dies leaving a child in its group that holds its stdout open: the
    # broker must notice the death at once and kill the group.
    b = broker_factory()
    agent = rec(b).agent_pid
    t0 = time.monotonic()
    h = client("webhook", "[sim:tool_child] crash-with-child")
    res = h.ev("result")
    assert res["status"] == "error" and res["error_code"] == "agent_restarted"
    assert res["t"] - t0 < 10
    wait_until(lambda: not group_members(agent), timeout_s=5, what="the old agent group killed")
    after = client("webhook", "after-tool-child")
    assert after.ev("result")["status"] == "ok"
    assert h.finish() == 0 and after.finish() == 0
