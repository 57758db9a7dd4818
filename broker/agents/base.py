"""What every agent adapter provides: how to launch the agent process.

An adapter only describes the process (argv, environment, working directory);
spawning, process groups and stdio belong to the session runtime, so the same
runtime drives the real Claude Code CLI and the simulated agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ipc.errors import AgentNotFound

__all__ = ["AgentAdapter", "AgentLaunch", "AgentNotFound"]


@dataclass(frozen=True)
class AgentLaunch:
    """Everything needed to spawn one agent process."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None


class AgentAdapter(Protocol):
    """A kind of agent the broker can run: names it and says how to launch it."""

    name: str

    def launch(self, *, session_id: str, resume: bool, model: str | None) -> AgentLaunch:
        """Describe the process for ``session_id``.

        ``resume`` is true when the session already exists (a restart after a
        crash or a wedge) and its conversation must be continued.
        """
        ...
