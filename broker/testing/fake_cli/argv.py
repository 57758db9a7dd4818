"""The fake CLI's command line: the real CLI's flags it accepts, and its own.

Flags of the real CLI that do not matter offline are accepted and ignored, so
a broker can pass its production argv unchanged; a command line the real CLI
would refuse is refused with the same message.  Only the standard library is
imported.
"""

from __future__ import annotations

import re

from broker.testing.fake_cli.wire import PERMISSION_MODES

# Flags of the real CLI that take a value and that the fake accepts and ignores.
_IGNORED_VALUE_FLAGS = {
    "--permission-prompt-tool",
    "--max-turns",
    "--max-budget-usd",
    "--append-system-prompt",
    "--system-prompt",
    "--allowedTools",
    "--allowed-tools",
    "--disallowedTools",
    "--disallowed-tools",
    "--mcp-config",
    "--setting-sources",
    "--settings",
    "--add-dir",
    "--fallback-model",
    "--agents",
    "--effort",
    "--debug-file",
}
_IGNORED_BOOL_FLAGS = {
    "--include-partial-messages",
    "--replay-user-messages",
    "--dangerously-skip-permissions",
    "--strict-mcp-config",
}
_VALUE_FLAGS = {
    "--input-format",
    "--output-format",
    "--session-id",
    "--resume",
    "-r",
    "--model",
    "--permission-mode",
    "--sim-state-dir",
    "--stamp-file",
    "--stats-file",
    "--turn-ms",
    "--chunks",
    "--bytes",
    "--huge",
    "--tool-ms",
    "--error",
    "--interrupt-ms",
    "--set-model-ms",
    "--context-usage-ms",
    "--startup-ms",
    "--tool-child-secs",
    "--hook",
} | _IGNORED_VALUE_FLAGS
_BOOL_FLAGS = {
    "-p",
    "--print",
    "--verbose",
    "--fork-session",
    "--tool",
    "--permission",
    "--ignore-interrupts",
    "--die",
    "--garbage",
    "--silent",
    "--tool-child",
    "--merge-queued",
    "--hang",
} | _IGNORED_BOOL_FLAGS

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class UsageError(Exception):
    """A command line the real CLI would refuse (the fake exits 1 with the message)."""


def parse_argv(argv: list[str]) -> dict[str, str]:
    """Parse the command line into ``{flag: value}`` (``""`` for booleans).

    Raises :class:`UsageError` where the real CLI refuses to start.
    """
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            if flag not in _VALUE_FLAGS:
                raise UsageError(f"error: unknown option '{flag}'")
            opts[flag] = value
        elif arg in _VALUE_FLAGS:
            # A value that looks like a flag is a missing value: that is why
            # callers are told to use --resume=ID.
            if i >= len(argv) or argv[i].startswith("-"):
                raise UsageError(f"error: option '{arg} <value>' argument missing")
            opts[arg] = argv[i]
            i += 1
        elif arg in _BOOL_FLAGS:
            opts[arg] = ""
        elif arg.startswith("-"):
            raise UsageError(f"error: unknown option '{arg}'")
        else:
            raise UsageError(
                "error: the sim takes no prompt argument; write prompts to stdin (stream-json)"
            )
    if "-r" in opts:
        opts["--resume"] = opts.pop("-r")
    if "-p" not in opts and "--print" not in opts:
        raise UsageError("Error: the sim supports only -p (print) mode")
    if opts.get("--input-format") != "stream-json":
        raise UsageError("Error: the sim supports only --input-format stream-json")
    if opts.get("--output-format") != "stream-json":
        raise UsageError("Error: the sim supports only --output-format stream-json")
    if "--verbose" not in opts:
        raise UsageError(
            "Error: When using --print, --output-format=stream-json requires --verbose"
        )
    if "--session-id" in opts and not _UUID_RE.match(opts["--session-id"]):
        raise UsageError("Error: Invalid session ID. Must be a valid UUID.")
    mode = opts.get("--permission-mode")
    if mode is not None and mode not in PERMISSION_MODES:
        raise UsageError(f"error: option '--permission-mode <mode>' argument '{mode}' is invalid")
    return opts

