"""What a session keeps on disk between brokers: the broker lock, session.json, agent.json.

The lock (``flock`` on ``broker.lock``) makes one broker per session; the
kernel drops it when the broker dies, however it dies. ``session.json`` holds
the agent's conversation id, whether it can be resumed and the model in use, so
a new broker continues the conversation. ``agent.json`` names the agent's
process group, so a broker that finds its predecessor's agent still running
(a tool child that outlived it) can kill exactly that group.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import uuid as uuidlib
from typing import Any

from broker.agentproc import reap_group
from broker.config import BrokerConfig
from broker.exits import RET_ALREADY_RUNNING
from ipc.errors import AlreadyRunning


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

    def open(self) -> None:
        """Create the directory and take the lock, or raise :class:`AlreadyRunning`."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dir / "broker.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
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
            return str(saved["model"]) if saved.get("model") else None
        except (OSError, ValueError, KeyError, TypeError):
            self.session_id = str(uuidlib.uuid4())
            self.resumable = False
            return None

    def save(self, model: str | None) -> None:
        """Write session.json atomically (a crash leaves the old or the new record, never half)."""
        path = self.dir / "session.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"session_id": self.session_id, "model": model, "resumable": self.resumable}))
        os.replace(tmp, path)

    def record_agent(self, pid: int, start_time: int) -> None:
        """Name the running agent's process group for the next broker's reaping."""
        (self.dir / "agent.json").write_text(json.dumps({"pid": pid, "pgid": pid, "start_time": start_time}))
