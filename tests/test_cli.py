"""The ``turnstile`` command, run as subprocesses against a real broker with the sim agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ipc import names
from ipc.procstat import read_proc_stat
from tests.support import TURNSTILE, rec, running, ts, wait_until

LONG = "[sim:turn_ms=3000]"

RESULT_FIELDS = {
    "status",
    "turn",
    "text",
    "session_id",
    "model",
    "queued_ms",
    "turn_ms",
    "error_code",
    "error",
    "request_id",
    "preemptions",
}


def ts_bg(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TURNSTILE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )


@pytest.fixture
def bg() -> Any:
    """Start background `turnstile` commands; each is reaped (killed if need be) at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        p = ts_bg(*args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def finish(p: subprocess.Popen[str], timeout_s: float = 20) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout_s)
    return p.returncode, out, err


# ---------------------------------------------------------------- prompt


def test_prompt_plain_text_streams_answer(broker_factory, session_name):
    broker_factory()
    cp = ts("prompt", "--session", session_name, "[sim:chunks=3] plain please")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "sim: [sim:chunks=3] plain please\n"


def test_prompt_reads_stdin_and_session_from_env(broker_factory, session_name):
    broker_factory()
    cp = subprocess.run(
        [*TURNSTILE, "prompt", "-"],
        input="from stdin",
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TURNSTILE_SESSION": session_name},
    )
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "sim: from stdin\n"


def test_prompt_json_schema_with_preemption(broker_factory, session_name, bg):
    b = broker_factory()
    w = bg("prompt", "--session", session_name, "--kind", "worker", "--json", "[sim:turn_ms=4000] json-worker")
    wait_until(running(b, "worker"), what="worker running")
    hook = ts("prompt", "--session", session_name, "--kind", "webhook", "--json", "json-hook")
    assert hook.returncode == 0, hook.stderr
    rc, out, err = finish(w)
    assert rc == 0, err
    lines = json_lines(out)
    kinds = [o["event"] for o in lines]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    assert set(kinds) == {"accepted", "agent", "preempted", "rerun", "result"}
    assert kinds.index("rerun") == kinds.index("preempted") + 1
    accepted = lines[0]
    assert set(accepted) == {"event", "request_id", "session", "kind"}
    assert accepted["session"] == session_name and accepted["kind"] == "worker"
    pre = next(o for o in lines if o["event"] == "preempted")
    assert set(pre) == {"event", "turn", "requeued", "reason"} and pre["requeued"] is True
    agent = [o for o in lines if o["event"] == "agent"]
    assert set(agent[0]) == {"event", "data"} and agent[0]["data"]["subtype"] == "init"
    i = kinds.index("rerun")
    assert set(lines[i]) == {"event", "cause", "attempt", "turn", "previous_turn", "incarnation"}
    assert kinds[i + 1] == "agent" and lines[i + 1]["data"]["subtype"] == "init"  # the rerun
    res = lines[-1]
    assert set(res) == RESULT_FIELDS | {"event"}
    assert res["status"] == "ok" and res["preemptions"] == 1 and res["request_id"] == accepted["request_id"]
    assert res["turn"] > pre["turn"] and res["error_code"] is None and res["error"] is None
    assert isinstance(res["queued_ms"], float) and isinstance(res["turn_ms"], float)
    assert res["session_id"] == agent[0]["data"]["session_id"]
    hres = json_lines(hook.stdout)[-1]
    assert hres["status"] == "ok" and hres["text"] == "sim: json-hook"


def test_prompt_defaults_to_worker_and_never_preempts(broker_factory, session_name, bg):
    """A quick `turnstile prompt` from a shell queues behind a running worker turn instead of preempting it."""
    b = broker_factory()
    w = bg("prompt", "--session", session_name, "--kind", "worker", "--on-preempt", "return", "[sim:turn_ms=1500] w")
    wait_until(running(b, "worker"), what="worker running")
    quick = ts("prompt", "--session", session_name, "--json", "quick")
    assert quick.returncode == 0, quick.stderr
    assert json_lines(quick.stdout)[0]["kind"] == "worker"
    rc, _out, err = finish(w)
    assert rc == 0, err
    assert rec(b).counters["preempts"] == 0
    assert "worker (the default)" in ts("prompt", "--help").stdout


def test_exit_3_preempted_with_on_preempt_return(broker_factory, session_name, bg):
    b = broker_factory()
    w = bg("prompt", "--session", session_name, "--kind", "worker", "--on-preempt", "return", "[sim:turn_ms=8000] w")
    wait_until(running(b, "worker"), what="worker running")
    assert ts("prompt", "--session", session_name, "--kind", "webhook", "hook").returncode == 0
    rc, _out, err = finish(w)
    assert rc == 3, err
    assert "preempted" in err


def test_exit_4_cancelled_by_cli_cancel(broker_factory, session_name, bg):
    b = broker_factory()
    w = bg("prompt", "--session", session_name, "--kind", "worker", f"{LONG} cancel-me")
    wait_until(running(b), what="turn running")
    turn = rec(b).turn
    cp = ts("cancel", "--session", session_name, "--holder")
    assert cp.returncode == 0, cp.stderr
    rc, _out, err = finish(w)
    assert rc == 4, err
    assert rec(b).counters["cancels"] == 1
    # A cancel naming that (finished) turn again is stale: counted, harmless.
    cp = ts("cancel", "--session", session_name, "--turn", str(turn))
    assert cp.returncode == 0
    wait_until(lambda: rec(b).counters["stale_cancels"] == 1, what="stale cancel counted")


def test_cancel_exit_codes(broker_factory, session_name):
    assert ts("cancel", "--session", session_name, "--holder").returncode == 5  # no broker
    broker_factory()
    assert ts("cancel", "--session", session_name, "--holder").returncode == 1  # nothing runs
    assert ts("cancel", "--session", session_name).returncode == 2  # neither --turn nor --holder
    assert ts("cancel", "--session", session_name, "--turn", "1", "--holder").returncode == 2


def test_exit_5_no_broker(session_name):
    t0 = time.monotonic()
    cp = ts("prompt", "--session", session_name, "--connect-timeout-s", "0.3", "hello")
    assert cp.returncode == 5
    assert f"turnstile serve --session {session_name}" in cp.stderr
    assert time.monotonic() - t0 < 10


def test_exit_6_agent_error(broker_factory, session_name):
    broker_factory()
    cp = ts("prompt", "--session", session_name, "--json", "[sim:error=api] boom")
    assert cp.returncode == 6, cp.stderr
    res = json_lines(cp.stdout)[-1]
    assert res["status"] == "error" and res["error_code"] == "api_error"
    cp = ts("prompt", "--session", session_name, "[sim:error=api] boom")
    assert cp.returncode == 6 and "api_error" in cp.stderr


def test_exit_7_timeout(broker_factory, session_name):
    b = broker_factory()
    cp = ts("prompt", "--session", session_name, "--timeout-s", "0.5", f"{LONG} too slow")
    assert cp.returncode == 7, cp.stderr
    # Says the request is gone, on a line of its own under the partial text.
    assert "no result within 0.5 s; the request was abandoned" in cp.stderr, cp.stderr
    assert cp.stdout == "" or cp.stdout.endswith("\n"), repr(cp.stdout)
    # The client left: its turn is interrupted and the session is free again.
    wait_until(lambda: rec(b).turn == 0, timeout_s=10, what="turn ended")
    assert ts("prompt", "--session", session_name, "next").returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ("prompt", "--kind", "admin", "x"),
        ("prompt",),
        ("prompt", "--on-preempt", "never", "x"),
        ("status", "--bogus"),
        ("serve", "--session", "bad name!"),
        ("nosuchcommand",),
    ],
)
def test_exit_2_usage(args, session_name):
    cp = ts(*args)
    assert cp.returncode == 2, (cp.stdout, cp.stderr)


def test_exit_2_empty_prompt_refused(broker_factory, session_name):
    broker_factory()
    cp = ts("prompt", "--session", session_name, "")
    assert cp.returncode == 2 and "empty prompt" in cp.stderr


# ---------------------------------------------------------------- bad input: one line, the documented code

BAD_SESSIONS = ["../x", "", "x" * 65, "sessi\u00f3n", "a b", "a.b"]
S = "{session}"  # replaced by the test's own session name
STATE = "{state}"  # replaced by the --state-dir the row's setup made


def _not_utf8() -> str:
    # What a shell hands Python for the bytes ff fe: lone surrogates (argv is decoded with surrogateescape).
    return os.fsdecode(b"\xff\xfe")


def _regular_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return []


def _tmpfs(options: str, fill: bool) -> Any:
    # A small tmpfs in a private mount namespace: read-only, or filled up, so a real filesystem says no.
    def setup(tmp: Path) -> list[str]:
        if os.geteuid() != 0:
            pytest.skip("a private tmpfs mount (unshare --mount) needs root")
        mnt = tmp / "mnt"
        mnt.mkdir()
        filler = f"head -c 1048576 /dev/zero > {mnt}/fill 2>/dev/null; " if fill else ""
        script = f'mount -t tmpfs -o {options} tmpfs {mnt} && {{ {filler}exec "$@"; }}'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]

    return setup


BAD_INPUT = [
    *[pytest.param(None, ["status", "--session", b], 2, id=f"status-session-{i}") for i, b in enumerate(BAD_SESSIONS)],
    *[pytest.param(None, ["prompt", "--session", b, "hi"], 2, id=f"prompt-session-{i}")
      for i, b in enumerate(BAD_SESSIONS)],
    *[pytest.param(None, ["cancel", "--session", b, "--turn", "1"], 2, id=f"cancel-session-{i}")
      for i, b in enumerate(BAD_SESSIONS)],
    pytest.param(None, ["sweep", "--session", "../x"], 2, id="sweep-session"),
    pytest.param(None, ["cancel", "--session", S, "--turn", "-1"], 2, id="cancel-turn-negative"),
    pytest.param(None, ["cancel", "--session", S, "--turn", str(2**64)], 2, id="cancel-turn-2**64"),
    pytest.param(None, ["prompt", "--session", S, _not_utf8()], 2, id="prompt-not-utf8"),
    pytest.param("broker", ["prompt", "--session", S, "--timeout-s", "-1", "hi"], 2, id="prompt-timeout-negative"),
    pytest.param(_regular_file, ["serve", "--agent", "sim", "--session", S, "--state-dir", f"{STATE}/file/state"],
                 13, id="serve-state-dir-under-file"),
    pytest.param(_tmpfs("ro,size=64k", fill=False),
                 ["serve", "--agent", "sim", "--session", S, "--state-dir", f"{STATE}/mnt/state"],
                 13, id="serve-state-dir-read-only"),
    pytest.param(_tmpfs("size=64k", fill=True),
                 ["serve", "--agent", "sim", "--session", S, "--state-dir", f"{STATE}/mnt/state"],
                 13, id="serve-state-dir-full-disk"),
]


@pytest.mark.parametrize(("setup", "args", "code"), BAD_INPUT)
def test_bad_input_gives_one_line_and_its_exit_code(setup, args, code, session_name, tmp_path, broker_factory):
    """Each bad input of the red-team table: no traceback, one message line, the documented exit code."""
    prefix: list[str] = []
    broker = None
    if setup == "broker":
        broker = broker_factory()
    elif setup is not None:
        prefix = setup(tmp_path)
    argv = [a.replace(S, session_name).replace(STATE, str(tmp_path)) for a in args]
    cp = subprocess.run([*prefix, *TURNSTILE, *argv], capture_output=True, text=True, timeout=30,
                        stdin=subprocess.DEVNULL, errors="replace")
    assert "Traceback" not in cp.stderr, cp.stderr
    said = [line for line in cp.stderr.splitlines() if line.startswith(("Error:", "turnstile:"))]
    assert len(said) == 1, cp.stderr
    assert cp.returncode == code, (cp.returncode, cp.stdout, cp.stderr)
    if broker is not None:
        # Refused before anything was sent: the broker never started a turn.
        assert rec(broker).turn == 0
    else:  # and nothing was created
        assert [n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.{session_name}.")] == []


# ---------------------------------------------------------------- status, sweep, help


def test_status_json_works_while_broker_stopped(broker_factory, session_name):
    b = broker_factory()
    assert ts("prompt", "--session", session_name, "one").returncode == 0
    os.kill(b.pid, signal.SIGSTOP)
    try:
        cp = ts("status", "--session", session_name, "--json", timeout_s=10)
        plain = ts("status", "--session", session_name, timeout_s=10)
    finally:
        os.kill(b.pid, signal.SIGCONT)
    assert cp.returncode == 0, cp.stderr
    d = json.loads(cp.stdout)
    assert d["broker_alive"] is True and d["broker_pid"] == b.pid
    assert d["agent_state"] == "up" and d["counters"]["results_ok"] == 1 and d["turn_state"] == "idle"
    assert "heartbeat_age_s" in d
    assert plain.returncode == 0 and "alive" in plain.stdout and session_name in plain.stdout


def test_status_without_broker(session_name):
    cp = ts("status", "--session", session_name, "--json")
    assert cp.returncode == 5
    assert json.loads(cp.stdout) == {"session": session_name, "broker_alive": False}
    cp = ts("status", "--session", session_name)
    assert cp.returncode == 5 and f"turnstile serve --session {session_name}" in cp.stdout


DEAD_CLIENT = r"""
import os, sys
from ipc import mailbox, names
cid = names.new_client_id()
box = mailbox.MailboxReader(sys.argv[1], cid)  # kept: a live owner holds its ring mapped
print(cid, os.getpid(), flush=True)
sys.stdin.read()
"""


def test_sweep_removes_dead_clients_mailbox(session_name):
    p = subprocess.Popen(
        [sys.executable, "-c", DEAD_CLIENT, session_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdin is not None
    cid, pid = p.stdout.readline().split()
    ring = names.mailbox(session_name, cid)
    assert os.path.exists("/dev/shm" + ring)
    live = ts("sweep", "--session", session_name)
    assert live.returncode == 0 and "0 object(s) removed" in live.stdout  # its owner is alive
    p.kill()
    p.wait()
    p.stdin.close()
    p.stdout.close()
    cp = ts("sweep", "--session", session_name)
    assert cp.returncode == 0
    assert f"removed mailbox {ring} (client pid {pid} is gone)" in cp.stdout
    assert not os.path.exists("/dev/shm" + ring)
    assert json.loads(ts("sweep", "--session", session_name, "--json").stdout) == []


@pytest.mark.parametrize("cmd", ["serve", "prompt", "status", "cancel", "demo"])
def test_help_lists_exit_codes(cmd):
    cp = ts(cmd, "--help")
    assert cp.returncode == 0
    text = cp.stdout.lower()
    assert "exit" in text, cp.stdout
    codes = {
        "serve": ["0", "10", "11", "12", "130"],
        "prompt": ["0", "2", "3", "4", "5", "6", "7"],
        "status": ["0", "5"],
        "cancel": ["0", "1", "2", "5"],
        "demo": ["0", "1"],
    }[cmd]
    section = text[text.index("exit") :]
    for code in codes:
        assert f" {code} " in section.replace("\n", " ").replace(",", " "), (cmd, code, cp.stdout)


def test_help_of_group_and_sweep():
    for args in [("--help",), ("sweep", "--help"), ("-h",)]:
        cp = ts(*args)
        assert cp.returncode == 0 and "Usage:" in cp.stdout


# ---------------------------------------------------------------- serve exit codes


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_cwd_is_the_agents_working_directory(broker_factory, session_name, tmp_path, how):
    """`serve --cwd DIR` (or TURNSTILE_CWD) starts the agent in DIR, not where serve runs."""
    work = tmp_path / "work"
    work.mkdir()
    if how == "flag":
        broker_factory(extra_args=("--cwd", str(work)))
    else:
        broker_factory(env={"TURNSTILE_CWD": str(work)})
    cp = ts("prompt", "--session", session_name, "--json", "where are you")
    assert cp.returncode == 0, cp.stderr
    init = next(o["data"] for o in json_lines(cp.stdout) if o["event"] == "agent" and o["data"]["subtype"] == "init")
    assert os.path.realpath(init["cwd"]) == os.path.realpath(work)


def test_serve_exit_10_when_session_is_served(broker_factory, session_name):
    b = broker_factory()
    cp = ts("serve", "--session", session_name, "--agent", "sim", "--state-dir", str(b.state_dir), timeout_s=20)
    assert cp.returncode == 10, cp.stderr
    assert "another broker" in cp.stderr
    assert ts("prompt", "--session", session_name, "still-served").returncode == 0


def test_serve_exit_11_when_live_broker_owns_ipc(broker_factory, session_name, tmp_path):
    broker_factory()
    # Another state dir, so no lock is shared: the live broker's state block refuses it.
    cp = ts("serve", "--session", session_name, "--agent", "sim", "--state-dir", str(tmp_path / "other"), timeout_s=20)
    assert cp.returncode == 11, cp.stderr
    assert "live broker" in cp.stderr
    cp = ts("prompt", "--session", session_name, "--connect-timeout-s", "2", "still-served")
    assert cp.returncode == 0, cp.stderr


def test_serve_exit_12_agent_not_found(session_name, tmp_path):
    cp = ts(
        "serve",
        "--session",
        session_name,
        "--agent",
        "claude",
        "--claude-bin",
        str(tmp_path / "no-such-claude"),
        "--state-dir",
        str(tmp_path / "state"),
        timeout_s=20,
    )
    assert cp.returncode == 12, cp.stderr
    assert "no-such-claude" in cp.stderr
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.{session_name}.")] == []


def test_serve_exit_130_on_second_signal(broker_factory, session_name):
    b = broker_factory()
    assert b.proc is not None
    w = ts_bg("prompt", "--session", session_name, "--kind", "worker", "[sim:ignore_interrupt] stuck")
    try:
        wait_until(running(b), what="stuck turn running")
        agent = rec(b).agent_pid
        b.proc.send_signal(signal.SIGINT)  # drain: the interrupt is ignored, so it waits
        wait_until(lambda: '"broker.signal"' in b.log_text(), what="first signal seen")
        b.proc.send_signal(signal.SIGINT)
        assert b.proc.wait(10) == 130
    finally:
        w.kill()
        w.communicate()
    wait_until(lambda: not os.path.exists(f"/proc/{agent}") or _zombie(agent), timeout_s=5, what="agent gone")
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.{session_name}.st")] == []


def _zombie(pid: int) -> bool:
    st = read_proc_stat(pid)
    return st is None or st.zombie


def test_status_and_sweep_after_broker_sigkill(broker_factory, session_name):
    b = broker_factory()
    pid, agent = b.pid, rec(b).agent_pid
    b.kill()
    cp = ts("status", "--session", session_name, "--json")
    assert cp.returncode == 5
    d = json.loads(cp.stdout)
    assert d["broker_alive"] is False and d["broker_pid"] == pid
    # Nothing keeps the rest of a dead broker's block current: it is under last_known, and said so.
    assert "agent_state" not in d and "counters" not in d
    assert d["last_known"]["agent_pid"] == agent and d["last_known"]["agent_state"] == "up"
    text = ts("status", "--session", session_name).stdout
    assert "DEAD" in text and f"last known: pid {agent} up" in text
    cp = ts("sweep", "--session", session_name, "--json")
    assert cp.returncode == 0
    removed = {(r["kind"], r["name"]) for r in json.loads(cp.stdout)}
    assert ("state", names.state_block(session_name)) in removed
    assert ("request_queue", names.request_queue(session_name)) in removed
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"turnstile.{session_name}.")] == []
