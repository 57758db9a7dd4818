"""Broker settings and the exit-code table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ipc.mailbox import DEFAULT_MAX_PENDING

# Exit codes of `turnstile serve`, one table (documented in --help).
RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2
RET_ALREADY_RUNNING = 10
RET_IPC = 11
RET_AGENT_NOT_FOUND = 12
RET_SIGNAL = 130

EXIT_CODES = {
    RET_OK: "clean stop",
    RET_ERROR: "unexpected error",
    RET_USAGE: "bad arguments",
    RET_ALREADY_RUNNING: "another broker serves this session",
    RET_IPC: "an IPC object could not be created (squatted name or system limit)",
    RET_AGENT_NOT_FOUND: "the agent executable was not found",
    RET_SIGNAL: "stopped at once by a second SIGINT/SIGTERM",
}


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/turnstile`` or ``~/.local/state/turnstile``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "turnstile"


@dataclass
class BrokerConfig:
    """Everything `turnstile serve` can be told."""

    session: str = "default"
    agent: str = "sim"
    claude_bin: str | None = None
    agent_args: list[str] = field(default_factory=list)
    agent_env: dict[str, str] = field(default_factory=dict)
    agent_cwd: str | None = None
    model: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    drain_timeout_s: float = 5.0
    model_timeout_s: float = 10.0
    lease_idle_s: float = 30.0
    idle_output_timeout_s: float = 1800.0
    agent_request_timeout_s: float = 60.0
    stop_step_s: float = 2.0
    max_line_bytes: int = 64 * 1024 * 1024
    #: Bytes buffered for a client whose mailbox ring is full before it is failed (client_too_slow).
    client_buffer_bytes: int = DEFAULT_MAX_PENDING
    queue_max_messages: int = 10
    queue_message_bytes: int = 8192
    log_format: str = "auto"  # json | console | auto (console on a TTY)
    log_level: str = "info"

    @property
    def session_dir(self) -> Path:
        """Where this session's persistent state lives (agent session id, lock)."""
        return self.state_dir / self.session
