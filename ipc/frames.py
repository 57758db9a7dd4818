"""Wire frames: a versioned, tagged union of msgspec Structs, msgpack on the wire.

Two directions:

* requests, client → broker, through the session's request queue;
* replies, broker → client, through the client's mailbox.

Every frame carries the protocol version ``v``, the sender's ``client`` id and a
request id ``req`` (empty where a frame concerns no request). Decoding
validates types, sizes and allowed values and raises :class:`ProtocolError`
naming what was wrong; nothing that fails decoding is ever acted on.

A request frame larger than one queue message travels as numbered
:class:`Chunk` frames (see :mod:`ipc.chunks`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from ipc.errors import InvalidArgument, ProtocolError

PROTOCOL_VERSION: Final = 1

#: Upper bound of one reassembled frame (a prompt with large attachments).
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024

Kind = Literal["webhook", "worker"]
KINDS: Final = ("webhook", "worker")
OnPreempt = Literal["requeue", "return"]
Status = Literal["ok", "preempted", "cancelled", "error"]

# mq priorities: higher is dequeued first. Control frames (hello, cancel, bye,
# answers to the agent's questions) overtake every prompt; webhooks overtake workers.
PRIORITY_CONTROL: Final = 2
PRIORITY: Final[dict[str, int]] = {"webhook": 1, "worker": 0}

ClientId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")]
ModelName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:\[\]/@-]{1,128}$")]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]
Token = Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}$")]
#: The largest turn id (and any other count a frame carries): a signed 64-bit integer.
MAX_TURN = 2**63 - 1
NonNeg = Annotated[int, msgspec.Meta(ge=0, le=MAX_TURN)]
Incarnation = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
#: A client's human label, shown by ``turnstile status`` instead of its id (it fits the state block's 32 bytes).
LABEL_PATTERN: Final = r"^[A-Za-z0-9_.:@/+-]{1,32}$"
Label = Annotated[str, msgspec.Meta(pattern=LABEL_PATTERN)]

# A content block: a JSON object with a string "type"; anything else is refused
# before it can reach the agent (a non-string ``content`` silently stalls the CLI).
ContentBlock = dict[str, Any]


class _Frame(msgspec.Struct, tag_field="t", kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    v: int = PROTOCOL_VERSION
    client: ClientId
    req: RequestId = ""


# ---------------------------------------------------------------- requests


class Hello(_Frame, tag="hello"):
    """A client announces itself: its kind (fixed for its life), pid and start time.

    ``handles`` lists the agent control requests it answers itself
    (``can_use_tool``, ``hook_callback``, ``mcp_message``). ``label`` is the
    human name ``turnstile status`` shows for it; it is left out of the frame
    when not set, so an unlabelled client's hello is what older brokers know.
    """

    kind: Kind
    pid: Annotated[int, msgspec.Meta(ge=1, le=2**31)]
    start_time: NonNeg
    handles: Annotated[list[Token], msgspec.Meta(max_length=8)] = []
    label: Label | None = None


class Prompt(_Frame, tag="prompt"):
    """Run one turn: a user message for the agent."""

    kind: Kind
    content: str | Annotated[list[ContentBlock], msgspec.Meta(max_length=1024)]
    model: ModelName | None = None
    on_preempt: OnPreempt = "requeue"
    resume_prompt: ShortText | None = None
    #: Ignored: the broker knows which client holds the lease. Kept (unknown fields are refused)
    #: so that prompts from clients of an earlier version still decode; current clients omit it.
    lease: bool = False


class Lease(_Frame, tag="lease"):
    """Ask to hold the session across several turns."""

    kind: Kind
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None


class Release(_Frame, tag="release"):
    """End a lease."""

    kind: Kind


class SetModel(_Frame, tag="set_model"):
    """Switch the session's model, in turn with the other requests."""

    kind: Kind
    model: ModelName


class Cancel(_Frame, tag="cancel"):
    """Cancel a turn.

    Either names the turn (``incarnation``, ``turn``) — honoured only if that
    exact turn is running — or names one of the sender's own requests
    (``target``), queued or running.
    """

    incarnation: Incarnation | None = None
    turn: NonNeg | None = None
    target: RequestId | None = None


class ControlAnswer(_Frame, tag="answer"):
    """The client's answer to an agent control request relayed to it."""

    request_id: Annotated[str, msgspec.Meta(max_length=128)]
    response: dict[str, Any] | None = None
    error: ShortText | None = None


class Bye(_Frame, tag="bye"):
    """The client is leaving: drop its queued requests, end its lease."""


class Chunk(_Frame, tag="chunk"):
    """One piece of a request frame too large for a queue message."""

    cid: NonNeg
    seq: NonNeg
    n: Annotated[int, msgspec.Meta(ge=2, le=MAX_FRAME_BYTES)]
    total: Annotated[int, msgspec.Meta(ge=1, le=MAX_FRAME_BYTES)]
    data: bytes


RequestFrame = Hello | Prompt | Lease | Release | SetModel | Cancel | ControlAnswer | Bye | Chunk


# ---------------------------------------------------------------- replies


class Accepted(_Frame, tag="accepted"):
    """The broker holds the request; it will end in exactly one Result."""

    incarnation: str
    position: NonNeg = 0


class Started(_Frame, tag="started"):
    """The request's turn began; ``turn`` with ``incarnation`` is what a cancel names."""

    incarnation: str
    turn: NonNeg
    model: str | None = None
    queued_ms: float = 0.0


class Event(_Frame, tag="event"):
    """One stream-json object of the running turn, as the agent wrote it (raw JSON bytes)."""

    turn: NonNeg
    data: bytes


class PreemptedNotice(_Frame, tag="preempted"):
    """The request's turn ended before its result; it runs again when ``requeued``.

    ``reason`` says why: ``preempted`` (a webhook took the session) or
    ``agent_restarted`` (the agent died under a worker turn).
    """

    turn: NonNeg
    requeued: bool
    reason: Token = "preempted"


class AgentRequest(_Frame, tag="agent_request"):
    """A control request from the agent (e.g. ``can_use_tool``) for the holder to answer."""

    turn: NonNeg
    request_id: str
    subtype: str
    data: bytes


class LeaseGranted(_Frame, tag="lease_granted"):
    """The lease is the client's; its prompts now run without waiting in line."""

    incarnation: str


class LeaseEnded(_Frame, tag="lease_ended"):
    """The lease ended (``released``, ``idle``, ``broker_restart``)."""

    reason: Token


class Result(_Frame, tag="result"):
    """The one terminal answer to a request."""

    status: Status
    turn: NonNeg = 0
    text: str = ""
    session_id: str | None = None
    model: str | None = None
    queued_ms: float = 0.0
    turn_ms: float = 0.0
    error_code: str | None = None
    error: str | None = None
    raw: bytes | None = None


class Error(_Frame, tag="error"):
    """A frame was refused, or the broker failed the client; terminal for ``req`` if set."""

    code: str
    message: str


ReplyFrame = (
    Accepted
    | Started
    | Event
    | PreemptedNotice
    | AgentRequest
    | LeaseGranted
    | LeaseEnded
    | Result
    | Error
)

REQUEST_TAGS: Final = frozenset(
    {"hello", "prompt", "lease", "release", "set_model", "cancel", "answer", "bye", "chunk"}
)
REPLY_TAGS: Final = frozenset(
    {"accepted", "started", "event", "preempted", "agent_request", "lease_granted",
     "lease_ended", "result", "error"}
)

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(RequestFrame)
_reply_decoder = msgspec.msgpack.Decoder(ReplyFrame)


class _Envelope(msgspec.Struct):
    """The fields every frame has, decoded leniently to name the sender of a bad frame."""

    v: Any = None
    t: Any = None
    client: Any = None
    req: Any = None


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_json_check = msgspec.json.Encoder()


def encode(frame: msgspec.Struct) -> bytes:
    """Serialise one frame to msgpack."""
    return _encoder.encode(frame)


def peek_sender(data: bytes) -> tuple[str | None, str | None]:
    """Best-effort (client id, request id) of a frame that may be invalid.

    Used only to address a typed error to the sender; ids that fail the id
    patterns are returned as ``None`` so a bad frame cannot name a mailbox path.
    """
    import re

    try:
        env = _envelope_decoder.decode(data)
    # ValidationError is a DecodeError; invalid UTF-8 in a str raises UnicodeDecodeError.
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None, None
    client = env.client if isinstance(env.client, str) and re.fullmatch(r"[0-9a-f]{16}", env.client) else None
    req = env.req if isinstance(env.req, str) and re.fullmatch(r"[A-Za-z0-9_.:-]{0,64}", env.req) else None
    return client, req


def _decode(data: bytes, decoder: msgspec.msgpack.Decoder[Any], tags: frozenset[str]) -> Any:
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError("oversize", f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        frame = decoder.decode(data)
    # ValidationError subclasses DecodeError, so it must be caught first.
    except msgspec.ValidationError as exc:
        try:
            env = _envelope_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            raise ProtocolError("invalid", f"not a frame map ({exc})") from None
        if env.v is not None and env.v != PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported_version",
                f"protocol version {env.v!r}, this side speaks {PROTOCOL_VERSION}",
                version=env.v,
            ) from None
        if not isinstance(env.t, str) or env.t not in tags:
            raise ProtocolError("unknown_type", f"frame type {env.t!r} is not one of {sorted(tags)}") from None
        raise ProtocolError("invalid", f"{env.t} frame: {exc}") from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        # RecursionError: nested deeper than the decoder's recursion limit;
        # UnicodeDecodeError: a msgpack str that is not UTF-8.
        raise ProtocolError("malformed", f"not a msgpack frame ({exc})") from None
    if frame.v != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {frame.v!r}, this side speaks {PROTOCOL_VERSION}",
            version=frame.v,
        )
    if isinstance(frame, Prompt):
        check_content(frame.content)
    return frame


def check_label(label: str | None) -> str | None:
    """Return ``label`` if a hello may carry it (``None`` too), else raise :class:`InvalidArgument`."""
    if label is not None and (not isinstance(label, str) or not re.fullmatch(LABEL_PATTERN, label)):
        raise InvalidArgument(
            f"client label {label!r}: use 1-32 of A-Z a-z 0-9 _ . : @ / + -", argument="label"
        )
    return label


def check_content(content: str | list[ContentBlock]) -> None:
    """Refuse user-message content the agent would choke on.

    The CLI silently ignores non-string, non-list content (no turn, no result),
    so a broker waiting for that turn's result would wait forever.
    """
    if isinstance(content, str):
        if not content:
            raise ProtocolError("bad_content", "empty prompt")
        return
    if not content:
        raise ProtocolError("bad_content", "empty content block list")
    for i, block in enumerate(content):
        if not isinstance(block.get("type"), str):
            raise ProtocolError("bad_content", f"content block {i} has no string 'type'")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise ProtocolError("bad_content", f"text block {i} has no string 'text'")
    # Blocks are maps of any msgpack values: an ext type, or a map keyed by nil or by an
    # array, has no JSON form. Found only when the broker writes the user message, it would
    # fail after the turn was granted and wedge the session: refuse it here.
    try:
        _json_check.encode(content)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("bad_content", f"content has no JSON form: {exc}") from None


def decode_request(data: bytes) -> RequestFrame:
    """Decode and validate a client → broker frame, or raise :class:`ProtocolError`."""
    frame: RequestFrame = _decode(data, _request_decoder, REQUEST_TAGS)
    return frame


def decode_reply(data: bytes) -> ReplyFrame:
    """Decode and validate a broker → client frame, or raise :class:`ProtocolError`."""
    frame: ReplyFrame = _decode(data, _reply_decoder, REPLY_TAGS)
    return frame


def priority_of(frame: RequestFrame) -> int:
    """The mq priority a frame is sent with: control > webhook > worker."""
    if isinstance(frame, Prompt | Lease | Release | SetModel):
        return PRIORITY[frame.kind]
    return PRIORITY_CONTROL
