"""Adapter for the real Claude Code CLI in stream-json mode."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from broker.agents.base import AgentLaunch, AgentNotFound, AgentPolicy, stream_json_args

__all__ = ["ClaudeAgent", "bundled_claude_bin", "find_claude_bin"]

_INSTALL_HINT = "Install it with: pip install 'turnstile-broker[claude]', or pass --claude-bin PATH"


def _bundled_candidate() -> str | None:
    # find_spec locates the package without importing it: claude_agent_sdk
    # pulls in anyio, mcp and more, none of which the broker needs.
    try:
        spec = importlib.util.find_spec("claude_agent_sdk")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        return str(Path(location) / "_bundled" / "claude")
    return None


def bundled_claude_bin() -> str | None:
    """Return the CLI bundled in the ``claude_agent_sdk`` package, if it is installed."""
    candidate = _bundled_candidate()
    if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    return None


def find_claude_bin(explicit: str | None = None) -> str:
    """Locate the ``claude`` executable.

    Order: ``explicit`` if given (a path, or a name looked up on ``PATH``; it
    must exist: a typo should not silently fall back to another binary);
    else ``claude`` on ``PATH``; else the binary bundled in the
    ``claude_agent_sdk`` package.  Raises :class:`AgentNotFound`.
    """
    if explicit is not None:
        # A bare name ("claude-next") is looked up on PATH like a shell would.
        resolved = shutil.which(explicit) if os.sep not in explicit else explicit
        if resolved and os.path.isfile(resolved) and os.access(resolved, os.X_OK):
            return resolved
        raise AgentNotFound([explicit], _INSTALL_HINT)
    searched = ["claude on PATH"]
    on_path = shutil.which("claude")
    if on_path:
        return on_path
    bundled = _bundled_candidate()
    searched.append(bundled or "claude_agent_sdk package (not installed)")
    found = bundled_claude_bin()
    if found:
        return found
    raise AgentNotFound(searched, _INSTALL_HINT)


class ClaudeAgent:
    """Launch description for ``claude -p`` speaking stream-json on stdio."""

    name = "claude"

    def __init__(
        self,
        bin_path: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        policy: AgentPolicy | None = None,
    ) -> None:
        # Resolved eagerly so a missing binary fails at configuration time,
        # not at the first turn.
        self.bin_path = find_claude_bin(bin_path)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cwd = cwd
        self.policy = policy or AgentPolicy()

    def launch(self, *, session_id: str, resume: bool, model: str | None) -> AgentLaunch:
        """Return argv, environment, cwd and the ``initialize`` request for one CLI process of ``session_id``."""
        argv = [self.bin_path, *stream_json_args(session_id=session_id, resume=resume, model=model,
                                                 policy=self.policy), *self.extra_args]
        env = {**os.environ, **self.env}
        return AgentLaunch(argv=argv, env=env, cwd=self.cwd, initialize=self.policy.initialize())
