"""turnstile's test kit: fakes of what the broker talks to, and helpers to run it.

- :mod:`broker.testing.fake_cli`: a fake Claude Code CLI (``python -m
  broker.testing.fake_cli``), run by ``turnstile serve --agent sim``.
- :mod:`broker.testing.fake_api`: an offline fake of the Anthropic Messages
  API (``python -m broker.testing.fake_api``), for the real CLI.
- :mod:`broker.testing.offline_env`: the environment that keeps the real CLI
  on the fake API and away from the user's HOME.
- :mod:`broker.testing.launcher`: a ``turnstile serve`` child process.
- :mod:`broker.testing.natsproc`, :mod:`broker.testing.gatewayproc`: a private
  ``nats-server`` (JetStream, loopback; or a cluster of them) and a ``turnstile gateway`` child process,
  for the fleet's demo, benchmark and tests.

None of it is used by the broker at run time; the demo, the benchmarks and
the tests use it.  docs/testing-kit.md says how to use each.  Nothing is
imported here: the fake CLI loads this package at every start-up.
"""
