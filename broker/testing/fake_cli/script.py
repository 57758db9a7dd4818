"""How the fake CLI scripts a turn: ``[sim:...]`` directives, global flags, the turn in flight.

Every directive (listed with examples in docs/testing-kit.md) has a global
flag that applies it to every turn; a directive in the prompt overrides the
flag.  Only the standard library is imported.
"""

from __future__ import annotations

import os
import signal
import time

from broker.testing.directives import scan_directives

TYPE_CHECKING = False  # not from typing: importing typing costs the fake CLI ~5 ms per start
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

# Global flags that set a per-turn directive default: flag -> directive name.
FLAG_DIRECTIVES = {
    "--turn-ms": "turn_ms",
    "--chunks": "chunks",
    "--bytes": "bytes",
    "--huge": "huge",
    "--tool-ms": "tool_ms",
    "--error": "error",
    "--interrupt-ms": "interrupt_ms",
    "--tool": "tool",
    "--permission": "permission",
    "--hook": "hook",
    "--ignore-interrupts": "ignore_interrupt",
    "--die": "die",
    "--garbage": "garbage",
    "--silent": "silent",
    "--tool-child": "tool_child",
    "--tool-child-secs": "tool_child",
    "--hang": "hang",
}


def parse_directives(text: str) -> dict[str, str]:
    """Return the ``[sim:NAME=VALUE]`` directives in ``text`` (``VALUE`` ``""`` if absent)."""
    return {name: value or "" for name, value in scan_directives(text, "sim")}


def base_script(opts: dict[str, str]) -> dict[str, str]:
    """The directives the command line sets for every turn."""
    return {name: opts[flag] for flag, name in FLAG_DIRECTIVES.items() if flag in opts}


def as_int(value: str | None, default: int = 0) -> int:
    """A directive's or flag's number; ``default`` when absent or not a number."""
    try:
        return int(value) if value else default
    except ValueError:
        return default


def reply_text(prompt: str, script: dict[str, str], history: int) -> str:
    """The reply's text: ``sim: PROMPT``, with ``[sim:history]`` and ``[sim:bytes]`` applied."""
    text = f"sim: {prompt}"
    if "history" in script:
        text += f" [history={history}]"
    if "bytes" in script:
        n = max(0, as_int(script["bytes"]))
        raw = text.encode("utf-8")[:n].decode("utf-8", "ignore")
        text = raw + "." * (n - len(raw.encode("utf-8")))
    return text


def split_reply(text: str, k: int) -> tuple[str, list[str]]:
    """The reply padded with dots to at least ``k`` characters, and cut into ``k`` blocks."""
    if len(text) < k:
        text += "." * (k - len(text))
    bounds = [len(text) * i // k for i in range(k + 1)]
    return text, [text[bounds[i] : bounds[i + 1]] for i in range(k)]


def fork_tool_child(seconds: int) -> None:
    """``[sim:tool_child]``: fork a child that holds stdout open for ``seconds``, as a tool left running would."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.close(0)
            # The child keeps fd 1 (the agent's stdout) open on purpose and
            # stays in the process group: that is the fault being modelled.
            time.sleep(seconds)
        finally:
            os._exit(0)


def filler(n: int) -> str:
    """Deterministic ASCII text of exactly ``n`` characters."""
    unit = "sim filler text 0123456789 abcdefghijklmnopqrstuvwxyz. "
    return (unit * (n // len(unit) + 1))[:n]


def decision(answer: Any) -> tuple[bool, str]:
    """Read a ``can_use_tool`` answer: (allowed, denial message)."""
    if not isinstance(answer, dict):
        return False, "no answer"
    if answer.get("subtype") != "success":
        return False, str(answer.get("error") or "permission request failed")
    inner = answer.get("response")
    if isinstance(inner, dict) and inner.get("behavior") == "allow":
        return True, ""
    if isinstance(inner, dict):
        return False, str(inner.get("message") or "denied")
    return False, "denied"


#: The hook events ``[sim:hook=EVENT]`` can fire: the ones around the sim's tool call.
HOOK_EVENTS = ("PreToolUse", "PostToolUse")


def hook_outcome(answer: Any) -> tuple[str, str]:
    """Read a ``hook_callback`` answer: (outcome, reason).

    The outcome is ``continue``; ``blocked`` (``decision: "block"`` with
    ``reason``, or PreToolUse's ``hookSpecificOutput.permissionDecision:
    "deny"``); ``stopped`` (``continue: false``, ``stopReason``: the turn ends
    after the tool); or ``failed`` (an error answer, which the CLI does not
    treat as a veto).
    """
    if not isinstance(answer, dict):
        return "failed", "no answer"
    if answer.get("subtype") != "success":
        return "failed", str(answer.get("error") or "hook callback failed")
    out = answer.get("response")
    if not isinstance(out, dict):
        return "continue", ""
    specific = out.get("hookSpecificOutput")
    specific = specific if isinstance(specific, dict) else {}
    if out.get("continue") is False:
        return "stopped", str(out.get("stopReason") or "continue: false")
    if out.get("decision") == "block":
        return "blocked", str(out.get("reason") or "blocked")
    if specific.get("permissionDecision") == "deny":
        return "blocked", str(specific.get("permissionDecisionReason") or "denied")
    return "continue", ""


class Turn:
    """One turn in flight: its messages, script and progress."""

    def __init__(self, uuids: list[str], prompt: str, script: dict[str, str], model: str) -> None:
        self.uuids = uuids
        self.prompt = prompt
        self.script = script
        self.model = model
        self.started = time.monotonic()
        self.phase = "streaming"
        self.num_turns = 1
        self.out_chars = 0
        self.ignore_interrupts = "ignore_interrupt" in script
        self.wait_until: float | None = None
        # The control request the turn waits on (can_use_tool or hook_callback), if any.
        self.pending_id: str | None = None
        self.stop_at: float | None = None
        self.stop_reason = ""
        self.die_timer: list[Any] | None = None
        self.gen: Generator[float | None, Any, dict[str, Any]] | None = None
        self.tool_id = ""
        self.tool_running = False
        # The text block streaming now: (text, start, end) on the monotonic clock.
        self.block: tuple[str, float, float] | None = None
        self.text_out = ""  # reply text printed so far (complete blocks)
        self.partial = ""  # a block cut short by an interrupt or priority "now"
        # How the turn was stopped: "" (not), "interrupt" (control request or
        # SIGINT: marker), "now" (a priority "now" message: no marker).
        self.abort = ""
        self.abort_after_tool = False  # priority "now" while the tool runs
        self.prompt_id = ""  # what hook inputs call the prompt being processed (made when a hook first fires)
        self.hook_stopped = False  # a hook answered continue: false: the turn ends after the tool
