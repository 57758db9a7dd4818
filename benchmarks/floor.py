"""The floor every other figure is divided by, measured in the same run.

* ``floor.queue_rtt``: a bare POSIX message-queue round trip between two
  processes (send 128 bytes on one queue, the other process receives it and
  sends it back on a second queue, receive it), each sample after an idle
  gap drawn uniformly from 0-2 ms: the rhythm of the preempt scenarios, where
  the broker and the agent sit blocked between events. This is the floor every
  ratio uses. A process woken after idling costs more than one woken at once
  (the CPU it ran on may have gone idle too), so the gap matters: on the
  2-core development machine the same round trip is ~7 µs back to back,
  ~20 µs after 1 ms idle and ~55 µs after 5 ms.
* ``floor.queue_rtt_hot``: the same round trip back to back (no gap), for
  reference: the best case, which no scenario here sees.
* ``floor.pipe_oneway``: a write to a child's stdin pipe → the child's
  ``read`` returning, with the child waiting in ``select()`` as the sim does.
* ``floor.pipe_rtt``: the same write → the child's one-byte ack read back.
"""

from __future__ import annotations

import array
import os
import random
import secrets
import subprocess
import sys
import time

import posix_ipc

from benchmarks.harness import child_env
from benchmarks.stats import Results

MSG = b"x" * 128


def queue_rtt(n: int, warmup: int, gap_s: float = 0.0) -> list[int]:
    """Round trips through two POSIX queues and an echo process, in ns (idle up to ``gap_s`` before each)."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    names = (f"/turnstile-bench-floor-{tag}-a", f"/turnstile-bench-floor-{tag}-b")
    qa = posix_ipc.MessageQueue(names[0], posix_ipc.O_CREX, mode=0o600, max_messages=10, max_message_size=8192)
    qb = posix_ipc.MessageQueue(names[1], posix_ipc.O_CREX, mode=0o600, max_messages=10, max_message_size=8192)
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.children", "mq-echo", *names], env=child_env())
    out: list[int] = []
    try:
        pc = time.perf_counter_ns
        rng = random.Random(2)
        for i in range(warmup + n):
            if gap_s:
                time.sleep(rng.random() * gap_s)
            t0 = pc()
            qa.send(MSG)
            qb.receive()
            t1 = pc()
            if i >= warmup:
                out.append(t1 - t0)
        qa.send(b"")
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for q in (qa, qb):
            q.close()
            q.unlink()
    return out


def pipe(n: int, warmup: int, tmp_file: str) -> tuple[list[int], list[int]]:
    """(one-way, round trip) samples of a stdin-pipe write to a child, in ns."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.children", "pipe-reader", tmp_file],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(),
    )
    assert child.stdin is not None and child.stdout is not None
    wfd, rfd = child.stdin.fileno(), child.stdout.fileno()
    line = b'{"type":"user","message":{"role":"user","content":"ping"},"uuid":"0"}\n'
    sent: list[int] = []
    rtt: list[int] = []
    pc = time.perf_counter_ns
    try:
        for _ in range(warmup + n):
            t0 = pc()
            os.write(wfd, line)
            os.read(rfd, 1)
            t1 = pc()
            sent.append(t0)
            rtt.append(t1 - t0)
        child.stdin.close()
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    got = array.array("q")
    with open(tmp_file, "rb") as f:
        got.frombytes(f.read())
    os.unlink(tmp_file)
    if len(got) != len(sent):
        raise RuntimeError(f"pipe reader stamped {len(got)} reads for {len(sent)} writes")
    oneway = [r - s for s, r in zip(sent, got, strict=True)]
    return oneway[warmup:], rtt[warmup:]


#: The idle gap before each floor sample: the preempt loops' random phase (0-2 ms).
IDLE_GAP_S = 0.002


def run(res: Results, n: int, warmup: int, tmp_dir: str) -> None:
    """Measure the floors into ``res``."""
    res.add_latency("floor.queue_rtt", "Floor: POSIX queue round trip (2 processes, idle 0-2 ms before)",
                    queue_rtt(n, warmup, IDLE_GAP_S), floor=None)
    res.add_latency("floor.queue_rtt_hot", "Floor: POSIX queue round trip, back to back", queue_rtt(n, warmup),
                    floor="floor.queue_rtt")
    oneway, rtt = pipe(n, warmup, os.path.join(tmp_dir, f"pipe-{os.getpid()}.bin"))
    res.add_latency("floor.pipe_oneway", "Floor: stdin pipe write → child read", oneway, floor=None)
    res.add_latency("floor.pipe_rtt", "Floor: stdin pipe write → child ack read", rtt, floor=None)


def ipc_micro(res: Results, samples: int, warmup: int) -> None:
    """The project's IPC micro-benchmarks (:mod:`benchmarks.ipc_micro`): turnstile's own queue and mailbox code."""
    from benchmarks import ipc_micro as micro
    from benchmarks.stats import Summary

    scale = {"ns": 0.001, "ns/op": 0.001, "us": 1.0, "µs": 1.0, "ms": 1000.0}
    for row in micro.run(samples, warmup):
        if row.value is not None:
            res.add_scalar(f"ipc.{row.name}", f"IPC micro: {row.name}", row.value, row.unit)
            continue
        k = scale.get(row.unit)
        if k is None or row.p50 is None or row.p99 is None or row.p999 is None or row.max is None:
            continue
        s = Summary(n=row.samples, p50=row.p50 * k, p90=float("nan"), p99=row.p99 * k, p999=row.p999 * k,
                    max=row.max * k, mean=(row.mean or float("nan")) * k, min=float("nan"))
        # A codec operation is no IPC: dividing it by the queue round trip means nothing. The
        # micro-benchmarks run back to back, so their floor is the back-to-back round trip.
        floor = None if row.name.startswith("frame_") else "floor.queue_rtt_hot"
        label = f"IPC micro: {row.name}" + ("" if floor is None else " (× back-to-back RTT)")
        res.add_summary(f"ipc.{row.name}", label, s, floor=floor)
