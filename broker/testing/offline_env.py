"""The environment that runs the real Claude Code CLI offline, against the fake Messages API.

One definition for the tests, the benchmarks and ``turnstile demo --agent
claude``: the CLI talks only to the fake (``ANTHROPIC_BASE_URL``), sends no
telemetry and checks for no update, and keeps everything it writes (HOME,
transcripts, TMPDIR with its ``cc-socks`` unix socket) in one directory the
caller removes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["offline_cli_env", "without_inherited_claude_settings"]


def offline_cli_env(api_url: str, home: str) -> dict[str, str]:
    """The variables that keep the CLI on ``api_url`` and inside ``home`` (``home/tmp`` is created)."""
    tmpdir = os.path.join(home, "tmp")
    os.makedirs(tmpdir, exist_ok=True)
    return {
        "ANTHROPIC_BASE_URL": api_url,
        "ANTHROPIC_API_KEY": "sk-test",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "HOME": home,
        "TMPDIR": tmpdir,
    }


def without_inherited_claude_settings(env: Mapping[str, str], given: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the CLAUDE*/ANTHROPIC* variables that are not in ``given``.

    Settings inherited from the caller's shell (an API key, a Bedrock switch,
    an enclosing Claude Code session) would send the CLI elsewhere than the
    fake API.
    """
    return {k: v for k, v in env.items() if k in given or not k.startswith(("CLAUDE", "ANTHROPIC"))}
