"""Why a broker that runs cannot be reached from here, and what to do about it.

A client attaches through three things: the session's state block (shared
memory under ``/dev/shm``), its request queue (a POSIX message queue) and the
broker's pid. Each is scoped differently: the queue belongs to the IPC
namespace, the shared memory to the ``/dev/shm`` mount, the names to the user
who created them (mode 0600), the pid to the pid namespace, and the broker's
lock file to the filesystem. So a client in another IPC namespace (``unshare
--ipc``, a Docker container by default) sees the state block, and
``turnstile status`` says the broker is alive, while the queue is missing; a
client of another user sees names it may not open. "No broker: start one"
would be wrong advice there (starting one fails: the lock is held, the names
are taken). :func:`diagnose` tells these cases apart from what is visible here.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from ipc import defaults, names, rqueue, state
from ipc.errors import BrokerUnreachable, IPCError

__all__ = ["GATEWAY_HINT", "Unreachable", "diagnose"]

#: The way in for clients that cannot share the broker's user and IPC namespace.
GATEWAY_HINT = "or reach it over NATS through the session's gateway (turnstile gateway)"


@dataclass(frozen=True)
class Unreachable:
    """A broker seems to serve the session but this process cannot reach it: why, and what to do."""

    reason: str  # other_user | other_ipc_namespace | other_pid_namespace | lock_held
    message: str
    owner_uid: int | None = None
    broker_pid: int | None = None

    def error(self, session: str, waited_s: float | None = None) -> BrokerUnreachable:
        """The typed error for this diagnosis."""
        return BrokerUnreachable(self.message, session=session, reason=self.reason, owner_uid=self.owner_uid,
                                 broker_pid=self.broker_pid, waited_s=waited_s)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _ipc_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/ipc")
    except OSError:
        return None  # gone, or another user's process (no ptrace access)


def _shm_owner(session: str) -> int | None:
    try:
        return os.stat(os.path.join("/dev/shm", names.state_block(session).lstrip("/"))).st_uid
    except OSError:
        return None


def _lock_held(session: str, state_dir: Path) -> Path | None:
    """The broker lock's path if a process holds it (flock is per open file, so it is seen from any namespace)."""
    path = state_dir / session / "broker.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # never created here
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return path if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    finally:
        os.close(fd)  # closing drops a lock taken just now: the probe leaves nothing held
    return None


def diagnose(session: str, state_dir: Path | None = None) -> Unreachable | None:
    """Why this process cannot reach a broker of ``session`` that seems to run; None if none seems to.

    ``state_dir`` is where the broker keeps its lock (default: this user's default state directory).
    """
    me = os.geteuid()
    owner = _shm_owner(session)
    if owner is not None and owner != me:
        return Unreachable(
            "other_user",
            f"session {session!r} belongs to user {_user(owner)}, and this process runs as {_user(me)}: "
            "a session's queue and shared memory are private to the user whose broker made them. "
            f"Run the client as {_user(owner)}, {GATEWAY_HINT}.",
            owner_uid=owner,
        )
    if owner is not None:
        try:
            block = state.StateBlock.open(session)
        except (OSError, IPCError):
            block = None
        if block is not None:
            try:
                snap = block.snapshot()
            except IPCError:
                snap = None
            finally:
                block.close()
            if snap is not None and snap.broker_alive:
                return _alive_but_unreachable(session, snap.record.broker_pid, snap.record.broker_start)
    lock = _lock_held(session, state_dir or defaults.default_state_dir())
    if lock is not None:
        return Unreachable(
            "lock_held",
            f"a broker holds session {session!r}'s lock ({lock}), but its shared memory is not visible here: "
            "this process has another IPC namespace or /dev/shm than the broker (a container of its own?). "
            "Run the client where the broker runs or share its IPC namespace (docker run --ipc=container:NAME), "
            f"{GATEWAY_HINT}.",
        )
    return None


def _alive_but_unreachable(session: str, pid: int, start: int) -> Unreachable | None:
    """The state block says a live broker serves ``session``: find which of its channels is out of reach."""
    if not rqueue.exists(session):
        mine, theirs = _ipc_ns("self"), _ipc_ns(pid)
        where = f" (this process: {mine}, the broker: {theirs})" if mine and theirs and mine != theirs else ""
        return Unreachable(
            "other_ipc_namespace",
            f"a broker (pid {pid}) serves session {session!r}, but its request queue is not visible here: this "
            f"process runs in another IPC namespace{where}, as a Docker container does by default, or after "
            "unshare --ipc. Run the client in the broker's IPC namespace (docker run --ipc=container:NAME, or "
            f"--ipc=host; no unshare --ipc), {GATEWAY_HINT}.",
            broker_pid=pid,
        )
    if names.proc_start_time(pid) != start:
        return Unreachable(
            "other_pid_namespace",
            f"a broker (pid {pid} in its own pid namespace) serves session {session!r}, but that pid is not it here: "
            "this process runs in another pid namespace. Share the broker's pid namespace "
            f"(docker run --pid=container:NAME), {GATEWAY_HINT}.",
            broker_pid=pid,
        )
    return None
