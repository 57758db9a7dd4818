"""The ``--agent sim`` adapter: launches the fake Claude Code CLI (``python -m broker.testing.fake_cli``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from broker.agents.base import AgentLaunch, AgentPolicy, stream_json_args


class SimAgent:
    """Launches the test kit's fake Claude Code CLI with the real CLI's argv."""

    name = "sim"

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        python: str | None = None,
        policy: AgentPolicy | None = None,
    ) -> None:
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cwd = cwd
        self.python = python or sys.executable
        self.policy = policy or AgentPolicy()

    def launch(self, *, session_id: str, resume: bool, model: str | None) -> AgentLaunch:
        """The fake's argv and initialize request mirror the real CLI's so the runtime cannot tell them apart."""
        argv = [self.python, "-m", "broker.testing.fake_cli",
                *stream_json_args(session_id=session_id, resume=resume, model=model, policy=self.policy),
                *self.extra_args]
        env = {**os.environ, **self.env}
        return AgentLaunch(argv=argv, env=env, cwd=self.cwd, initialize=self.policy.initialize())
