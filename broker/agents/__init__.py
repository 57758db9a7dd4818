"""Agent adapters: how to launch the real Claude Code CLI or the simulated agent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from broker.agents.base import AgentAdapter, AgentLaunch, AgentNotFound

__all__ = ["AgentAdapter", "AgentLaunch", "AgentNotFound", "make_agent"]


def make_agent(
    name: str,
    *,
    claude_bin: str | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> AgentAdapter:
    """The adapter called ``name`` (``claude`` or ``sim``)."""
    if name == "claude":
        from broker.agents.claude import ClaudeAgent

        return ClaudeAgent(bin_path=claude_bin, extra_args=extra_args, env=env, cwd=cwd)
    if name == "sim":
        from broker.agents.simulated import SimAgent

        return SimAgent(extra_args=extra_args, env=env, cwd=cwd)
    raise ValueError(f"unknown agent {name!r}: use 'claude' or 'sim'")
