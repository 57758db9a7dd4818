"""The exit codes of the ``turnstile`` command: one table, generated from the error tree.

Every error class carries its ``exit_code`` (``ipc/errors.py``); the constants
and the ``--help`` epilogs here are read from those classes, so a code cannot
be documented as one number and returned as another.
"""

from __future__ import annotations

from ipc import errors

RET_OK = errors.EXIT_OK
RET_ERROR = errors.TurnstileError.exit_code
RET_USAGE = errors.InvalidArgument.exit_code
RET_PREEMPTED = errors.Preempted.exit_code
RET_CANCELLED = errors.Cancelled.exit_code
RET_UNAVAILABLE = errors.BrokerUnavailable.exit_code
RET_AGENT_ERROR = errors.AgentError.exit_code
RET_TIMEOUT = errors.TurnTimeout.exit_code
RET_ALREADY_RUNNING = errors.AlreadyRunning.exit_code
RET_IPC = errors.IPCError.exit_code
RET_AGENT_NOT_FOUND = errors.AgentNotFound.exit_code
RET_STATE_DIR = errors.StateDirError.exit_code
RET_SIGNAL = errors.EXIT_SIGNAL

#: Every error class that introduces an exit code, in the order of the full table.
ERRORS: tuple[type[errors.TurnstileError], ...] = (
    errors.TurnstileError, errors.InvalidArgument, errors.Preempted, errors.Cancelled, errors.BrokerUnavailable,
    errors.AgentError, errors.TurnTimeout, errors.AlreadyRunning, errors.IPCError, errors.AgentNotFound,
    errors.StateDirError,
)

#: The whole table: exit code → meaning.
EXIT_CODES: dict[int, str] = dict(
    sorted({RET_OK: "ok",
            RET_SIGNAL: "interrupted: serve stopped at once by a second SIGINT/SIGTERM; prompt cancelled by Ctrl-C",
            **{err.exit_code: err.exit_meaning for err in ERRORS}}.items())
)

Row = type[errors.TurnstileError] | tuple[int, str]


def epilog(*rows: Row, title: str = "Exit codes") -> str:
    """A ``--help`` epilog listing ``rows``: error classes, or (code, meaning) for the non-error codes.

    Rows are sorted by code; click keeps the block's layout because of the ``\\b`` line.
    """
    pairs = sorted((r.exit_code, r.exit_meaning) if isinstance(r, type) else r for r in rows)
    return f"\b\n{title}:\n" + "\n".join(f"  {code:<3} {meaning}" for code, meaning in pairs)


__all__ = [
    "ERRORS", "EXIT_CODES", "RET_AGENT_ERROR", "RET_AGENT_NOT_FOUND", "RET_ALREADY_RUNNING", "RET_CANCELLED",
    "RET_ERROR", "RET_IPC", "RET_OK", "RET_PREEMPTED", "RET_SIGNAL", "RET_STATE_DIR", "RET_TIMEOUT",
    "RET_UNAVAILABLE", "RET_USAGE", "epilog",
]
