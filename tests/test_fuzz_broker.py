"""Bad input fed to a live broker through its request queue (raw POSIX queue sends).

One broker (the simulated agent, with ``--stats-file``) takes everything:
random bytes, truncated msgpack, wrong field types, huge declared lengths,
chunk sequences with gaps, duplicates and lies about totals, wrong protocol
versions and unknown frame types, frames naming other clients, and prompt
content the CLI would choke on. Hypothesis generates it; a barrier frame
after each example (sent last, at the lowest priority, so the queue's order
puts it after everything before it) tells when the broker has read it all.

The broker must stay up and still serve; answer a typed ``Error`` to the
sender when the frame names a client that has a mailbox, count the rest in
``rejected_frames``; never write a user message to the agent because of it;
and keep its memory bounded. Prompt content that reaches the agent must be a
valid JSON user message that ends in a result (it must not wedge the session).

The frame-level decoder has its own property tests (``test_ipc_frames.py``,
``test_ipc_chunks.py``); these run the same kinds of input through the
running broker.
"""

from __future__ import annotations

import math
import os
from typing import Any

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ipc import frames, mailbox, names, rqueue
from ipc.errors import ProtocolError
from tests.support import rec, sim_stats, vm_rss_kib, wait_until

#: Codes a refused frame's Error may carry (ipc.errors.ProtocolError and the broker's own).
ERROR_CODES = {
    "malformed", "invalid", "unknown_type", "unsupported_version", "oversize", "chunk_sequence",
    "chunk_timeout", "chunk_evicted", "unknown_client", "kind_mismatch", "bad_content",
}
#: Replies that would mean a bad frame was acted on.
ACTED_ON = (frames.Accepted, frames.Started, frames.Event, frames.Result, frames.LeaseGranted, frames.LeaseEnded,
            frames.PreemptedNotice, frames.AgentRequest)
#: How much the broker's resident memory may grow over the whole run.
RSS_MARGIN_KIB = 24 * 1024

# ---------------------------------------------------------------- strategies

#: Any msgpack value, ext types and non-string keys included.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20),
    st.builds(msgspec.msgpack.Ext, st.integers(min_value=-128, max_value=127), st.binary(max_size=8)),
)
keys = st.one_of(st.text(max_size=8), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.none(),
                 st.binary(max_size=4), st.floats(allow_nan=False))
any_value = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)

REQUEST_TYPES = ("hello", "prompt", "lease", "release", "set_model", "cancel", "answer", "bye", "chunk")


def base_frame(t: str, client: str, req: str) -> dict[str, Any]:
    """A valid request frame of type ``t`` as a plain map."""
    d: dict[str, Any] = {"t": t, "v": frames.PROTOCOL_VERSION, "client": client, "req": req}
    extra: dict[str, dict[str, Any]] = {
        "hello": {"kind": "worker", "pid": 1, "start_time": 1},
        "prompt": {"kind": "worker", "content": "fuzz"},
        "lease": {"kind": "worker"},
        "release": {"kind": "worker"},
        "set_model": {"kind": "worker", "model": "m-fuzz"},
        "cancel": {"target": "nothing"},
        "answer": {"request_id": "x", "response": {}},
        "bye": {},
        "chunk": {"cid": 1, "seq": 0, "n": 2, "total": 8, "data": b"abcd"},
    }
    d.update(extra[t])
    return d


def enc(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def decodes(data: bytes) -> bool:
    """True when the broker's decoder accepts ``data`` as a request frame."""
    try:
        frames.decode_request(data)
    except ProtocolError:
        return False
    return True


def huge_header(draw: Any) -> bytes:
    """A msgpack str/bin/array/map header declaring up to 4 GiB, followed by a few bytes."""
    code = draw(st.sampled_from([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xda", b"\xc5", b"\xdc", b"\xde"]))
    width = 4 if code in (b"\xdb", b"\xc6", b"\xdd", b"\xdf") else 2
    size = draw(st.integers(min_value=16, max_value=2 ** (8 * width) - 1))
    return code + size.to_bytes(width, "big") + draw(st.binary(max_size=16))


#: The request id every generated frame carries; the test swaps in a unique one of the same length
#: (the strategies must not depend on state outside their draws).
REQ_SLOT = "fz-XXXXXX"


@st.composite
def bad_messages(draw: Any, me: str) -> list[bytes]:
    """One bad input: a list of raw queue messages (one, or a chunk sequence)."""
    req = REQ_SLOT
    kind = draw(st.sampled_from(
        ["random", "truncated", "wrong_type", "huge_length", "chunks", "version_or_type", "other_client"]
    ))
    t = draw(st.sampled_from(REQUEST_TYPES))
    if kind == "random":
        return [draw(st.binary(min_size=0, max_size=8192))]
    if kind == "truncated":
        data = enc(base_frame(t, me, req))
        return [data[: draw(st.integers(min_value=0, max_value=len(data) - 1))]]
    if kind == "wrong_type":
        d = base_frame(t, me, req)
        field = draw(st.sampled_from(sorted(k for k in d if k != "t")))
        d[field] = draw(any_value)
        data = enc(d)
        if decodes(data):  # valid by chance: make it a frame of a version we do not speak
            d["v"] = 99
            data = enc(d)
        return [data]
    if kind == "huge_length":
        d = base_frame(t, me, req)
        body = enc(d)
        if draw(st.booleans()):
            return [huge_header(draw)]
        # The frame's map, one entry longer, whose last value declares a huge length.
        assert 0x80 <= body[0] <= 0x8E
        return [bytes([body[0] + 1]) + body[1:] + enc("content") + huge_header(draw)]
    if kind == "version_or_type":
        d = base_frame(t, me, req)
        if draw(st.booleans()):
            wrong = st.integers(min_value=-(2**63), max_value=2**64 - 1).filter(lambda v: v != frames.PROTOCOL_VERSION)
            d["v"] = draw(st.one_of(wrong, any_value))
        else:
            d["t"] = draw(st.one_of(st.text(max_size=12).filter(lambda s: s not in frames.REQUEST_TAGS), any_value))
        data = enc(d)
        return [data] if not decodes(data) else [enc({**d, "v": 0})]
    if kind == "other_client":
        # A well-formed frame naming a client that has no mailbox (never connected, or gone).
        other = draw(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16).filter(lambda c: c != me))
        d = base_frame(t if t != "chunk" else "prompt", other, req)
        if t == "hello":
            d["pid"], d["start_time"] = names.self_identity()  # a live pid: only the mailbox is missing
        return [enc(d)]
    return chunk_sequence(draw, me, req)


def chunk_sequence(draw: Any, me: str, req: str) -> list[bytes]:
    """Chunks of a frame that must never be acted on: gaps, duplicates, lies, or a bad inner frame."""
    inner_kind = draw(st.sampled_from(["bad_content", "other_client", "nested_chunk", "garbage"]))
    if inner_kind == "bad_content":
        inner = enc({**base_frame("prompt", me, req), "content": 42})
    elif inner_kind == "other_client":
        inner = enc(base_frame("prompt", "f" * 16 if me != "f" * 16 else "e" * 16, req))
    elif inner_kind == "nested_chunk":
        inner = enc(base_frame("chunk", me, req))
    else:
        inner = draw(st.binary(min_size=2, max_size=400))
    n = draw(st.integers(min_value=2, max_value=min(6, len(inner))))
    step = -(-len(inner) // n)
    pieces = [inner[i * step : (i + 1) * step] for i in range(n)]
    pieces = [p for p in pieces if p] or [inner]
    n = len(pieces)
    cid = draw(st.integers(min_value=0, max_value=2**63 - 1))
    total = len(inner)
    seqs = list(range(n))
    fault = draw(st.sampled_from(["none", "gap", "duplicate", "lie_total", "lie_count", "seq_past_n", "empty",
                                  "shuffle"]))
    if fault == "gap" and n > 1:
        seqs.remove(draw(st.sampled_from(seqs)))
    elif fault == "duplicate":
        seqs.insert(draw(st.integers(0, len(seqs))), draw(st.sampled_from(seqs)))
    elif fault == "shuffle":
        seqs = draw(st.permutations(seqs))
    out = []
    for i, seq in enumerate(seqs):
        c: dict[str, Any] = {"t": "chunk", "v": 1, "client": me, "req": req, "cid": cid, "seq": seq, "n": max(n, 2),
                             "total": total, "data": pieces[seq]}
        if fault == "lie_total":
            c["total"] = draw(st.integers(min_value=1, max_value=frames.MAX_FRAME_BYTES * 2))
        elif fault == "lie_count" and i == len(seqs) - 1:
            c["n"] = n + draw(st.integers(min_value=1, max_value=5))
        elif fault == "seq_past_n" and i == 0:
            c["seq"] = n + draw(st.integers(min_value=0, max_value=5))
        elif fault == "empty" and i == 0:
            c["data"] = b""
        out.append(enc(c))
    return out


def content_values() -> st.SearchStrategy[Any]:
    """Prompt content: strings, block lists (valid or not, with odd values inside), and other types."""
    block = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)},
                              optional={"extra": any_value}),
        st.dictionaries(st.text(max_size=6), any_value, max_size=3),
        st.fixed_dictionaries({"type": st.text(max_size=6)}, optional={"text": any_value, "x": any_value}),
    )
    return st.one_of(st.text(max_size=40), st.lists(block, max_size=3), any_value)


# ---------------------------------------------------------------- the test


class Mailbox:
    """The fuzzer's own client: a mailbox the broker answers to, and what arrived in it."""

    def __init__(self, session: str) -> None:
        self.id = names.new_client_id()
        self.box = mailbox.MailboxReader(session, self.id)
        self.got: list[frames.ReplyFrame] = []

    def poll(self) -> None:
        self.got.extend(frames.decode_reply(d) for d in self.box.read_frames())

    def wait_req(self, req: str, timeout_s: float = 10.0, terminal: bool = True) -> frames.ReplyFrame:
        """The first terminal reply (Error or Result) for ``req``."""

        def find() -> frames.ReplyFrame | None:
            self.poll()
            for f in self.got:
                if f.req == req and isinstance(f, frames.Error | frames.Result):
                    return f
            return None

        found: frames.ReplyFrame = wait_until(find, timeout_s, f"a reply to {req}", poll_s=0.0005)
        return found

    def close(self) -> None:
        self.box.close()


def test_bad_input_is_refused_counted_and_never_reaches_the_agent(broker_factory, session_name, tmp_path):
    st_path = tmp_path / "sim-stats.json"
    b = broker_factory(agent_args=(f"--stats-file={st_path}",))
    me = Mailbox(session_name)
    rq = rqueue.RequestQueue.open(session_name)
    pid, start = names.self_identity()
    barrier_n = [0]

    def barrier() -> None:
        """Send a refused frame last, at the lowest priority; its Error means everything before was read."""
        barrier_n[0] += 1
        req = f"barrier-{barrier_n[0]}"
        rq.send_bytes(enc({**base_frame("prompt", me.id, req), "content": 42}), 0)
        err = me.wait_req(req)
        assert isinstance(err, frames.Error) and err.code == "invalid"

    try:
        rq.send_frame(frames.Hello(client=me.id, kind="worker", pid=pid, start_time=start))
        barrier()
        wait_until(lambda: rec(b).clients == 1, what="the fuzzer's hello counted")
        rejected0 = rec(b).counters["rejected_frames"]
        rss0 = vm_rss_kib(b.pid)

        # ---- phase 1: frames that must all be refused
        counter = [0]
        stats = {"messages": 0, "undecodable": 0, "errors_expected": 0}

        @settings(max_examples=int(os.environ.get("TURNSTILE_FUZZ_EXAMPLES", "250")), deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(st.lists(bad_messages(me.id), min_size=1, max_size=4))
        def refused(batches: list[list[bytes]]) -> None:
            expect: list[str] = []
            seen = len(me.got)
            for batch in batches:
                counter[0] += 1
                unique = f"fz-{counter[0]:06d}".encode()
                for data in batch:
                    data = data.replace(REQ_SLOT.encode(), unique)
                    prio = int.from_bytes(os.urandom(1), "little") % 3
                    rq.send_bytes(data, prio)
                    stats["messages"] += 1
                    if not decodes(data):
                        stats["undecodable"] += 1
                        client, req = frames.peek_sender(data)
                        if client == me.id and req and req.startswith("fz-") and not _is_chunk(data):
                            expect.append(req)
            barrier()
            stats["errors_expected"] += len(expect)
            new = me.got[seen:]
            acted = [f for f in new if isinstance(f, ACTED_ON)]
            assert not acted, f"a bad frame was acted on: {acted}"
            assert all(isinstance(f, frames.Error) and f.code in ERROR_CODES for f in new), new
            answered = {f.req for f in new}
            missing = [r for r in expect if r not in answered]
            assert not missing, f"no typed error for {missing}"

        refused()
        r = rec(b)
        assert b.proc is not None and b.proc.poll() is None, "the broker died"
        assert r.counters["rejected_frames"] - rejected0 >= stats["undecodable"]
        assert r.counters["requests"] == 0 and r.counters["turns"] == 0
        assert sim_stats(st_path).get("user_messages", 0) == 0, "a bad frame reached the agent"
        print(f"phase 1: {stats['messages']} messages, {stats['undecodable']} undecodable, "
              f"{stats['errors_expected']} typed errors checked, "
              f"rejected_frames +{r.counters['rejected_frames'] - rejected0}")

        # ---- phase 2: prompt content, refused up front or run to a result
        accepted = [0]
        refused_codes: dict[str, int] = {}

        @settings(max_examples=int(os.environ.get("TURNSTILE_FUZZ_CONTENT_EXAMPLES", "120")), deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(content_values())
        @example(42)
        @example({"type": "text", "text": "a dict, not a list"})
        @example([{"text": "no type"}])
        @example([{"type": 7}])
        @example([{"type": "text"}])
        @example([{"type": "text", "text": 5}])
        @example("")
        @example([])
        @example([{"type": "text", "text": "ext inside", "x": msgspec.msgpack.Ext(3, b"ab")}])
        @example([{"type": "text", "text": "nil key inside", "x": {None: 1}}])
        @example([{"type": "text", "text": "array key inside", "x": {(1, 2): 1}}])
        @example([{"type": "text", "text": "nan inside", "x": math.nan}])
        def content(value: Any) -> None:
            counter[0] += 1
            req = f"ct-{counter[0]}"
            try:
                data = enc({**base_frame("prompt", me.id, req), "content": value})
            except (TypeError, ValueError, OverflowError):
                return  # not encodable as msgpack: no client can send it
            if len(data) > rq.max_message_bytes:
                return
            rq.send_bytes(data, 0)
            reply = me.wait_req(req)
            if isinstance(reply, frames.Error):
                assert reply.code in ERROR_CODES
                refused_codes[reply.code] = refused_codes.get(reply.code, 0) + 1
                assert not decodes(data), f"valid content refused: {value!r}"
                return
            assert isinstance(reply, frames.Result)
            assert reply.status == "ok", f"content {value!r} ended {reply.status} {reply.error_code}"
            accepted[0] += 1

        content()
        r = rec(b)
        s = sim_stats(st_path)
        print(f"phase 2: {accepted[0]} content values ran, refused {refused_codes}")
        assert s["user_messages"] == accepted[0] == r.counters["turns"]
        assert s.get("malformed_lines", 0) == 0 and s.get("user_messages_while_running", 0) == 0
        assert r.counters["agent_restarts"] == 0, "content killed the agent"
        assert refused_codes.get("bad_content", 0) + refused_codes.get("invalid", 0) >= 8

        # ---- the broker still serves a normal prompt, and its memory stayed bounded
        me.poll()
        rq.send_frame(frames.Prompt(client=me.id, req="normal-1", kind="worker", content="still serving"))
        res = me.wait_req("normal-1")
        assert isinstance(res, frames.Result) and res.status == "ok" and res.text == "sim: still serving"
        rss1 = vm_rss_kib(b.pid)
        print(f"broker VmRSS {rss0} KiB -> {rss1} KiB")
        assert rss1 - rss0 < RSS_MARGIN_KIB, f"broker memory grew by {rss1 - rss0} KiB"

        # ---- the client library refuses the same content in the caller, before sending
        from clients import Client

        with Client(session_name, "worker") as c:
            for bad in (42, {"type": "text"}, [{"text": "no type"}], [{"type": "text", "text": 5}], "", [],
                        [{"type": "text", "text": "x", "e": msgspec.msgpack.Ext(1, b"")}]):
                try:
                    c.prompt(bad)
                except ProtocolError:
                    continue
                raise AssertionError(f"the client library sent {bad!r}")
    finally:
        rq.close()
        me.close()


def _is_chunk(data: bytes) -> bool:
    """True for a message that carries a chunk tag (its errors come when the set completes, if ever)."""
    try:
        env = msgspec.msgpack.decode(data, type=dict[str, Any])
    except (msgspec.DecodeError, TypeError, RecursionError, UnicodeDecodeError):
        return False
    return env.get("t") == "chunk"
