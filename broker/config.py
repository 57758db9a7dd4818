"""Broker settings (their defaults come from :mod:`ipc.defaults`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from broker.agents.base import DEFAULT_HOOK_EVENTS
from ipc import defaults
from ipc.errors import StateDirError
from ipc.mailbox import DEFAULT_MAX_PENDING

#: One page: the smallest write that a full filesystem refuses.
_PROBE_BYTES = 4096


default_state_dir = defaults.default_state_dir


@dataclass
class BrokerConfig:
    """Everything `turnstile serve` can be told."""

    session: str = defaults.SESSION
    agent: str = defaults.AGENT
    claude_bin: str | None = None
    agent_args: list[str] = field(default_factory=list)
    agent_env: dict[str, str] = field(default_factory=dict)
    agent_cwd: str | None = None
    model: str | None = None
    #: Passed to the agent as ``--permission-mode`` (None: the agent's own default).
    permission_mode: str | None = None
    #: The answer to ``can_use_tool`` when the turn's holder has no ``on_permission`` handler.
    default_permission: str = "deny"
    #: Hook events whose ``hook_callback`` reaches the broker (the holder's ``on_hook``, else "go on").
    hook_events: tuple[str, ...] = DEFAULT_HOOK_EVENTS
    state_dir: Path = field(default_factory=default_state_dir)
    drain_timeout_s: float = defaults.DRAIN_TIMEOUT_S
    model_timeout_s: float = defaults.MODEL_TIMEOUT_S
    lease_idle_s: float = defaults.LEASE_IDLE_S
    agent_start_timeout_s: float = defaults.AGENT_START_TIMEOUT_S
    agent_unavailable_timeout_s: float = defaults.AGENT_UNAVAILABLE_TIMEOUT_S
    max_clients_per_process: int = defaults.MAX_CLIENTS_PER_PROCESS
    idle_output_timeout_s: float = 1800.0
    agent_request_timeout_s: float = 60.0
    stop_step_s: float = 2.0
    max_line_bytes: int = 64 * 1024 * 1024
    #: Bytes buffered for a client whose mailbox ring is full before it is failed (client_too_slow).
    client_buffer_bytes: int = DEFAULT_MAX_PENDING
    #: Bytes of replies buffered for all clients whose mailboxes are full; over it, the one holding most is failed.
    max_buffered_bytes: int = 512 * 1024 * 1024
    #: Bytes of prompt frames one client may have queued or running; a prompt over it is refused (queue_full).
    max_queued_bytes_per_client: int = 256 * 1024 * 1024
    #: Bytes of prompt frames all clients together may have queued or running.
    max_queued_bytes: int = 1024 * 1024 * 1024
    queue_max_messages: int = 10
    queue_message_bytes: int = 8192
    log_format: str = "auto"  # json | console | auto (console on a TTY)
    log_level: str = "info"

    @property
    def session_dir(self) -> Path:
        """Where this session's persistent state lives (agent session id, lock)."""
        return self.state_dir / self.session

    def check_state_dir(self) -> None:
        """Create the session's state directory and prove it writable, else :class:`StateDirError`.

        Run before the broker starts, so a read-only filesystem, a path under a
        regular file or a full disk is one clear error, not a traceback from the
        middle of start-up. The probe writes a page, because a full tmpfs still
        lets an empty file be created.
        """
        probe = self.session_dir / f".probe-{os.getpid()}"
        try:
            self.session_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, bytes(_PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StateDirError(
                f"state directory {str(self.state_dir)!r} is not usable: {reason}. "
                "Give a writable one with --state-dir.",
                path=str(self.state_dir), reason=reason,
            ) from None
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
