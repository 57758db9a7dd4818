"""Scripted stream-json exchanges, to run against the real CLI and the sim alike.

An exchange is a list of steps: lines to write to the agent's stdin, and
pauses "until X is seen" on its stdout.  :func:`run_exchange` plays one against
a fresh agent process and returns the ``type[/subtype]`` of every stdout
object; :func:`normalise` turns a full :class:`Transcript` into what must
agree between agents (kinds, control-response shapes, result shapes, message
lifecycles), free of ids, timings and wording.

Prompts carry directives for both agents (``[api:...]`` for the offline
Messages API behind the real CLI, ``[sim:...]`` for the sim); each ignores the
other's.  Symbolic ids keep scripts readable: ``"@u1"`` in a user message's
``uuid`` becomes a fresh UUID per run, and request ids are used as written.

Only behaviour recorded in ``docs/claude-stream-json.md`` (and checked
against the real binary) is scripted.  Where the real CLI's output depends on
timing, the script pins the timing down (see :class:`Busy`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from tests.realcli import CLIExited, Line

__all__ = [
    "ASPECTS",
    "EXCHANGES",
    "Agent",
    "Answer",
    "Busy",
    "CloseStdin",
    "Exchange",
    "Normalised",
    "Send",
    "SendRaw",
    "Transcript",
    "Until",
    "control",
    "control_shape",
    "dumps",
    "normalise",
    "record_exchange",
    "run_exchange",
    "user",
]

DEFAULT_TIMEOUT_S = 10.0

#: What two agents must agree on, compared one by one (see :class:`Normalised`).
ASPECTS = ("kinds", "lifecycles", "controls", "results", "num_turns", "exit")


# -- steps ------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Write one JSON object as a line (``"@name"`` uuids are substituted)."""

    obj: Mapping[str, Any]


@dataclass(frozen=True)
class SendRaw:
    """Write raw text as it is (malformed or ignorable input)."""

    text: str


@dataclass(frozen=True)
class Until:
    """Read stdout until an object matches ``what``.

    ``what`` is ``"result"`` (any result), ``"result:@u1"`` (the result whose
    ``user_message_uuids`` include u1), ``"control_response:RID"``, a
    ``type[/subtype]`` such as ``"system/init"``, or ``"eof"``.
    """

    what: str
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Busy:
    """Wait until the turn of the last user message is mid-stream.

    The real CLI prints nothing while the model streams, so stdout cannot say
    when an interrupt will land mid-stream; an agent may provide
    ``busy_hook(prompt, text_started, timeout_s)`` that knows (the real CLI's
    hook watches the offline API, the sim's goes by the sim's clock).  The
    runner then also reads up to the turn's ``system/init`` (the real CLI may
    print it only after the request is streaming, so its place relative to
    later input is a race), and, without a hook and with ``text_started``, to
    the first ``assistant``.

    ``text_started``: wait until reply text has reached the agent, so an
    interrupt leaves a partial assistant message behind.
    """

    text_started: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Answer:
    """Read stdout until the agent's own control request of ``subtype``, then answer it with ``response``
    (a ``success`` control_response carrying the agent's request id)."""

    subtype: str
    response: Mapping[str, Any]
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class CloseStdin:
    """Close the agent's stdin (end of input)."""


Step = Send | SendRaw | Until | Busy | Answer | CloseStdin


@dataclass(frozen=True)
class Exchange:
    """A named script.  After its steps the runner closes stdin and reads to EOF."""

    name: str
    steps: tuple[Step, ...]
    doc: str = ""
    # Aspects (see ASPECTS) where the real CLI and the sim are known to
    # differ, each with the precise difference.  The conformance test still
    # checks every other aspect, reports these as xfail, and fails once one
    # of them agrees again (so the entry gets removed).
    drifts: Mapping[str, str] = field(default_factory=dict)
    # Control requests whose replies are compared by outcome only: their
    # payloads are agent-specific by nature (e.g. context usage numbers).
    loose_controls: tuple[str, ...] = ()


def user(name: str, content: Any, **extra: Any) -> Send:
    """A user message stamped with symbolic uuid ``name``."""
    return Send(
        {
            "type": "user",
            "message": {"role": "user", "content": content},
            "parent_tool_use_id": None,
            "session_id": "default",
            "uuid": f"@{name}",
            **extra,
        }
    )


def control(request_id: str, subtype: str, **fields: Any) -> Send:
    """A control request with a literal request id."""
    return Send({"type": "control_request", "request_id": request_id, "request": {"subtype": subtype, **fields}})


# Long turns: the real CLI's stream hangs after message_start, and so does the
# sim's turn after system/init: no text, so no partial assistant line when the
# turn is cut short.
LONG = "[api:hang] [sim:hang]"

# A reply whose one text block streams for 6 s: neither agent prints it until
# it is complete, or cut short (then as one assistant line).
SLOW_TEXT = "[api:slow=6000] [sim:turn_ms=6000] [sim:chunks=1] partial " + "x" * 200


EXCHANGES: tuple[Exchange, ...] = (
    Exchange(
        "one_turn",
        (user("u1", "hello"), Until("result:@u1")),
        "A prompt gives init, one assistant line and a success result; EOF then exits 0.",
    ),
    Exchange(
        "two_turns_blocks",
        (
            user("u1", "first"),
            Until("result:@u1"),
            user("u2", [{"type": "text", "text": "second as blocks"}]),
            Until("result:@u2"),
        ),
        "system/init comes at every turn; content may be a list of blocks.",
    ),
    Exchange(
        "interrupt_streaming",
        (
            user("u1", f"{LONG} long turn"),
            Busy(),
            control("int-1", "interrupt"),
            Until("control_response:int-1"),
            Until("result:@u1"),
            user("u2", "after the interrupt"),
            Until("result:@u2"),
        ),
        "Interrupt mid-stream: nested reply, interrupt marker, aborted_streaming result; the process keeps serving.",
    ),
    Exchange(
        "interrupt_then_eof",
        (user("u1", f"{LONG} cut short"), Busy(), control("int-1", "interrupt"), Until("result:@u1")),
        "Stdin EOF after an error result: exit 1.",
    ),
    Exchange(
        "idle_interrupt",
        (
            control("int-1", "interrupt"),
            Until("control_response:int-1"),
            user("u1", "then a prompt"),
            Until("result:@u1"),
        ),
        "An interrupt with no turn running gets its reply and nothing else.",
    ),
    Exchange(
        "interrupt_with_partial_text",
        (user("u1", SLOW_TEXT), Busy(text_started=True), control("int-1", "interrupt"), Until("result:@u1")),
        "Interrupt after some reply text streamed: no assistant line while the block streams; the "
        "partial block as one assistant line after the interrupt's reply, then the marker and the "
        "result (num_turns 2: the marker counts).",
    ),
    Exchange(
        "set_model_mid_session",
        (
            user("u1", "before the switch"),
            Until("result:@u1"),
            control("model-1", "set_model", model="claude-haiku-4-5"),
            Until("control_response:model-1"),
            user("u2", "after the switch"),
            Until("result:@u2"),
        ),
        "set_model after a turn: an isReplay user line, then {model}.",
    ),
    Exchange(
        "set_model_before_first_turn",
        (
            control("model-1", "set_model", model="claude-haiku-4-5"),
            Until("control_response:model-1"),
            user("u1", "first prompt"),
            Until("result:@u1"),
        ),
        "set_model before any turn: no replay line.",
    ),
    Exchange(
        "set_model_null",
        (
            user("u1", "a turn"),
            Until("result:@u1"),
            control("model-1", "set_model", model=None),
            Until("control_response:model-1"),
        ),
        "set_model with model null resets to the built-in default model (not --model's): that changes "
        "the model, so the isReplay line comes first (the doc's 'not for model:null' holds only when "
        "already on the default).",
    ),
    Exchange(
        "set_model_unknown_model",
        (
            user("u1", "a turn"),
            Until("result:@u1"),
            control("model-1", "set_model", model="not-a-model"),
            Until("control_response:model-1"),
            user("u2", "still on the old model"),
            Until("result:@u2"),
        ),
        "set_model to a model the API does not serve: the CLI probes it, gets a 404 and answers with an "
        "error (error_code not_found, the model it kept); the next turn runs on the old model.",
    ),
    Exchange(
        "set_model_same_model",
        (
            user("u1", "a turn"),
            Until("result:@u1"),
            control("model-1", "set_model", model="claude-sonnet-4-5"),
            Until("control_response:model-1"),
        ),
        "set_model to the model already in use (agents run with --model claude-sonnet-4-5): the "
        "control_response alone, no replay line.",
    ),
    Exchange(
        "queued_message_survives_interrupt",
        (
            user("u1", f"{LONG} running"),
            Busy(),
            user("u2", "queued behind it"),
            control("int-1", "interrupt"),
            Until("control_response:int-1"),
            Until("result:@u1"),
            Until("result:@u2"),
        ),
        "A message queued during a turn is still_queued at the interrupt, then runs.",
    ),
    Exchange(
        "interrupt_cancel_queued",
        (
            user("u1", f"{LONG} running"),
            Busy(),
            user("u2", "queued then cancelled"),
            control("int-1", "interrupt", cancel_queued=True),
            Until("control_response:int-1"),
            Until("result:@u1"),
        ),
        "cancel_queued drops the queued message.",
    ),
    Exchange(
        "priority_now",
        (
            user("u1", f"{LONG} running"),
            Busy(),
            user("u2", "urgent", priority="now"),
            Until("result:@u2"),
        ),
        "priority now aborts the running turn: the error_during_execution result alone, no "
        "interrupt marker (num_turns 1).  (After some reply text the real CLI may instead print "
        "the partial block and a success result carrying it, but whether it does at a given moment "
        "is a race inside it, so that is not scripted.)",
    ),
    Exchange(
        "interrupt_during_tool",
        (
            user("u1", '[api:tool=Bash:{"command":"sleep 8"}] [sim:tool] [sim:tool_ms=8000] slow tool'),
            Until("assistant"),
            control("int-1", "interrupt"),
            Until("control_response:int-1"),
            Until("result:@u1"),
        ),
        "Interrupt while a tool runs: a rejected tool_result line (is_error), the '... for tool use]' "
        "marker, an aborted_tools result (num_turns 3).",
    ),
    Exchange(
        "misc_controls",
        (
            control("init-1", "initialize"),
            Until("control_response:init-1"),
            control("mode-1", "set_permission_mode", mode="default"),
            Until("control_response:mode-1"),
            control("mode-2", "set_permission_mode", mode="no-such-mode"),
            Until("control_response:mode-2"),
            control("mcp-1", "mcp_status"),
            Until("control_response:mcp-1"),
            control("ctx-1", "get_context_usage"),
            Until("control_response:ctx-1"),
            user("u1", "after the controls"),
            Until("result:@u1"),
        ),
        "Other control requests the SDK sends succeed (payloads are agent-specific); "
        "set_permission_mode answers {mode}, or error_code invalid_mode.",
        loose_controls=("init-1", "mcp-1", "ctx-1"),
    ),
    Exchange(
        "permission_modes",
        (
            control("mode-1", "set_permission_mode", mode="acceptEdits"),
            Until("control_response:mode-1"),
            control("mode-2", "set_permission_mode", mode="acceptEdits"),
            Until("control_response:mode-2"),
            control("mode-3", "set_permission_mode", mode="auto"),
            Until("control_response:mode-3"),
            control("mode-4", "set_permission_mode", mode="bypassPermissions"),
            Until("control_response:mode-4"),
            control("mode-5", "set_permission_mode", mode=42),
            Until("control_response:mode-5"),
            control("model-1", "set_model", model=42),
            Until("control_response:model-1"),
            user("u1", "after the modes"),
            Until("result:@u1"),
        ),
        "A mode change is answered {mode} and followed by a system/status line (none when the mode "
        "is unchanged); 'auto' is refused for a 4.5 model (error_code auto_mode_model: agents run "
        "with claude-sonnet-4-5), bypassPermissions without --dangerously-skip-permissions "
        "(bypass_not_launched), a non-string mode with invalid_mode; a non-string model with "
        "invalid_request.",
    ),
    Exchange(
        "unsupported_control",
        (control("bad-1", "no_such_subtype"), Until("control_response:bad-1"), user("u1", "ok"), Until("result:@u1")),
        "An unknown control subtype: error reply with error_code unsupported_request.",
    ),
    Exchange(
        "ignored_input",
        (
            SendRaw("\n"),
            SendRaw("[1, 2]\n"),
            SendRaw('{"type":"no_such_type","x":1}\r\n'),
            user("u0", 42),
            user("u1", "still alive"),
            Until("result:@u1"),
        ),
        "Blank lines, arrays, unknown types, CRLF and content 42 are ignored: no turn, no result; "
        "the uuid-stamped content-42 message gets a lone command_lifecycle 'completed'.",
    ),
    Exchange(
        "duplicate_uuid",
        (
            user("u1", "original"),
            Until("result:@u1"),
            user("u1", "repeat of the same uuid"),
            user("u2", "fresh"),
            Until("result:@u2"),
        ),
        "A repeated uuid is dropped silently.",
    ),
    Exchange(
        "malformed_line",
        (SendRaw("{not json\n"), Until("eof")),
        "One malformed line kills the agent: EOF, exit 1.",
    ),
    Exchange(
        "malformed_mid_turn",
        (user("u1", f"{LONG} doomed"), Busy(), SendRaw('{"type":"user"}\n'), Until("eof")),
        "A user line without message kills the agent mid-turn: no result.",
    ),
    Exchange(
        "eof_mid_turn",
        (user("u1", "[api:slow=800] [sim:turn_ms=800] [sim:chunks=1] finish me"), Busy(), CloseStdin()),
        "Stdin EOF mid-turn: the turn finishes, then exit 0.",
    ),
    Exchange(
        "api_error",
        (
            user("u1", "[api:status=400] [sim:error=api:400] rejected"),
            Until("result:@u1"),
            user("u2", "recovers"),
            Until("result:@u2"),
        ),
        "An API error is a success/is_error result with api_error_status; the process goes on.",
    ),
    Exchange(
        "hook_blocks_tool",
        (
            control("init-1", "initialize", hooks={"PreToolUse": [{"matcher": None, "hookCallbackIds": ["pre"]}]}),
            Until("control_response:init-1"),
            user("u1", '[api:tool=Bash:{"command":"echo sim"}] [sim:hook] guarded tool'),
            Answer("hook_callback", {"decision": "block", "reason": "not now"}),
            Until("result:@u1"),
        ),
        "A PreToolUse hook registered at initialize: the agent's hook_callback request (its keys and its "
        "input's, in order), then, blocked, an is_error tool_result and a success result (num_turns 2).",
        loose_controls=("init-1",),
    ),
    Exchange(
        "hook_stops_turn",
        (
            control("init-1", "initialize", hooks={"PreToolUse": [{"matcher": "Bash", "hookCallbackIds": ["pre"]}],
                                                   "PostToolUse": [{"matcher": None, "hookCallbackIds": ["post"]}]}),
            Until("control_response:init-1"),
            user("u1", '[api:tool=Bash:{"command":"echo sim"}] [sim:hook] stop after'),
            Answer("hook_callback", {"continue": False, "stopReason": "enough"}),
            Answer("hook_callback", {}),
            Until("result:@u1"),
        ),
        "Both tool events registered, PreToolUse answering continue: false: the tool still runs and its "
        "PostToolUse is called (input with tool_response), then an empty success result with "
        "terminal_reason hook_stopped (no text turn).",
        loose_controls=("init-1",),
    ),
    Exchange(
        "tool_turn",
        (user("u1", '[api:tool=Bash:{"command":"echo sim"}] [sim:tool] use a tool'), Until("result:@u1")),
        "A tool call: assistant tool_use, user tool_result, assistant text, result (num_turns 2).",
    ),
)


# -- running --------------------------------------------------------------------------


class Agent(Protocol):
    """What the runner needs from an agent process (``tests.realcli.StdioProcess``)."""

    lines: list[Line]

    def send(self, obj: Mapping[str, Any]) -> int: ...
    def send_raw(self, text: str) -> int: ...
    def close_stdin(self) -> None: ...
    def read(self, timeout_s: float) -> Line: ...
    def wait_exit(self, timeout_s: float) -> int: ...


AgentFactory = Callable[[], AbstractContextManager[Agent]]


@dataclass
class Transcript:
    """Everything one run of an exchange produced."""

    exchange: str
    lines: list[Line]
    exit_code: int | None
    uuids: dict[str, str] = field(default_factory=dict)  # symbolic name -> real uuid

    @property
    def kinds(self) -> list[str]:
        """``type[/subtype]`` of every stdout object, then ``exit:N``."""
        return [ln.kind for ln in self.lines] + [f"exit:{self.exit_code}"]

    def label(self, value: Any) -> Any:
        """Map a real uuid back to its symbolic name (other values unchanged)."""
        for name, real in self.uuids.items():
            if value == real:
                return f"@{name}"
        return value


def _substitute(obj: Any, uuids: dict[str, str]) -> Any:
    if isinstance(obj, str) and obj.startswith("@") and len(obj) > 1:
        return uuids.setdefault(obj[1:], str(uuid.uuid4()))
    if isinstance(obj, dict):
        return {k: _substitute(v, uuids) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, uuids) for v in obj]
    return obj


def _matches(line: Line, what: str, uuids: dict[str, str]) -> bool:
    obj = line.obj
    kind, _, arg = what.partition(":")
    if kind == "result" and obj.get("type") == "result":
        return not arg or uuids.get(arg.lstrip("@")) in (obj.get("user_message_uuids") or [])
    if kind == "control_response" and obj.get("type") == "control_response":
        return (obj.get("response") or {}).get("request_id") == arg
    if kind == "control_request" and obj.get("type") == "control_request":
        return (obj.get("request") or {}).get("subtype") == arg
    return line.kind == what or (not arg and obj.get("type") == what)


def _read_until(agent: Agent, what: str, timeout_s: float, uuids: dict[str, str]) -> Line | None:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what!r} not seen within {timeout_s} s")
        try:
            line = agent.read(left)
        except CLIExited:
            if what == "eof":
                return None
            raise
        if what != "eof" and _matches(line, what, uuids):
            return line


def record_exchange(factory: AgentFactory, script: Exchange) -> Transcript:
    """Play ``script`` against a fresh agent from ``factory``; return the transcript."""
    uuids: dict[str, str] = {}
    last_prompt = ""
    sent_at = 0  # len(agent.lines) when the last user message was written
    with factory() as agent:
        for step in script.steps:
            match step:
                case Send(obj=obj):
                    real = _substitute(dict(obj), uuids)
                    if real.get("type") == "user":
                        last_prompt = _prompt_of(real)
                        sent_at = len(agent.lines)
                    agent.send(real)
                case SendRaw(text=text):
                    agent.send_raw(text)
                case Until(what=what, timeout_s=timeout_s):
                    _read_until(agent, what, timeout_s, uuids)
                case Busy(text_started=text_started, timeout_s=timeout_s):
                    hook = getattr(agent, "busy_hook", None)
                    if hook is not None:
                        hook(last_prompt, text_started, timeout_s)
                    if not any(ln.kind == "system/init" for ln in agent.lines[sent_at:]):
                        _read_until(agent, "system/init", timeout_s, uuids)
                    if hook is None and text_started:
                        _read_until(agent, "assistant", timeout_s, uuids)
                case Answer(subtype=subtype, response=response, timeout_s=timeout_s):
                    asked = _read_until(agent, f"control_request:{subtype}", timeout_s, uuids)
                    rid = asked.obj.get("request_id") if asked is not None else None
                    agent.send({"type": "control_response",
                                "response": {"subtype": "success", "request_id": rid, "response": dict(response)}})
                case CloseStdin():
                    agent.close_stdin()
        agent.close_stdin()
        _read_until(agent, "eof", DEFAULT_TIMEOUT_S, uuids)
        exit_code = agent.wait_exit(DEFAULT_TIMEOUT_S)
        return Transcript(script.name, list(agent.lines), exit_code, uuids)


def run_exchange(proc_factory: AgentFactory, script: Exchange) -> list[str]:
    """Play ``script`` against a fresh agent; return the ``type[/subtype]`` of
    every stdout object, followed by ``exit:N``."""
    return record_exchange(proc_factory, script).kinds


def _prompt_of(user_obj: Mapping[str, Any]) -> str:
    content = (user_obj.get("message") or {}).get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


# -- normalising ----------------------------------------------------------------------------


def _user_kind(obj: Mapping[str, Any]) -> str:
    if obj.get("isReplay"):
        return "user:replay"
    content = (obj.get("message") or {}).get("content")
    blocks = content if isinstance(content, list) else []
    if any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
        return "user:tool_result"
    text = content if isinstance(content, str) else " ".join(str(b.get("text", "")) for b in blocks)
    if "[Request interrupted by user for tool use]" in text:
        return "user:interrupted_tool"
    if "[Request interrupted by user]" in text:
        return "user:interrupted"
    return "user"


def _assistant_kind(obj: Mapping[str, Any]) -> str:
    content = (obj.get("message") or {}).get("content") or []
    types = sorted({str(b.get("type")) for b in content if isinstance(b, dict)})
    return "assistant:" + "+".join(types)


def _shape(value: Any, transcript: Transcript | None = None) -> Any:
    """Replace scalars by their type name, keeping the structure (and uuids,
    as symbolic names, so ``still_queued: ["@u2"]`` compares)."""
    if isinstance(value, dict):
        return {k: _shape(v, transcript) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(v, transcript) for v in value]
    if transcript is not None and isinstance(value, str):
        labelled = transcript.label(value)
        if labelled != value:
            return labelled
    return "null" if value is None else type(value).__name__


def control_shape(obj: Mapping[str, Any], transcript: Transcript | None = None, *, loose: bool = False) -> Any:
    """The agent-independent shape of a ``control_response`` line.

    Keeps where the request id sits (it must be nested), the subtype, the
    ``error_code`` token, and the structure of the inner ``response`` with
    its values reduced to type names.  ``loose`` keeps the outcome only.
    """
    resp = obj.get("response")
    if not isinstance(resp, Mapping):
        return {"malformed": _shape(dict(obj))}
    shape: dict[str, Any] = {
        "top_level_keys": sorted(obj.keys()),
        "subtype": resp.get("subtype"),
        "nested_request_id": "request_id" in resp,
    }
    if loose:
        return shape
    if "error_code" in resp:
        shape["error_code"] = resp["error_code"]
    if "error" in resp:
        shape["error"] = _shape(resp["error"])
    if "response" in resp:
        shape["response"] = _shape(resp["response"], transcript)
    return shape


def _result_shape(obj: Mapping[str, Any], transcript: Transcript) -> dict[str, Any]:
    return {
        "subtype": obj.get("subtype"),
        "is_error": obj.get("is_error"),
        "terminal_reason": obj.get("terminal_reason"),
        "api_error_status": obj.get("api_error_status"),
        "has_result_text": isinstance(obj.get("result"), str),
        "user_message_uuids": [transcript.label(u) for u in obj.get("user_message_uuids") or []],
    }


@dataclass(frozen=True)
class Normalised:
    """What must agree between two agents for one exchange."""

    kinds: list[str]
    lifecycles: dict[str, list[str]]
    controls: dict[str, Any]
    results: list[dict[str, Any]]
    num_turns: list[Any]
    exit_code: int | None

    def aspect(self, name: str) -> Any:
        """One of :data:`ASPECTS` by name (``exit`` is the exit code)."""
        return self.exit_code if name == "exit" else getattr(self, name)


def normalise(transcript: Transcript, *, loose_controls: tuple[str, ...] = ()) -> Normalised:
    """Reduce a transcript to its agent-independent content.

    ``command_lifecycle`` lines are taken out of the kind sequence (where the
    "completed" of one turn lands relative to the next stdin line is a race)
    and compared per message instead, as state sequences.
    """
    kinds: list[str] = []
    lifecycles: dict[str, list[str]] = {}
    controls: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    num_turns: list[Any] = []
    for line in transcript.lines:
        obj = line.obj
        kind = obj.get("type")
        if kind == "command_lifecycle":
            name = str(transcript.label(obj.get("command_uuid")))
            lifecycles.setdefault(name, []).append(str(obj.get("state")))
            continue
        if kind == "user":
            kinds.append(_user_kind(obj))
        elif kind == "assistant":
            kinds.append(_assistant_kind(obj))
        elif kind == "control_request":
            # The agent's own request: its id is the agent's, its keys (and its input's) are the protocol.
            request = obj.get("request") or {}
            kinds.append(f"control_request:{request.get('subtype')}")
            hook_input = request.get("input")
            controls[f"agent_request_{sum(k.startswith('agent_request_') for k in controls)}"] = {
                "keys": list(request), "input_keys": list(hook_input) if isinstance(hook_input, dict) else None,
            }
        elif kind == "control_response":
            rid = str((obj.get("response") or {}).get("request_id"))
            kinds.append(f"control_response:{rid}")
            controls[rid] = control_shape(obj, transcript, loose=rid in loose_controls)
        elif kind == "result":
            kinds.append(line.kind)
            results.append(_result_shape(obj, transcript))
            num_turns.append(obj.get("num_turns"))
        else:
            kinds.append(line.kind)
    return Normalised(kinds, lifecycles, controls, results, num_turns, transcript.exit_code)


def dumps(norm: Normalised) -> str:
    """Readable multi-line rendering, for assertion messages."""
    return json.dumps(
        {
            "kinds": norm.kinds,
            "lifecycles": norm.lifecycles,
            "controls": norm.controls,
            "results": norm.results,
            "num_turns": norm.num_turns,
            "exit": norm.exit_code,
        },
        indent=1,
    )
