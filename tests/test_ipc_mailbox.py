"""Client mailboxes: the shared-memory ring, its doorbell, overflow, the queue budget, and sweeping."""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Iterator

import posix_ipc
import pytest

from ipc import mailbox, names, shm, sweep
from ipc.errors import ClientTooSlow, IPCError
from tests import ipc_helpers as h

RING = 64 * 1024


@pytest.fixture
def client_id() -> str:
    return names.new_client_id()


@pytest.fixture
def pair(session_name: str, client_id: str) -> Iterator[tuple[mailbox.MailboxReader, mailbox.MailboxWriter]]:
    r = mailbox.MailboxReader(session_name, client_id, capacity=RING)
    w = mailbox.MailboxWriter(session_name, client_id, max_pending=1 << 20)
    yield r, w
    w.close()
    r.close()


def exchange(r: mailbox.MailboxReader, w: mailbox.MailboxWriter, count: int, timeout_s: float = 10.0) -> list[bytes]:
    """Same-process transfer: pump the writer and drain the reader in turn until ``count`` frames arrived."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        assert time.monotonic() < deadline, f"{len(out)} of {count} frames"
        w.pump()
        out.extend(r.read_frames())
    return out


# ---------------------------------------------------------------- basics


def test_mailbox_objects_are_0600_and_record_their_owner(
    pair: tuple[mailbox.MailboxReader, mailbox.MailboxWriter], session_name: str, client_id: str
) -> None:
    r, w = pair
    assert stat.S_IMODE(os.stat(h.shm_path(r.ring_name)).st_mode) == 0o600
    assert stat.S_IMODE(os.fstat(r.fileno()).st_mode) == 0o600
    assert (w.owner_pid, w.owner_start) == names.self_identity()
    assert mailbox.read_owner(session_name, client_id) == names.self_identity()
    assert w.capacity == RING


def test_frames_of_every_size_round_trip_in_order(pair: tuple[mailbox.MailboxReader, mailbox.MailboxWriter]) -> None:
    r, w = pair
    assert r.read_frames() == []
    sizes = [0, 1, 3, 4, 5, 100, RING - 5, RING - 4, RING - 3, RING, RING + 1, 3 * RING + 17, 0]
    sent = [h.make_frame(i, n) for i, n in enumerate(sizes)]
    for f in sent:
        w.send(f)
    assert exchange(r, w, len(sent)) == sent
    assert w.pending_bytes == 0
    assert r.read_frames() == []


def test_a_second_mailbox_of_the_same_name_is_refused(
    pair: tuple[mailbox.MailboxReader, mailbox.MailboxWriter], session_name: str, client_id: str
) -> None:
    r, w = pair
    with pytest.raises(FileExistsError):
        mailbox.MailboxReader(session_name, client_id, capacity=4096)
    w.send(b"still fine")
    assert r.read_frames() == [b"still fine"]


def test_writer_refuses_missing_and_foreign_segments(session_name: str) -> None:
    with pytest.raises(FileNotFoundError):
        mailbox.MailboxWriter(session_name, "0" * 16)
    # Ours and 0600, but not a mailbox.
    name = names.mailbox(session_name, "1" * 16)
    shm.create(name, 8192).close()
    try:
        with pytest.raises(IPCError, match="not a turnstile mailbox"):
            mailbox.MailboxWriter(session_name, "1" * 16)
    finally:
        shm.unlink(name)


def test_close_removes_both_names(session_name: str, client_id: str) -> None:
    r = mailbox.MailboxReader(session_name, client_id, capacity=4096)
    assert h.shm_exists(r.ring_name)
    r.close()
    r.close()  # idempotent
    assert not h.shm_exists(r.ring_name)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(r.bell_name)
    assert not mailbox.unlink(session_name, client_id)


def test_unlink_by_name(session_name: str, client_id: str) -> None:
    r = mailbox.MailboxReader(session_name, client_id, capacity=4096)
    try:
        assert mailbox.unlink(session_name, client_id)
        assert not h.shm_exists(r.ring_name)
        assert mailbox.read_owner(session_name, client_id) is None
    finally:
        r.close()


# ---------------------------------------------------------------- across processes


@pytest.mark.timeout(180)
def test_100k_random_frames_wrap_a_64k_ring_without_loss(session_name: str, client_id: str) -> None:
    count, max_size, seed = 100_000, 5000, 1234
    r = mailbox.MailboxReader(session_name, client_id, capacity=RING)
    try:
        with h.child(h.mailbox_writer_child, session_name, client_id, seed, count, max_size, []) as (_p, conn):
            sizes = h.frame_sizes(seed, count, max_size)
            total = 0
            for seq, frame in enumerate(h.read_all(r, count, timeout_s=150.0)):
                size = next(sizes)
                h.check_frame(frame, seq, size)
                total += len(frame) + 4
            assert h.result(conn, 30.0, "the writer") == count
        assert r.read_frames() == [], "a frame arrived after the last one"
        assert total > 1000 * RING, "the ring did not wrap many times"
    finally:
        r.close()


@pytest.mark.timeout(120)
def test_counters_are_never_seen_half_written(session_name: str, client_id: str) -> None:
    # Tiny frames: the write counter is republished hundreds of thousands of times while
    # the reader loads it. A counter stored byte by byte (or zero-filled first) is seen
    # going backwards, which the reader reports as inconsistent counters.
    count = 300_000
    r = mailbox.MailboxReader(session_name, client_id, capacity=RING)
    try:
        with h.child(h.mailbox_writer_child, session_name, client_id, 3, count, 0, []) as (_p, conn):
            for seq, frame in enumerate(h.read_all(r, count, timeout_s=100.0)):
                h.check_frame(frame, seq, 0)
            assert h.result(conn, 30.0, "the writer") == count
    finally:
        r.close()


@pytest.mark.timeout(120)
def test_frames_larger_than_the_ring_stream_through(session_name: str, client_id: str) -> None:
    count, big = 40, [3, 4, 20, 39]  # 3 MB frames, two back to back, one last
    r = mailbox.MailboxReader(session_name, client_id, capacity=RING)
    try:
        with h.child(h.mailbox_writer_child, session_name, client_id, 7, count, 5000, big) as (_p, conn):
            sizes = h.frame_sizes(7, count, 5000)
            for seq, frame in enumerate(h.read_all(r, count, timeout_s=60.0)):
                size = next(sizes)
                h.check_frame(frame, seq, 3_000_000 if seq in big else size)
            assert h.result(conn, 30.0, "the writer") == count
    finally:
        r.close()


@pytest.mark.timeout(120)
def test_no_lost_wake_up_when_the_writer_races_the_reader(session_name: str, client_id: str) -> None:
    # The writer publishes the next frame the moment the reader has taken the last:
    # exactly when the reader is between reading the ring and blocking on the bell.
    count = 5000
    r = mailbox.MailboxReader(session_name, client_id, capacity=4096)
    try:
        with h.child(h.lockstep_writer_child, session_name, client_id, count) as (_p, conn):
            got = 0
            spurious = 0
            while got < count:
                # Every wait must end with the bell: a lost wake-up shows as a timeout here.
                assert r.wait(10.0), f"no wake-up for frame {got}: lost"
                batch = r.read_frames()
                spurious += not batch
                for frame in batch:
                    h.check_frame(frame, got, got % 64)
                    got += 1
            assert h.result(conn, 30.0, "the writer") == count
        # A spurious wake (a bell for data already read) is allowed, never a missed one.
        assert spurious < count
    finally:
        r.close()


def test_the_writer_rings_only_after_publishing(pair: tuple[mailbox.MailboxReader, mailbox.MailboxWriter]) -> None:
    r, w = pair
    seen: list[list[bytes]] = []
    real_ring = w.ring

    def ring() -> None:
        seen.append(r.read_frames())  # what a woken reader would find at this instant
        real_ring()

    w.ring = ring  # type: ignore[method-assign]
    w.send(b"first")
    w.send(b"second")
    assert seen == [[b"first"], [b"second"]]


def test_the_doorbell_holds_one_ring(pair: tuple[mailbox.MailboxReader, mailbox.MailboxWriter]) -> None:
    r, w = pair
    assert not r.wait(0)
    w.send(b"a")
    w.send(b"b")  # rings a rung bell: a no-op, never blocks the broker
    w.ring()
    assert r.wait(0)
    assert not r.wait(0)
    assert r.read_frames() == [b"a", b"b"]
    w.ring()
    r.clear_bell()
    assert not r.wait(0.01)


# ---------------------------------------------------------------- overflow


def test_a_slow_reader_is_failed_and_told_so(session_name: str, client_id: str) -> None:
    r = mailbox.MailboxReader(session_name, client_id, capacity=RING)
    w = mailbox.MailboxWriter(session_name, client_id, max_pending=100_000)
    try:
        frame = b"x" * 1000  # 1004 bytes on the ring with its length prefix
        # The ring takes 65 whole frames and 276 bytes of the 66th; the rest is buffered
        # until more than 100,000 bytes wait: that is the 165th frame.
        for _ in range(164):
            w.send(frame)
        assert not w.failed
        with pytest.raises(ClientTooSlow) as info:
            w.send(frame)
        assert info.value.pending_bytes == 165 * 1004 - RING > 100_000  # type: ignore[attr-defined]
        assert str(165 * 1004 - RING) in str(info.value)
        assert w.failed and w.pending_bytes == 0
        w.send(frame)  # a failed client gets nothing more, and the broker is not disturbed
        # The reader gets what reached the ring, then the failure (the head of the 66th
        # frame, cut off, is not a frame and must not hang it).
        assert r.wait(1.0)
        assert r.read_frames() == [frame] * 65
        assert r.wait(1.0), "the reader was not woken to learn of its failure"
        with pytest.raises(ClientTooSlow):
            r.read_frames()
        with pytest.raises(ClientTooSlow):
            r.read_frames()
        assert r.failed
    finally:
        w.close()
        r.close()


def test_failure_reaches_a_reader_whose_last_wake_up_was_consumed(
    pair: tuple[mailbox.MailboxReader, mailbox.MailboxWriter],
) -> None:
    r, w = pair
    for i in range(3):
        w.send(b"frame %d" % i)  # the bell is rung once
    w.fail()  # rings a rung bell: no second wake-up
    assert r.wait(0)
    assert r.read_frames() == [b"frame 0", b"frame 1", b"frame 2"]
    assert r.wait(1.0), "a reader told nothing more would wait forever"
    with pytest.raises(ClientTooSlow):
        r.read_frames()


def test_a_reader_that_keeps_up_is_never_failed(pair: tuple[mailbox.MailboxReader, mailbox.MailboxWriter]) -> None:
    r, w = pair
    w.max_pending = 10_000
    sent = [h.make_frame(i, 3000) for i in range(200)]  # 600 KB through a 64 KB ring
    got: list[bytes] = []
    for f in sent:
        w.send(f)
        got.extend(r.read_frames())
    got.extend(exchange(r, w, len(sent) - len(got)))
    assert got == sent
    assert not w.failed


# ---------------------------------------------------------------- the queue budget


@pytest.mark.xdist_group("many_queues")  # the system-wide count of queues (256) is shared
@pytest.mark.timeout(120)
def test_200_mailboxes_fit_the_default_queue_budget(session_name: str) -> None:
    # As root the child takes a real uid of its own (keeping euid 0), so the budget it
    # measures is not shared with the tests running in parallel. Without root it can only
    # show that 200 open; the kernel's charge for a 1x1 queue is ~100 bytes either way.
    fresh_uid = 200_000 + secrets.randbelow(1_000_000) if h.is_root() else None
    with h.child(h.many_mailboxes_child, session_name, 200, fresh_uid) as (_p, conn):
        got = h.result(conn, 90.0, "the mailbox child")
    assert got["opened"] == 200
    if fresh_uid is not None:
        cost = got["used_after"] - got["used_before"]
        per_mailbox = cost / 200
        print(f"200 doorbells cost {cost} bytes of RLIMIT_MSGQUEUE ({per_mailbox:.0f} each)")
        assert 0 < cost < 100_000, cost
        assert cost < h.DEFAULT_RLIMIT_MSGQUEUE // 8


def test_a_doorbell_over_the_limit_is_a_limit_error_and_leaves_no_ring(session_name: str) -> None:
    with h.child(h.limit_child, session_name, "mailbox", 0) as (_p, conn):
        got = h.result(conn, 30.0)
    assert got["type"] == "LimitError", got
    assert "RLIMIT_MSGQUEUE" in got["message"] and "queues_max" in got["message"]
    assert "doorbell" in got["message"]
    assert not got["ring_left"]


# ---------------------------------------------------------------- sweep


def test_sweep_removes_only_what_dead_owners_left(session_name: str) -> None:
    other_session = f"{session_name}x"
    dead, live, dead_elsewhere, mine = (names.new_client_id() for _ in range(4))
    foreign = [f"/not{names.PREFIX}.{session_name}.mb.{dead}", f"/{names.PREFIX}-{session_name}"]
    for name in foreign:
        shm.create(name, 4096).close()
    own = mailbox.MailboxReader(session_name, mine, capacity=4096)
    try:
        with (
            h.child(h.hold_mailbox_child, session_name, dead) as (p_dead, c_dead),
            h.child(h.hold_mailbox_child, session_name, live) as (p_live, c_live),
            h.child(h.hold_mailbox_child, other_session, dead_elsewhere) as (p_else, c_else),
        ):
            dead_pid = h.recv(c_dead, 30.0)[1][0]
            live_pid = h.recv(c_live, 30.0)[1][0]
            h.recv(c_else, 30.0)
            h.kill_and_reap(p_dead)
            h.kill_and_reap(p_else)

            removed = sweep.sweep(session=session_name)
            assert {(x.kind, x.name) for x in removed} == {
                ("mailbox", names.mailbox(session_name, dead)),
                ("doorbell", names.doorbell(session_name, dead)),
            }
            assert all(f"pid {dead_pid} is gone" in x.reason for x in removed)
            assert mailbox.read_owner(session_name, live) == (live_pid, names.proc_start_time(live_pid))
            assert mailbox.read_owner(session_name, mine) == names.self_identity()
            assert mailbox.read_owner(other_session, dead_elsewhere) is not None
            assert all(h.shm_exists(n) for n in foreign)
            assert sweep.sweep(session=session_name) == []

            h.kill_and_reap(p_live)
            assert {x.kind for x in sweep.sweep(session=session_name)} == {"mailbox", "doorbell"}
            assert mailbox.read_owner(session_name, mine) == names.self_identity()
        own.wait(0)  # our own mailbox still works after all that
    finally:
        own.close()
        sweep.sweep(session=other_session, force=True)
        for name in foreign:
            shm.unlink(name)


def test_sweep_removes_a_doorbell_whose_ring_is_gone(session_name: str, client_id: str) -> None:
    if not os.path.isdir(sweep.MQUEUE_DIR):
        pytest.skip("the mqueue file system is not mounted: doorbells cannot be listed")
    r = mailbox.MailboxReader(session_name, client_id, capacity=4096)
    try:
        shm.unlink(r.ring_name)
        removed = sweep.sweep(session=session_name)
        assert [(x.kind, x.name, x.reason) for x in removed] == [("doorbell", r.bell_name, "its mailbox ring is gone")]
    finally:
        r.close()
