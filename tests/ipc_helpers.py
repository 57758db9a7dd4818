"""Support for the ipc tests: child processes that are always reaped, and bounded waits.

Child entry points live here (not in the test modules) so that a ``spawn``
child can import them by module name. Every child talks to the test through
one pipe: it sends ``("ok", value)`` or ``("error", traceback)`` when it ends,
and may send ``("msg", value)`` progress messages before that.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import pwd
import random
import resource
import signal
import struct
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import posix_ipc

from ipc import frames, mailbox, names, rqueue, shm, state, sweep
from ipc.errors import IPCError, LimitError
from tests.support import wait_until

SPAWN = multiprocessing.get_context("spawn")
Conn = multiprocessing.connection.Connection

#: The per-user POSIX queue budget on default limits (RLIMIT_MSGQUEUE).
DEFAULT_RLIMIT_MSGQUEUE = 819_200


# ---------------------------------------------------------------- waiting (wait_until: tests.support)


def recv(conn: Conn, timeout_s: float, what: str = "the child") -> tuple[str, Any]:
    """The next message from a child, or a test failure after ``timeout_s``."""
    if not conn.poll(timeout_s):
        raise AssertionError(f"no answer from {what} within {timeout_s:g} s")
    try:
        msg: tuple[str, Any] = conn.recv()
    except EOFError:
        raise AssertionError(f"{what} exited without answering") from None
    return msg


def result(conn: Conn, timeout_s: float, what: str = "the child") -> Any:
    """The final value a child sent; its traceback as a failure if it raised."""
    while True:
        tag, value = recv(conn, timeout_s, what)
        if tag == "ok":
            return value
        if tag == "error":
            raise AssertionError(f"{what} failed:\n{value}")


def _entry(target: Callable[..., Any], conn: Conn, args: tuple[Any, ...]) -> None:
    try:
        value = target(conn, *args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("ok", value))
    conn.close()


@contextlib.contextmanager
def child(target: Callable[..., Any], *args: Any) -> Iterator[tuple[multiprocessing.process.BaseProcess, Conn]]:
    """Run ``target(conn, *args)`` in a spawned process; SIGKILL and reap it on the way out."""
    parent_conn, child_conn = SPAWN.Pipe()
    proc = SPAWN.Process(target=_entry, args=(target, child_conn, args), daemon=True)
    proc.start()
    child_conn.close()
    try:
        yield proc, parent_conn
    finally:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        proc.close()
        parent_conn.close()


def kill_and_reap(proc: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL a child by pid and wait for it to be gone."""
    assert proc.pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode is not None, "child survived SIGKILL"


# ---------------------------------------------------------------- names


def shm_path(name: str) -> str:
    """Where a shared-memory name shows in the file system."""
    return os.path.join(sweep.SHM_DIR, name.lstrip("/"))


def mq_path(name: str) -> str:
    """Where a queue name shows in the file system (when mqueue is mounted)."""
    return os.path.join(sweep.MQUEUE_DIR, name.lstrip("/"))


def shm_exists(name: str) -> bool:
    """True when a shared-memory name exists."""
    return os.path.exists(shm_path(name))


# ---------------------------------------------------------------- users


def is_root() -> bool:
    """True when this process may drop to another uid."""
    return os.geteuid() == 0


def nobody() -> tuple[int, int]:
    """(uid, gid) of the unprivileged ``nobody`` account."""
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def drop_to(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (root only): supplementary groups, then gid, then uid."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


# ---------------------------------------------------------------- mailbox traffic

#: Header of each test frame: sequence number, payload length, crc32 of the payload.
FRAME_HEAD = struct.Struct("<QII")
_POOL = random.Random(0).randbytes(1 << 16)


def make_frame(seq: int, size: int) -> bytes:
    """A frame carrying its own sequence number and checksum; ``size`` payload bytes."""
    start = (seq * 7919) % (len(_POOL) - size) if size < len(_POOL) else 0
    payload = _POOL[start : start + size] if size <= len(_POOL) else (_POOL * (size // len(_POOL) + 1))[:size]
    return FRAME_HEAD.pack(seq, size, zlib.crc32(payload)) + payload


def check_frame(frame: bytes, expect_seq: int, expect_size: int) -> None:
    """Fail unless ``frame`` is frame ``expect_seq`` of ``expect_size`` bytes, intact."""
    seq, size, crc = FRAME_HEAD.unpack_from(frame)
    payload = frame[FRAME_HEAD.size :]
    assert seq == expect_seq, f"frame {seq} arrived where {expect_seq} was due (lost, duplicated or reordered)"
    assert size == expect_size == len(payload), f"frame {seq}: {len(payload)} bytes, expected {expect_size}"
    assert zlib.crc32(payload) == crc, f"frame {seq}: corrupt payload"


def frame_sizes(seed: int, count: int, max_size: int) -> Iterator[int]:
    """The same sequence of frame sizes on both sides of a test."""
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randint(0, max_size)


def pump_until_drained(writer: mailbox.MailboxWriter, timeout_s: float, below: int = 0) -> None:
    """Move buffered bytes into the ring as the reader frees room, until at most ``below`` remain."""
    deadline = time.monotonic() + timeout_s
    spins = 0
    while writer.pump() > below:
        if time.monotonic() > deadline:
            raise AssertionError(f"reader freed no room for {timeout_s:g} s ({writer.pending_bytes} bytes left)")
        spins += 1
        if spins > 200:
            time.sleep(0.00005)


def mailbox_writer_child(
    conn: Conn, session: str, client: str, seed: int, count: int, max_size: int, big: list[int]
) -> int:
    """Write ``count`` test frames of seeded random sizes; ``big`` lists seqs made 3 MB."""
    w = mailbox.MailboxWriter(session, client)
    try:
        sizes = frame_sizes(seed, count, max_size)
        for seq, size in enumerate(sizes):
            w.send(make_frame(seq, 3_000_000 if seq in big else size))
            # Keep at most one ring's worth buffered: the broker's bound is far larger.
            pump_until_drained(w, 60.0, below=w.capacity)
        pump_until_drained(w, 60.0)
        return count
    finally:
        w.close()


def read_all(reader: mailbox.MailboxReader, count: int, timeout_s: float) -> Iterator[bytes]:
    """Frames from ``reader`` until ``count`` arrived; every wait is bounded."""
    got = 0
    deadline = time.monotonic() + timeout_s
    while got < count:
        for f in reader.read_frames():
            got += 1
            yield f
        if got < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {got} of {count} frames within {timeout_s:g} s"
            reader.wait(min(left, 1.0))


def lockstep_writer_child(conn: Conn, session: str, client: str, count: int) -> int:
    """Send one frame, wait until the reader consumed it, repeat: the tightest race on the bell."""
    w = mailbox.MailboxWriter(session, client)
    mm = shm.open_existing(names.mailbox(session, client))
    try:
        for seq in range(count):
            w.send(make_frame(seq, seq % 64))
            target = w.written

            def consumed(target: int = target) -> bool:
                return int(struct.unpack_from("<Q", mm, mailbox.OFF_READ)[0]) >= target

            wait_until(consumed, 10.0, f"the reader to take frame {seq}", poll_s=0)
        return count
    finally:
        mm.close()
        w.close()


def hold_mailbox_child(conn: Conn, session: str, client: str) -> None:
    """Create a mailbox, report, then wait to be killed (the test SIGKILLs it)."""
    r = mailbox.MailboxReader(session, client, capacity=4096)
    conn.send(("msg", names.self_identity()))
    conn.recv()  # never answered: the test kills us
    r.close()


def many_mailboxes_child(conn: Conn, session: str, count: int, fresh_uid: int | None) -> dict[str, Any]:
    """Open ``count`` mailboxes under RLIMIT_MSGQUEUE set to the default, and measure their cost.

    With ``fresh_uid`` (root only) the process takes a real uid nobody else uses
    and keeps effective uid 0: POSIX queue bytes are charged to the real uid, so
    the budget is this process's alone and the cost can be measured exactly,
    whatever the tests running in parallel hold.
    """
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (DEFAULT_RLIMIT_MSGQUEUE, DEFAULT_RLIMIT_MSGQUEUE))
    if fresh_uid is not None:
        os.setresuid(fresh_uid, 0, 0)
    used_before = _charged_bytes(session) if fresh_uid is not None else None
    readers = []
    writers = []
    try:
        for i in range(count):
            client = f"{i:016x}"
            readers.append(mailbox.MailboxReader(session, client, capacity=4096))
            writers.append(mailbox.MailboxWriter(session, client))
        used_after = _charged_bytes(session) if fresh_uid is not None else None
        # Every mailbox works: one frame each way through all of them.
        for i, w in enumerate(writers):
            w.send(b"hello %d" % i)
        for i, r in enumerate(readers):
            assert r.wait(5.0)
            assert r.read_frames() == [b"hello %d" % i]
        return {
            "opened": len(readers),
            "used_before": used_before,
            "used_after": used_after,
        }
    finally:
        for w in writers:
            w.close()
        for r in readers:
            r.close()


def _charged_bytes(session: str) -> int:
    """Queue bytes charged to our real uid now, found by bisecting RLIMIT_MSGQUEUE.

    The smallest soft limit at which one more 1x1 queue can be created is
    (bytes charged) + (cost of that queue); the caller subtracts two readings.
    """
    hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]
    probe = names.doorbell(session, "probe")  # a doorbell name: a sweep of the session finds it
    lo, hi = 0, hard  # invariant: creating fails at lo (or lo == 0), succeeds at hi
    try:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            resource.setrlimit(resource.RLIMIT_MSGQUEUE, (mid, hard))
            try:
                q = posix_ipc.MessageQueue(probe, posix_ipc.O_CREX, mode=0o600, max_messages=1, max_message_size=1)
            except OSError:
                lo = mid
                continue
            q.close()
            posix_ipc.unlink_message_queue(probe)
            hi = mid
    finally:
        resource.setrlimit(resource.RLIMIT_MSGQUEUE, (hard, hard))
    return hi


# ---------------------------------------------------------------- limits


def limit_child(conn: Conn, session: str, what: str, rlimit: int) -> dict[str, Any]:
    """Lower our own RLIMIT_MSGQUEUE, then create ``what``; report the error it raised."""
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (rlimit, resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]))
    try:
        if what == "request_queue":
            rqueue.RequestQueue.create(session).close()
        else:
            mailbox.MailboxReader(session, "0123456789abcdef", capacity=4096).close()
    except LimitError as exc:
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "limits": exc.limits,  # type: ignore[attr-defined]
            "ring_left": shm_exists(names.mailbox(session, "0123456789abcdef")),
        }
    return {"type": None}


# ---------------------------------------------------------------- request queue


def queue_reader_child(conn: Conn, session: str, timeout_s: float) -> dict[str, Any]:
    """Receive messages until one whole request frame is reassembled; describe it."""
    from ipc import chunks

    q = rqueue.RequestQueue.open(session)
    try:
        conn.send(("msg", "ready"))
        r = chunks.Reassembler()
        messages = 0
        deadline = time.monotonic() + timeout_s
        while True:
            got = q.receive(max(0.0, deadline - time.monotonic()))
            assert got is not None, "no message before the deadline"
            messages += 1
            frame = frames.decode_request(got[0])
            if isinstance(frame, frames.Chunk):
                whole = r.add(frame, time.monotonic())
                if whole is None:
                    continue
                frame = frames.decode_request(whole)
            assert isinstance(frame, frames.Prompt)
            assert isinstance(frame.content, str)
            return {
                "messages": messages,
                "priority": got[1],
                "sha256": hashlib.sha256(frame.content.encode()).hexdigest(),
                "client": frame.client,
                "req": frame.req,
            }
    finally:
        q.close()


# ---------------------------------------------------------------- state block


def state_writer_child(conn: Conn, session: str, max_s: float) -> int:
    """Publish records whose every field equals a counter, as fast as we can.

    Stops when the test says so (a message on the pipe) or after ``max_s``.
    """
    block = state.StateBlock.open(session)
    block.writer = True
    try:
        rec = state.StateRecord()
        i = 0
        deadline = time.monotonic() + max_s
        conn.send(("msg", "ready"))
        while True:
            i += 1
            fill_record(rec, i)
            block.write(rec)
            if i % 256 == 0 and (conn.poll() or time.monotonic() > deadline):
                return i
    finally:
        block.close()


def fill_record(rec: state.StateRecord, i: int) -> None:
    """Every numeric field = i, every string = str(i) (fits every string field), closed = odd i."""
    s = str(i)
    for name, code in state.StateRecord._LAYOUT:
        if code.endswith("s"):
            setattr(rec, name, s)
        elif code == "?":
            setattr(rec, name, bool(i & 1))
        else:
            setattr(rec, name, i)
    rec.counters = dict.fromkeys(state.COUNTERS, i)
    rec.latencies = dict.fromkeys(state.LATENCIES, i)


def record_value(rec: state.StateRecord) -> int:
    """The counter a record was filled with; fails if its fields disagree (a torn read)."""
    i = rec.turn
    for name, code in state.StateRecord._LAYOUT:
        v = getattr(rec, name)
        want: object = str(i) if code.endswith("s") else (bool(i & 1) if code == "?" else i)
        assert v == want, f"torn record: {name}={v!r} but turn={i}"
    assert set(rec.counters.values()) == {i}, f"torn record: counters {rec.counters} but turn={i}"
    assert set(rec.latencies.values()) == {i}, f"torn record: latencies {rec.latencies} but turn={i}"
    return i


def state_broker_child(conn: Conn, session: str) -> None:
    """Act as a live broker: create the block, publish our identity, wait to be killed."""
    block = state.StateBlock.create(session)
    pid, start = names.self_identity()
    block.write(state.StateRecord(broker_pid=pid, broker_start=start, incarnation=names.new_incarnation()))
    conn.send(("msg", (pid, start)))
    conn.recv()  # never answered: the test kills us
    block.close()


# ---------------------------------------------------------------- other users


def as_nobody_child(conn: Conn, session: str, client: str, action: str) -> dict[str, str]:
    """Drop to ``nobody`` and try to reach this session's objects; report each outcome."""
    uid, gid = nobody()
    drop_to(uid, gid)
    if action == "squat":
        return _squat(session, client)
    out: dict[str, str] = {}

    def attempt(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (IPCError, OSError, posix_ipc.Error) as exc:
            out[what] = f"{type(exc).__name__}: {exc}"
        else:
            out[what] = "OK"

    def send_raw() -> None:
        q = posix_ipc.MessageQueue(names.request_queue(session), read=False, write=True)
        q.send(b"x", timeout=0)

    def read_raw() -> None:
        q = posix_ipc.MessageQueue(names.request_queue(session), read=True, write=False)
        q.receive(timeout=0)

    def write_cancel_raw() -> None:
        fd = os.open(shm_path(names.state_block(session)), os.O_RDWR)
        os.close(fd)

    def read_mailbox_raw() -> None:
        fd = os.open(shm_path(names.mailbox(session, client)), os.O_RDONLY)
        os.close(fd)

    def ring_raw() -> None:
        posix_ipc.MessageQueue(names.doorbell(session, client)).receive(timeout=0)

    def open_mailbox_writer() -> None:
        mailbox.MailboxWriter(session, client).close()

    attempt("open_request_queue", lambda: rqueue.RequestQueue.open(session))
    attempt("send_request_raw", send_raw)
    attempt("receive_request_raw", read_raw)
    attempt("open_state_block", lambda: state.StateBlock.open(session))
    attempt("write_cancel_raw", write_cancel_raw)
    attempt("open_mailbox_writer", open_mailbox_writer)
    attempt("read_mailbox_raw", read_mailbox_raw)
    attempt("take_doorbell_raw", ring_raw)
    return out


def _squat(session: str, client: str) -> dict[str, str]:
    """Pre-create every name of ``session`` (and ``client``'s mailbox) with mode 0666."""
    os.umask(0)
    made: dict[str, str] = {}
    q = posix_ipc.MessageQueue(
        names.request_queue(session), posix_ipc.O_CREX, mode=0o666, max_messages=1, max_message_size=64
    )
    q.close()
    made["request_queue"] = names.request_queue(session)
    for what, name in (
        ("state_block", names.state_block(session)),
        ("mailbox", names.mailbox(session, client)),
    ):
        seg = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o666, size=8192)
        seg.close_fd()
        made[what] = name
    _squat_queue(names.doorbell(session, client))
    made["doorbell"] = names.doorbell(session, client)
    return made


def squat_doorbell_child(conn: Conn, session: str, client: str) -> None:
    """As ``nobody``, create only ``client``'s doorbell name, mode 0666."""
    drop_to(*nobody())
    os.umask(0)
    _squat_queue(names.doorbell(session, client))


def _squat_queue(name: str) -> None:
    posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o666, max_messages=1, max_message_size=1).close()


def hold_mailbox_as_nobody_child(conn: Conn, session: str, client: str) -> None:
    """As ``nobody``: create a mailbox, report, wait to be killed."""
    drop_to(*nobody())
    hold_mailbox_child(conn, session, client)


def sweep_as_nobody_child(conn: Conn, session: str) -> list[str] | str:
    """As ``nobody``: sweep ``session``; the names removed, or the error it raised."""
    drop_to(*nobody())
    try:
        return [r.name for r in sweep.sweep(session=session)]
    except BaseException as exc:  # report any failure, whatever its type
        return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


def state_seq_writer_child(conn: Conn, session: str, count: int) -> int:
    """Publish ``count`` small records as fast as possible (the sequence word moves 2 per write)."""
    block = state.StateBlock.open(session)
    try:
        rec = state.StateRecord()
        conn.send(("msg", "ready"))
        for i in range(count):
            rec.turn = i
            block.write(rec)
        return count
    finally:
        block.close()


def read_word(mm: Any, offset: int) -> int:
    """One aligned 64-bit word of a mapping, loaded in one access."""
    with memoryview(mm) as whole, whole[offset : offset + 8] as part, part.cast("Q") as word:
        return int(word[0])
