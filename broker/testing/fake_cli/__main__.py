"""``python -m broker.testing.fake_cli``: run the fake Claude Code CLI on stdin and stdout."""

from broker.testing.fake_cli.cli import main

main()
