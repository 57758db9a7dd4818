"""What the fake CLI lets a test observe: the ``--stats-file`` counters and the ``--stamp-file`` log.

``--stamp-file PATH`` gets one line per stdin line, written unbuffered as
soon as the line is read: ``<time.perf_counter_ns()>\\t<kind>\\t<detail>``,
kind being the line's ``type`` (or ``blank``, ``malformed``, ``array``,
``scalar``), detail the ``uuid`` of a user message, the subtype of a
control request, the ``request_id`` of a control response, else ``-``.

``--stats-file PATH`` is a JSON object of counters (:data:`COUNTERS`, and
``pid``), replaced atomically (temporary file, then rename) after every stdin
line, turn start and result, and just before every control response: once a
reader has seen the reply to a request it sent, the file counts everything
before it.  ``user_messages_while_running`` counts user lines that arrived
while a turn ran: a broker must keep it at 0.  Only the standard library is
imported.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # not from typing: importing typing costs the fake CLI ~5 ms per start
if TYPE_CHECKING:
    from typing import Any

COUNTERS = (
    "lines_read",  # every stdin line, blank ones too
    "malformed_lines",  # 0 or 1: the first kills the process
    "ignored_lines",
    "user_messages",  # well-formed user lines, duplicates included
    "user_messages_while_running",
    "duplicate_uuids",
    "interrupts",
    "control_requests",  # interrupts included
    "control_responses",
    "turns",
    "results",
    "error_results",
    "interrupted_turns",
    "cancelled_messages",
)
"""The counters of ``--stats-file``, all starting at 0."""


def new_counters() -> dict[str, int]:
    """Zeroed counters, plus this process's ``pid``."""
    stats = dict.fromkeys(COUNTERS, 0)
    stats["pid"] = os.getpid()
    return stats


class StatsFile:
    """``--stats-file``: written whole and atomically; given up (with a word on stderr) on error."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, stats: dict[str, int]) -> None:
        """Replace the file's content with ``stats`` (nothing without a path)."""
        if not self.path:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(stats, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            sys.stderr.write(f"sim: cannot write stats file: {exc}\n")
            self.path = None


class StampFile:
    """``--stamp-file``: one line per stdin line, appended unbuffered."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600) if path else -1

    def stamp(self, t_ns: int, kind: str, detail: Any) -> None:
        """Append ``t_ns<TAB>kind<TAB>detail`` (``-`` for no detail)."""
        if self.fd >= 0:
            detail_s = str(detail).replace("\t", " ").replace("\n", " ") if detail else "-"
            os.write(self.fd, f"{t_ns}\t{kind}\t{detail_s}\n".encode("utf-8", "replace"))
