"""The shared-memory state block: round trip, seqlock under fire, liveness, takeover, cancel slot."""

from __future__ import annotations

import os
import stat
import string
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import names, rqueue, shm, state, sweep
from ipc.errors import IPCError, StateDamaged
from tests import ipc_helpers as h


@pytest.fixture
def block(session_name: str) -> Iterator[state.StateBlock]:
    b = state.StateBlock.create(session_name)
    yield b
    b.close()
    state.unlink(session_name)


def field_size(name: str) -> int:
    code = dict(state.StateRecord._LAYOUT)[name]
    return int(code[:-1])


def text_field(name: str) -> st.SearchStrategy[str]:
    return st.text(string.printable.strip(), max_size=field_size(name))


u64 = st.integers(0, 2**64 - 1)

records = st.builds(
    state.StateRecord,
    broker_pid=u64,
    broker_start=u64,
    incarnation=text_field("incarnation"),
    started_unix_ns=u64,
    heartbeat_unix_ns=u64,
    closed=st.booleans(),
    agent_pid=u64,
    agent_state=text_field("agent_state"),
    session_id=text_field("session_id"),
    model=text_field("model"),
    turn=u64,
    turn_state=text_field("turn_state"),
    turn_started_unix_ns=u64,
    holder_client=text_field("holder_client"),
    holder_kind=text_field("holder_kind"),
    holder_req=text_field("holder_req"),
    lease_client=text_field("lease_client"),
    webhooks_queued=u64,
    workers_queued=u64,
    clients=u64,
    counters=st.fixed_dictionaries({k: u64 for k in state.COUNTERS}),
    latencies=st.fixed_dictionaries({k: u64 for k in state.LATENCIES}),
)


# ---------------------------------------------------------------- basics


def test_create_is_0600_and_starts_clear(block: state.StateBlock) -> None:
    assert stat.S_IMODE(os.stat(h.shm_path(block.name)).st_mode) == 0o600
    assert block.read_record() == state.StateRecord()
    assert block.read_cancel() == ("", 0)


@given(records)
# The session fixture is shared by the examples on purpose: create() takes over its own block.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_write_read_round_trip(session_name: str, rec: state.StateRecord) -> None:
    b = state.StateBlock.create(session_name)  # takes over its own block on later examples
    reader = state.StateBlock.open(session_name)
    try:
        b.write(rec)
        assert reader.read_record() == rec
        assert reader.read_record().as_dict() == rec.as_dict()
    finally:
        reader.close()
        b.close()


def test_over_long_strings_are_cut_to_their_field(block: state.StateBlock) -> None:
    block.write(state.StateRecord(model="m" * 500, holder_kind="webhook-and-more"))
    rec = block.read_record()
    assert rec.model == "m" * field_size("model")
    assert rec.holder_kind == "webhook-"


def test_open_needs_a_turnstile_block(session_name: str) -> None:
    with pytest.raises(FileNotFoundError):
        state.StateBlock.open(session_name)
    shm.create(names.state_block(session_name), state.SIZE).close()  # ours, 0600, but all zeros
    with pytest.raises(IPCError, match="not a turnstile state block"):
        state.StateBlock.open(session_name)
    # create() adopts an all-zero block (a broker that died before its first write).
    b = state.StateBlock.create(session_name)
    b.close()
    state.StateBlock.open(session_name).close()


def test_create_refuses_a_foreign_layout(session_name: str) -> None:
    mm = shm.create(names.state_block(session_name), state.SIZE)
    mm[0:8] = b"NOTOURS!"
    mm.close()
    with pytest.raises(IPCError, match="not a turnstile state block"):
        state.StateBlock.create(session_name)


def test_a_block_a_layout_1_broker_left_is_taken_over_and_refused_to_layout_1_readers(session_name: str) -> None:
    # Layout 1 counted its sequence word plainly (odd = mid-write); layout 2 counts in
    # shm.seq_code steps, whose lowest bit is not their parity, so the header says which.
    mm = shm.create(names.state_block(session_name), state.SIZE)
    with memoryview(mm) as whole, whole[: state.SIZE].cast("Q") as words:
        words[0] = state.MAGIC | (1 << 32)  # magic, layout 1
        words[state.OFF_SEQ // 8] = 255  # a dead layout-1 broker's odd sequence word
    mm.close()
    b = state.StateBlock.create(session_name)
    try:
        b.write(state.StateRecord(turn=5))
        reader = state.StateBlock.open(session_name)
        try:
            assert reader.read_record(timeout_s=0.5).turn == 5
        finally:
            reader.close()
        raw = shm.read_head(names.state_block(session_name), 8)
        assert int.from_bytes(raw[4:8], "little") == state.LAYOUT == 2
    finally:
        b.close()


# ---------------------------------------------------------------- seqlock


@pytest.mark.timeout(120)
def test_no_torn_read_while_a_writer_process_publishes_flat_out(block: state.StateBlock, session_name: str) -> None:
    reads_wanted = 100_000
    reader = state.StateBlock.open(session_name)
    try:
        with h.child(h.state_writer_child, session_name, 60.0) as (_p, conn):
            assert h.recv(conn, 30.0, "the writer") == ("msg", "ready")
            h.wait_until(lambda: reader.read_record().turn > 0, 10.0, "the first record")
            seen = set()
            last = 0
            t0 = time.monotonic()
            for _ in range(reads_wanted):
                i = h.record_value(reader.read_record())  # every field agrees, or it fails here
                assert i >= last, "the record went back in time"
                last = i
                seen.add(i)
            elapsed = time.monotonic() - t0
            conn.send("stop")
            writes = h.result(conn, 30.0, "the writer")
        # The reads really raced the writes (how often depends on how the two cores are
        # shared with parallel tests: thousands of distinct records when idle, hundreds under load).
        assert writes > 1000
        assert len(seen) > 50, f"only {len(seen)} distinct records in {reads_wanted} reads"
        print(f"{reads_wanted} reads in {elapsed:.2f} s against {writes} writes, {len(seen)} distinct")
    finally:
        reader.close()


@pytest.mark.timeout(120)
def test_the_sequence_word_never_goes_back(block: state.StateBlock, session_name: str) -> None:
    # The seqlock is only as good as its sequence word: a reader must never see it
    # half-written (a store that zero-fills first reads as 0, an even "stable" value).
    count = 200_000
    mm = shm.open_existing(names.state_block(session_name), writable=False)
    try:
        # Where the word ends is fixed before the writer starts: it may write before we look.
        # The word counts in shm.seq_code steps, each of which changes one byte: a word
        # seen torn would decode to a step off the sequence (behind, or far ahead).
        last = shm.seq_step(h.read_word(mm, state.OFF_SEQ))
        end = last + 2 * count
        with h.child(h.state_seq_writer_child, session_name, count) as (_p, conn):
            assert h.recv(conn, 30.0, "the writer") == ("msg", "ready")
            deadline = time.monotonic() + 100.0
            loads = 0
            while last < end:
                seq = shm.seq_step(h.read_word(mm, state.OFF_SEQ))
                assert last <= seq <= end, f"sequence step went from {last} to {seq} (end {end})"
                last = seq
                loads += 1
                assert time.monotonic() < deadline, "the writer did not finish"
            assert h.result(conn, 30.0, "the writer") == count
        # The reader must have watched the word while it changed; how often depends on the
        # machine's load (a descheduled reader may see only part of the writes).
        assert loads > 10
    finally:
        mm.close()


def _set_seq(session: str, value: int) -> None:
    """Write the block's sequence word the way a writer killed between its two stores leaves it."""
    mm = shm.open_existing(names.state_block(session))
    try:
        with memoryview(mm) as whole, whole[: state.SIZE].cast("Q") as words:
            words[state.OFF_SEQ // 8] = value
    finally:
        mm.close()


def test_a_writer_killed_mid_write_is_reported_and_create_repairs_it(session_name: str) -> None:
    # A broker that died mid-write: the record names it, and it is gone.
    with h.child(h.state_broker_child, session_name) as (p, conn):
        dead_pid, _start = h.recv(conn, 30.0, "the broker")[1]
        h.kill_and_reap(p)
    _set_seq(session_name, 7)
    reader = state.StateBlock.open(session_name)
    try:
        t0 = time.monotonic()
        with pytest.raises(IPCError, match="mid-write"):
            reader.read_record(timeout_s=0.2)
        assert time.monotonic() - t0 < 2.0
        b = state.StateBlock.create(session_name)  # the next broker takes over and repairs
        try:
            rec = reader.read_record(timeout_s=0.2)
            assert rec.broker_pid == dead_pid
            b.write(state.StateRecord(turn=5))
            assert reader.read_record().turn == 5
        finally:
            b.close()
    finally:
        reader.close()


# ---------------------------------------------------------------- liveness and takeover


def test_broker_liveness_create_refusal_and_takeover(session_name: str) -> None:
    with h.child(h.state_broker_child, session_name) as (p, conn):
        pid, start = h.recv(conn, 30.0, "the broker")[1]
        reader = state.StateBlock.open(session_name)
        try:
            snap = reader.snapshot()
            assert snap.broker_alive
            assert (snap.record.broker_pid, snap.record.broker_start) == (pid, start)
            with pytest.raises(IPCError, match=f"live broker \\(pid {pid}\\)") as info:
                state.StateBlock.create(session_name)
            assert info.value.pid == pid  # type: ignore[attr-defined]
            h.kill_and_reap(p)
            assert not reader.snapshot().broker_alive
        finally:
            reader.close()
    b = state.StateBlock.create(session_name)  # a dead broker's block is taken over
    try:
        assert b.read_record().broker_pid == pid
        me, my_start = names.self_identity()
        b.write(state.StateRecord(broker_pid=me, broker_start=my_start))
        assert b.snapshot().broker_alive
        again = state.StateBlock.create(session_name)  # our own block: no refusal
        again.close()
        b.write(state.StateRecord(broker_pid=me, broker_start=my_start, closed=True))
        assert not b.snapshot().broker_alive  # a closed block has no live broker
    finally:
        b.close()


def test_a_reused_pid_is_not_a_live_broker(block: state.StateBlock) -> None:
    me, start = names.self_identity()
    block.write(state.StateRecord(broker_pid=me, broker_start=start + 1))
    assert not block.snapshot().broker_alive


# ---------------------------------------------------------------- cancel slot


def test_cancel_slot_write_read_clear(session_name: str) -> None:
    broker = state.StateBlock.create(session_name)
    client = state.StateBlock.open(session_name)
    try:
        client.write_cancel("0123456789abcdef", 42)
        assert broker.read_cancel() == ("0123456789abcdef", 42)
        snap = broker.snapshot()
        assert (snap.cancel_incarnation, snap.cancel_turn) == ("0123456789abcdef", 42)
        client.write_cancel("fedcba9876543210", 43)  # the latest request wins
        assert broker.read_cancel() == ("fedcba9876543210", 43)
        broker.clear_cancel()
        assert client.read_cancel() == ("", 0)
        client.write_cancel("0123456789abcdef", 44)
        # The slot survives a broker crash, and the next broker clears it on start.
        broker.close()
        assert client.read_cancel() == ("0123456789abcdef", 44)
        broker = state.StateBlock.create(session_name)
        assert client.read_cancel() == ("", 0)
    finally:
        client.close()
        broker.close()


def test_cancel_slot_does_not_touch_the_record(block: state.StateBlock) -> None:
    rec = state.StateRecord(turn=9, model="opus", counters=dict.fromkeys(state.COUNTERS, 3))
    block.write(rec)
    block.write_cancel("0123456789abcdef", 9)
    block.clear_cancel()
    assert block.read_record() == rec


# ---------------------------------------------------------------- sweep


def test_sweep_removes_a_dead_brokers_block_and_queue_and_keeps_a_live_one(session_name: str) -> None:
    other = f"{session_name}-live"
    with h.child(h.state_broker_child, session_name) as (p, conn):
        pid = h.recv(conn, 30.0, "the broker")[1][0]
        q = rqueue.RequestQueue.create(session_name, max_message_bytes=256)
        q.close()
        h.kill_and_reap(p)
    live = state.StateBlock.create(other)
    live_q = None
    try:
        me, start = names.self_identity()
        live.write(state.StateRecord(broker_pid=me, broker_start=start))
        live_q = rqueue.RequestQueue.create(other, max_message_bytes=256)
        removed = sweep.sweep(session=session_name)
        assert {(x.kind, x.name) for x in removed} == {
            ("state", names.state_block(session_name)),
            ("request_queue", names.request_queue(session_name)),
        }
        assert all(f"broker pid {pid} is gone" in x.reason for x in removed)
        assert sweep.sweep(session=other) == []
        assert h.shm_exists(names.state_block(other))
        live_q.send_bytes(b"still here", 0)
        assert live_q.receive_nowait() == (b"still here", 0)
    finally:
        if live_q is not None:
            live_q.close()
        live.close()
        sweep.sweep(session=other, force=True)
    assert not h.shm_exists(names.state_block(other))


# ---------------------------------------------------------------- damage (issue 13, item 7)


@pytest.mark.timeout(120)
def test_a_sequence_word_set_odd_by_someone_else_never_yields_a_torn_read(
    block: state.StateBlock, session_name: str
) -> None:
    """The writer keeps its own sequence: a word left odd cannot make its writes look stable mid-write."""
    reader = state.StateBlock.open(session_name)
    mm = shm.open_existing(names.state_block(session_name))
    words = memoryview(mm)[: state.SIZE].cast("Q")
    try:
        with h.child(h.state_writer_child, session_name, 60.0) as (_p, conn):
            assert h.recv(conn, 30.0, "the writer") == ("msg", "ready")
            h.wait_until(lambda: reader.read_record().turn > 0, 10.0, "the first record")
            reads = 0
            for k in range(2000):
                if k % 20 == 0:
                    seq = words[state.OFF_SEQ // 8]  # the damage, again and again: an odd step
                    words[state.OFF_SEQ // 8] = seq if shm.seq_odd(seq) else seq ^ 1
                h.record_value(reader.read_record(timeout_s=5.0))  # every field agrees, or it fails here
                reads += 1
            conn.send("stop")
            h.result(conn, 30.0, "the writer")
        assert reads == 2000
    finally:
        words.release()
        mm.close()
        reader.close()


def test_repair_restores_size_header_and_sequence(block: state.StateBlock, session_name: str) -> None:
    block.write(state.StateRecord(turn=1))
    path = "/dev/shm/" + names.state_block(session_name).lstrip("/")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"JUNKJUNK", 0)
        os.pwrite(fd, (7).to_bytes(8, "little"), state.OFF_SEQ)
        with pytest.raises(StateDamaged):
            state.StateBlock.open(session_name)
        problems = block.write(state.StateRecord(turn=2))
        assert any("header" in p for p in problems) and any("sequence" in p for p in problems)
        os.ftruncate(fd, 0)
        assert any("resized" in p for p in block.write(state.StateRecord(turn=3)))
        assert os.fstat(fd).st_size == state.SIZE
    finally:
        os.close(fd)
    reader = state.StateBlock.open(session_name)
    try:
        assert reader.read_record().turn == 3
        assert block.write(state.StateRecord(turn=4)) == []
    finally:
        reader.close()
