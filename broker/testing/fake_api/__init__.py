"""An offline fake of the Anthropic Messages API, for tests, benchmarks and the demo.

The real Claude Code CLI runs unchanged against it (``ANTHROPIC_BASE_URL``
pointing here; :func:`broker.testing.offline_env.offline_cli_env` builds the
whole environment).  By default the "model" answers ``echo: <prompt>``;
``[api:...]`` directives in the prompt make it stream slowly, call a tool,
fail with a status, send a big reply or hang (docs/testing-kit.md).

- :mod:`.directives`: the ``[api:...]`` directives.
- :mod:`.recording`: what is read from a request (the prompt) and recorded.
- :mod:`.server`: :class:`OfflineAPI`, the HTTP server, and what a test can wait on.
- ``python -m broker.testing.fake_api [--port N] [--record FILE]``: run it standalone.
"""

from __future__ import annotations

from broker.testing.fake_api.directives import Directives, big_text, parse_directives
from broker.testing.fake_api.recording import CLIENT_GONE, RecordedRequest, prompt_pieces, prompt_text
from broker.testing.fake_api.server import OfflineAPI, serve

__all__ = [
    "CLIENT_GONE",
    "Directives",
    "OfflineAPI",
    "RecordedRequest",
    "big_text",
    "parse_directives",
    "prompt_pieces",
    "prompt_text",
    "serve",
]
