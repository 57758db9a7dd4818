"""The client library (``Client``, ``AsyncClient``) against a real broker process and the sim agent.

The clients run in the test process; a second client that must act while
the first one waits (a webhook preempting a worker) runs in a thread, with
its own connection.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.scheduler import RESUME_NOTE
from clients import AsyncClient, BrokerUnavailable, Client, Interrupted, TurnResult, TurnstileError
from tests.support import rec, running, wait_until

LONG = "[sim:turn_ms=3000]"


def started(t: Any) -> dict[str, Any]:
    """Wait for a turn's first event (its system/init): the turn runs now.

    (The state block is published just after the broker acts, so a snapshot
    read right after a previous turn's result may still show that turn.)
    """
    first = next(iter(t.events(timeout_s=15)))
    assert first.get("subtype") == "init", first
    return first


def in_thread(fn: Callable[[], Any]) -> Callable[[float], Any]:
    """Run ``fn`` in a thread; returns a join(timeout) that gives its value or raises its error."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in join
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()

    def join(timeout_s: float = 20.0) -> Any:
        th.join(timeout_s)
        assert not th.is_alive(), "thread did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def webhook_prompt(session: str, text: str) -> Callable[[float], TurnResult]:
    def go() -> TurnResult:
        with Client(session, "webhook") as h:
            return h.prompt(text).result(timeout_s=20)

    return in_thread(go)


# ---------------------------------------------------------------- blocking client


def test_stream_order_init_first_result_last(broker_factory, session_name):
    broker_factory()
    with Client(session_name, "worker") as c:
        turn = c.prompt("[sim:chunks=4] ordered")
        events = list(turn.events(timeout_s=10))
        res = turn.result()
    assert events[0]["type"] == "system" and events[0]["subtype"] == "init"
    assert events[-1]["type"] == "result"
    assert [e["type"] for e in events[1:-1]] == ["assistant"] * 4
    assert res.ok and res.text == "sim: [sim:chunks=4] ordered"
    assert res.raw is not None and res.raw["type"] == "result" and res.raw == events[-1]
    assert res.request_id == turn.request_id and res.turn == turn.turn_id >= 1
    assert res.session_id == events[0]["session_id"]


def test_result_before_iterating_keeps_events(broker_factory, session_name):
    broker_factory()
    with Client(session_name, "webhook") as c:
        turn = c.prompt("kept")
        res = turn.result(timeout_s=10)
        events = list(turn)
    assert res.ok and events[0]["subtype"] == "init" and events[-1]["type"] == "result"


def test_set_model_then_prompt_runs_on_it(broker_factory, session_name):
    b = broker_factory()
    with Client(session_name, "worker") as c:
        c.prompt("warm-up").result(timeout_s=10)
        res = c.set_model("opus", timeout_s=10)
        assert res.ok and res.model == "claude-opus-4-1-20250805"  # the sim resolves the alias
        turn = c.prompt("on-opus")
        events = list(turn.events(timeout_s=10))
        again = c.set_model("claude-opus-4-1-20250805", timeout_s=10)  # the current model: nothing sent
    assert events[0]["model"] == "claude-opus-4-1-20250805"
    assert again.ok
    r = rec(b)
    assert r.model == "claude-opus-4-1-20250805" and r.counters["model_switches"] == 1


def test_lease_holds_session_across_turns(broker_factory, session_name):
    b = broker_factory()
    with Client(session_name, "worker") as c:
        with c.lease():
            r1 = c.prompt("[sim:turn_ms=300] in-lease-1").result(timeout_s=10)

            # Another worker submits now; it must wait for the lease to end.
            def outsider() -> TurnResult:
                with Client(session_name, "worker") as o:
                    return o.prompt("outsider").result(20)

            other = in_thread(outsider)
            wait_until(lambda: rec(b).workers_queued == 1, what="outsider queued")
            r2 = c.prompt("in-lease-2").result(timeout_s=10)
            assert rec(b).workers_queued == 1, "the outsider ran inside the lease"
        ro = other(20)
    assert r1.ok and r2.ok and ro.ok
    assert r2.turn == r1.turn + 1 and ro.turn == r2.turn + 1


def test_cancel_running_and_queued(broker_factory, session_name):
    b = broker_factory()
    with Client(session_name, "worker") as c:
        long_turn = c.prompt(f"{LONG} long")
        queued = c.prompt("queued-behind")
        wait_until(running(b), what="long turn running")
        queued.cancel()
        rq = queued.result(timeout_s=10)
        assert rq.status == "cancelled" and rq.turn == 0  # never ran
        long_turn.cancel()
        rr = long_turn.result(timeout_s=10)
        assert rr.status == "cancelled" and rr.turn == long_turn.turn_id
        nxt = c.prompt("clean-after").result(timeout_s=10)
    assert nxt.ok and nxt.text == "sim: clean-after"
    assert rec(b).counters["turns"] == 2


def test_requeue_by_default_return_on_request(broker_factory, session_name):
    broker_factory()
    with Client(session_name, "worker") as c:
        t = c.prompt(f"{LONG} requeued-work")
        first = started(t)
        hook = webhook_prompt(session_name, "hook-1")
        events = [first, *t.events(timeout_s=20)]
        res = t.result()
        assert hook(20).ok
        assert res.ok and res.preemptions == 1 and res.text.startswith("sim: " + RESUME_NOTE)
        pre = [e for e in events if e.get("type") == "turnstile"]
        assert pre == [
            {"type": "turnstile", "subtype": "preempted", "turn": pre[0]["turn"], "requeued": True,
             "reason": "preempted"},
            {"type": "turnstile", "subtype": "rerun", "cause": "preempted", "attempt": 2, "turn": res.turn,
             "previous_turn": pre[0]["turn"], "incarnation": c.incarnation},
        ]

        t2 = c.prompt(f"{LONG} given-back", on_preempt="return")
        started(t2)
        hook2 = webhook_prompt(session_name, "hook-2")
        res2 = t2.result(timeout_s=20)
        assert hook2(20).ok
        assert res2.status == "preempted" and res2.turn == t2.turn_id


def test_client_level_on_preempt_return_and_custom_resume_prompt(broker_factory, session_name):
    broker_factory()
    with Client(session_name, "worker", on_preempt="return") as c:
        t = c.prompt(f"{LONG} x")
        started(t)
        hook = webhook_prompt(session_name, "hook")
        assert t.result(timeout_s=20).status == "preempted"
        assert hook(20).ok
    with Client(session_name, "worker") as c:
        t = c.prompt(f"{LONG} y", resume_prompt="carry on from where you stopped")
        started(t)
        hook = webhook_prompt(session_name, "hook")
        res = t.result(timeout_s=20)
        assert hook(20).ok
        assert res.ok and res.text == "sim: carry on from where you stopped"


def test_broker_unavailable_names_the_start_command(session_name):
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable) as ei:
        Client(session_name, "webhook", connect_timeout_s=0.3)
    assert time.monotonic() - t0 < 3
    assert f"turnstile serve --session {session_name}" in str(ei.value)
    assert isinstance(ei.value, TurnstileError) and ei.value.session == session_name


def test_bad_arguments_fail_in_the_caller(broker_factory, session_name):
    broker_factory()
    with pytest.raises(ValueError):
        Client(session_name, "admin")  # type: ignore[arg-type]
    with Client(session_name, "worker") as c:
        with pytest.raises(TurnstileError):
            c.prompt("")
        with pytest.raises(TurnstileError):
            c.prompt([{"no": "type"}])  # type: ignore[list-item]


def test_broker_restart_mid_request_resubmits_same_id(broker_factory, session_name):
    b = broker_factory()
    with Client(session_name, "worker", reconnect_timeout_s=30) as c:
        t = c.prompt("[sim:turn_ms=1500] across-restart")
        first = next(iter(t.events(timeout_s=10)))
        assert first["subtype"] == "init"
        inc0 = c.incarnation
        b.kill()
        b2 = broker_factory(wait=False)
        res = t.result(timeout_s=30)
        assert c.incarnation != inc0
    assert res.ok and "across-restart" in res.text and res.request_id == t.request_id
    b2.wait_ready()

    def results_logged() -> list[str]:
        log = [json.loads(line) for line in b2.log_text().splitlines() if line.startswith("{")]
        return [e["req"] for e in log if e["event"] == "request.result"]

    assert wait_until(results_logged, what="result logged") == [t.request_id]
    assert rec(b2).counters["requests"] == 1


def test_many_turns_one_client_no_leak_between_them(broker_factory, session_name):
    broker_factory()
    with Client(session_name, "webhook") as c:
        for i in range(5):
            turn = c.prompt(f"[sim:chunks=2] msg-{i}")
            events = list(turn)
            text = "".join(b["text"] for e in events if e["type"] == "assistant" for b in e["message"]["content"])
            assert text.startswith(f"sim: [sim:chunks=2] msg-{i}")
            assert events[0]["subtype"] == "init" and events[-1]["type"] == "result"
            assert sum(1 for e in events if e["type"] == "result") == 1


# ---------------------------------------------------------------- asyncio client


def test_async_stream_order_and_result(broker_factory, session_name):
    broker_factory()

    async def main() -> tuple[list[dict[str, Any]], TurnResult]:
        async with AsyncClient(session_name, "webhook") as c:
            turn = c.prompt("[sim:chunks=3] async-hello")
            events = [e async for e in turn]
            return events, await turn.result()

    events, res = asyncio.run(main())
    assert events[0]["subtype"] == "init" and events[-1]["type"] == "result"
    assert [e["type"] for e in events[1:-1]] == ["assistant"] * 3
    assert res.ok and res.text == "sim: [sim:chunks=3] async-hello"


def test_async_concurrent_turns_set_model_lease_cancel(broker_factory, session_name):
    b = broker_factory()

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with AsyncClient(session_name, "worker") as w, AsyncClient(session_name, "webhook") as h:
            long = w.prompt(f"{LONG} async-long")
            first = await long.events().__anext__()
            out["first"] = first
            hook = await h.prompt("async-hook").result(timeout_s=10)
            out["hook"] = hook
            out["long"] = await long.result(timeout_s=20)
            out["model"] = await w.set_model("claude-m9", timeout_s=10)
            async with w.lease():
                a = await w.prompt("lease-a").result(timeout_s=10)
                b2 = await w.prompt("lease-b").result(timeout_s=10)
            out["lease"] = (a, b2)
            c = w.prompt(f"{LONG} to-cancel")
            async for e in c:
                if e.get("subtype") == "init":
                    c.cancel()
            out["cancelled"] = await c.result(timeout_s=10)
        return out

    out = asyncio.run(asyncio.wait_for(main(), 40))
    assert out["first"]["subtype"] == "init"
    assert out["hook"].ok
    assert out["long"].ok and out["long"].preemptions == 1
    assert out["model"].ok and out["model"].model == "claude-m9"
    a, b2 = out["lease"]
    assert a.ok and b2.ok and b2.turn == a.turn + 1 and a.model == "claude-m9"
    assert out["cancelled"].status == "cancelled"
    assert rec(b).model == "claude-m9"


def test_async_client_has_the_blocking_clients_shape(broker_factory, session_name):
    b = broker_factory()
    public = {n for n in dir(Client) if not n.startswith("_")}
    assert public <= {n for n in dir(AsyncClient) if not n.startswith("_")}

    async def main() -> TurnResult:
        async with AsyncClient(session_name, "worker") as w, AsyncClient(session_name, "webhook") as h:
            assert w.incarnation == rec(b).incarnation
            t = w.prompt(f"{LONG} cancelled-by-turn-id")
            await t.events().__anext__()
            h.cancel_turn(h.incarnation, t.turn_id)
            return await t.result(timeout_s=10)

    assert asyncio.run(main()).status == "cancelled"


def test_async_on_preempt_return(broker_factory, session_name):
    b = broker_factory()

    async def main() -> TurnResult:
        async with AsyncClient(session_name, "worker", on_preempt="return") as w:
            t = w.prompt(f"{LONG} give-back")
            await t.events().__anext__()
            await asyncio.get_running_loop().run_in_executor(None, wait_until, running(b, "worker"))
            async with AsyncClient(session_name, "webhook") as h:
                assert (await h.prompt("hook").result(timeout_s=10)).ok
            return await t.result(timeout_s=10)

    assert asyncio.run(main()).status == "preempted"


def test_async_broker_unavailable(session_name):
    async def main() -> None:
        await AsyncClient(session_name, "worker", connect_timeout_s=0.3).connect()

    with pytest.raises(BrokerUnavailable) as ei:
        asyncio.run(main())
    assert f"turnstile serve --session {session_name}" in str(ei.value)


def test_async_broker_restart_mid_request(broker_factory, session_name):
    b = broker_factory()
    holder: dict[str, Any] = {}

    async def main() -> TurnResult:
        async with AsyncClient(session_name, "worker", reconnect_timeout_s=30) as c:
            t = c.prompt("[sim:turn_ms=1500] async-across-restart")
            holder["req"] = t.request_id
            await t.events().__anext__()
            b.kill()
            holder["b2"] = broker_factory(wait=False)
            return await t.result(timeout_s=30)

    res = asyncio.run(main())
    assert res.ok and "async-across-restart" in res.text and res.request_id == holder["req"]
    holder["b2"].wait_ready()
    assert rec(holder["b2"]).counters["requests"] == 1


def test_large_prompt_and_large_reply(broker_factory, session_name):
    broker_factory()
    big = "x" * 200_000
    with Client(session_name, "worker") as c:
        res = c.prompt(f"[sim:bytes=10] {big}").result(timeout_s=20)  # chunked through the queue
        assert res.ok and res.text == "sim: [sim:"
        t = c.prompt("[sim:huge=1500000] big reply")  # 1.5 MB lines, streamed through a 1 MiB ring
        events = list(t.events(timeout_s=30))
        res = t.result()
    assert res.ok
    line = next(e for e in events if e["type"] == "assistant")
    assert len(json.dumps(line, separators=(",", ":"), ensure_ascii=False)) == 1_500_000


def test_broker_dying_mid_frame_does_not_corrupt_the_mailbox(broker_factory, session_name):
    # The broker streams a 3 MB line into a 1 MiB ring the client is not reading,
    # and dies with only its head published. The next broker's frames follow it.
    b = broker_factory()
    with Client(session_name, "worker", reconnect_timeout_s=30) as c:
        t = c.prompt("[sim:huge=3000000] big")
        wait_until(lambda: rec(b).counters["results_ok"] == 1, what="turn done in the broker")
        b.kill()
        broker_factory()
        res = t.result(timeout_s=30)
    assert res.ok and res.request_id == t.request_id


def test_reconnect_timeout_gives_broker_unavailable(broker_factory, session_name):
    b = broker_factory()
    with Client(session_name, "worker", reconnect_timeout_s=0.5) as c:
        t = c.prompt("[sim:turn_ms=2000] orphaned")
        next(iter(t.events(timeout_s=10)))
        b.kill()
        with pytest.raises(BrokerUnavailable):
            t.result(timeout_s=10)
        res = t.result()  # the request ends: no second wait
        assert res.status == "error" and res.error_code == "broker_unavailable"

    async def main() -> None:
        b2 = broker_factory()
        async with AsyncClient(session_name, "worker", reconnect_timeout_s=0.5) as ac:
            at = ac.prompt("[sim:turn_ms=2000] orphaned-async")
            await at.events().__anext__()
            b2.kill()
            with pytest.raises(BrokerUnavailable):
                await at.result(timeout_s=10)
            res = await at.result()
            assert res.status == "error" and res.error_code == "broker_unavailable"

    asyncio.run(main())


def test_cancel_while_no_broker_runs_is_not_lost(broker_factory, session_name):
    b = broker_factory()
    with Client(session_name, "worker", reconnect_timeout_s=30) as c:
        t = c.prompt("[sim:turn_ms=3000] cancel-me-later")
        next(iter(t.events(timeout_s=10)))
        b.kill()
        wait_until(lambda: b.snapshot() is None or not b.snapshot().broker_alive, what="broker dead")
        t.cancel()  # no broker to send it to now
        broker_factory(wait=False)
        res = t.result(timeout_s=30)
    assert res.status == "cancelled"


def _once(flag: threading.Event) -> Callable[[], bool]:
    """An interrupt check that is true once after ``flag`` is set (as the CLI's recorded Ctrl-C)."""
    taken = threading.Event()

    def check() -> bool:
        if flag.is_set() and not taken.is_set():
            taken.set()
            return True
        return False

    return check


def test_interrupt_when_stops_a_wait_between_frames_and_the_turn_reads_on(broker_factory, session_name):
    broker_factory()
    flag = threading.Event()
    with Client(session_name, "worker") as c:
        c.interrupt_when(_once(flag))
        t = c.prompt(f"{LONG} interrupt-me")
        seen = [started(t)]
        flag.set()  # nothing waits yet: the next wait stops at its first pass, frames applied
        with pytest.raises(Interrupted):
            for ev in t.events(timeout_s=15):
                seen.append(ev)
        t.cancel()
        seen += list(t.events(timeout_s=15))
        res = t.result(timeout_s=1)
    assert res.status == "cancelled"
    # Every event, once each: none lost to the interruption.
    assert seen[0]["subtype"] == "init" and seen[-1]["type"] == "result"
    assert sum(ev.get("subtype") == "init" for ev in seen) == 1


def test_async_interrupt_when_stops_a_wait_between_frames(broker_factory, session_name):
    broker_factory()
    flag = threading.Event()

    async def main() -> TurnResult:
        async with AsyncClient(session_name, "worker") as c:
            c.interrupt_when(_once(flag))
            t = c.prompt(f"{LONG} interrupt-me")
            await t.events().__anext__()
            flag.set()
            with pytest.raises(Interrupted):
                await t.result(timeout_s=15)
            t.cancel()
            return await t.result(timeout_s=15)

    assert asyncio.run(main()).status == "cancelled"
