"""The ``--agent sim`` adapter: launches the fake Claude Code CLI (``python -m broker.testing.fake_cli``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from broker.agents.base import AgentLaunch


class SimAgent:
    """Launches the test kit's fake Claude Code CLI with the real CLI's argv."""

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
        """The fake's argv mirrors the real CLI's so the runtime cannot tell them apart."""
        argv = [
            self.python, "-m", "broker.testing.fake_cli",
            "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
        ]
        argv += [f"--resume={session_id}"] if resume else ["--session-id", session_id]
        if model:
            argv += ["--model", model]
        argv += self.extra_args
        env = {**os.environ, **self.env}
        return AgentLaunch(argv=argv, env=env, cwd=self.cwd)
