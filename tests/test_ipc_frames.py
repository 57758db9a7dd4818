"""Wire frames: every frame type round-trips; every bad input is a ProtocolError with a reason."""

from __future__ import annotations

import pickle
import resource
import string
import time
import tracemalloc
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import frames
from ipc.errors import ProtocolError

CLIENT = "0123456789abcdef"
REASONS = {"malformed", "invalid", "unknown_type", "unsupported_version", "oversize", "bad_content"}

settings.register_profile("ipc", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ipc")

# ---------------------------------------------------------------- strategies

client_ids = st.text("0123456789abcdef", min_size=16, max_size=16)
request_ids = st.text(string.ascii_letters + string.digits + "_.:-", max_size=64)
kinds = st.sampled_from(frames.KINDS)
non_neg = st.integers(0, 2**63 - 1)
models = st.text(string.ascii_letters + string.digits + "_.:[]/@-", min_size=1, max_size=128)
tokens = st.text(string.ascii_lowercase + "_", min_size=1, max_size=32)
short_text = st.text(max_size=200)
incarnations = st.text("0123456789abcdef", min_size=16, max_size=16)
finite = st.floats(allow_nan=False, allow_infinity=False)

# JSON-like values as msgpack carries them (lists, not tuples; ints within 64 bits).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@st.composite
def content_blocks(draw: st.DrawFn) -> dict[str, Any]:
    block = draw(json_objects)
    block["type"] = draw(st.sampled_from(["text", "image", "tool_result", "x"]))
    if block["type"] == "text":
        block["text"] = draw(st.text(max_size=50))
    return block


contents = st.text(min_size=1, max_size=200) | st.lists(content_blocks(), min_size=1, max_size=5)


def common() -> dict[str, Any]:
    return {"client": client_ids, "req": request_ids}


request_frames = st.one_of(
    st.builds(
        frames.Hello,
        **common(),
        kind=kinds,
        pid=st.integers(1, 2**31),
        start_time=non_neg,
        handles=st.lists(tokens, max_size=8),
    ),
    st.builds(
        frames.Prompt,
        **common(),
        kind=kinds,
        content=contents,
        model=st.none() | models,
        on_preempt=st.sampled_from(["requeue", "return"]),
        resume_prompt=st.none() | st.text(max_size=300),
        lease=st.booleans(),
    ),
    st.builds(
        frames.Lease,
        **common(),
        kind=kinds,
        idle_timeout_s=st.none() | st.floats(min_value=0, max_value=86400, exclude_min=True),
    ),
    st.builds(frames.Release, **common(), kind=kinds),
    st.builds(frames.SetModel, **common(), kind=kinds, model=models),
    st.builds(
        frames.Cancel,
        **common(),
        incarnation=st.none() | incarnations,
        turn=st.none() | non_neg,
        target=st.none() | request_ids,
    ),
    st.builds(
        frames.ControlAnswer,
        **common(),
        request_id=st.text(max_size=128),
        response=st.none() | json_objects,
        error=st.none() | short_text,
    ),
    st.builds(frames.Bye, **common()),
    st.builds(
        frames.Chunk,
        **common(),
        cid=non_neg,
        seq=non_neg,
        n=st.integers(2, frames.MAX_FRAME_BYTES),
        total=st.integers(1, frames.MAX_FRAME_BYTES),
        data=st.binary(max_size=300),
    ),
)

reply_frames = st.one_of(
    st.builds(frames.Accepted, **common(), incarnation=incarnations, position=non_neg),
    st.builds(
        frames.Started,
        **common(),
        incarnation=incarnations,
        turn=non_neg,
        model=st.none() | models,
        queued_ms=finite,
    ),
    st.builds(frames.Event, **common(), turn=non_neg, data=st.binary(max_size=300)),
    st.builds(frames.PreemptedNotice, **common(), turn=non_neg, requeued=st.booleans()),
    st.builds(
        frames.AgentRequest,
        **common(),
        turn=non_neg,
        request_id=st.text(max_size=40),
        subtype=st.text(max_size=20),
        data=st.binary(max_size=100),
    ),
    st.builds(frames.LeaseGranted, **common(), incarnation=incarnations),
    st.builds(frames.LeaseEnded, **common(), reason=tokens),
    st.builds(
        frames.Result,
        **common(),
        status=st.sampled_from(["ok", "preempted", "cancelled", "error"]),
        turn=non_neg,
        text=st.text(max_size=100),
        session_id=st.none() | st.text(max_size=40),
        model=st.none() | models,
        queued_ms=finite,
        turn_ms=finite,
        error_code=st.none() | tokens,
        error=st.none() | short_text,
        raw=st.none() | st.binary(max_size=50),
    ),
    st.builds(frames.Error, **common(), code=tokens, message=short_text),
)


def expect(reason: str, data: bytes, decode: Any = frames.decode_request) -> ProtocolError:
    """Decode ``data``; it must fail with exactly ``reason``."""
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.reason == reason, str(info.value)
    return info.value


def enc(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def raw(frame: msgspec.Struct) -> dict[str, Any]:
    """A frame as a plain map, ready to be damaged."""
    out: dict[str, Any] = msgspec.msgpack.decode(frames.encode(frame))
    return out


# ---------------------------------------------------------------- round trips


@given(request_frames)
def test_every_request_frame_round_trips(frame: msgspec.Struct) -> None:
    data = frames.encode(frame)
    assert frames.decode_request(data) == frame
    # An empty request id is omitted on the wire (a default), so it peeks as None.
    assert frames.peek_sender(data) == (frame.client, frame.req or None)  # type: ignore[attr-defined]


@given(reply_frames)
def test_every_reply_frame_round_trips(frame: msgspec.Struct) -> None:
    data = frames.encode(frame)
    assert frames.decode_reply(data) == frame


@given(request_frames)
def test_a_request_frame_is_not_a_reply_and_back(frame: msgspec.Struct) -> None:
    expect("unknown_type", frames.encode(frame), frames.decode_reply)


@given(reply_frames)
def test_a_reply_frame_is_not_a_request(frame: msgspec.Struct) -> None:
    expect("unknown_type", frames.encode(frame), frames.decode_request)


def test_every_frame_type_is_covered_by_the_strategies() -> None:
    req = {c.__struct_config__.tag for c in frames.RequestFrame.__args__}  # type: ignore[attr-defined]
    rep = {c.__struct_config__.tag for c in frames.ReplyFrame.__args__}  # type: ignore[attr-defined]
    assert req == frames.REQUEST_TAGS
    assert rep == frames.REPLY_TAGS


def test_priorities_control_over_webhook_over_worker() -> None:
    c = CLIENT
    assert frames.priority_of(frames.Prompt(client=c, kind="worker", content="x")) == 0
    assert frames.priority_of(frames.Prompt(client=c, kind="webhook", content="x")) == 1
    for kind in frames.KINDS:
        prio = frames.PRIORITY[kind]
        assert frames.priority_of(frames.Lease(client=c, kind=kind)) == prio
        assert frames.priority_of(frames.Release(client=c, kind=kind)) == prio
        assert frames.priority_of(frames.SetModel(client=c, kind=kind, model="m")) == prio
    for control in (
        frames.Hello(client=c, kind="worker", pid=1, start_time=0),
        frames.Cancel(client=c, target="r"),
        frames.ControlAnswer(client=c, request_id="x"),
        frames.Bye(client=c),
    ):
        assert frames.priority_of(control) == frames.PRIORITY_CONTROL > frames.PRIORITY["webhook"]


def test_protocol_error_survives_pickling() -> None:
    err = expect("unknown_type", enc({"t": "nope", "client": CLIENT}))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ProtocolError
    assert back.reason == "unknown_type"
    assert str(back) == str(err)


# ---------------------------------------------------------------- malformed input


@given(request_frames)
@settings(max_examples=30)
def test_every_truncation_is_malformed(frame: msgspec.Struct) -> None:
    data = frames.encode(frame)
    for cut in range(len(data)):
        expect("malformed", data[:cut])


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_random_bytes_give_protocol_error_or_a_frame(data: bytes) -> None:
    for decode in (frames.decode_request, frames.decode_reply):
        try:
            decode(data)
        except ProtocolError as exc:
            assert exc.reason in REASONS
    frames.peek_sender(data)


@given(st.dictionaries(st.sampled_from(["t", "v", "client", "req", "kind", "content", "x"]), json_values))
@settings(max_examples=300)
def test_random_maps_give_protocol_error_or_a_frame(obj: dict[str, Any]) -> None:
    data = enc(obj)
    for decode in (frames.decode_request, frames.decode_reply):
        try:
            decode(data)
        except ProtocolError as exc:
            assert exc.reason in REASONS
    frames.peek_sender(data)


@given(request_frames, st.data())
@settings(max_examples=200)
def test_a_byte_flipped_frame_gives_protocol_error_or_a_frame(frame: msgspec.Struct, data: st.DataObject) -> None:
    buf = bytearray(frames.encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        frames.decode_request(bytes(buf))
    except ProtocolError as exc:
        assert exc.reason in REASONS
    frames.peek_sender(bytes(buf))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x81", b"\x81\xa1t", b"\xa3bye", b"\x92\x01", b"\xd4\x01\x00"],
    ids=["empty", "reserved-byte", "map-without-entries", "key-without-value", "str", "array", "ext"],
)
def test_not_a_frame(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        frames.decode_request(data)
    assert info.value.reason in {"malformed", "invalid"}
    assert frames.peek_sender(data) == (None, None)


def test_trailing_bytes_are_malformed() -> None:
    expect("malformed", frames.encode(frames.Bye(client=CLIENT)) + b"\x00")


@pytest.mark.parametrize("t", ["nope", "", "Prompt", 5, None, ["prompt"], "accepted"])
def test_unknown_type(t: Any) -> None:
    err = expect("unknown_type", enc({"t": t, "client": CLIENT, "kind": "worker", "content": "x"}))
    assert "prompt" in str(err)  # names the allowed types


def test_missing_type_is_unknown_type() -> None:
    expect("unknown_type", enc({"client": CLIENT}))


@pytest.mark.parametrize("v", [0, 2, -1, 2**40, "1", 1.5])
def test_wrong_version(v: Any) -> None:
    err = expect("unsupported_version", enc({"t": "bye", "v": v, "client": CLIENT}))
    assert err.version == v  # type: ignore[attr-defined]
    reply = {"t": "accepted", "v": v, "client": CLIENT, "incarnation": "x"}
    expect("unsupported_version", enc(reply), frames.decode_reply)


def test_wrong_version_wins_over_fields_a_newer_version_may_have() -> None:
    expect(
        "unsupported_version",
        enc({"t": "prompt", "v": 2, "client": CLIENT, "kind": "worker", "content": "x", "priority_hint": 3}),
    )


def test_oversize_is_refused_before_decoding() -> None:
    # Valid msgpack up front, then padding: only the length can be the reason.
    data = frames.encode(frames.Bye(client=CLIENT)) + b"\x00" * frames.MAX_FRAME_BYTES
    err = expect("oversize", data)
    assert str(frames.MAX_FRAME_BYTES) in str(err)
    expect("oversize", data, frames.decode_reply)


P = {"t": "prompt", "client": CLIENT, "kind": "worker", "content": "hi"}
H = {"t": "hello", "client": CLIENT, "kind": "worker", "pid": 10, "start_time": 5}
L = {"t": "lease", "client": CLIENT, "kind": "webhook"}
C = {"t": "cancel", "client": CLIENT}
A = {"t": "answer", "client": CLIENT, "request_id": "r1"}
K = {"t": "chunk", "client": CLIENT, "cid": 1, "seq": 0, "n": 2, "total": 10, "data": b"12345"}
S = {"t": "set_model", "client": CLIENT, "kind": "worker", "model": "opus"}

# (frame, field, bad value): each must be refused as "invalid".
BAD_FIELDS: list[tuple[dict[str, Any], str, Any]] = [
    # ids: the client id is 16 lowercase hex digits, a request id a short safe token
    (P, "client", "0123456789ABCDEF"),
    (P, "client", "0123456789abcde"),
    (P, "client", "0123456789abcdef0"),
    (P, "client", "../../etc/passwd"),
    (P, "client", 42),
    (P, "req", "a/b"),
    (P, "req", "../x"),
    (P, "req", "x" * 65),
    (P, "req", "a b"),
    (P, "req", 7),
    # kinds and enumerations
    (P, "kind", "admin"),
    (P, "kind", 1),
    (P, "on_preempt", "never"),
    (P, "lease", "yes"),
    (P, "lease", 1),
    (P, "model", "bad model"),
    (P, "model", "x" * 129),
    (P, "model", 5),
    (P, "resume_prompt", "x" * 4097),
    (P, "resume_prompt", 5),
    (P, "content", 42),
    (P, "content", None),
    (P, "content", {"type": "text", "text": "x"}),
    (P, "content", [42]),
    (P, "content", ["text"]),
    (P, "content", [{"type": "text", "text": "x"}] * 1025),
    (H, "pid", 0),
    (H, "pid", 2**31 + 1),
    (H, "pid", "10"),
    (H, "start_time", -1),
    (H, "start_time", 2**63),
    (H, "start_time", 1.5),
    (H, "handles", "can_use_tool"),
    (H, "handles", ["Can-Use"]),
    (H, "handles", ["a"] * 9),
    (L, "idle_timeout_s", 0),
    (L, "idle_timeout_s", -1.0),
    (L, "idle_timeout_s", 86401),
    (L, "idle_timeout_s", "60"),
    (C, "incarnation", "nothex0000000000"),
    (C, "turn", -1),
    (C, "turn", "3"),
    (C, "target", "a/b"),
    (A, "request_id", "x" * 129),
    (A, "request_id", 3),
    (A, "response", [1, 2]),
    (A, "response", {1: 2}),
    (A, "error", 3),
    (K, "cid", -1),
    (K, "seq", "0"),
    (K, "n", 1),
    (K, "n", frames.MAX_FRAME_BYTES + 1),
    (K, "total", 0),
    (K, "total", frames.MAX_FRAME_BYTES + 1),
    (K, "data", "12345"),
    (S, "model", None),
    (S, "model", ""),
    # unknown fields are refused, not ignored
    (P, "priority", 5),
    (C, "kind", "worker"),
]


BAD_FIELD_IDS = [f"{f['t']}.{k}={v!r:.20}" for f, k, v in BAD_FIELDS]


@pytest.mark.parametrize(("frame", "field", "bad"), BAD_FIELDS, ids=BAD_FIELD_IDS)
def test_wrong_type_or_value_per_field_is_invalid(frame: dict[str, Any], field: str, bad: Any) -> None:
    frames.decode_request(enc(frame))  # the frame is fine before the damage
    err = expect("invalid", enc({**frame, field: bad}))
    assert frame["t"] in str(err)


@pytest.mark.parametrize(
    ("frame", "field"),
    [(P, "kind"), (P, "content"), (P, "client"), (H, "pid"), (H, "start_time"), (K, "data"), (A, "request_id")],
)
def test_missing_required_field_is_invalid(frame: dict[str, Any], field: str) -> None:
    expect("invalid", enc({k: v for k, v in frame.items() if k != field}))


@pytest.mark.parametrize(
    ("frame", "field", "bad"),
    [
        ({"t": "accepted", "client": CLIENT, "incarnation": "x"}, "position", -1),
        ({"t": "event", "client": CLIENT, "turn": 1, "data": b"{}"}, "data", "{}"),
        ({"t": "result", "client": CLIENT, "status": "ok"}, "status", "fine"),
        ({"t": "lease_ended", "client": CLIENT, "reason": "idle"}, "reason", "Idle!"),
        ({"t": "error", "client": CLIENT, "code": "x", "message": "m"}, "client", "nothex"),
    ],
)
def test_reply_fields_are_validated(frame: dict[str, Any], field: str, bad: Any) -> None:
    frames.decode_reply(enc(frame))
    expect("invalid", enc({**frame, field: bad}), frames.decode_reply)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "empty prompt"),
        ([], "empty content block list"),
        ([{"text": "no type"}], "no string 'type'"),
        ([{"type": None}], "no string 'type'"),
        ([{"type": 3}], "no string 'type'"),
        ([{"type": "text", "text": "ok"}, {"source": "x"}], "block 1"),
        ([{"type": "text"}], "no string 'text'"),
        ([{"type": "text", "text": 42}], "no string 'text'"),
    ],
)
def test_bad_prompt_content(content: Any, why: str) -> None:
    err = expect("bad_content", enc({**P, "content": content}))
    assert why in str(err)


def test_content_42_is_refused() -> None:
    # A non-string, non-list content silently stalls the CLI: it must never decode.
    expect("invalid", enc({**P, "content": 42}))


# ---------------------------------------------------------------- peek_sender


def test_peek_sender_names_a_valid_sender() -> None:
    data = frames.encode(frames.Prompt(client=CLIENT, req="r-1", kind="worker", content="x"))
    assert frames.peek_sender(data) == (CLIENT, "r-1")


def test_peek_sender_of_an_invalid_frame_still_names_its_sender() -> None:
    assert frames.peek_sender(enc({**P, "content": 42, "req": "r2"})) == (CLIENT, "r2")


@pytest.mark.parametrize(
    "obj",
    [
        {**P, "client": "../../evil/path1"},
        {**P, "client": "0123456789ABCDEF"},
        {**P, "client": 7},
        {**P, "client": None},
    ],
)
def test_peek_sender_refuses_bad_client_ids(obj: dict[str, Any]) -> None:
    assert frames.peek_sender(enc(obj))[0] is None


@pytest.mark.parametrize("req", ["a/b", "../x", "x" * 65, 5, b"r"])
def test_peek_sender_refuses_bad_request_ids(req: Any) -> None:
    assert frames.peek_sender(enc({**P, "req": req})) == (CLIENT, None)


@given(st.binary(max_size=500) | st.builds(enc, json_objects))
@settings(max_examples=300)
def test_peek_sender_never_raises(data: bytes) -> None:
    client, req = frames.peek_sender(data)
    assert client is None or (len(client) == 16 and set(client) <= set("0123456789abcdef"))
    assert req is None or ("/" not in req and len(req) <= 64)


# ---------------------------------------------------------------- hostile headers and depth

_PROMPT_HEAD = enc({"t": "prompt", "client": CLIENT, "kind": "worker"})  # a 3-entry map
_4G = b"\xff\xff\xff\xff"


def _prompt_with_content(raw_content: bytes) -> bytes:
    """The prompt map above with a fourth entry, "content", whose value is ``raw_content``."""
    return b"\x84" + _PROMPT_HEAD[1:] + enc("content") + raw_content


HOSTILE = {
    "array32": b"\xdd" + _4G,
    "map32": b"\xdf" + _4G,
    "str32": b"\xdb" + _4G,
    "bin32": b"\xc6" + _4G,
    "ext32": b"\xc9" + _4G + b"\x01",
    "content-str32": _prompt_with_content(b"\xdb" + _4G),
    "content-array32": _prompt_with_content(b"\xdd" + _4G),
    "content-block-map32": _prompt_with_content(b"\x91\xdf" + _4G),
    "content-block-value-array32": _prompt_with_content(b"\x91\x82\xa4type\xa1x\xa1k\xdd" + _4G),
    "answer-response-array32": b"\x83"
    + enc("t")
    + enc("answer")
    + enc("client")
    + enc(CLIENT)
    + enc("response")
    + b"\x81\xa1k\xdd"
    + _4G,
    "chunk-data-bin32": b"\x87"
    + b"".join(enc(x) for x in ("t", "chunk", "client", CLIENT, "cid", 1, "seq", 0, "n", 2, "total", 10, "data"))
    + b"\xc6"
    + _4G,
    "client-str32": b"\x82" + enc("t") + enc("bye") + enc("client") + b"\xdb" + _4G,
}


@pytest.mark.parametrize("data", list(HOSTILE.values()), ids=list(HOSTILE))
def test_huge_declared_lengths_fail_fast_without_allocating(data: bytes) -> None:
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        for decode in (frames.decode_request, frames.decode_reply):
            with pytest.raises(ProtocolError) as info:
                decode(data)
            assert info.value.reason in {"malformed", "invalid", "unknown_type"}
        frames.peek_sender(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    assert peak < 256 * 1024, f"decoding a {len(data)}-byte frame peaked at {peak} bytes"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib < 64 * 1024
    assert elapsed < 1.0


@pytest.mark.parametrize("depth", [100, 10_000, 200_000])
def test_deep_nesting_is_a_protocol_error(depth: int) -> None:
    nested = b"\x91" * depth + b"\xc0"
    for data in (
        _prompt_with_content(b"\x91\x82\xa4type\xa1x\xa1k" + nested),  # inside a content block
        b"\x82" + enc("t") + enc("bye") + enc("v") + nested,  # in the envelope
        b"\x83" + enc("t") + enc("nope") + enc("client") + enc(CLIENT) + enc("v") + nested,
        nested,
    ):
        for decode in (frames.decode_request, frames.decode_reply):
            try:
                decode(data)
            except ProtocolError as exc:
                assert exc.reason in REASONS
        frames.peek_sender(data)


@pytest.mark.parametrize(
    "data",
    [
        _prompt_with_content(b"\xa2\xc3\x28"),  # content: a str that is not UTF-8
        b"\x82" + enc("t") + enc("bye") + enc("client") + b"\xb0" + b"\xff" * 16,  # client id
        b"\x82" + enc("t") + enc("bye") + b"\xa2\xc3\x28" + enc("x"),  # a key
        b"\x81" + enc("t") + b"\xa3\xe2\x82\x28",  # the type tag
    ],
    ids=["content", "client", "key", "tag"],
)
def test_invalid_utf8_is_malformed(data: bytes) -> None:
    expect("malformed", data)
    # A reply decoder may stop earlier, at the request's type tag.
    with pytest.raises(ProtocolError) as info:
        frames.decode_reply(data)
    assert info.value.reason in REASONS
    frames.peek_sender(data)
