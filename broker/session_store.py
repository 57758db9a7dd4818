"""What a session keeps on disk between brokers: the broker lock, session.json, agent.json.

The lock (``flock`` on ``broker.lock``) makes one broker per session; the
kernel drops it when the broker dies, however it dies. ``session.json`` holds
the agent's conversation id, whether it can be resumed and the model in use, so
a new broker continues the conversation. ``agent.json`` names the agent's
process group, so a broker that finds its predecessor's agent still running
(a tool child that outlived it) can kill exactly that group.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import uuid as uuidlib
from typing import Any

from broker.agentproc import reap_group
from broker.config import BrokerConfig
from broker.exits import RET_ALREADY_RUNNING
from ipc.errors import AlreadyRunning

#: How long a starting broker keeps trying a lock that a client's reachability probe may hold.
LOCK_PROBE_GRACE_S = 0.25


class SessionStore:
    """One session's directory: the lock, the conversation record, the agent's group."""

    def __init__(self, cfg: BrokerConfig, log: Any) -> None:
        self.cfg = cfg
        self.dir = cfg.session_dir
        self.log = log
        #: The agent's conversation id (the CLI's ``session_id``).
        self.session_id = ""
        #: The conversation has begun (printed system/init): later starts pass ``--resume``.
        self.resumable = False
        self._lock_fd: int | None = None
        self._model: str | None = None  # the model of the last save asked for
        self._unsaved = False  # the last save failed: retry() writes it again
        self._failing = False  # a failure was logged and no save has succeeded since

    def open(self) -> None:
        """Create the directory and take the lock, or raise :class:`AlreadyRunning`."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dir / "broker.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # A client diagnosing an unreachable broker (ipc/reach.py) holds a shared lock
        # for an instant: look again for a moment before saying another broker runs.
        deadline = time.monotonic() + LOCK_PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and time.monotonic() < deadline:
                    time.sleep(0.01)  # a bounded retry at start-up, before the loop runs
                    continue
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise AlreadyRunning(
                        f"another broker serves session {self.cfg.session!r} (lock {path.name} is held)",
                        exit_code=RET_ALREADY_RUNNING,
                    ) from None
                raise
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def reap_previous_agent(self) -> None:
        """Kill what is left of the previous broker's agent group, if anything."""
        try:
            prev = json.loads((self.dir / "agent.json").read_text())
            killed = reap_group(int(prev["pgid"]), int(prev["start_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return
        if killed:
            self.log.warning("agent.reaped_orphans", pgid=prev["pgid"], killed=killed)

    def load(self) -> str | None:
        """Read session.json (a fresh conversation if it is missing or bad); returns the saved model."""
        try:
            saved = json.loads((self.dir / "session.json").read_text())
            self.session_id = str(uuidlib.UUID(saved["session_id"]))
            # The agent writes its transcript at its first turn: an id that never ran
            # one cannot be resumed (--resume fails) and must be started afresh.
            self.resumable = bool(saved.get("resumable", True))
            self._model = str(saved["model"]) if saved.get("model") else None
            return self._model
        except (OSError, ValueError, KeyError, TypeError):
            self.session_id = str(uuidlib.uuid4())
            self.resumable = False
            return None

    def save(self, model: str | None) -> bool:
        """Write session.json atomically (a crash leaves the old or the new record, never half).

        Never raises: it is called while agent output is being delivered, and a
        full or read-only disk must not cost a client its events. A failed save
        is logged once and written again by :meth:`retry` (every tick) until it
        succeeds. Returns True if the record is on disk now.
        """
        self._unsaved = True
        self._model = model
        return self._write()

    @property
    def saved_model(self) -> str | None:
        """The model of the last save (or load): the one the next broker starts the agent on."""
        return self._model

    def retry(self) -> None:
        """Write session.json again if the last save failed (the disk may have room now)."""
        if self._unsaved:
            self._write()

    def _write(self) -> bool:
        path = self.dir / "session.json"
        tmp = path.with_suffix(".tmp")
        record = {"session_id": self.session_id, "model": self._model, "resumable": self.resumable}
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a half-written temporary holds the space we lack
            if not self._failing:
                self.log.error("session.save_failed", error=str(exc), retry_s="every tick")
            self._failing = True
            return False
        self._unsaved = False
        if self._failing:
            self._failing = False
            self.log.warning("session.saved", after_failure=True, resumable=self.resumable)
        return True

    def record_agent(self, pid: int, start_time: int) -> None:
        """Name the running agent's process group for the next broker's reaping."""
        (self.dir / "agent.json").write_text(json.dumps({"pid": pid, "pgid": pid, "start_time": start_time}))
