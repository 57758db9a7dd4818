"""Chunking: frames larger than a queue message split and reassemble, within bounds."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc import chunks, frames
from ipc.errors import ProtocolError

CLIENT = "0123456789abcdef"
LONG_REQ = "r" * 64  # the longest request id: the most bytes a chunk spends on ids


def decode_chunks(parts: list[bytes]) -> list[frames.Chunk]:
    out = []
    for p in parts:
        frame = frames.decode_request(p)
        assert isinstance(frame, frames.Chunk)
        out.append(frame)
    return out


def reassemble(parts: list[bytes], r: chunks.Reassembler | None = None) -> bytes:
    """Feed every part in order; the whole frame must come out with the last one, not before."""
    r = r or chunks.Reassembler()
    cs = decode_chunks(parts)
    for c in cs[:-1]:
        assert r.add(c, 0.0) is None
    whole = r.add(cs[-1], 0.0)
    assert whole is not None
    assert len(r) == 0 and r.pending_bytes == 0
    return whole


def boundary_sizes(max_bytes: int) -> list[int]:
    step = max_bytes - chunks.CHUNK_OVERHEAD
    return sorted(
        {
            0,
            1,
            step - 1,
            step,
            step + 1,
            max_bytes - 1,
            max_bytes,
            max_bytes + 1,
            2 * step - 1,
            2 * step,
            2 * step + 1,
            3 * step - 1,
            3 * step,
            3 * step + 1,
            7 * step + 13,
        }
    )


@pytest.mark.parametrize("max_bytes", [chunks.CHUNK_OVERHEAD + 1, 512, 8192])
def test_split_and_reassemble_at_every_boundary(max_bytes: int) -> None:
    step = max_bytes - chunks.CHUNK_OVERHEAD
    rng = random.Random(max_bytes)
    for size in boundary_sizes(max_bytes):
        data = rng.randbytes(size)
        parts = chunks.split(data, client=CLIENT, req=LONG_REQ, max_message_bytes=max_bytes)
        if size <= max_bytes:
            assert parts == [data], size
            continue
        assert len(parts) == -(-size // step), size
        assert all(len(p) <= max_bytes for p in parts), f"a chunk outgrew the queue message at size {size}"
        cs = decode_chunks(parts)
        assert [c.seq for c in cs] == list(range(len(parts)))
        assert {(c.cid, c.n, c.total, c.client, c.req) for c in cs} == {(cs[0].cid, len(parts), size, CLIENT, LONG_REQ)}
        assert all(c.data for c in cs), "no chunk is empty"
        assert reassemble(parts) == data


def test_chunk_overhead_holds_for_the_largest_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    # The chunk-set id counter near its 64-bit end, the longest request id, a
    # frame near the size limit: every chunk still fits its queue message.
    monkeypatch.setattr(chunks, "_cids", itertools.count(2**63 - 5))
    max_bytes = 1024
    step = max_bytes - chunks.CHUNK_OVERHEAD
    n = frames.MAX_FRAME_BYTES // step
    data = bytes(step * 2 + 1)
    parts = chunks.split(data, client="f" * 16, req="Z" * 64, max_message_bytes=max_bytes)
    assert max(len(p) for p in parts) <= max_bytes
    # And with seq and n at their widest encodings.
    widest = frames.encode(
        frames.Chunk(
            client="f" * 16, req="Z" * 64, cid=2**63 - 1, seq=n - 1, n=n, total=frames.MAX_FRAME_BYTES, data=bytes(step)
        )
    )
    assert len(widest) <= max_bytes


def test_split_refuses_a_frame_over_the_limit_and_a_message_too_small() -> None:
    with pytest.raises(ProtocolError) as info:
        chunks.split(bytes(frames.MAX_FRAME_BYTES + 1), client=CLIENT, req="", max_message_bytes=8192)
    assert info.value.reason == "oversize"
    with pytest.raises(ValueError, match="too small"):
        chunks.split(bytes(1000), client=CLIENT, req="", max_message_bytes=chunks.CHUNK_OVERHEAD)


@pytest.mark.timeout(120)
def test_a_64_mib_prompt_round_trips() -> None:
    # A Prompt whose encoding is exactly MAX_FRAME_BYTES: the largest frame there is.
    base = len(frames.encode(frames.Prompt(client=CLIENT, req="big", kind="worker", content="x" * 70_000)))
    content = "x" * (70_000 + frames.MAX_FRAME_BYTES - base)
    prompt = frames.Prompt(client=CLIENT, req="big", kind="worker", content=content)
    data = frames.encode(prompt)
    assert len(data) == frames.MAX_FRAME_BYTES
    parts = chunks.split(data, client=CLIENT, req="big", max_message_bytes=8192)
    assert all(len(p) <= 8192 for p in parts)
    del data
    r = chunks.Reassembler()
    whole = None
    for i, p in enumerate(parts):
        c = frames.decode_request(p)
        assert isinstance(c, frames.Chunk)
        whole = r.add(c, 0.0)
        assert (whole is None) == (i < len(parts) - 1)
    assert whole is not None
    del parts
    assert frames.decode_request(whole) == prompt
    # One byte more cannot be sent, nor accepted by a reassembler.
    with pytest.raises(ProtocolError) as info:
        chunks.split(whole + b"\x00", client=CLIENT, req="big", max_message_bytes=8192)
    assert info.value.reason == "oversize"
    with pytest.raises(ProtocolError) as info:
        r.add(frames.Chunk(client=CLIENT, cid=1, seq=0, n=2, total=frames.MAX_FRAME_BYTES + 1, data=b"x"), 0.0)
    assert info.value.reason == "oversize"


@given(
    sizes=st.lists(st.integers(0, 2000), min_size=1, max_size=6),
    clients=st.lists(st.sampled_from(["0" * 16, "1" * 16, "a" * 16, "f" * 16]), min_size=6, max_size=6),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_interleaved_sets_of_several_clients_reassemble(
    sizes: list[int], clients: list[str], data: st.DataObject
) -> None:
    max_bytes = chunks.CHUNK_OVERHEAD + 100  # small messages: many chunks per frame
    rng = random.Random(len(sizes))
    sent: dict[tuple[str, int], bytes] = {}
    all_parts: list[frames.Chunk] = []
    whole_messages: list[tuple[str, bytes]] = []
    for i, size in enumerate(sizes):
        payload = rng.randbytes(size)
        parts = chunks.split(payload, client=clients[i], req=f"r{i}", max_message_bytes=max_bytes)
        if len(parts) == 1:
            whole_messages.append((clients[i], payload))
            continue
        cs = decode_chunks(parts)
        sent[(clients[i], cs[0].cid)] = payload
        all_parts.extend(cs)
    order = data.draw(st.permutations(all_parts))
    r = chunks.Reassembler()
    got: dict[tuple[str, int], bytes] = {}
    for c in order:
        whole = r.add(c, 0.0)
        if whole is not None:
            key = (c.client, c.cid)
            assert key not in got, "a set completed twice"
            got[key] = whole
        assert r.pending_bytes == sum(len(b) for b in _pending(r))
    assert got == sent
    assert len(r) == 0 and r.pending_bytes == 0


def _pending(r: chunks.Reassembler) -> Iterator[bytes]:
    for s in r._sets.values():
        yield from s.received.values()


def chunk(
    seq: int, n: int, total: int, data: bytes, *, cid: int = 1, client: str = CLIENT, req: str = ""
) -> frames.Chunk:
    return frames.Chunk(client=client, req=req, cid=cid, seq=seq, n=n, total=total, data=data)


def test_a_gap_never_completes_and_expires_with_its_key() -> None:
    r = chunks.Reassembler(timeout_s=30.0)
    assert r.add(chunk(0, 3, 9, b"abc"), 100.0) is None
    assert r.add(chunk(2, 3, 9, b"ghi"), 101.0) is None  # 1 is missing
    assert r.add(chunk(0, 2, 4, b"zz", cid=2), 120.0) is None
    assert r.expire(129.0) == []  # not yet 30 s old
    assert len(r) == 2
    assert [(d.client, d.cid, d.code) for d in r.expire(130.5)] == [(CLIENT, 1, "chunk_timeout")]
    assert len(r) == 1 and r.pending_bytes == 2
    assert [(d.client, d.cid) for d in r.expire(1000.0)] == [(CLIENT, 2)]
    assert len(r) == 0 and r.pending_bytes == 0
    # A late piece of an expired set starts a new set: it cannot complete the old one.
    assert r.add(chunk(1, 3, 9, b"def"), 1001.0) is None


def test_drop_client_forgets_only_that_client() -> None:
    r = chunks.Reassembler()
    r.add(chunk(0, 2, 4, b"ab", client="a" * 16), 0.0)
    r.add(chunk(0, 2, 4, b"ab", client="b" * 16), 0.0)
    r.add(chunk(0, 2, 4, b"ab", client="a" * 16, cid=7), 0.0)
    r.drop_client("a" * 16)
    assert len(r) == 1 and r.pending_bytes == 2
    assert r.add(chunk(1, 2, 4, b"cd", client="b" * 16), 0.0) == b"abcd"


@pytest.mark.parametrize(
    ("first", "second", "why"),
    [
        (chunk(0, 3, 9, b"abc"), chunk(0, 3, 9, b"abc"), "duplicate"),
        (chunk(0, 3, 9, b"abc"), chunk(0, 3, 9, b"xyz"), "duplicate"),
        (chunk(0, 3, 9, b"abc"), chunk(1, 4, 9, b"def"), "disagree"),
        (chunk(0, 3, 9, b"abc"), chunk(1, 3, 10, b"def"), "disagree"),
        (chunk(0, 2, 4, b"abc"), chunk(1, 2, 4, b"def"), "exceed the declared total"),
        (chunk(0, 3, 9, b"abc"), chunk(3, 3, 9, b"def"), "chunk 3 of 3"),
        (chunk(0, 3, 9, b"abc"), chunk(99, 3, 9, b"def"), "chunk 99 of 3"),
    ],
    ids=[
        "duplicate",
        "duplicate-other-data",
        "n-mismatch",
        "total-mismatch",
        "more-than-total",
        "seq-eq-n",
        "seq-gt-n",
    ],
)
def test_inconsistent_sets_are_refused_and_dropped(first: frames.Chunk, second: frames.Chunk, why: str) -> None:
    r = chunks.Reassembler()
    assert r.add(first, 0.0) is None
    with pytest.raises(ProtocolError) as info:
        r.add(second, 0.0)
    assert info.value.reason == "chunk_sequence"
    assert why in str(info.value)
    # The whole set is gone: nothing of it is kept, nothing of it can complete later.
    assert len(r) == 0 and r.pending_bytes == 0


def test_fewer_bytes_than_declared_is_refused_on_the_last_piece() -> None:
    r = chunks.Reassembler()
    assert r.add(chunk(0, 2, 100, b"x" * 10), 0.0) is None
    with pytest.raises(ProtocolError) as info:
        r.add(chunk(1, 2, 100, b"y" * 10), 0.0)
    assert info.value.reason == "chunk_sequence"
    assert "declared 100" in str(info.value)
    assert len(r) == 0 and r.pending_bytes == 0


def test_a_first_piece_with_seq_past_n_is_refused() -> None:
    r = chunks.Reassembler()
    with pytest.raises(ProtocolError) as info:
        r.add(chunk(5, 2, 10, b"x"), 0.0)
    assert info.value.reason == "chunk_sequence"
    assert len(r) == 0


def test_a_declared_total_over_the_frame_bound_is_refused_before_storing() -> None:
    r = chunks.Reassembler(max_frame_bytes=1000)
    with pytest.raises(ProtocolError) as info:
        r.add(chunk(0, 2, 1001, b"x" * 10), 0.0)
    assert info.value.reason == "oversize"
    assert len(r) == 0 and r.pending_bytes == 0


def test_max_sets_evicts_the_oldest_set() -> None:
    r = chunks.Reassembler(max_sets=3)
    for cid in range(1, 4):
        assert r.add(chunk(0, 2, 4, b"ab", cid=cid), float(cid)) is None
    assert r.add(chunk(0, 2, 4, b"ab", cid=4), 4.0) is None
    assert len(r) == 3 and r.pending_bytes == 6
    # cid 1 was the oldest and is gone: its last piece starts a fresh, incomplete set
    # (evicting cid 2), while the kept sets still complete.
    assert r.add(chunk(1, 2, 4, b"cd", cid=1), 5.0) is None
    assert len(r) == 3
    assert r.add(chunk(1, 2, 4, b"cd", cid=3), 6.0) == b"abcd"
    assert r.add(chunk(1, 2, 4, b"cd", cid=4), 6.0) == b"abcd"
    assert r.add(chunk(1, 2, 4, b"cd", cid=2), 6.0) is None  # evicted earlier
    assert len(r) <= 3


def test_pending_bytes_are_bounded_across_sets() -> None:
    r = chunks.Reassembler(max_pending_bytes=1000)
    for cid in (1, 2, 3):
        assert r.add(chunk(0, 2, 400, b"x" * 300, cid=cid), 0.0) is None
    assert r.pending_bytes == 900
    with pytest.raises(ProtocolError) as info:
        r.add(chunk(0, 2, 400, b"x" * 300, cid=99), 0.0)
    assert info.value.reason == "oversize"
    assert r.pending_bytes == 900 and len(r) == 3
    # Completing a set frees its bytes.
    assert r.add(chunk(1, 2, 400, b"y" * 100, cid=1), 0.0) == b"x" * 300 + b"y" * 100
    assert r.pending_bytes == 600


@given(
    st.lists(
        st.builds(
            frames.Chunk,
            client=st.sampled_from(["0" * 16, "1" * 16]),
            cid=st.integers(0, 3),
            seq=st.integers(0, 5),
            n=st.integers(2, 5),
            total=st.integers(1, 40),
            data=st.binary(max_size=12),
        ),
        max_size=60,
    ),
    st.lists(st.floats(0, 100), min_size=60, max_size=60),
)
@settings(max_examples=400, deadline=None)
def test_arbitrary_chunk_streams_only_raise_protocol_errors_and_keep_bounds(
    stream: list[frames.Chunk], times: list[float]
) -> None:
    r = chunks.Reassembler(max_frame_bytes=30, max_pending_bytes=50, max_sets=3, timeout_s=10.0)
    for c, now in zip(stream, sorted(times), strict=False):
        try:
            whole = r.add(c, now)
        except ProtocolError as exc:
            assert exc.reason in {"chunk_sequence", "oversize"}
        else:
            if whole is not None:
                assert len(whole) == c.total <= 30
        r.expire(now)
        assert 0 <= r.pending_bytes <= 50
        assert r.pending_bytes == sum(len(b) for b in _pending(r))
        assert len(r) <= 3


# ---------------------------------------------------------------- per-client budgets (issue 13, item 5)


def test_an_expired_set_names_its_request() -> None:
    r = chunks.Reassembler(timeout_s=1.0)
    r.add(chunk(0, 2, 4, b"ab", req="big-1"), 0.0)
    [d] = r.expire(2.0)
    assert (d.client, d.req, d.code) == (CLIENT, "big-1", "chunk_timeout")


def test_a_client_that_is_not_connected_holds_nothing() -> None:
    r = chunks.Reassembler()
    with pytest.raises(ProtocolError) as info:
        r.add(chunk(0, 2, 4, b"ab"), 0.0, connected=False)
    assert info.value.reason == "unknown_client"
    assert len(r) == 0 and r.pending_bytes == 0


def test_one_client_cannot_take_the_shared_byte_budget() -> None:
    r = chunks.Reassembler(max_pending_bytes=1000, max_client_bytes=500)
    hog, other = "a" * 16, "b" * 16
    r.add(chunk(0, 2, 600, b"x" * 400, client=hog, cid=1), 0.0)
    with pytest.raises(ProtocolError) as info:
        r.add(chunk(0, 2, 600, b"x" * 400, client=hog, cid=2), 0.0)
    assert info.value.reason == "oversize" and "this client" in str(info.value)
    assert r.holding(hog) == (400, 1)
    # Another client's large frame still fits.
    assert r.add(chunk(0, 2, 500, b"y" * 250, client=other), 0.0) is None
    assert r.add(chunk(1, 2, 500, b"y" * 250, client=other), 0.0) == b"y" * 500


def test_a_newcomer_below_its_fair_share_evicts_the_heaviest_and_its_owner_is_named() -> None:
    r = chunks.Reassembler(max_pending_bytes=1000, max_client_bytes=1000)
    hog, small = "a" * 16, "b" * 16
    r.add(chunk(0, 3, 1200, b"x" * 500, client=hog, cid=1, req="hog-1"), 0.0)
    r.add(chunk(1, 3, 1200, b"x" * 400, client=hog, cid=1, req="hog-1"), 0.0)
    assert r.add(chunk(0, 2, 400, b"s" * 200, client=small, req="small-1"), 1.0) is None
    [d] = r.take_dropped()
    assert (d.client, d.req, d.code) == (hog, "hog-1", "chunk_evicted")
    assert r.holding(hog) == (0, 0)
    assert r.add(chunk(1, 2, 400, b"s" * 200, client=small, req="small-1"), 1.0) == b"s" * 400
    assert r.take_dropped() == []


def test_a_set_spray_from_one_client_evicts_only_its_own_sets() -> None:
    r = chunks.Reassembler(max_sets=10, max_client_sets=3)
    legit, sprayer = "a" * 16, "b" * 16
    r.add(chunk(0, 2, 4, b"ab", client=legit, req="legit"), 0.0)
    for cid in range(100):
        r.add(chunk(0, 2, 4, b"ab", client=sprayer, cid=cid, req=f"s{cid}"), 1.0 + cid)
    assert r.holding(sprayer)[1] == 3
    assert {d.client for d in r.take_dropped()} == {sprayer}
    assert r.add(chunk(1, 2, 4, b"cd", client=legit, req="legit"), 200.0) == b"abcd"


def test_many_sprayers_evict_each_other_before_a_client_with_one_set() -> None:
    r = chunks.Reassembler(max_sets=4, max_client_sets=3)
    legit = "f" * 16
    r.add(chunk(0, 2, 4, b"ab", client=legit, req="legit"), 0.0)
    for i in range(20):
        sprayer = f"{i:016x}"
        for cid in range(3):
            with contextlib.suppress(ProtocolError):  # refused once every holder is at its fair share
                r.add(chunk(0, 2, 4, b"ab", client=sprayer, cid=cid), 1.0 + i)
    assert legit not in {d.client for d in r.take_dropped()}
    assert r.add(chunk(1, 2, 4, b"cd", client=legit, req="legit"), 50.0) == b"abcd"
