"""Another local user can neither reach a session's objects nor plant its own under their names.

The cross-user tests drop a child process to ``nobody``, so they need root. Root
itself can open anything, so every refusal of a squatted name seen here comes
from turnstile's owner check, not from the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import posix_ipc
import pytest

from ipc import mailbox, names, rqueue, shm, state, sweep
from ipc.errors import IPCError, NameSquatted
from tests import ipc_helpers as h

needs_root = pytest.mark.skipif(not h.is_root(), reason="dropping a child to another uid (nobody) needs root")


@pytest.fixture
def client_id() -> str:
    return names.new_client_id()


@pytest.fixture
def scrub(session_name: str, client_id: str) -> Iterator[None]:
    """Remove every name of the session, whoever owns it (the squatters' too), even on failure."""
    yield
    shm.unlink(names.state_block(session_name))
    shm.unlink(names.mailbox(session_name, client_id))
    for name in (names.request_queue(session_name), names.doorbell(session_name, client_id)):
        try:
            posix_ipc.unlink_message_queue(name)
        except posix_ipc.ExistentialError:
            pass


# ---------------------------------------------------------------- another user reaching in


@pytest.mark.root
@needs_root
def test_nobody_cannot_open_send_read_or_cancel(session_name: str, client_id: str, scrub: None) -> None:
    q = rqueue.RequestQueue.create(session_name, max_message_bytes=256)
    block = state.StateBlock.create(session_name)
    box = mailbox.MailboxReader(session_name, client_id, capacity=4096)
    try:
        with h.child(h.as_nobody_child, session_name, client_id, "intrude") as (_p, conn):
            got = h.result(conn, 30.0, "the child as nobody")
        assert set(got) == {
            "open_request_queue",
            "send_request_raw",
            "receive_request_raw",
            "open_state_block",
            "write_cancel_raw",
            "open_mailbox_writer",
            "read_mailbox_raw",
            "take_doorbell_raw",
        }
        refused = {what: outcome for what, outcome in got.items() if outcome != "OK"}
        assert refused == got, f"nobody got through: {[w for w, o in got.items() if o == 'OK']}"
        # turnstile's own openers say what is wrong.
        assert got["open_request_queue"].startswith("NameSquatted")
        assert got["open_state_block"].startswith("NameSquatted")
        assert got["open_mailbox_writer"].startswith("NameSquatted")
        # Nothing arrived, nothing was taken, the cancel slot is untouched.
        assert q.receive_nowait() is None
        assert block.read_cancel() == ("", 0)
        w = mailbox.MailboxWriter(session_name, client_id)
        try:
            w.send(b"for the owner")
        finally:
            w.close()
        assert box.wait(1.0)
        assert box.read_frames() == [b"for the owner"]
    finally:
        box.close()
        block.close()
        q.close()


# ---------------------------------------------------------------- squatting


@pytest.fixture
def squatted(session_name: str, client_id: str, scrub: None) -> dict[str, str]:
    """Every name of the session pre-created by ``nobody`` with mode 0666."""
    with h.child(h.as_nobody_child, session_name, client_id, "squat") as (_p, conn):
        made: dict[str, str] = h.result(conn, 30.0, "the squatter")
    uid = h.nobody()[0]
    for name in (made["state_block"], made["mailbox"]):
        st = os.stat(h.shm_path(name))
        assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o666)
    return made


def assert_squatted(exc: BaseException, name: str) -> None:
    assert isinstance(exc, NameSquatted), repr(exc)
    assert name in str(exc)
    if hasattr(exc, "owner_uid"):
        assert exc.owner_uid == h.nobody()[0]
        assert f"owned by uid {h.nobody()[0]}" in str(exc)


@pytest.mark.root
@needs_root
def test_a_squatted_request_queue_is_refused(session_name: str, squatted: dict[str, str]) -> None:
    for opener in (rqueue.RequestQueue.create, rqueue.RequestQueue.open):
        with pytest.raises(IPCError) as info:
            opener(session_name)
        assert_squatted(info.value, squatted["request_queue"])
        assert info.value.owner_uid == h.nobody()[0]  # type: ignore[attr-defined]


@pytest.mark.root
@needs_root
def test_a_squatted_state_block_is_refused(session_name: str, squatted: dict[str, str]) -> None:
    for opener in (state.StateBlock.create, state.StateBlock.open):
        with pytest.raises(IPCError) as info:
            opener(session_name)
        assert_squatted(info.value, squatted["state_block"])
        assert info.value.owner_uid == h.nobody()[0]  # type: ignore[attr-defined]


@pytest.mark.root
@needs_root
def test_a_squatted_mailbox_is_refused_by_both_sides(
    session_name: str, client_id: str, squatted: dict[str, str]
) -> None:
    with pytest.raises(IPCError) as info:
        mailbox.MailboxWriter(session_name, client_id)  # the broker side
    assert_squatted(info.value, squatted["mailbox"])
    with pytest.raises(FileExistsError):
        mailbox.MailboxReader(session_name, client_id, capacity=4096)  # the client creates exclusively
    assert mailbox.read_owner(session_name, client_id) is None
    # The squatter's objects were neither used nor removed by the refusals.
    assert os.stat(h.shm_path(squatted["mailbox"])).st_uid == h.nobody()[0]


@pytest.mark.root
@needs_root
def test_a_squatted_doorbell_is_refused(session_name: str, client_id: str, scrub: None) -> None:
    # Ring ours, doorbell theirs.
    box = mailbox.MailboxReader(session_name, client_id, capacity=4096)
    try:
        posix_ipc.unlink_message_queue(box.bell_name)
        with h.child(h.squat_doorbell_child, session_name, client_id) as (_p, conn):
            h.result(conn, 30.0, "the squatter")
        with pytest.raises(IPCError) as info:
            mailbox.MailboxWriter(session_name, client_id)
        assert_squatted(info.value, box.bell_name)
    finally:
        box.close()  # removes the squatted doorbell's name too
    # And a client creating its mailbox refuses a doorbell name already taken, leaving no ring.
    with h.child(h.squat_doorbell_child, session_name, client_id) as (_p, conn):
        h.result(conn, 30.0, "the squatter")
    with pytest.raises(IPCError, match="already exists"):
        mailbox.MailboxReader(session_name, client_id, capacity=4096)
    assert not h.shm_exists(names.mailbox(session_name, client_id))


@pytest.mark.root
@needs_root
def test_sweep_as_root_clears_squatted_names(session_name: str, client_id: str, squatted: dict[str, str]) -> None:
    removed = {x.name for x in sweep.sweep(session=session_name, force=True)}
    assert set(squatted.values()) <= removed


# ---------------------------------------------------------------- our own objects, opened too wide (no root needed)


def test_a_queue_of_ours_open_to_the_group_is_refused(session_name: str) -> None:
    q = rqueue.RequestQueue.create(session_name, max_message_bytes=256)
    try:
        os.fchmod(q.fileno(), 0o660)
        for opener in (rqueue.RequestQueue.create, rqueue.RequestQueue.open):
            with pytest.raises(NameSquatted) as info:
                opener(session_name)
            assert info.value.mode == 0o660  # type: ignore[attr-defined]
            assert "0660" in str(info.value) and "0600" in str(info.value)
    finally:
        q.close()
        q.unlink()


def test_a_queue_created_0660_under_umask_0_is_refused(session_name: str) -> None:
    name = names.request_queue(session_name)
    old = os.umask(0)
    try:
        posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o660, max_messages=1, max_message_size=64).close()
    finally:
        os.umask(old)
    try:
        with pytest.raises(NameSquatted, match="mode 0660"):
            rqueue.RequestQueue.open(session_name)
    finally:
        rqueue.unlink(session_name)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o666])
def test_a_state_block_of_ours_open_to_others_is_refused(session_name: str, mode: int) -> None:
    state.StateBlock.create(session_name).close()
    os.chmod(h.shm_path(names.state_block(session_name)), mode)
    for opener in (state.StateBlock.create, state.StateBlock.open):
        with pytest.raises(NameSquatted) as info:
            opener(session_name)
        assert info.value.mode == mode  # type: ignore[attr-defined]


def test_a_mailbox_of_ours_open_to_others_is_refused(session_name: str) -> None:
    client = names.new_client_id()
    box = mailbox.MailboxReader(session_name, client, capacity=4096)
    try:
        os.chmod(h.shm_path(box.ring_name), 0o644)
        with pytest.raises(NameSquatted):
            mailbox.MailboxWriter(session_name, client)
        os.chmod(h.shm_path(box.ring_name), 0o600)
        os.fchmod(box.fileno(), 0o620)
        with pytest.raises(NameSquatted):
            mailbox.MailboxWriter(session_name, client)
    finally:
        box.close()


# ---------------------------------------------------------------- sweeping other users' objects


@pytest.mark.root
@needs_root
def test_sweep_as_root_keeps_another_users_live_mailbox(session_name: str, client_id: str, scrub: None) -> None:
    with h.child(h.hold_mailbox_as_nobody_child, session_name, client_id) as (_p, conn):
        h.recv(conn, 30.0, "the mailbox owner")
        removed = sweep.sweep(session=session_name)
        assert removed == [], f"removed a live mailbox of another user: {removed}"


@pytest.mark.root
@needs_root
def test_sweep_by_another_user_skips_what_it_cannot_remove(session_name: str) -> None:
    block = state.StateBlock.create(session_name)
    block.write(state.StateRecord(closed=True))  # its broker has gone
    block.close()
    with h.child(h.sweep_as_nobody_child, session_name) as (_p, conn):
        got = h.result(conn, 30.0, "the sweep as nobody")
    assert isinstance(got, list), got
    assert h.shm_exists(names.state_block(session_name))
