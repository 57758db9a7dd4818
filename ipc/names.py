"""IPC object names, ownership checks and process identity.

Every name derives from the session name, so two sessions (and two parallel
test runs, which use unique session names) never collide. ``/dev/shm`` and
the mqueue namespace are flat, so names are ``/turnstile.<session>.<what>``.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Final

from ipc.errors import InvalidArgument, NameSquatted
from ipc.procstat import read_proc_stat

PREFIX: Final = "turnstile"
SHM_DIR: Final = "/dev/shm"  # where POSIX shared-memory names are listed on Linux
SESSION_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_session(session: str) -> str:
    """Return ``session`` if it is a valid session name, else raise :class:`InvalidArgument` (a ``ValueError``)."""
    if not SESSION_RE.fullmatch(session):
        raise InvalidArgument(f"session name {session!r}: use 1-64 of A-Z a-z 0-9 _ -", argument="session")
    return session


def parse(entry: str) -> tuple[str, str, str] | None:
    """('session', 'what', 'client') from a listed name 'turnstile.<session>.<what>[.<client>]', else None."""
    parts = entry.lstrip("/").split(".")
    if len(parts) < 3 or parts[0] != PREFIX or not SESSION_RE.fullmatch(parts[1]):
        return None
    return parts[1], parts[2], parts[3] if len(parts) > 3 else ""


def sessions_on_host(shm_dir: str = SHM_DIR) -> list[str]:
    """Sessions whose state block exists and is ours (another user's block is not readable to us), sorted."""
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    found: list[str] = []
    for entry in entries:
        parsed = parse(entry)
        if parsed is None or parsed[1] != "st" or parsed[2]:
            continue
        try:
            if os.stat(os.path.join(shm_dir, entry)).st_uid != os.geteuid():
                continue
        except OSError:
            continue  # removed while we listed
        found.append(parsed[0])
    return sorted(found)


def request_queue(session: str) -> str:
    """Name of the session's request queue."""
    return f"/{PREFIX}.{check_session(session)}.rq"


def state_block(session: str) -> str:
    """Name of the session's shared-memory state block."""
    return f"/{PREFIX}.{check_session(session)}.st"


def mailbox(session: str, client: str) -> str:
    """Name of a client's mailbox ring (shared memory)."""
    return f"/{PREFIX}.{check_session(session)}.mb.{client}"


def doorbell(session: str, client: str) -> str:
    """Name of a client's mailbox doorbell (a one-slot queue)."""
    return f"/{PREFIX}.{check_session(session)}.db.{client}"


def new_client_id() -> str:
    """A fresh random client id (16 hex digits)."""
    return os.urandom(8).hex()


def new_incarnation() -> str:
    """A fresh random broker incarnation id (16 hex digits)."""
    return os.urandom(8).hex()


def check_owner(fd: int, name: str) -> None:
    """Refuse an IPC object not owned by us or open to group/other.

    A name pre-created by another local user would let them read our replies
    or inject frames, so it is an error, never silently used.
    """
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise NameSquatted(
            f"{name} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); "
            "another user created it: remove it (as that user or root) or pick another session name",
            name=name,
            owner_uid=st.st_uid,
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise NameSquatted(
            f"{name} has mode {stat.S_IMODE(st.st_mode):04o}; turnstile objects must be 0600. "
            "Another process may be reading or writing it: remove it and start again",
            name=name,
            mode=stat.S_IMODE(st.st_mode),
        )


def proc_start_time(pid: int) -> int | None:
    """The start time (clock ticks after boot) of process ``pid``, or None if it is gone.

    A pid alone is not an identity: pids are reused. (pid, start time) is.
    """
    st = read_proc_stat(pid)
    return None if st is None or st.zombie else st.start_time


def is_alive(pid: int, start_time: int) -> bool:
    """True when process ``pid`` exists and is the one that started at ``start_time``."""
    return pid > 0 and proc_start_time(pid) == start_time


def self_identity() -> tuple[int, int]:
    """(pid, start time) of this process."""
    pid = os.getpid()
    start = proc_start_time(pid)
    assert start is not None
    return pid, start
