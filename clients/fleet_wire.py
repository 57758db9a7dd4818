"""The fleet's names and messages on NATS: subjects, stream, buckets, and the msgpack structs on them.

One session ``S`` owns (so NATS permissions can grant one session and not another):

* ``turnstile.S.req.webhook`` / ``turnstile.S.req.worker``: durable requests, in the
  JetStream stream ``turnstile_S`` (file storage, work-queue retention, ``Nats-Msg-Id``
  = request id), pulled by two consumers so a worker backlog never delays a webhook;
* ``turnstile.S.evt.<client>.<request>``: the live events of one request, to the client that
  submitted it (core NATS, best effort; one subscription per client, made when it connects);
* ``turnstile.S.ctl``: cancels and lease releases (request/reply, answered by the gateway), and
  lease holders' beats (published);
* ``turnstile.S.ask.<client>``: the agent's permission/hook questions for a remote client
  that registered handlers (request/reply, answered by that client);
* KV bucket ``turnstile_res_S``: the one result of each request id, kept for a bounded time.

The registry of served sessions is the KV bucket ``turnstile_fleet`` (key = session).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from ipc import frames

WIRE_VERSION: Final = 1
REGISTRY_BUCKET: Final = "turnstile_fleet"
CONSUMERS: Final = ("webhook", "worker")
#: The key of a stored result that lists the remote handlers that failed in it (subtype, handler, reason).
HANDLER_FAILURES: Final = "handler_failures"


def escape(req: str) -> str:
    """A request id as one subject token and KV key ('.' splits subjects, ':' is no KV key byte)."""
    return req.replace(".", "=2E").replace(":", "=3A")


def stream_name(session: str) -> str:
    """The JetStream stream holding the session's requests."""
    return f"turnstile_{session}"


def results_bucket(session: str) -> str:
    """The KV bucket holding the session's results."""
    return f"turnstile_res_{session}"


def request_subject(session: str, kind: str) -> str:
    """Where a request of ``kind`` is published."""
    return f"turnstile.{session}.req.{kind}"


def events_subject(session: str, client: str, req: str) -> str:
    """Where the live events of request ``req`` are published, for ``client``, which submitted it."""
    return f"turnstile.{session}.evt.{client}.{escape(req)}"


def client_events_subject(session: str, client: str) -> str:
    """What ``client`` subscribes to for the live events of all its requests."""
    return f"turnstile.{session}.evt.{client}.*"


def ask_subject(session: str, client: str) -> str:
    """Where the gateway asks a remote client's permission/hook handlers (request/reply)."""
    return f"turnstile.{session}.ask.{client}"


def control_subject(session: str) -> str:
    """Where cancels are sent (request/reply)."""
    return f"turnstile.{session}.ctl"


class RemoteRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request as stored in the session's stream."""

    v: int = WIRE_VERSION
    op: Literal["prompt", "set_model", "lease"]
    client: frames.ClientId
    req: frames.RequestId
    kind: frames.Kind
    content: str | list[dict[str, Any]] | None = None
    model: frames.ModelName | None = None
    on_preempt: frames.OnPreempt = "requeue"
    resume_prompt: frames.ShortText | None = None
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None
    #: A lease's holder beats this often while it holds it (a ``beat`` control message).
    beat_s: Annotated[float, msgspec.Meta(gt=0, le=60)] | None = None
    #: The agent control requests the remote client answers itself (``can_use_tool``, ``hook_callback``).
    handles: list[frames.Token] = []
    #: The client made ``req`` for this submit and this is its first publish: no result can be
    #: stored for it yet (the gateway then skips looking one up; see ``SessionRelay.may_be_stored``).
    fresh: bool = False


class Ask(msgspec.Struct, kw_only=True):
    """An agent control request relayed to the remote client that holds the turn."""

    subtype: str
    data: dict[str, Any]


class AskReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The remote handler's answer (or why there is none)."""

    response: dict[str, Any] | None = None
    error: str | None = None
    #: Why the remote client's handler failed (``response``/``error`` are then the deny it gave).
    failure: str | None = None


class Notice(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One live message about a request: an agent/turnstile event, its start, or its result."""

    req: str
    event: dict[str, Any] | None = None
    turn: int = 0
    incarnation: str = ""
    result: dict[str, Any] | None = None


class Control(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A cancel of one request (``target``) or of a turn (``incarnation``, ``turn``), a lease's release, or
    a lease holder's beat (published, not requested)."""

    op: Literal["cancel", "cancel_turn", "release", "beat"]
    client: str = ""
    target: str = ""
    incarnation: str = ""
    turn: int = 0


class ControlReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The gateway's answer to a :class:`Control`."""

    ok: bool
    detail: str = ""


class Registration(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A gateway's entry in the fleet registry, refreshed every heartbeat."""

    session: str
    gateway: str
    host: str
    pid: int
    heartbeat_unix: float
    stale_after_s: float
    broker_alive: bool = False
    holder_client: str = ""
    holder_kind: str = ""
    turn: int = 0
    turn_state: str = ""
    webhooks_queued: int = 0
    workers_queued: int = 0
    model: str = ""
    incarnation: str = ""


_enc = msgspec.msgpack.Encoder()


def encode(obj: msgspec.Struct | dict[str, Any]) -> bytes:
    """msgpack bytes of one wire message."""
    return _enc.encode(obj)


# One decoder per message type; each raises ``msgspec.DecodeError`` / ``ValidationError`` on junk.
#: Decode a stored request.
decode_request = msgspec.msgpack.Decoder(RemoteRequest).decode
#: Decode a live notice.
decode_notice = msgspec.msgpack.Decoder(Notice).decode
#: Decode a control message.
decode_control = msgspec.msgpack.Decoder(Control).decode
#: Decode a relayed agent question.
decode_ask = msgspec.msgpack.Decoder(Ask).decode
#: Decode a handler's answer.
decode_ask_reply = msgspec.msgpack.Decoder(AskReply).decode
#: Decode a control reply.
decode_control_reply = msgspec.msgpack.Decoder(ControlReply).decode
#: Decode a registry entry (JSON, so ``nats kv get`` shows it readably).
decode_registration = msgspec.json.Decoder(Registration).decode
#: Decode a stored result (a ``TurnResult.as_dict()`` plus ``raw`` and any handler failures).
decode_result = msgspec.msgpack.Decoder(dict[str, Any]).decode


def encode_registration(reg: Registration) -> bytes:
    """Registry entries are JSON, so ``nats kv get`` shows them readably."""
    return msgspec.json.encode(reg)
