"""Soak: many client processes doing everything at random while the agent and the broker are killed.

``TURNSTILE_SOAK_S`` sets the duration (60 s in ``make test``, 600 s in
``make soak``). ``TURNSTILE_SOAK_CLIENTS`` sets how many client processes
run at once (default 50; 30 under pytest-xdist, see :data:`CLIENTS`),
``TURNSTILE_SOAK_SEED`` the seed.

Each client process (:data:`SOAK_CLIENT`) has a fixed kind and a seeded
random life: prompts (some cancelled, some asking for ``on_preempt=return``),
leases of one or two turns, model switches, and now and then a SIGKILL of
itself (idle or mid-turn). Every prompt carries its client's id and a
sequence number, so a client can tell an event of its own turn from anyone
else's. A chaos thread SIGKILLs, at random moments, the agent's process
group; clients (often one right after the broker, so that it dies while no
broker runs); and the broker, starting a new one each time, except in the
last third of the run, which one broker serves whole so that its memory can
be watched over a long life. A dead client is replaced by a new one.

At the end:

* every request a client that stayed alive submitted got exactly one
  terminal result (counted at the frame level, too), with a known status;
* no event reached the wrong client (every assistant text and result text of
  a request is part of its own reply);
* no malformed line reached any agent process (the sims' shared stamp file,
  appended by every one of them), and none got a user message while a turn ran;
* no process, queue or shared memory of the session is left;
* the broker's resident memory stays flat (sampled through each broker's life).

It prints one summary line with the counts (run with ``-s``, or ``-rP``
under xdist, to see it).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.testing.launcher import BrokerProcess
from tests.support import procs_with_home, session_objects, sim_stats, vm_rss_kib, wait_until

SOAK_S = float(os.environ.get("TURNSTILE_SOAK_S", "60"))
#: 50 client processes alone (``make soak``); 30 beside other tests (``make test``, under xdist): each
#: client holds a doorbell queue, and the system-wide queue count (fs.mqueue.queues_max, 256, enforced
#: even for root without CAP_SYS_RESOURCE, as in containers) is shared with the other worker, where
#: test_ipc_mailbox.py opens 200 mailboxes at once.
CLIENTS = int(os.environ.get("TURNSTILE_SOAK_CLIENTS", "30" if os.environ.get("PYTEST_XDIST_WORKER") else "50"))
SEED = int(os.environ.get("TURNSTILE_SOAK_SEED", "20240611"))
#: Statuses a request may end with under this chaos, with the error codes allowed for "error".
ALLOWED = {"ok", "cancelled", "preempted", "error:agent_restarted"}
#: Growth of a broker's RSS over its life (after a warm-up) that counts as flat.
RSS_GROWTH_KIB = 8 * 1024

#: One client process. argv[1]: JSON spec {session, kind, seed, log, stop_at (time.monotonic())}.
SOAK_CLIENT = r"""
import collections, json, os, random, signal, sys, time
from broker.scheduler import RESUME_NOTE
from clients import Client, TurnstileError
from ipc import frames

spec = json.loads(sys.argv[1])
rng = random.Random(spec["seed"])
kind, stop_at = spec["kind"], spec["stop_at"]
log = open(spec["log"], "a", buffering=1)

def out(**o):
    o["t"] = time.monotonic()
    log.write(json.dumps(o) + "\n")

c = Client(spec["session"], kind, connect_timeout_s=60, reconnect_timeout_s=60)
me = c.client_id
terminal = collections.defaultdict(list)   # req -> statuses of every terminal frame that arrived
conn = c._conn
orig_apply = conn.apply

def apply(frame):
    # Count terminal frames per request at the frame level: the library keeps only the last.
    if frame.client != me:
        out(ev="violation", what="frame addressed to another client", frame=repr(frame)[:300])
    if isinstance(frame, frames.Result):
        terminal[frame.req].append(frame.status + (":" + frame.error_code if frame.status == "error" else ""))
    elif isinstance(frame, frames.Error) and frame.req:
        terminal[frame.req].append("error:" + frame.code)
    orig_apply(frame)

conn.apply = apply
out(ev="start", client=me, pid=os.getpid(), kind=kind)
seq = 0
models = ["claude-alpha", "claude-beta", "claude-gamma"]

def prompt(op, on_preempt=None, cancel=None, die_mid=False):
    global seq
    seq += 1
    tok = f"<{me}:{seq:04d}>"
    ms = rng.randint(0, 200) if kind == "worker" else rng.randint(0, 40)
    text = f"{tok} [sim:turn_ms={ms}] {tok} [sim:chunks={rng.randint(1, 3)}] {tok} {tok}"
    turn = c.prompt(text, on_preempt=on_preempt)
    req = turn.request_id
    out(ev="sub", req=req, op=op)
    if cancel == "now":
        turn.cancel()
    expected = ("sim: " + text, "sim: " + RESUME_NOTE + text)
    wrong = []
    n = 0
    for e in turn.events(timeout_s=150):
        n += 1
        if e.get("type") == "assistant":
            for b in e["message"]["content"]:
                if b.get("type") == "text" and not any(b["text"] in x for x in expected):
                    wrong.append(b["text"][:300])
        elif e.get("type") == "result" and isinstance(e.get("result"), str) and e["result"]:
            if e["result"] not in expected:
                wrong.append("result: " + e["result"][:300])
        if n == 1 and cancel == "after_first":
            turn.cancel()
        if n == 1 and die_mid:
            out(ev="die", req=req, mid_turn=True)
            os.kill(os.getpid(), signal.SIGKILL)
    res = turn.result(timeout_s=150)
    if res.status == "ok" and res.text not in expected:
        wrong.append("final text: " + res.text[:300])
    out(ev="res", req=req, status=res.status, code=res.error_code, wrong=wrong, preemptions=res.preemptions)

ops = ["prompt", "cancel", "return", "lease", "set_model", "die"]
weights = [50, 12, 8, 10, 6, 3] if kind == "worker" else [60, 12, 0, 8, 4, 3]
try:
    while time.monotonic() < stop_at:
        op = rng.choices(ops, weights)[0]
        try:
            if op == "prompt":
                prompt(op)
            elif op == "cancel":
                prompt(op, cancel=rng.choice(["now", "after_first"]))
            elif op == "return":
                prompt(op, on_preempt="return")
            elif op == "lease":
                with c.lease(idle_timeout_s=2.0, timeout_s=150):
                    out(ev="lease", granted=True)
                    for _ in range(rng.randint(1, 2)):
                        prompt("lease_prompt", die_mid=rng.random() < 0.05)
            elif op == "set_model":
                res = c.set_model(rng.choice(models), timeout_s=150)
                out(ev="sub", req=res.request_id, op=op)
                out(ev="res", req=res.request_id, status=res.status, code=res.error_code, wrong=[], preemptions=0)
            elif op == "die":
                if rng.random() < 0.5:
                    out(ev="die", mid_turn=False)
                    os.kill(os.getpid(), signal.SIGKILL)
                prompt(op, die_mid=True)
        except TurnstileError as exc:
            out(ev="op_error", op=op, error=type(exc).__name__, message=str(exc)[:300])
        # Pacing between operations (load shape, not synchronisation).
        time.sleep(rng.random() * 0.3)
finally:
    dup = {r: s for r, s in terminal.items() if len(s) > 1}
    out(ev="exit", terminal={r: s for r, s in terminal.items()}, duplicates=dup)
    c.close()
"""


class Fleet:
    """The client processes: spawned, replaced when they kill themselves, all reaped at the end."""

    def __init__(self, session: str, tmp: Path, stop_at: float, rng: random.Random) -> None:
        self.session = session
        self.dir = tmp / "clients"
        self.dir.mkdir()
        self.stop_at = stop_at
        self.rng = rng
        self.procs: dict[int, tuple[subprocess.Popen[bytes], Path, Any]] = {}
        self.all: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.n = 0
        self.killed_by_chaos = 0
        self.lock = threading.Lock()  # the monitor and the chaos thread both reach the processes

    def spawn(self) -> None:
        self.n += 1
        log = self.dir / f"c{self.n:04d}.jsonl"
        err = open(self.dir / f"c{self.n:04d}.err", "wb")  # noqa: SIM115 - closed in reap()
        spec = {"session": self.session, "kind": "webhook" if self.rng.random() < 0.3 else "worker",
                "seed": self.rng.getrandbits(64), "log": str(log), "stop_at": self.stop_at}
        p = subprocess.Popen([sys.executable, "-c", SOAK_CLIENT, json.dumps(spec)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err)
        self.procs[p.pid] = (p, log, err)
        self.all.append((p, log))

    def stderr_of(self, pid: int) -> str:
        """What client ``pid`` wrote to stderr."""
        for p, log in self.all:
            if p.pid == pid:
                with contextlib.suppress(OSError):
                    return log.with_suffix(".err").read_text(errors="replace")
        return ""

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random client process (it may be idle, mid-turn, or waiting for a broker)."""
        with self.lock:
            alive = [p for p, _log, _err in self.procs.values() if p.poll() is None]
            if alive:
                with contextlib.suppress(ProcessLookupError):
                    rng.choice(alive).kill()
                self.killed_by_chaos += 1

    def replace_the_dead(self, respawn: bool) -> list[tuple[int, int]]:
        """Reap exited clients; replace those killed (by themselves or the chaos). Returns abnormal exits."""
        with self.lock:
            return self._replace_the_dead(respawn)

    def _replace_the_dead(self, respawn: bool) -> list[tuple[int, int]]:
        bad = []
        for pid, (p, _log, err) in list(self.procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del self.procs[pid]
            err.close()
            if rc == -signal.SIGKILL:
                if respawn:
                    self.spawn()
            elif rc != 0:
                bad.append((pid, rc))
        return bad

    def kill_all(self) -> None:
        with self.lock:
            self._kill_all()

    def _kill_all(self) -> None:
        for p, _log, err in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            err.close()
        self.procs.clear()


class Chaos(threading.Thread):
    """SIGKILLs the agent group and the broker at random moments; starts a new broker after each."""

    def __init__(self, start_broker: Callable[[], BrokerProcess], first: BrokerProcess, stats_path: Path,
                 stop_at: float, rng: random.Random, fleet: Fleet) -> None:
        super().__init__(daemon=True)
        self.start_broker = start_broker
        self.fleet = fleet
        self.broker = first
        self.stats_path = stats_path
        self.stop_at = stop_at
        self.rng = rng
        self.stop = threading.Event()
        # The last third of the run keeps one broker, under the same load and agent kills: one
        # long life in which to see its memory stay flat.
        self.last_broker_kill_at = stop_at - SOAK_S / 3
        self.agent_kills = 0
        self.broker_kills = 0
        self.counters: Counter[str] = Counter()
        self.sim_snapshots: list[dict[str, int]] = []
        self.rss: dict[int, list[tuple[float, int]]] = {first.pid: []}
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def _snapshot(self) -> None:
        # The stats file is rewritten by whichever sim process runs now: read it before killing one.
        self.sim_snapshots.append(sim_stats(self.stats_path))

    def _record(self) -> Any:
        snap = self.broker.snapshot()
        return snap.record if snap is not None and snap.record.broker_pid == self.broker.pid else None

    def run(self) -> None:
        try:
            next_broker_kill = time.monotonic() + self.rng.uniform(6, 14)
            next_agent_kill = time.monotonic() + self.rng.uniform(1.5, 5)
            next_client_kill = time.monotonic() + self.rng.uniform(1, 4)
            while not self.stop.is_set() and time.monotonic() < self.stop_at - 2:
                now = time.monotonic()
                with self.lock:
                    self.rss.setdefault(self.broker.pid, []).append((now, vm_rss_kib(self.broker.pid)))
                if now >= next_broker_kill and now < self.last_broker_kill_at:
                    self._kill_broker()
                    next_broker_kill = time.monotonic() + self.rng.uniform(6, 14)
                elif now >= next_agent_kill:
                    rec = self._record()
                    if rec is not None and rec.agent_pid and rec.agent_state == "up":
                        self._snapshot()
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(rec.agent_pid, signal.SIGKILL)
                        self.agent_kills += 1
                    next_agent_kill = time.monotonic() + self.rng.uniform(1.5, 5)
                elif now >= next_client_kill:
                    self.fleet.kill_one(self.rng)
                    next_client_kill = time.monotonic() + self.rng.uniform(1, 4)
                self.stop.wait(0.25)  # sampling period of the RSS and the chaos clock
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _kill_broker(self) -> None:
        rec = self._record()
        if rec is not None:
            self.counters.update(rec.counters)
        self._snapshot()
        self.broker.kill()
        self.broker_kills += 1
        if self.rng.random() < 0.7:
            self.fleet.kill_one(self.rng)  # a client that dies while no broker runs: nobody watches it
        with self.lock:
            self.broker = self.start_broker()
            self.rss[self.broker.pid] = []

    def final_counters(self) -> Counter[str]:
        rec = self._record()
        total = Counter(self.counters)
        if rec is not None:
            total.update(rec.counters)
        return total


def _read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _flat(samples: list[tuple[float, int]]) -> tuple[int, int] | None:
    """(baseline, end) RSS of one broker's life, or None when it lived too short to judge."""
    if len(samples) < 12 or samples[-1][0] - samples[0][0] < 5:
        return None
    t0 = samples[0][0]
    warm = [kib for t, kib in samples if t - t0 >= 2.0 and kib]
    if len(warm) < 8:
        return None
    return int(statistics.median(warm[: len(warm) // 3])), max(warm[-3:])


@pytest.mark.xdist_group("many_queues")  # the system-wide count of queues (256) is shared
@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_S) + 300)
def test_soak(broker_factory, session_name, tmp_path):
    rng = random.Random(SEED)
    stamp = tmp_path / "sim-stamps.tsv"
    stats_path = tmp_path / "sim-stats.json"
    agent_args = (f"--stamp-file={stamp}", f"--stats-file={stats_path}")
    extra = ("--drain-timeout-s=2", "--lease-idle-s=3", "--model-timeout-s=5")

    def start_broker() -> BrokerProcess:
        return broker_factory(agent_args=agent_args, extra_args=extra)

    first = start_broker()
    home = Path(first.env["HOME"])
    t_start = time.monotonic()
    stop_at = t_start + SOAK_S
    fleet = Fleet(session_name, tmp_path, stop_at, rng)
    chaos = Chaos(start_broker, first, stats_path, stop_at, random.Random(rng.getrandbits(64)), fleet)
    abnormal: list[tuple[int, int]] = []
    try:
        for _ in range(CLIENTS):
            fleet.spawn()
        chaos.start()
        # Until the end, replace clients that killed themselves; then let the rest finish their last request.
        while time.monotonic() < stop_at + 120 and fleet.procs:
            abnormal += fleet.replace_the_dead(respawn=time.monotonic() < stop_at - 5)
            chaos.join(0.05)  # the monitor's polling period (also notices a chaos thread that failed)
            if chaos.error is not None:
                raise chaos.error
        chaos.stop.set()
        chaos.join(30)
        left_running = len(fleet.procs)
    finally:
        chaos.stop.set()
        fleet.kill_all()
    counters = chaos.final_counters()
    broker = chaos.broker
    chaos.sim_snapshots.append(sim_stats(stats_path))
    assert broker.stop() == 0, broker.log_text()[-3000:]
    elapsed = time.monotonic() - t_start

    # ---- per-request accounting, from every client's own log
    statuses: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    problems: list[str] = []
    requests = died = completed_clients = dup_frames = preempted_reruns = 0
    for p, log in fleet.all:
        lines = _read_log(log)
        killed = p.returncode == -signal.SIGKILL
        died += killed
        subs = {o["req"]: o for o in lines if o.get("ev") == "sub"}
        ress = [o for o in lines if o.get("ev") == "res"]
        exits = [o for o in lines if o.get("ev") == "exit"]
        requests += len(subs)
        problems += [f"{log.name}: {o}" for o in lines if o.get("ev") in ("violation", "op_error")]
        by_req = Counter(o["req"] for o in ress)
        for o in ress:
            status = o["status"] + (f":{o['code']}" if o["status"] == "error" else "")
            statuses[status] += 1
            ops[subs.get(o["req"], {}).get("op", "?")] += 1
            preempted_reruns += o.get("preemptions", 0)
            if o["wrong"]:
                problems.append(f"{log.name}: events of another turn in {o['req']}: {o['wrong'][:3]}")
            if status not in ALLOWED:
                problems.append(f"{log.name}: {o['req']} ended {status}")
        problems += [f"{log.name}: {r} got {n} results" for r, n in by_req.items() if n > 1]
        if killed:
            continue
        if p.returncode != 0 or not exits:
            problems.append(f"{log.name}: exited {p.returncode} without its summary")
            continue
        completed_clients += 1
        missing = [r for r in subs if r not in by_req]
        problems += [f"{log.name}: no result for {r} ({subs[r]['op']})" for r in missing]
        for r, seen in exits[-1]["terminal"].items():
            if len(seen) > 1:
                dup_frames += 1
                if len(set(seen)) > 1:
                    problems.append(f"{log.name}: {r} got different terminal frames {seen}")

    # ---- what reached the agents
    kinds = Counter(line.split("\t")[1] for line in stamp.read_text().splitlines() if line.count("\t") >= 2)
    while_running = sum(s.get("user_messages_while_running", 0) for s in chaos.sim_snapshots)
    sim_malformed = sum(s.get("malformed_lines", 0) for s in chaos.sim_snapshots)

    # ---- broker memory
    rss_lives = {pid: _flat(samples) for pid, samples in chaos.rss.items()}
    judged = {pid: v for pid, v in rss_lives.items() if v is not None}
    max_rss = max((kib for samples in chaos.rss.values() for _t, kib in samples), default=0)

    print(
        f"\nSOAK {elapsed:.0f} s (TURNSTILE_SOAK_S={SOAK_S:g}), seed {SEED}: "
        f"{fleet.n} client processes ({CLIENTS} at once, {died} SIGKILLed: {fleet.killed_by_chaos} by the chaos, "
        f"the rest by themselves; {completed_clients} finished), "
        f"{requests} requests, results {dict(statuses)}, ops {dict(ops)}, {preempted_reruns} preempted reruns, "
        f"{dup_frames} identical duplicate result frames; chaos: {chaos.agent_kills} agent SIGKILLs, "
        f"{chaos.broker_kills} broker SIGKILLs; broker counters: turns {counters['turns']}, preempts "
        f"{counters['preempts']}, cancels {counters['cancels']}, agent_restarts {counters['agent_restarts']}, "
        f"model_switches {counters['model_switches']}, client_deaths {counters['client_deaths']}, "
        f"rejected_frames {counters['rejected_frames']}; agent stdin lines {dict(kinds)}; "
        f"broker RSS max {max_rss} KiB, per life (start, end) KiB {list(judged.values())}"
    )
    assert not abnormal, "client processes crashed:\n" + "\n".join(
        f"pid {pid} rc {rc}: {fleet.stderr_of(pid)[-1500:]}" for pid, rc in abnormal[:5]
    )
    assert left_running == 0, "client processes did not finish"
    assert not problems, "\n".join(problems[:40])
    assert requests > 0 and statuses["ok"] > 0
    assert kinds["malformed"] == 0 and sim_malformed == 0, "a malformed line reached the agent"
    assert while_running == 0, "a user message reached the agent while a turn ran"
    assert chaos.agent_kills > 0 and (chaos.broker_kills > 0 or SOAK_S < 15)
    for pid, (base, end) in judged.items():
        assert end - base < RSS_GROWTH_KIB, f"broker {pid} grew from {base} to {end} KiB"
    # ---- nothing left behind
    wait_until(lambda: not procs_with_home(home), timeout_s=10, what=f"no process left (now {procs_with_home(home)})")
    assert session_objects(session_name) == [], f"IPC objects left: {session_objects(session_name)}"
