"""turnstile's scenarios with the simulated agent: preempt, handoff, per-turn overhead, throughput, scale, start-up.

Every scenario runs a real broker process (``turnstile serve``) whose agent is
the stamped sim (:mod:`benchmarks.stamped_sim`). Times on both sides are
``perf_counter_ns`` (CLOCK_MONOTONIC), so a client's stamp before it sends and
the sim's stamp when it reads a line are directly comparable. The broker's own
figures (``last_preempt_signal_us``, ``last_handoff_us``,
``last_submit_to_write_us`` in the state block) are read after each iteration,
once the state block shows that iteration's counters.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks import harness
from benchmarks.harness import StampReader, StateView, Workspace, first, workspace
from benchmarks.stats import Results, summarize
from broker import protocol
from clients import AsyncClient, Client

#: The worker's long turn: one assistant line every 2 ms for 4 s (it is always preempted long before).
WORKER_PROMPT = "[sim:turn_ms=4000][sim:chunks=2000] long worker turn"
#: The webhook's turn: answered at once (system/init, one assistant line, result).
HOOK_PROMPT = "urgent webhook"
PING_PROMPT = "ping"

Progress = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


# ---------------------------------------------------------------- preempt + handoff


@dataclass
class PreemptSamples:
    """What one preempt loop measured, per iteration."""

    preempt_ns: list[int] = field(default_factory=list)  # webhook submit → interrupt read by the sim
    handoff_ns: list[int] = field(default_factory=list)  # preempted result written → webhook message read by the sim
    broker_preempt_us: list[int] = field(default_factory=list)  # frame read → interrupt written (broker)
    broker_handoff_us: list[int] = field(default_factory=list)  # result read → webhook message written (broker)
    webhook_ns: list[int] = field(default_factory=list)  # webhook submit → its user message read by the sim


class PreemptRig:
    """A broker with a worker and a webhook client attached, ready to run preempt iterations."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.stamp_file = ws.path("stamps")
        self.broker = ws.start_broker(self.stamp_file)
        self.stamps = StampReader(self.stamp_file)
        self.state = StateView(ws.session)
        # on_preempt="return": the preempted worker request ends as "preempted" and the next
        # iteration submits a fresh one, so nothing runs after the webhook and the broker's
        # last_handoff_us is the preempted → webhook handoff, not webhook → worker.
        self.worker = Client(ws.session, "worker", on_preempt="return")
        self.hook = Client(ws.session, "webhook")
        self.rng = random.Random(1)

    def clients_connected(self) -> int:
        """Clients the broker counts now."""
        return int(self.state.record().clients)

    def run(self, n: int, warmup: int, progress: Progress = _quiet, what: str = "preempt") -> PreemptSamples:
        """Run ``warmup + n`` preemptions; return the last ``n``."""
        out = PreemptSamples()
        rec0 = self.state.record()
        ok0 = rec0.counters["results_ok"]
        pre0 = rec0.counters["results_preempted"]
        self.stamps.read_new()
        pc = time.perf_counter_ns
        for i in range(warmup + n):
            wt = self.worker.prompt(WORKER_PROMPT)
            # Wait until the worker's turn streams (its first assistant line reached us): the
            # sim is then idle in select() between lines, as an agent waiting on the API is.
            for ev in wt.events(timeout_s=30):
                if ev.get("type") == "assistant":
                    break
            # A random phase against the worker's 2 ms line cadence.
            time.sleep(self.rng.random() * 0.002)
            t0 = pc()
            ht = self.hook.prompt(HOOK_PROMPT)
            hr = ht.result(timeout_s=30)
            wr = wt.result(timeout_s=30)
            if hr.status != "ok" or wr.status != "preempted":
                raise RuntimeError(f"iteration {i}: webhook {hr.status}, worker {wr.status} (expected ok, preempted)")
            rec = self.state.wait(
                lambda r, k=i: r.counters["results_ok"] >= ok0 + k + 1
                and r.counters["results_preempted"] >= pre0 + k + 1 and r.turn_state == "idle",
                10, "the iteration's counters in the state block",
            )
            st = self.stamps.read_new()
            t_int = first(st, "control_request", t0, "interrupt")
            t_res = first(st, "result_written", t_int.t_ns if t_int else t0)
            t_user = first(st, "user", t_res.t_ns if t_res else t0)
            if t_int is None or t_res is None or t_user is None:
                raise RuntimeError(f"iteration {i}: missing stamps {[(s.kind, s.detail) for s in st]}")
            if i < warmup:
                continue
            out.preempt_ns.append(t_int.t_ns - t0)
            out.handoff_ns.append(t_user.t_ns - t_res.t_ns)
            out.webhook_ns.append(t_user.t_ns - t0)
            out.broker_preempt_us.append(rec.latencies["last_preempt_signal_us"])
            out.broker_handoff_us.append(rec.latencies["last_handoff_us"])
            if (i + 1) % 1000 == 0:
                progress(f"{what}: {i + 1 - warmup}/{n}")
        return out

    def close(self) -> None:
        """Disconnect the clients."""
        self.worker.close()
        self.hook.close()
        self.stamps.close()
        self.state.close()


def preempt(res: Results, n: int, warmup: int, progress: Progress = _quiet) -> None:
    """Webhook submit → interrupt read by the agent, and the handoff after it, while a worker turn streams."""
    with workspace("preempt") as ws:
        rig = PreemptRig(ws)
        try:
            s = rig.run(n, warmup, progress)
        finally:
            rig.close()
    res.add_latency("preempt.turnstile", "Preempt signal: webhook submit → interrupt read by agent", s.preempt_ns)
    res.add_latency("preempt.turnstile_broker", "  broker-internal: frame read → interrupt written",
                    [x * 1000 for x in s.broker_preempt_us], note="state block last_preempt_signal_us (µs resolution)")
    res.add_latency("handoff.turnstile", "Handoff: preempted result written → webhook msg read by agent", s.handoff_ns)
    res.add_latency("handoff.turnstile_broker", "  broker-internal: result read → webhook msg written",
                    [x * 1000 for x in s.broker_handoff_us], note="state block last_handoff_us (µs resolution)")
    res.add_latency("preempt.turnstile_webhook", "Webhook submit → its prompt read by agent (preempting)",
                    s.webhook_ns)


# ---------------------------------------------------------------- per-turn overhead


def per_turn(res: Results, n: int, warmup: int, progress: Progress = _quiet) -> None:
    """Submit → user message read by the agent, and result written → client holding its TurnResult.

    Against a client that writes the same user message to the agent's stdin
    pipe itself and parses every stdout line until the result (the direct-pipe
    baseline, same stamped sim).
    """
    sub: list[int] = []
    ret: list[int] = []
    tot: list[int] = []
    broker_us: list[int] = []
    pc = time.perf_counter_ns
    with workspace("perturn") as ws:
        stamp_file = ws.path("stamps")
        ws.start_broker(stamp_file)
        stamps = StampReader(stamp_file)
        sv = StateView(ws.session)
        c = Client(ws.session, "webhook")
        try:
            turns0 = sv.record().counters["turns"]
            for i in range(warmup + n):
                t0 = pc()
                turn = c.prompt(PING_PROMPT)
                r = turn.result(timeout_s=30)
                t1 = pc()
                if r.status != "ok":
                    raise RuntimeError(f"turn {i}: {r.status} {r.error}")
                u, seen = stamps.wait_for(lambda s: s.kind == "result_written", 10, "result stamp")
                t_user = first(seen, "user", t0)
                if t_user is None:
                    raise RuntimeError(f"turn {i}: no user stamp")
                rec = sv.record()
                if i < warmup:
                    continue
                sub.append(t_user.t_ns - t0)
                ret.append(t1 - u.t_ns)
                tot.append(t1 - t0)
                if rec.counters["turns"] == turns0 + i + 1:
                    broker_us.append(rec.latencies["last_submit_to_write_us"])
                if (i + 1) % 2000 == 0:
                    progress(f"per-turn (turnstile): {i + 1 - warmup}/{n}")
        finally:
            c.close()
            stamps.close()
            sv.close()
        d_sub, d_ret, d_tot = _direct_pipe(ws, n, warmup, progress)
    res.add_latency("turn.submit_turnstile", "Per turn: submit → user msg read by agent (turnstile)", sub)
    res.add_latency("turn.submit_direct", "Per turn: write to agent stdin → read (direct pipe)", d_sub)
    res.add_latency("turn.submit_broker", "  broker-internal: frame read → user msg written",
                    [x * 1000 for x in broker_us], note="state block last_submit_to_write_us")
    res.add_latency("turn.return_turnstile", "Per turn: result written → client holds TurnResult (turnstile)", ret)
    res.add_latency("turn.return_direct", "Per turn: result written → result parsed (direct pipe)", d_ret)
    res.add_latency("turn.total_turnstile", "Per turn: whole short turn, submit → TurnResult (turnstile)", tot)
    res.add_latency("turn.total_direct", "Per turn: whole short turn (direct pipe)", d_tot)


def _direct_pipe(ws: Workspace, n: int, warmup: int, progress: Progress) -> tuple[list[int], list[int], list[int]]:
    """The baseline: this process owns the agent's pipes and writes user messages itself."""
    stamp_file = ws.path("stamps-direct")
    p = ws.spawn(harness.sim_argv(stamp_file, ws.dir / "sim-direct"), stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    stamps = StampReader(stamp_file)
    reader = _LineReader(p.stdout.fileno())
    wfd = p.stdin.fileno()
    sub: list[int] = []
    ret: list[int] = []
    tot: list[int] = []
    pc = time.perf_counter_ns
    try:
        for i in range(warmup + n):
            line = protocol.user_message(PING_PROMPT, str(uuidlib.uuid4()))
            t0 = pc()
            harness_write(wfd, line)
            events = []
            while True:
                raw = reader.next_line()
                obj = json.loads(raw)
                events.append(obj)
                if obj.get("type") == "result":
                    break
            t1 = pc()
            u, seen = stamps.wait_for(lambda s: s.kind == "result_written", 10, "result stamp")
            t_user = first(seen, "user", t0)
            if t_user is None:
                raise RuntimeError(f"direct turn {i}: no user stamp")
            if i < warmup:
                continue
            sub.append(t_user.t_ns - t0)
            ret.append(t1 - u.t_ns)
            tot.append(t1 - t0)
            if (i + 1) % 2000 == 0:
                progress(f"per-turn (direct pipe): {i + 1 - warmup}/{n}")
    finally:
        stamps.close()
        p.stdin.close()
        p.wait(10)
    return sub, ret, tot


def harness_write(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking fd."""
    import os

    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _LineReader:
    """Blocking line reader over a raw fd (no Python-level buffering surprises)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.pos = 0

    def next_line(self) -> bytes:
        import os

        while True:
            nl = self.buf.find(b"\n", self.pos)
            if nl >= 0:
                line = bytes(self.buf[self.pos:nl])
                self.pos = nl + 1
                if self.pos > 1 << 20:
                    del self.buf[:self.pos]
                    self.pos = 0
                return line
            data = os.read(self.fd, 1 << 20)
            if not data:
                raise EOFError("agent closed stdout")
            self.buf += data


# ---------------------------------------------------------------- throughput


def _read_alone(ws: Workspace, prompt: str, reps: int) -> list[dict[str, Any]]:
    """The broker's read path alone (AgentProcess + protocol.parse, nobody listening): one dict per rep."""
    argv = harness.sim_argv(ws.path("stamps-ra"), ws.dir / "sim-ra")
    p = ws.spawn([sys.executable, "-m", "benchmarks.children", "read-alone", str(reps), prompt, *argv],
                 stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"read-alone exited {p.returncode}")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _mbps(nbytes: int, ns: int) -> float:
    return nbytes / (ns / 1e9) / 1e6


def throughput(res: Results, total_bytes: int, reps: int, huge_bytes: int, n_clients: int,
               progress: Progress = _quiet) -> None:
    """MB/s of agent output delivered to clients, against the broker reading it with nobody listening.

    Each shape is timed from the prompt's submission to the client holding
    the TurnResult with every event parsed (read-alone: from the user
    message's write to the result line parsed); the best of ``reps`` turns.
    """
    line_text = 1024
    shapes = {
        "lines": (f"[sim:bytes={total_bytes}][sim:chunks={total_bytes // line_text}] throughput",
                  "1 KiB-text lines"),
        "huge": (f"[sim:huge={huge_bytes}] throughput", f"one {huge_bytes / (1 << 20):g} MiB line"),
    }
    per_client_bytes = total_bytes // n_clients
    many_prompt = f"[sim:bytes={per_client_bytes}][sim:chunks={max(1, per_client_bytes // line_text)}] throughput"
    with workspace("tput") as ws:
        alone: dict[str, float] = {}
        sizes: dict[str, int] = {}
        for shape, prompt in (*((k, v[0]) for k, v in shapes.items()), ("many", many_prompt)):
            runs = _read_alone(ws, prompt, reps + 1)[1:]  # the first rep warms up
            sizes[shape] = runs[0]["bytes"]
            alone[shape] = max(_mbps(r["bytes"], r["t1"] - r["t0"]) for r in runs)
            progress(f"throughput: read-alone {shape} {alone[shape]:.0f} MB/s ({sizes[shape]} B/turn)")
        stamp_file = ws.path("stamps")
        ws.start_broker(stamp_file)
        sv = StateView(ws.session)
        for shape, (prompt, what) in shapes.items():
            res.add_scalar(f"tput.read_alone_{shape}", f"Throughput, broker read path alone, {what}", alone[shape],
                           "MB/s", f"{sizes[shape]} bytes of agent stdout per turn")
            try:
                best = _one_client(ws.session, prompt, sizes[shape], reps)
            except Exception as exc:
                res.errors[f"throughput.{shape}"] = f"{type(exc).__name__}: {exc}"
                continue
            res.add_scalar(f"tput.one_client_{shape}", f"Throughput to 1 client, {what}", best, "MB/s")
            res.add_scalar(f"tput.one_client_{shape}_ratio", "  ratio to read-alone", best / alone[shape], "×")
            progress(f"throughput: one client {shape} {best:.0f} MB/s")
        res.add_scalar("tput.read_alone_many", f"Throughput, read path alone, one of the {n_clients} turns below",
                       alone["many"], "MB/s", f"{sizes['many']} bytes per turn")
        many = max(asyncio.run(_many_clients(ws.session, n_clients, many_prompt, sizes["many"])) for _ in range(reps))
        progress(f"throughput: {n_clients} clients {many:.0f} MB/s")
        res.add_scalar(f"tput.clients_{n_clients}", f"Throughput to {n_clients} clients (one turn each, aggregate)",
                       many, "MB/s", f"{sizes['many']} bytes per client turn")
        res.add_scalar(f"tput.clients_{n_clients}_ratio", "  ratio to read-alone", many / alone["many"], "×")
        res.add_scalar("tput.clients_failed_slow", "Clients the broker failed as too slow (throughput)",
                       sv.record().counters["clients_failed_slow"], "count")
        sv.close()


def _one_client(session: str, prompt: str, nbytes: int, reps: int) -> float:
    best = 0.0
    with Client(session, "worker") as c:
        for _ in range(reps + 1):
            t0 = time.perf_counter_ns()
            turn = c.prompt(prompt)
            nev = sum(1 for _ in turn.events(timeout_s=300))
            r = turn.result(timeout_s=300)
            t1 = time.perf_counter_ns()
            if r.status != "ok" or nev < 2:
                raise RuntimeError(f"throughput turn: {r.status} {r.error_code} {r.error}")
            best = max(best, _mbps(nbytes, t1 - t0))
    return best


async def _many_clients(session: str, n: int, prompt: str, nbytes: int) -> float:
    clients = [await AsyncClient(session, "worker").connect() for _ in range(n)]
    try:
        t0 = time.perf_counter_ns()
        turns = [c.prompt(prompt) for c in clients]

        async def consume(t: Any) -> None:
            async for _ in t.events(timeout_s=300):
                pass
            r = await t.result(timeout_s=300)
            if r.status != "ok":
                raise RuntimeError(f"throughput turn: {r.status} {r.error_code}")

        await asyncio.gather(*(consume(t) for t in turns))
        t1 = time.perf_counter_ns()
    finally:
        for c in clients:
            await c.close()
    return _mbps(nbytes * n, t1 - t0)


# ---------------------------------------------------------------- scale


def scale(res: Results, points: list[int], n: int, warmup: int, progress: Progress = _quiet, *,
          fill: int = 1100) -> None:
    """The preempt figure with 2…200 clients connected, and the broker's RSS per idle client.

    The two measuring clients count as connected; the rest are idle
    :class:`clients.Client` objects held by separate processes.
    """
    series: list[dict[str, Any]] = []
    with workspace("scale") as ws:
        rig = PreemptRig(ws)
        holders: list[subprocess.Popen[str]] = []
        try:
            # Fill the broker's per-request caches (1024 remembered results) before the first RSS
            # reading, so the growth measured is the clients', not the caches'.
            for _ in range(fill):
                t = rig.hook.prompt(PING_PROMPT)
                t.result(timeout_s=30)
            connected = rig.clients_connected()
            rss0 = None
            for target in points:
                need = target - connected
                while need > 0:
                    k = min(need, 50)
                    p = ws.spawn([sys.executable, "-m", "benchmarks.children", "idle-clients", ws.session, str(k)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    holders.append(p)
                    assert p.stdout is not None
                    if p.stdout.readline().strip() != "ready":
                        raise RuntimeError("idle-client holder failed")
                    need -= k
                    connected += k
                want = max(target, 2)
                rig.state.wait(lambda r, t=want: r.clients >= t, 30, f"{target} clients connected")
                connected = rig.clients_connected()
                rss = harness.rss_kib(rig.broker.pid)
                if rss0 is None:
                    rss0 = rss
                s = rig.run(n, warmup, progress, what=f"scale {connected} clients")
                sp, sh = summarize(s.preempt_ns), summarize(s.handoff_ns)
                bp = summarize([x * 1000 for x in s.broker_preempt_us])
                series.append({"clients": connected, "preempt": sp.as_dict(), "handoff": sh.as_dict(),
                               "broker_preempt": bp.as_dict(), "rss_kib": rss})
                res.add_latency(f"scale.preempt_{connected}", f"Preempt signal, {connected} clients connected",
                                s.preempt_ns)
                progress(f"scale: {connected} clients: preempt p50 {sp.p50:.0f} µs p99 {sp.p99:.0f} µs, "
                         f"RSS {rss['VmRSS']} KiB")
        finally:
            for p in holders:
                if p.stdin is not None:
                    p.stdin.close()
            for p in holders:
                p.wait(10)
            rig.close()
    res.series["scale"] = series
    first_pt, last_pt = series[0], series[-1]
    added = last_pt["clients"] - first_pt["clients"]
    if added > 0:
        for part in ("VmRSS", "RssAnon", "RssShmem"):
            delta = last_pt["rss_kib"].get(part, 0) - first_pt["rss_kib"].get(part, 0)
            res.add_scalar(f"scale.rss_per_client_{part}", f"Broker {part} per idle client "
                           f"({first_pt['clients']} → {last_pt['clients']} clients)", delta / added, "KiB")


# ---------------------------------------------------------------- CLI start-up


def startup(res: Results, n: int, warmup: int, progress: Progress = _quiet) -> None:
    """``turnstile prompt`` process start → its prompt read by the agent (an upper bound for 'on the queue')."""
    from pathlib import Path

    exe = Path(sys.executable).parent / "turnstile"
    argv0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "broker.cli"]
    to_agent: list[int] = []
    to_broker: list[int] = []
    whole: list[int] = []
    with workspace("startup") as ws:
        stamp_file = ws.path("stamps")
        ws.start_broker(stamp_file)
        stamps = StampReader(stamp_file)
        sv = StateView(ws.session)
        env = harness.child_env({"TURNSTILE_SESSION": ws.session})
        try:
            for i in range(warmup + n):
                turns0 = sv.record().counters["turns"]
                t0 = time.perf_counter_ns()
                p = subprocess.Popen([*argv0, "prompt", "--kind", "webhook", f"start-up {i}"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(ws.home))
                _, err = p.communicate(timeout=60)
                t1 = time.perf_counter_ns()
                if p.returncode != 0:
                    raise RuntimeError(f"turnstile prompt exited {p.returncode}: {err.decode()[-500:]}")
                u, _seen = stamps.wait_for(lambda s, t=t0: s.kind == "user" and s.t_ns >= t, 10, "user stamp")
                rec = sv.wait(lambda r, k=turns0: r.counters["turns"] >= k + 1, 10, "turn counted")
                if i < warmup:
                    continue
                to_agent.append(u.t_ns - t0)
                # Minus the broker's frame read → user written and the pipe hop (the floor's median):
                # when the frame came off the queue.
                to_broker.append(u.t_ns - t0 - rec.latencies["last_submit_to_write_us"] * 1000)
                whole.append(t1 - t0)
        finally:
            stamps.close()
            sv.close()
    res.add_latency("startup.to_agent", "CLI start-up: `turnstile prompt` spawn → prompt read by agent", to_agent)
    res.add_latency("startup.to_queue", "CLI start-up: spawn → frame taken off the queue by the broker", to_broker,
                    note="agent read time minus the broker's own frame read → user written")
    res.add_latency("startup.whole", "CLI start-up: whole `turnstile prompt` run (exit)", whole)
