"""Removing what dead brokers and clients left behind.

Owners are identified by (pid, start time) recorded in each object, never by
pid alone. Only turnstile's own names are touched.

A mailbox header is written by whoever created the segment, so it can name
any live process (pid 1, say). A mailbox is therefore kept only while the
process it names is alive *and* has it mapped (``/proc/<pid>/maps``): a
client's reader maps its ring before it writes its header, and keeps it
mapped for its whole life.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import posix_ipc

from ipc import mailbox, names, rqueue, shm, state
from ipc.errors import IPCError

SHM_DIR = "/dev/shm"
MQUEUE_DIR = "/dev/mqueue"  # listed only when the mqueue filesystem is mounted


@dataclass(frozen=True)
class Removed:
    """One object sweep removed, and why."""

    kind: str  # "state", "request_queue", "mailbox", "doorbell"
    name: str
    reason: str


def _listing(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _ours(directory: str, entry: str) -> bool:
    """True when the object is owned by us: another user's objects are never ours to sweep."""
    try:
        return os.stat(os.path.join(directory, entry)).st_uid == os.geteuid()
    except OSError:
        return False


def _orphaned(session: str, client: str, owner: tuple[int, int] | None) -> str:
    """Why a mailbox has no live owner, or "" if it has one."""
    if owner is None:
        return "unreadable"
    pid, start = owner
    if not names.is_alive(pid, start):
        return f"client pid {pid} is gone"
    if not mailbox.held_by(session, client, pid):
        return f"pid {pid} named in its header does not hold it"
    return ""


def _entries(directory: str, session: str | None, force: bool) -> Iterator[tuple[str, str, str]]:
    """(session, kind, client) of each of turnstile's names in ``directory`` that this sweep may touch.

    Only ``session``'s when one is given, and only ours unless ``force`` (another
    user's objects are never ours to sweep).
    """
    for entry in _listing(directory):
        parsed = names.parse(entry)
        if parsed is None:
            continue
        sess, what, client = parsed
        if session is not None and sess != session:
            continue
        if force or _ours(directory, entry):
            yield sess, what, client


def _remove_session(sess: str, why: str) -> list[Removed]:
    """Remove a session's state block and request queue (what no live broker holds any more)."""
    removed = []
    if state.unlink(sess):
        removed.append(Removed("state", names.state_block(sess), why))
    if rqueue.unlink(sess):
        removed.append(Removed("request_queue", names.request_queue(sess), why))
    return removed


def _remove_doorbell(sess: str, client: str, why: str) -> list[Removed]:
    try:
        posix_ipc.unlink_message_queue(names.doorbell(sess, client))
    except posix_ipc.ExistentialError:
        return []
    return [Removed("doorbell", names.doorbell(sess, client), why)]


def _remove_mailbox(sess: str, client: str, why: str) -> list[Removed]:
    """Remove a client's mailbox: its ring, then its doorbell (either may be gone already)."""
    removed = []
    if shm.unlink(names.mailbox(sess, client)):
        removed.append(Removed("mailbox", names.mailbox(sess, client), why))
    return removed + _remove_doorbell(sess, client, why)


def sweep(*, session: str | None = None, force: bool = False) -> list[Removed]:
    """Remove leftovers whose owner process is gone.

    ``session`` limits the sweep to one session; ``force`` removes that
    session's objects whatever their owners' state (test teardown).
    """
    if force and session is None:
        raise ValueError("force needs a session")
    removed: list[Removed] = []
    sessions_dead: set[str] = set()
    for sess, what, client in _entries(SHM_DIR, session, force):
        if what == "st":
            dead, why = force, "forced"
            if not force:
                try:
                    block = state.StateBlock.open(sess)
                    try:
                        rec = block.read_record(timeout_s=0.2)
                    finally:
                        block.close()
                    dead = rec.closed or not names.is_alive(rec.broker_pid, rec.broker_start)
                    why = f"broker pid {rec.broker_pid} is gone" if dead else ""
                except (OSError, IPCError) as exc:
                    dead, why = True, f"unreadable: {exc}"
            if dead:
                sessions_dead.add(sess)
                removed += _remove_session(sess, why)
        elif what == "mb" and client:
            owner = mailbox.read_owner(sess, client)
            why = "forced" if force else _orphaned(sess, client, owner)
            if why:
                removed += _remove_mailbox(sess, client, why)
    # Queues are visible only where the mqueue filesystem is mounted; without it,
    # a doorbell whose ring is gone is found only through its session (force).
    for sess, what, client in _entries(MQUEUE_DIR, session, force):
        if what == "db" and not os.path.exists(os.path.join(SHM_DIR, f"{names.PREFIX}.{sess}.mb.{client}")):
            removed += _remove_doorbell(sess, client, "its mailbox ring is gone")
        elif what == "rq" and (force or sess in sessions_dead or not os.path.exists(
            os.path.join(SHM_DIR, f"{names.PREFIX}.{sess}.st")
        )) and rqueue.unlink(sess):
            removed.append(Removed("request_queue", names.request_queue(sess), "no live broker"))
    if force and session is not None:
        removed += _remove_session(session, "forced")
    return removed


def sweep_dead_clients(session: str) -> list[Removed]:
    """Remove ``session``'s mailboxes whose owner process is gone (the broker calls this).

    A client that dies while no broker runs, or before its hello is read, is
    never watched by a broker's pidfd, so no broker removes its mailbox when
    it dies. Unlike :func:`sweep`, this never touches the state block or the
    request queue, and it keeps a mailbox whose header names no owner yet:
    its client may be creating it right now.
    """
    removed: list[Removed] = []
    prefix = f"{names.PREFIX}.{session}.mb."
    for entry in _listing(SHM_DIR):
        if not entry.startswith(prefix) or not _ours(SHM_DIR, entry):
            continue
        client = entry[len(prefix) :]
        owner = mailbox.read_owner(session, client)
        why = _orphaned(session, client, owner) if owner is not None else ""
        if why:
            removed += _remove_mailbox(session, client, why)
    return removed
