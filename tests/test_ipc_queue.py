"""The session's request queue: creation, ownership, priority order, bounded sends, chunking, limits."""

from __future__ import annotations

import hashlib
import os
import select
import stat
import time
from collections.abc import Iterator

import posix_ipc
import pytest

from ipc import chunks, frames, names, rqueue
from ipc.errors import IPCError, LimitError, NameSquatted, QueueFull, QueueGone
from tests import ipc_helpers as h

CLIENT = "0123456789abcdef"
SMALL = 1024  # message size for tests that do not need full-size messages (saves the shared budget)


@pytest.fixture
def broker_queue(session_name: str) -> Iterator[rqueue.RequestQueue]:
    q = rqueue.RequestQueue.create(session_name, max_message_bytes=SMALL)
    yield q
    q.close()
    q.unlink()


def test_create_is_exclusive_0600_and_ours(broker_queue: rqueue.RequestQueue, session_name: str) -> None:
    st = os.fstat(broker_queue.fileno())
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert broker_queue.name == names.request_queue(session_name)
    assert broker_queue.max_message_bytes == SMALL
    assert broker_queue.max_messages == rqueue.DEFAULT_MAX_MESSAGES
    if os.path.isdir(h.mq_path("")):
        assert stat.S_IMODE(os.stat(h.mq_path(broker_queue.name)).st_mode) == 0o600


def test_create_is_not_widened_by_a_permissive_umask(session_name: str) -> None:
    old = os.umask(0)
    try:
        q = rqueue.RequestQueue.create(session_name, max_message_bytes=SMALL)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.fstat(q.fileno()).st_mode) == 0o600
    finally:
        q.close()
        q.unlink()


def test_open_without_a_queue_is_an_ipc_error(session_name: str) -> None:
    with pytest.raises(IPCError) as info:
        rqueue.RequestQueue.open(session_name)
    assert not isinstance(info.value, NameSquatted)
    assert names.request_queue(session_name) in str(info.value)


def test_client_sends_broker_receives(broker_queue: rqueue.RequestQueue, session_name: str) -> None:
    client = rqueue.RequestQueue.open(session_name)
    try:
        assert client.max_message_bytes == SMALL
        frame = frames.Prompt(client=CLIENT, req="r1", kind="webhook", content="hi")
        client.send_frame(frame)
        assert broker_queue.current_messages == 1
        got = broker_queue.receive(1.0)
        assert got is not None
        assert frames.decode_request(got[0]) == frame
        assert got[1] == frames.PRIORITY["webhook"]
        assert broker_queue.receive_nowait() is None
    finally:
        client.close()


def test_queue_outlives_its_broker_and_is_adopted_with_its_frames(session_name: str) -> None:
    first = rqueue.RequestQueue.create(session_name, max_message_bytes=SMALL)
    try:
        first.send_frame(frames.Bye(client=CLIENT, req="sent-while-no-broker"))
        first.close()  # the broker dies; the name stays
        second = rqueue.RequestQueue.create(session_name, max_message_bytes=SMALL)
        try:
            got = second.receive_nowait()
            assert got is not None
            assert frames.decode_request(got[0]).req == "sent-while-no-broker"
        finally:
            second.close()
    finally:
        assert rqueue.unlink(session_name)
    assert not rqueue.unlink(session_name)


def test_fileno_is_pollable(broker_queue: rqueue.RequestQueue) -> None:
    poller = select.poll()
    poller.register(broker_queue.fileno(), select.POLLIN)
    assert poller.poll(0) == []
    broker_queue.send_bytes(b"x", 0)
    assert poller.poll(1000) == [(broker_queue.fileno(), select.POLLIN)]
    assert broker_queue.receive_nowait() == (b"x", 0)


def test_receive_times_out_in_bounded_time(broker_queue: rqueue.RequestQueue) -> None:
    t0 = time.monotonic()
    assert broker_queue.receive(0.05) is None
    assert time.monotonic() - t0 < 2.0


def test_priority_order_control_then_webhook_then_worker_fifo_within(broker_queue: rqueue.RequestQueue) -> None:
    def worker(i: int) -> frames.RequestFrame:
        return frames.Prompt(client=CLIENT, req=f"worker{i}", kind="worker", content="w")

    def webhook(i: int) -> frames.RequestFrame:
        return frames.Prompt(client=CLIENT, req=f"webhook{i}", kind="webhook", content="h")

    sent = [
        worker(0),
        webhook(0),
        frames.Cancel(client=CLIENT, req="control0", target="worker0"),
        worker(1),
        frames.Lease(client=CLIENT, req="webhook1", kind="webhook"),
        frames.Bye(client=CLIENT, req="control1"),
        worker(2),
        frames.SetModel(client=CLIENT, req="webhook2", kind="webhook", model="m"),
        frames.Hello(client=CLIENT, req="control2", kind="worker", pid=1, start_time=1),
    ]
    assert len(sent) < broker_queue.max_messages
    for f in sent:
        broker_queue.send_frame(f)
    order = []
    while (got := broker_queue.receive_nowait()) is not None:
        order.append((frames.decode_request(got[0]).req, got[1]))
    assert order == [
        ("control0", 2),
        ("control1", 2),
        ("control2", 2),
        ("webhook0", 1),
        ("webhook1", 1),
        ("webhook2", 1),
        ("worker0", 0),
        ("worker1", 0),
        ("worker2", 0),
    ]


def test_send_to_a_full_queue_raises_queue_full_in_bounded_time(broker_queue: rqueue.RequestQueue) -> None:
    for i in range(broker_queue.max_messages):
        broker_queue.send_bytes(b"%d" % i, 0, timeout_s=0)
    t0 = time.monotonic()
    with pytest.raises(QueueFull) as info:
        broker_queue.send_bytes(b"one too many", 1, timeout_s=0.1)
    elapsed = time.monotonic() - t0
    assert 0.05 <= elapsed < 2.0
    assert info.value.timeout_s == 0.1  # type: ignore[attr-defined]
    assert broker_queue.name in str(info.value)
    # A frame goes the same way, and nothing of it was queued.
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        broker_queue.send_frame(frames.Bye(client=CLIENT), timeout_s=0.1)
    assert time.monotonic() - t0 < 2.0
    assert broker_queue.current_messages == broker_queue.max_messages


def test_one_timeout_bounds_every_chunk_of_a_large_send(broker_queue: rqueue.RequestQueue) -> None:
    # 40 chunks, room for 10, nobody reading: the whole send gives up after ~timeout, not 40 of them.
    big = frames.Prompt(client=CLIENT, req="big", kind="worker", content="x" * (40 * (SMALL - 200)))
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        broker_queue.send_frame(big, timeout_s=0.2)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.timeout(60)
def test_a_large_frame_passes_chunked_to_a_concurrent_reader_process(session_name: str) -> None:
    q = rqueue.RequestQueue.create(session_name)  # full size: the real chunk geometry
    try:
        content = os.urandom(600_000).hex()  # 1.2 MB: ~150 chunks through a 10-message queue
        prompt = frames.Prompt(client=CLIENT, req="big-1", kind="webhook", content=content)
        with h.child(h.queue_reader_child, session_name, 30.0) as (_proc, conn):
            assert h.recv(conn, 30.0, "the reader") == ("msg", "ready")
            q.send_frame(prompt, timeout_s=30.0)
            got = h.result(conn, 30.0, "the reader")
    finally:
        q.close()
        q.unlink()
    assert got["sha256"] == hashlib.sha256(content.encode()).hexdigest()
    assert (got["client"], got["req"]) == (CLIENT, "big-1")
    step = q.max_message_bytes - chunks.CHUNK_OVERHEAD
    assert got["messages"] == -(-len(frames.encode(prompt)) // step)
    assert got["priority"] == frames.PRIORITY["webhook"]


@pytest.mark.parametrize("rlimit", [0, 50_000])
def test_limit_error_names_the_limits_to_raise(session_name: str, rlimit: int) -> None:
    # The child lowers its own RLIMIT_MSGQUEUE below one full-size queue: the real budget is untouched.
    with h.child(h.limit_child, session_name, "request_queue", rlimit) as (_proc, conn):
        got = h.result(conn, 30.0)
    assert got["type"] == "LimitError", got
    assert "RLIMIT_MSGQUEUE" in got["message"]
    assert "queues_max" in got["message"]
    assert names.request_queue(session_name) in got["message"]
    assert got["limits"]["rlimit_msgqueue"] == rlimit
    assert not os.path.exists(h.mq_path(names.request_queue(session_name)))


def test_limit_error_is_an_ipc_error() -> None:
    assert issubclass(LimitError, IPCError)
    assert issubclass(QueueFull, IPCError)


def test_unlink_removes_the_name_while_open_handles_keep_working(session_name: str) -> None:
    q = rqueue.RequestQueue.create(session_name, max_message_bytes=SMALL)
    try:
        q.unlink()
        # The descriptor still works after unlink (POSIX semantics); a closed one does not.
        q.send_bytes(b"x", 0)
        assert q.receive_nowait() == (b"x", 0)
    finally:
        q.close()
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(names.request_queue(session_name))


def test_a_send_on_a_gone_queue_is_queue_gone_not_a_string_match(session_name: str) -> None:
    """The client reattaches on QueueGone; it is its own class, so nobody parses the message."""
    q = rqueue.RequestQueue.create(session_name, max_message_bytes=SMALL)
    q.unlink()
    q.close()
    with pytest.raises(QueueGone) as gone:
        q.send_bytes(b"x", 0, timeout_s=0.1)
    assert isinstance(gone.value, IPCError) and gone.value.name == names.request_queue(session_name)
