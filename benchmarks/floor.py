"""The floor every other figure is divided by, measured in the same run.

* ``floor.queue_rtt``: a bare POSIX message-queue round trip between two
  processes (send 128 bytes on one queue, the other process receives it and
  sends it back on a second queue, receive it). This is the design's floor.
* ``floor.pipe_oneway``: a write to a child's stdin pipe → the child's
  ``read`` returning, with the child waiting in ``select()`` as the sim does.
* ``floor.pipe_rtt``: the same write → the child's one-byte ack read back.
"""

from __future__ import annotations

import array
import os
import secrets
import subprocess
import sys
import time

import posix_ipc

from benchmarks.harness import child_env
from benchmarks.stats import Results

MSG = b"x" * 128


def queue_rtt(n: int, warmup: int) -> list[int]:
    """Round trips through two POSIX queues and an echo process, in ns."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    names = (f"/turnstile-bench-floor-{tag}-a", f"/turnstile-bench-floor-{tag}-b")
    qa = posix_ipc.MessageQueue(names[0], posix_ipc.O_CREX, mode=0o600, max_messages=10, max_message_size=8192)
    qb = posix_ipc.MessageQueue(names[1], posix_ipc.O_CREX, mode=0o600, max_messages=10, max_message_size=8192)
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.children", "mq-echo", *names], env=child_env())
    out: list[int] = []
    try:
        pc = time.perf_counter_ns
        for i in range(warmup + n):
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


def run(res: Results, n: int, warmup: int, tmp_dir: str) -> None:
    """Measure the floors into ``res``."""
    res.add_latency("floor.queue_rtt", "Floor: POSIX queue round trip (2 processes)", queue_rtt(n, warmup),
                    floor=None)
    oneway, rtt = pipe(n, warmup, os.path.join(tmp_dir, f"pipe-{os.getpid()}.bin"))
    res.add_latency("floor.pipe_oneway", "Floor: stdin pipe write → child read", oneway, floor=None)
    res.add_latency("floor.pipe_rtt", "Floor: stdin pipe write → child ack read", rtt, floor=None)
