"""Agent adapters: how to launch the real Claude Code CLI (``claude``) or the fake one (``sim``).

The fake CLI itself lives in the test kit, :mod:`broker.testing.fake_cli`;
:mod:`broker.agents.sim` is only its adapter.  Kept free of imports at module
level so choosing an adapter loads only that adapter.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not from typing: keeps this package as cheap to import as it was
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    from broker.agents.base import AgentAdapter, AgentPolicy

__all__ = ["AgentAdapter", "AgentLaunch", "AgentNotFound", "AgentPolicy", "make_agent"]


def __getattr__(name: str) -> Any:
    if name in ("AgentAdapter", "AgentLaunch", "AgentNotFound", "AgentPolicy"):
        from broker.agents import base

        return getattr(base, name)
    raise AttributeError(name)


def make_agent(
    name: str,
    *,
    claude_bin: str | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    policy: AgentPolicy | None = None,
) -> AgentAdapter:
    """The adapter called ``name`` (``claude`` or ``sim``); ``policy`` says how the agent asks before acting."""
    if name == "claude":
        from broker.agents.claude import ClaudeAgent

        return ClaudeAgent(bin_path=claude_bin, extra_args=extra_args, env=env, cwd=cwd, policy=policy)
    if name == "sim":
        from broker.agents.sim import SimAgent

        return SimAgent(extra_args=extra_args, env=env, cwd=cwd, policy=policy)
    raise ValueError(f"unknown agent {name!r}: use 'claude' or 'sim'")
