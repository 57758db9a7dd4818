"""What every agent adapter provides: how to launch the agent process.

An adapter only describes the process (argv, environment, working directory,
the ``initialize`` request to write first); spawning, process groups and
stdio belong to the session runtime, so the same runtime drives the real
Claude Code CLI and the simulated agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ipc.errors import AgentNotFound

__all__ = [
    "DEFAULT_HOOK_EVENTS", "HOOK_CALLBACK_PREFIX", "AgentAdapter", "AgentLaunch", "AgentNotFound", "AgentPolicy",
    "stream_json_args",
]

#: The hook events registered by default: the ones around every tool call, which a holder's
#: ``on_hook`` most often wants (each registered event costs one control round trip when it fires).
DEFAULT_HOOK_EVENTS: tuple[str, ...] = ("PreToolUse", "PostToolUse")

#: A hook's callback id is this prefix and the event name, so the broker can tell them apart in logs.
HOOK_CALLBACK_PREFIX = "turnstile:"


@dataclass(frozen=True)
class AgentPolicy:
    """How the agent asks before acting: permission mode, and which hook events reach the broker.

    ``can_use_tool`` requests always reach the broker (``--permission-prompt-tool stdio``):
    the holder's ``on_permission`` answers them, else the broker's default permission.
    """

    permission_mode: str | None = None
    hook_events: tuple[str, ...] = DEFAULT_HOOK_EVENTS

    def initialize(self) -> dict[str, Any]:
        """The ``initialize`` control request's fields: one matcher per hook event, for every tool.

        The CLI sends ``hook_callback`` only for callback ids registered this way
        (the Agent SDK registers its hooks with the same request).
        """
        hooks = {ev: [{"matcher": None, "hookCallbackIds": [HOOK_CALLBACK_PREFIX + ev]}] for ev in self.hook_events}
        return {"hooks": hooks or None}


@dataclass(frozen=True)
class AgentLaunch:
    """Everything needed to spawn one agent process."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    #: Fields of the ``initialize`` control request to write before anything else, if any.
    initialize: dict[str, Any] | None = field(default=None)


def stream_json_args(*, session_id: str, resume: bool, model: str | None, policy: AgentPolicy) -> list[str]:
    """The CLI's arguments for stream-json on stdio, shared by the real CLI and the fake one."""
    args = [
        "-p", "--input-format", "stream-json", "--output-format", "stream-json",
        # Without --verbose the CLI refuses stream-json output (exit 1).
        "--verbose",
        # Without it the CLI decides permission prompts itself (denying in -p mode) and never asks.
        "--permission-prompt-tool=stdio",
    ]
    # The "=" forms keep a value starting with "-" from parsing as a flag.
    args += [f"--resume={session_id}"] if resume else ["--session-id", session_id]
    if model:
        args.append(f"--model={model}")
    if policy.permission_mode:
        args.append(f"--permission-mode={policy.permission_mode}")
    return args


class AgentAdapter(Protocol):
    """A kind of agent the broker can run: names it and says how to launch it."""

    name: str

    def launch(self, *, session_id: str, resume: bool, model: str | None) -> AgentLaunch:
        """Describe the process for ``session_id``.

        ``resume`` is true when the session already exists (a restart after a
        crash or a wedge) and its conversation must be continued.
        """
        ...

