"""Adapter for the simulated agent (``python -m broker.agents.sim``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from broker.agents.base import AgentLaunch


class SimAgent:
    """Launches the project's simulated Claude Code CLI with the real CLI's argv."""

    name = "sim"

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        python: str | None = None,
    ) -> None:
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cwd = cwd
        self.python = python or sys.executable

    def launch(self, *, session_id: str, resume: bool, model: str | None) -> AgentLaunch:
        """The sim's argv mirrors the real CLI's so the runtime cannot tell them apart."""
        argv = [
            self.python, "-m", "broker.agents.sim",
            "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
        ]
        argv += [f"--resume={session_id}"] if resume else ["--session-id", session_id]
        if model:
            argv += ["--model", model]
        argv += self.extra_args
        env = {**os.environ, **self.env}
        return AgentLaunch(argv=argv, env=env, cwd=self.cwd)
