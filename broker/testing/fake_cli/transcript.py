"""The fake CLI's transcripts: one JSON-lines file per session, what ``--resume`` reads.

Transcripts live in ``<state dir>/<session id>.jsonl`` (``--sim-state-dir``,
default ``~/.sim-claude``).  A turn's prompt is recorded when the turn starts,
so a prompt killed mid-turn survives a ``--resume``; like the real CLI's, a
transcript is written lazily, so a process killed before its first turn leaves
nothing to resume.  Only the standard library is imported.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False  # not from typing: importing typing costs the fake CLI ~5 ms per start
if TYPE_CHECKING:
    from typing import Any


class Transcripts:
    """The transcripts under one state directory."""

    def __init__(self, state_dir: str | None) -> None:
        self.state_dir = state_dir or os.path.join(os.path.expanduser("~"), ".sim-claude")

    def path(self, session_id: str) -> str:
        """Where ``session_id``'s transcript lives."""
        return os.path.join(self.state_dir, f"{session_id}.jsonl")

    def exists(self, session_id: str) -> bool:
        """True when ``session_id`` has a transcript (the id is in use)."""
        return os.path.exists(self.path(session_id))

    def read(self, session_id: str) -> list[str] | None:
        """The transcript's lines, or ``None`` when there is none."""
        try:
            with open(self.path(session_id), encoding="utf-8") as f:
                return f.readlines()
        except FileNotFoundError:
            return None

    def write(self, session_id: str, lines: list[str]) -> None:
        """Create ``session_id``'s transcript with ``lines`` (``--fork-session``)."""
        os.makedirs(self.state_dir, exist_ok=True)
        with open(self.path(session_id), "w", encoding="utf-8") as f:
            f.writelines(lines)

    def append(self, session_id: str, entry: dict[str, Any]) -> None:
        """Append one entry, in one write (a process killed later keeps it)."""
        os.makedirs(self.state_dir, exist_ok=True)
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        fd = os.open(self.path(session_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)


def user_messages(lines: list[str]) -> int:
    """How many user messages a transcript holds (what ``[sim:history]`` reports)."""
    return sum(1 for line in lines if '"type":"user"' in line)
