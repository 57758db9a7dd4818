"""Reading ``/proc/<pid>/stat``: a process's state, group, session and start time.

The one parser of that file in the project.  Field 2 (``comm``) may hold
spaces and parentheses, so fields are split after the *last* ``)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from ipc.errors import IPCError

__all__ = ["ProcStat", "all_pids", "parse_proc_stat", "read_proc_stat"]


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` turnstile uses."""

    state: str
    """One letter: ``R``, ``S``, ``D``, ``Z`` (zombie), ..."""
    pgrp: int
    """Process group id."""
    session: int
    """Session id (of ``setsid``, not a turnstile session)."""
    start_time: int
    """Clock ticks after boot: with the pid, an identity that survives pid reuse."""

    @property
    def zombie(self) -> bool:
        """True when the process has exited and waits to be reaped."""
        return self.state == "Z"


def parse_proc_stat(data: bytes) -> ProcStat:
    """Parse the content of a ``/proc/<pid>/stat`` file; ``ValueError`` if it is not one."""
    try:
        rest = data[data.rindex(b")") + 2 :].split()
        return ProcStat(state=rest[0].decode("ascii"), pgrp=int(rest[2]), session=int(rest[3]),
                        start_time=int(rest[19]))
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a /proc/<pid>/stat line: {data[:80]!r}") from exc


def read_proc_stat(pid: int) -> ProcStat | None:
    """``pid``'s stat, or None when there is no such process (or it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError as exc:
        raise IPCError(f"cannot read /proc/{pid}/stat: {exc}") from exc
    return parse_proc_stat(data)


def all_pids() -> Iterator[int]:
    """The pids listed in ``/proc`` now (processes may be gone by the time they are read)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)
