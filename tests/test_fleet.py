"""The fleet over NATS JetStream: a real nats-server per test, a real broker (sim agent), a real gateway
process and real remote client processes.

Gateways here beat every 0.3 s and go stale after 1 s (so a takeover after a
SIGKILL takes about a second), and redeliver an untouched request after 6 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import Client
from ipc.errors import FleetUnavailable
from tests.nats_support import GatewayProcess, NatsServer, free_port
from tests.support import ClientProc, published, rec, running, wait_until

pytestmark = [pytest.mark.timeout(60)]

FLEET_CLIENT = str(Path(__file__).with_name("fleet_client.py"))
TURNSTILE = [sys.executable, "-m", "broker.cli"]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., ClientProc]]:
    """Start client processes (argv) whose stdout is JSON lines; killed at teardown."""
    started: list[ClientProc] = []

    def start(argv: list[str]) -> ClientProc:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             text=True, cwd=str(tmp_path))
        c = ClientProc(p)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
        c.proc.wait()
        c._reader.join(5)
        c._err.join(5)
        for f in (c.proc.stdout, c.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def remote(procs: Callable[..., ClientProc], session_name: str) -> Callable[..., ClientProc]:
    """A remote client process (tests/fleet_client.py) submitting ``prompts`` over NATS."""

    def start(url: str, kind: str, prompts: list[dict[str, Any]], **spec: Any) -> ClientProc:
        spec = {"url": url, "session": session_name, "kind": kind, "prompts": prompts, **spec}
        return procs([sys.executable, FLEET_CLIENT, json.dumps(spec)])

    return start


def cli_event(c: ClientProc, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """The first `turnstile prompt --json` line of event ``name``."""
    return c.wait_for(lambda o: o.get("event") == name, timeout_s)


def results(c: ClientProc) -> dict[str, dict[str, Any]]:
    """Result lines of a fleet client by request id (failing if one request got two)."""
    out: dict[str, dict[str, Any]] = {}
    for o in c.results():
        assert o["request_id"] not in out, f"two results for {o['request_id']}"
        out[o["request_id"]] = o
    return out


def take_over(gateway_factory: Callable[..., GatewayProcess], url: str, timeout_s: float = 20.0) -> GatewayProcess:
    """Start a gateway, again and again while the registry still says a (dead) one serves the session."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return gateway_factory(url)  # type: ignore[no-any-return]
        except RuntimeError as exc:
            if "exited with 10" not in str(exc) or time.monotonic() > deadline:
                raise


# ---------------------------------------------------------------- the contract


def test_remote_webhook_preempts_local_worker_which_resumes(
    nats_factory, broker_factory, gateway_factory, procs, session_name
):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    worker = procs([*TURNSTILE, "prompt", "--session", session_name, "--kind", "worker", "--json",
                    "[sim:turn_ms=4000] long worker"])
    wait_until(running(b, "worker"), what="the local worker's turn")
    hook = procs([*TURNSTILE, "prompt", "--nats", n.url, "--session", session_name, "--kind", "webhook", "--json",
                  "remote hook"])
    accepted = cli_event(hook, "accepted")
    assert accepted["session"] == session_name and accepted["kind"] == "webhook" and accepted["request_id"]
    assert hook.finish() == 0, hook.stderr
    hres = cli_event(hook, "result")
    assert hres["status"] == "ok" and hres["text"] == "sim: remote hook"
    assert any(o.get("event") == "agent" and o["data"].get("type") == "assistant" for o in hook.lines)
    cli_event(worker, "preempted")
    assert worker.finish() == 0, worker.stderr
    wres = cli_event(worker, "result")
    assert wres["status"] == "ok" and wres["preemptions"] == 1
    assert hres["turn"] < wres["turn"], "the worker reran after the webhook"
    assert rec(b).counters["preempts"] == 1


def test_same_request_id_submitted_twice_runs_once(nats_factory, broker_factory, gateway_factory, remote):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    prompt = [{"text": "[sim:turn_ms=600] once", "request_id": "dup-1"}]
    first = remote(n.url, "worker", prompt)
    first.ev("submitted")
    second = remote(n.url, "worker", prompt)  # while the first runs
    assert first.finish() == 0 and second.finish() == 0, first.stderr + second.stderr
    a, b2 = results(first)["dup-1"], results(second)["dup-1"]
    assert a["status"] == b2["status"] == "ok" and a["turn"] == b2["turn"]
    assert a["text"].startswith("sim: [sim:turn_ms=600] once")
    late = remote(n.url, "worker", prompt)  # after it finished: collects the stored result
    assert late.finish() == 0, late.stderr
    assert results(late)["dup-1"]["turn"] == a["turn"]
    assert rec(b).counters["turns"] == 1 and rec(b).counters["requests"] == 1


def test_request_id_past_the_dedup_window_is_answered_from_the_results_bucket(
    nats_factory, broker_factory, gateway_factory, remote
):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url, extra_args=("--dedup-window-s", "1"))
    prompt = [{"text": "once only", "request_id": "dup-2"}]
    first = remote(n.url, "webhook", prompt)
    assert first.finish() == 0, first.stderr
    stored_at = time.monotonic()
    wait_until(lambda: time.monotonic() - stored_at > 1.5, what="the de-dup window to pass")
    again = remote(n.url, "webhook", prompt)  # JetStream stores it anew; the gateway finds its result
    assert again.finish() == 0, again.stderr
    assert results(again)["dup-2"]["turn"] == results(first)["dup-2"]["turn"]
    assert rec(b).counters["requests"] == 1


def test_permission_requests_are_answered_by_the_remote_client(nats_factory, broker_factory, gateway_factory, remote):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    allow = remote(n.url, "webhook", [{"text": "[sim:permission] tool please"}], permission="allow")
    deny = remote(n.url, "webhook", [{"text": "[sim:permission] tool please"}], permission="deny")
    assert allow.finish() == 0 and deny.finish() == 0, allow.stderr + deny.stderr
    (a,) = results(allow).values()
    (d,) = results(deny).values()
    assert a["status"] == d["status"] == "ok"
    assert a["text"].endswith("[permission: allowed]"), a["text"]
    assert "[permission: denied (no-from-remote" in d["text"], d["text"]
    assert "agent.request_relayed" in b.log_text()


def test_remote_cancel_of_one_request_cancel_of_the_holder_and_set_model(
    nats_factory, broker_factory, gateway_factory, procs, session_name
):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    with Client(session_name, "worker", nats=n.url) as a, Client(session_name, "worker", nats=n.url) as c:
        long = a.prompt("[sim:turn_ms=30000] long")
        wait_until(running(b, "worker"), what="the long turn")
        queued = c.prompt("queued behind it")
        wait_until(lambda: rec(b).workers_queued == 1, what="the second request queued at the broker")
        queued.cancel()
        assert queued.result(timeout_s=20).status == "cancelled"
        assert running(b, "worker")(), "cancelling a queued request left the running turn alone"
        cancel = procs([*TURNSTILE, "cancel", "--nats", n.url, "--session", session_name, "--holder"])
        assert cancel.finish() == 0, cancel.stderr
        assert long.result(timeout_s=20).status == "cancelled"
        res = c.set_model("opus", timeout_s=20)
        assert res.ok and res.model == "claude-opus-4-1-20250805"
    # The block is published after the hot path: wait for it, don't read it once.
    published(b, lambda r: r.model == "claude-opus-4-1-20250805", "the broker to publish the new model")


@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "nats://127.0.0.1:4222,https://x:1", ","])
def test_a_url_nats_cannot_use_is_a_usage_error_at_once(url, session_name):
    t0 = time.monotonic()
    cp = subprocess.run([*TURNSTILE, "prompt", "--nats", url, "--session", session_name, "hi"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2, cp.stderr
    assert "is not a NATS URL: use nats://HOST:PORT" in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
    assert time.monotonic() - t0 < 5, "refused without waiting for a connect timeout"


def test_ctrl_c_on_a_remote_prompt_cancels_it_and_prints_the_cancelled_result(
    nats_factory, broker_factory, gateway_factory, procs, session_name
):
    """Ctrl-C on `turnstile prompt --nats` acts as on a local one: cancel, read on, print, exit 130."""
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    p = procs([*TURNSTILE, "prompt", "--nats", n.url, "--session", session_name, "--kind", "worker", "--json",
               "[sim:turn_ms=20000] interrupt me"])
    wait_until(running(b, "worker"), what="the remote worker's turn")
    p.proc.send_signal(signal.SIGINT)
    assert p.finish() == 130, p.stderr
    assert "Traceback" not in p.stderr and "turnstile: interrupted" in p.stderr, p.stderr
    assert p.lines[-1]["event"] == "result" and p.lines[-1]["status"] == "cancelled", p.lines[-1:]
    published(b, lambda r: r.counters["results_cancelled"] == 1, "the cancelled result counted")


def test_remote_lease_holds_the_session_across_turns(nats_factory, broker_factory, gateway_factory, session_name):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    with Client(session_name, "worker", nats=n.url) as c, Client(session_name, "worker", nats=n.url) as other:
        with c.lease(timeout_s=20):
            first = c.prompt("[sim:turn_ms=300] in-lease-1").result(timeout_s=20)
            outsider = other.prompt("outsider")
            wait_until(lambda: rec(b).workers_queued == 1, what="the outsider queued behind the lease")
            second = c.prompt("in-lease-2").result(timeout_s=20)
            assert rec(b).lease_client, "the lease is still held"
        late = outsider.result(timeout_s=20)
    assert first.ok and second.ok and late.ok
    assert first.turn < second.turn < late.turn, (first.turn, second.turn, late.turn)


def test_junk_in_the_stream_is_dropped_and_the_session_goes_on(
    nats_factory, broker_factory, gateway_factory, session_name
):
    import asyncio

    import nats

    from clients import fleet_wire as wire

    n = nats_factory()
    broker_factory()
    g = gateway_factory(n.url)

    async def publish_junk() -> None:
        nc = await nats.connect(n.url)
        js = nc.jetstream()
        subject = wire.request_subject(session_name, "webhook")
        await js.publish(subject, b"\xc1 not msgpack", headers={"Nats-Msg-Id": "junk-1"})
        no_id = wire.RemoteRequest(op="prompt", client="0" * 16, req="", kind="webhook", content="x")
        await js.publish(subject, wire.encode(no_id), headers={"Nats-Msg-Id": "junk-2"})
        await nc.close()

    asyncio.run(publish_junk())
    with Client(session_name, "webhook", nats=n.url) as c:
        assert c.prompt("after the junk").result(timeout_s=20).ok
    assert g.log_text().count("fleet.bad_request") == 2


def test_unreachable_nats_is_a_typed_error_naming_the_url(session_name, procs):
    url = f"nats://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(FleetUnavailable) as err:
        Client(session_name, "webhook", nats=url, connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    assert url in str(err.value) and err.value.url == url
    p = procs([*TURNSTILE, "prompt", "--nats", url, "--session", session_name, "--connect-timeout-s", "1", "--json",
               "hi"])
    assert p.finish() == 5
    assert url in p.stderr


def test_no_gateway_ever_for_the_session_is_a_typed_error(nats_factory, session_name):
    n = nats_factory()
    with pytest.raises(FleetUnavailable, match="no gateway has served session"):
        Client(session_name, "webhook", nats=n.url)


def test_second_gateway_for_a_served_session_is_refused_and_status_lists_it(
    nats_factory, broker_factory, gateway_factory, session_name, procs
):
    n = nats_factory()
    broker_factory()
    first = gateway_factory(n.url)
    second = gateway_factory(n.url, wait=False)
    assert second.wait() == 10
    assert "already served by gateway" in second.log_text()
    assert first.proc is not None and first.proc.poll() is None
    st = procs([*TURNSTILE, "status", "--nats", n.url, "--json"])
    assert st.finish() == 0, st.stderr
    (row,) = [r for r in st.lines[0] if r["session"] == session_name]
    assert row["gateway_alive"] and row["broker_alive"] and row["pid"] == first.proc.pid
    one = procs([*TURNSTILE, "status", "--nats", n.url, "--session", session_name, "--json"])
    assert one.finish() == 0 and one.lines[0]["session"] == session_name


def test_mixed_local_and_remote_webhooks_stay_fifo(nats_factory, broker_factory, gateway_factory, procs, session_name):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    local = [*TURNSTILE, "prompt", "--session", session_name, "--kind", "webhook", "--json"]
    remote_ = [*TURNSTILE, "prompt", "--nats", n.url, "--session", session_name, "--kind", "webhook", "--json"]
    # A long webhook holds the session while the others line up behind it; it is cancelled once they have.
    holder = procs([*local, "[sim:turn_ms=60000] hold"])
    wait_until(running(b, "webhook"), what="the holding webhook's turn")
    hooks = []
    for i, argv in enumerate([remote_, local, remote_, local], start=1):
        hooks.append(procs([*argv, f"hook{i}"]))
        wait_until(lambda i=i: rec(b).webhooks_queued == i, timeout_s=30, what=f"webhook {i} queued")
    cancel = procs([*TURNSTILE, "cancel", "--session", session_name, "--holder"])
    assert cancel.finish() == 0 and holder.finish() == 4
    turns = []
    for h in hooks:
        assert h.finish() == 0, h.stderr
        turns.append(cli_event(h, "result")["turn"])
    assert turns == sorted(turns) and len(set(turns)) == len(turns), turns


# ---------------------------------------------------------------- nothing lost, nothing run twice

FOUR = [{"text": "[sim:turn_ms=1500] w0"}, {"text": "w1"}, {"text": "w2"}, {"text": "w3"}]


def _all_ok_once(c: ClientProc, n: int) -> None:
    assert c.finish(45) == 0, c.stderr[-3000:]
    res = results(c)
    assert len(res) == n and all(r["status"] == "ok" for r in res.values()), res
    assert sorted(r["text"].rstrip(".") for r in res.values()) == sorted(f"sim: {p['text']}" for p in FOUR[:n])


def test_gateway_sigkill_mid_turn_with_requests_queued(nats_factory, broker_factory, gateway_factory, remote):
    n = nats_factory()
    b = broker_factory()
    g1 = gateway_factory(n.url)
    c = remote(n.url, "worker", FOUR, events=False)
    wait_until(lambda: len([o for o in c.lines if o.get("ev") == "submitted"]) == 4, what="4 requests stored")
    wait_until(running(b, "worker"), what="the first turn")
    g1.kill()
    take_over(gateway_factory, n.url)
    _all_ok_once(c, 4)
    # The turn cut by the gateway's death was cancelled (its client died), then run once through the new one.
    assert rec(b).counters["results_ok"] == 4


def test_nats_server_sigkill_and_restart(nats_factory, broker_factory, gateway_factory, remote):
    n: NatsServer = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    c = remote(n.url, "worker", FOUR, events=False)
    wait_until(lambda: len([o for o in c.lines if o.get("ev") == "submitted"]) == 4, what="4 requests stored")
    wait_until(running(b, "worker"), what="the first turn")
    n.kill()
    n.start()
    _all_ok_once(c, 4)
    assert rec(b).counters["results_ok"] == 4


def test_broker_sigkill(nats_factory, broker_factory, gateway_factory, remote):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    c = remote(n.url, "worker", FOUR)
    wait_until(lambda: len([o for o in c.lines if o.get("ev") == "submitted"]) == 4, what="4 requests stored")
    # Killed once the turn's system/init reached the client: the broker has then recorded that the
    # conversation exists. (Killed between the agent's first turn start and that record, the next
    # broker starts the agent with --session-id on an id it already used: a broker finding, not the
    # fleet's; reported separately.)
    c.wait_for(lambda o: o.get("ev") == "event" and o["data"].get("subtype") == "init", 30)
    b.kill()
    b2 = broker_factory()
    _all_ok_once(c, 4)
    assert rec(b2).counters["results_ok"] == 4


# ---------------------------------------------------------------- security


def _auth_config(a: str, b: str) -> str:
    return f"""
authorization {{
  users = [
    {{user: gw, password: gwpass}}
    {{user: hooks, password: hookpass, permissions: {{
      publish: {{allow: ["turnstile.{a}.req.webhook", "$JS.API.STREAM.INFO.KV_turnstile_res_{a}",
                        "$JS.API.DIRECT.GET.KV_turnstile_res_{a}.>"]}}
      subscribe: {{allow: ["_INBOX.>", "turnstile.{a}.evt.>"]}}
    }}}}
  ]
}}
"""


def test_nats_identity_allowed_one_session_is_refused_on_another(
    nats_factory, broker_factory, gateway_factory, session_name
):
    other = f"{session_name}-b"
    n = nats_factory(config=_auth_config(session_name, other))
    broker_factory()
    gateway_factory(n.url, sessions=[session_name, other], extra_args=("--user", "gw", "--password", "gwpass"))
    hooks_url = n.url.replace("nats://", "nats://hooks:hookpass@")
    with Client(session_name, "webhook", nats=hooks_url) as c:
        assert c.prompt("allowed").result(timeout_s=20).ok
    with pytest.raises(FleetUnavailable, match=r"(?i)permissions violation"):
        Client(other, "webhook", nats=hooks_url, connect_timeout_s=2.0)
    with (Client(session_name, "worker", nats=hooks_url, connect_timeout_s=2.0) as w,
          pytest.raises(FleetUnavailable, match=r"(?i)permissions violation")):
        w.prompt("a worker request from a webhook-only identity")


def test_gateway_refuses_non_loopback_url_without_credentials(session_name, procs):
    p = procs([*TURNSTILE, "gateway", "--nats", "nats://192.0.2.1:4222", "--session", session_name])
    assert p.finish() == 2
    assert "not a loopback address" in p.stderr


# ---------------------------------------------------------------- reach and scale


def test_remote_client_in_another_ipc_namespace(nats_factory, broker_factory, gateway_factory, procs, session_name):
    if os.geteuid() != 0:
        pytest.skip("unshare --ipc needs root (CAP_SYS_ADMIN) to create an IPC namespace")
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    n = nats_factory()
    broker_factory()
    gateway_factory(n.url)
    # In a fresh IPC namespace the session's request queue does not exist: no local client...
    local = procs(["unshare", "--ipc", *TURNSTILE, "prompt", "--session", session_name, "--connect-timeout-s",
                   "0.5", "--json", "local"])
    assert local.finish() == 5
    # ...and over NATS the session is there.
    p = procs(["unshare", "--ipc", *TURNSTILE, "prompt", "--nats", n.url, "--session", session_name,
               "--kind", "webhook", "--json", "from another namespace"])
    assert p.finish() == 0, p.stderr
    assert cli_event(p, "result")["text"] == "sim: from another namespace"


@pytest.mark.xdist_group("many_queues")  # 200 local clients of the gateway: the system-wide count of queues (256)
def test_200_remote_clients_on_one_gateway(nats_factory, broker_factory, gateway_factory, remote):
    n = nats_factory()
    # The gateway is one process with a local client per remote requester: its broker's
    # per-process cap must admit them (docs/deploy.md).
    b = broker_factory(extra_args=("--max-clients-per-process", "512"))
    gateway_factory(n.url)
    t0 = time.monotonic()
    c = remote(n.url, "webhook", [{"text": "hi"}], clients=200, events=False, timeout_s=50)
    assert c.finish(55) == 0, c.stderr[-3000:]
    res = results(c)
    assert len(res) == 200 and all(r["status"] == "ok" for r in res.values())
    acks = sorted(o["ack_ms"] for o in c.lines if o.get("ev") == "submitted")
    print(f"200 remote clients: {time.monotonic() - t0:.2f} s; durable ack p50 {acks[100]:.2f} ms, "
          f"max {acks[-1]:.2f} ms")
    assert rec(b).counters["results_ok"] == 200


def test_demo_fleet(procs):
    p = procs([*TURNSTILE, "demo", "--fleet", "--plain", "--webhooks", "2", "--worker-ms", "3000"])
    assert p.finish(50) == 0, p.stderr[-3000:] + str(p.lines[-10:])
