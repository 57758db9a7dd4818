"""IPC micro-benchmarks: frame codec, request-queue latency, mailbox latency and throughput.

Run from the project root::

    python -m benchmarks.ipc_micro [--samples N] [--json PATH]

Every latency row is a distribution over ``--samples`` measurements taken after
a warm-up, reported as p50 / p99 / p99.9 / max. Cross-process latencies are
``time.perf_counter_ns`` differences: CLOCK_MONOTONIC is one clock for every
process on the machine, so a stamp taken by the sender and a reading taken by
the receiver compare directly. Every IPC name is unique to the run and removed
at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import secrets
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.stats import percentile
from ipc import frames, mailbox, names, rqueue, sweep

#: Where a run writes (git-ignored); ``--json benchmarks/results/ipc_micro.json`` refreshes the committed copy.
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "ipc_micro.json")

#: Every row the benchmark reports, in table order.
ROWS = (
    "frame_encode_prompt",
    "frame_decode_prompt",
    "frame_encode_event",
    "frame_decode_event",
    "rq_one_way",
    "rq_round_trip",
    "mailbox_one_way",
    "mailbox_throughput_4k",
    "mailbox_throughput_64k",
)

_STAMP = struct.Struct("<qQ")  # perf_counter_ns at send, sequence number
_SPAWN = multiprocessing.get_context("spawn")
_CODEC_BATCH = 16  # operations per codec sample: keeps the clock's own cost out of the figure


@dataclass
class Row:
    """One line of the table."""

    name: str
    unit: str
    samples: int
    p50: float | None = None
    p99: float | None = None
    p999: float | None = None
    max: float | None = None
    mean: float | None = None
    value: float | None = None  # throughput rows
    extra: dict[str, Any] = field(default_factory=dict)


def distribution(name: str, unit: str, values: list[float], **extra: Any) -> Row:
    """A latency row from raw samples."""
    s = sorted(values)
    return Row(
        name=name, unit=unit, samples=len(s), p50=percentile(s, 0.50), p99=percentile(s, 0.99),
        p999=percentile(s, 0.999), max=s[-1], mean=sum(s) / len(s), extra=extra,
    )


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Keep the cyclic collector's pauses out of a timed loop."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------- frame codec


def bench_codec(samples: int, warmup: int) -> list[Row]:
    """ns per encode and per decode of a typical Prompt and Event."""
    client = names.new_client_id()
    prompt = frames.Prompt(
        client=client, req="req-000123", kind="webhook", model="claude-sonnet-4-5",
        content="Summarise the failing CI job and propose a fix. " * 8,
    )
    event = frames.Event(
        client=client, req="req-000123", turn=42,
        data=b'{"type":"assistant","message":{"content":[{"type":"text","text":"' + b"x" * 400 + b'"}]}}',
    )
    rows = []
    for label, frame, decode in (("prompt", prompt, frames.decode_request), ("event", event, frames.decode_reply)):
        data = frames.encode(frame)
        assert decode(data) == frame
        for op, fn in (("encode", lambda f=frame: frames.encode(f)), ("decode", lambda d=data, dec=decode: dec(d))):
            per_op = _time_batches(fn, samples, warmup)
            rows.append(distribution(f"frame_{op}_{label}", "ns/op", per_op, frame_bytes=len(data)))
    return rows


def _time_batches(fn: Callable[[], object], samples: int, warmup: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    batch = range(_CODEC_BATCH)
    with no_gc():
        for i in range(warmup + samples):
            t0 = clock()
            for _ in batch:
                fn()
            t1 = clock()
            if i >= warmup:
                out.append((t1 - t0) / _CODEC_BATCH)
    return out


# ---------------------------------------------------------------- children


Conn = multiprocessing.connection.Connection


@contextlib.contextmanager
def _child(target: Callable[..., Any], *args: Any) -> Iterator[Conn]:
    """Run ``target(conn, *args)`` in a spawned process; kill it by pid if it outlives the block."""
    parent, child = _SPAWN.Pipe()
    proc = _SPAWN.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    try:
        yield parent
        proc.join(60)
    finally:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        proc.close()
        parent.close()


def _expect(conn: Conn, timeout_s: float = 60.0) -> Any:
    if not conn.poll(timeout_s):
        raise RuntimeError("benchmark child did not answer")
    tag, value = conn.recv()
    if tag == "error":
        raise RuntimeError(f"benchmark child failed: {value}")
    return value


def _guard(conn: Conn, fn: Callable[[], Any]) -> None:
    try:
        value = fn()
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("ok", value))


# ---------------------------------------------------------------- request queue


def _rq_echo(conn: Conn, ping_session: str, pong_session: str, total: int) -> None:
    """Receive each ping, note its one-way latency, answer on the pong queue."""

    def run() -> list[int]:
        ping = rqueue.RequestQueue.open(ping_session)
        pong = rqueue.RequestQueue.open(pong_session)
        one_way = []
        clock = time.perf_counter_ns
        conn.send(("ok", "ready"))
        with no_gc():
            for _ in range(total):
                got = ping.receive(30.0)
                now = clock()
                if got is None:
                    raise RuntimeError("ping lost")
                stamp, seq = _STAMP.unpack_from(got[0])
                one_way.append(now - stamp)
                pong.send_bytes(_STAMP.pack(clock(), seq), 0, timeout_s=30.0)
        ping.close()
        pong.close()
        return one_way

    _guard(conn, run)


def bench_request_queue(samples: int, warmup: int, sessions: list[str]) -> list[Row]:
    """One-way and round-trip latency over the session request queue, between two processes."""
    ping_session, pong_session = _session(sessions), _session(sessions)
    ping = rqueue.RequestQueue.create(ping_session)  # full size, as a broker makes it
    pong = rqueue.RequestQueue.create(pong_session, max_message_bytes=64)
    total = warmup + samples
    rtt = []
    payload_pad = bytes(64)  # a small control frame's size
    try:
        with _child(_rq_echo, ping_session, pong_session, total) as conn:
            _expect(conn)
            clock = time.perf_counter_ns
            with no_gc():
                for seq in range(total):
                    t0 = clock()
                    ping.send_bytes(_STAMP.pack(t0, seq) + payload_pad, frames.PRIORITY_CONTROL, timeout_s=30.0)
                    got = pong.receive(30.0)
                    t1 = clock()
                    if got is None or _STAMP.unpack_from(got[0])[1] != seq:
                        raise RuntimeError("pong lost or out of order")
                    rtt.append(t1 - t0)
            one_way = _expect(conn)
    finally:
        for q in (ping, pong):
            q.close()
            q.unlink()
    return [
        distribution("rq_one_way", "us", [v / 1000 for v in one_way[warmup:]], message_bytes=_STAMP.size + 64),
        distribution("rq_round_trip", "us", [v / 1000 for v in rtt[warmup:]], message_bytes=_STAMP.size + 64),
    ]


# ---------------------------------------------------------------- mailbox


def _mailbox_pinger(conn: Conn, session: str, client: str, ack_session: str, total: int) -> None:
    """Broker side: stamp, send, wait for the reader's ack; repeat."""

    def run() -> None:
        w = mailbox.MailboxWriter(session, client)
        ack = rqueue.RequestQueue.open(ack_session)
        clock = time.perf_counter_ns
        pad = bytes(64)
        conn.send(("ok", "ready"))
        with no_gc():
            for seq in range(total):
                w.send(_STAMP.pack(clock(), seq) + pad)
                if ack.receive(30.0) is None:
                    raise RuntimeError("ack lost")
        w.close()
        ack.close()

    _guard(conn, run)


def bench_mailbox_latency(samples: int, warmup: int, sessions: list[str]) -> Row:
    """Broker → client one-way latency: the client blocks on the doorbell."""
    session, ack_session = _session(sessions), _session(sessions)
    client = names.new_client_id()
    box = mailbox.MailboxReader(session, client)
    ack = rqueue.RequestQueue.create(ack_session, max_message_bytes=64)
    total = warmup + samples
    lat = []
    try:
        with _child(_mailbox_pinger, session, client, ack_session, total) as conn:
            _expect(conn)
            clock = time.perf_counter_ns
            with no_gc():
                got = 0
                while got < total:
                    if not box.wait(30.0):
                        raise RuntimeError("doorbell never rang")
                    batch = box.read_frames()
                    now = clock()
                    for f in batch:
                        lat.append(now - _STAMP.unpack_from(f)[0])
                        got += 1
                        ack.send_bytes(b"k", 0, timeout_s=30.0)
            _expect(conn)
    finally:
        box.close()
        ack.close()
        ack.unlink()
    return distribution("mailbox_one_way", "us", [v / 1000 for v in lat[warmup:]], frame_bytes=_STAMP.size + 64)


def _mailbox_streamer(conn: Conn, session: str, client: str, frame_bytes: int, count: int) -> None:
    """Broker side: send ``count`` frames as fast as the ring takes them."""

    def run() -> None:
        w = mailbox.MailboxWriter(session, client)
        body = bytes(frame_bytes - _STAMP.size)
        clock = time.perf_counter_ns
        conn.send(("ok", "ready"))
        if conn.recv() != "go":
            raise RuntimeError("no go")
        deadline = time.monotonic() + 60.0
        for seq in range(count):
            w.send(_STAMP.pack(clock(), seq) + body)
            # Keep at most one ring's worth buffered; the reader frees room as it goes.
            while w.pump() > w.capacity:
                if time.monotonic() > deadline:
                    raise RuntimeError("reader stalled")
                os.sched_yield()
        while w.pump():
            if time.monotonic() > deadline:
                raise RuntimeError("reader stalled")
            os.sched_yield()
        w.close()

    _guard(conn, run)


def bench_mailbox_throughput(frame_bytes: int, count: int, sessions: list[str]) -> Row:
    """MB/s from the broker's first send to the client's last frame."""
    session = _session(sessions)
    client = names.new_client_id()
    box = mailbox.MailboxReader(session, client)
    try:
        with _child(_mailbox_streamer, session, client, frame_bytes, count) as conn:
            _expect(conn)
            conn.send("go")
            got = 0
            nbytes = 0
            first_stamp = None
            with no_gc():
                while got < count:
                    for f in box.read_frames():
                        if first_stamp is None:
                            first_stamp = _STAMP.unpack_from(f)[0]
                        got += 1
                        nbytes += len(f)
                    if got < count and not box.wait(30.0):
                        raise RuntimeError("doorbell never rang")
                end = time.perf_counter_ns()
            _expect(conn)
    finally:
        box.close()
    assert first_stamp is not None
    seconds = (end - first_stamp) / 1e9
    name = f"mailbox_throughput_{frame_bytes // 1024}k"
    return Row(
        name=name, unit="MB/s", samples=count, value=nbytes / seconds / 1e6,
        extra={"frame_bytes": frame_bytes, "frames": count, "bytes": nbytes, "seconds": seconds,
               "ring_bytes": box.capacity},
    )


# ---------------------------------------------------------------- driver


def _session(sessions: list[str]) -> str:
    name = f"bench{os.getpid()}-{secrets.token_hex(4)}"
    sessions.append(name)
    return name


def run(samples: int, warmup: int) -> list[Row]:
    """Every benchmark, in table order; all IPC names are removed afterwards."""
    sessions: list[str] = []
    try:
        rows = bench_codec(samples, warmup)
        rows += bench_request_queue(samples, warmup, sessions)
        rows.append(bench_mailbox_latency(samples, warmup, sessions))
        # Enough data to run for a while even with few samples, bounded for long runs.
        rows.append(bench_mailbox_throughput(4096, max(2000, min(samples, 40_000)), sessions))
        rows.append(bench_mailbox_throughput(65536, max(500, min(samples // 4, 5_000)), sessions))
    finally:
        for s in sessions:
            sweep.sweep(session=s, force=True)
    assert tuple(r.name for r in rows) == ROWS
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'benchmark':<24} {'unit':>6} {'samples':>8} {'p50':>10} {'p99':>10} {'p99.9':>10} {'max':>10}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        if r.value is not None:
            lines.append(f"{r.name:<24} {r.unit:>6} {r.samples:>8} {r.value:>10.1f}")
        else:
            assert r.p50 is not None and r.p99 is not None and r.p999 is not None and r.max is not None
            lines.append(
                f"{r.name:<24} {r.unit:>6} {r.samples:>8} {r.p50:>10.1f} {r.p99:>10.1f} {r.p999:>10.1f} {r.max:>10.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ipc_micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000, help="measurements per latency row (default 20000)")
    parser.add_argument("--warmup", type=int, default=None, help="unrecorded rounds first (default samples/10)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results (default %(default)s)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    warmup = args.warmup if args.warmup is not None else min(2000, max(50, args.samples // 10))
    t0 = time.monotonic()
    rows = run(args.samples, warmup)
    elapsed = time.monotonic() - t0
    print(table(rows))
    print(f"({elapsed:.1f} s; warm-up {warmup} rounds per latency row)")
    doc = {
        "benchmark": "ipc_micro",
        "meta": {
            "samples": args.samples,
            "warmup": warmup,
            "seconds": elapsed,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "unix_time": time.time(),
        },
        "rows": [asdict(r) for r in rows],
    }
    directory = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
