"""Splitting request frames larger than one queue message, and putting them back.

A frame of ``total`` bytes becomes ``n`` :class:`~ipc.frames.Chunk` frames with
the same ``cid`` (chunk-set id, unique per sender) and ``seq`` 0..n-1. The
reassembler keeps only bytes it has actually received (never allocates by a
declared total), bounds every set and all sets together, expires incomplete
sets, and refuses gaps, duplicates and lies about totals with
:class:`ProtocolError`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Final

from ipc import frames
from ipc.errors import ProtocolError

#: Bytes a Chunk frame spends around its data (tag, ids, counters), rounded up.
CHUNK_OVERHEAD: Final = 160

_cids = itertools.count(1)


def split(data: bytes, *, client: str, req: str, max_message_bytes: int) -> list[bytes]:
    """Encoded messages carrying ``data``: itself if it fits, else numbered chunks."""
    if len(data) <= max_message_bytes:
        return [data]
    if len(data) > frames.MAX_FRAME_BYTES:
        raise ProtocolError("oversize", f"frame of {len(data)} bytes exceeds {frames.MAX_FRAME_BYTES}")
    step = max_message_bytes - CHUNK_OVERHEAD
    if step <= 0:
        raise ValueError(f"queue message size {max_message_bytes} is too small to carry chunks")
    cid = next(_cids)
    n = -(-len(data) // step)
    view = memoryview(data)
    out = []
    for seq in range(n):
        piece = bytes(view[seq * step : (seq + 1) * step])
        out.append(
            frames.encode(
                frames.Chunk(client=client, req=req, cid=cid, seq=seq, n=n, total=len(data), data=piece)
            )
        )
    return out


@dataclass
class _Set:
    n: int
    total: int
    started_s: float
    req: str
    received: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


@dataclass(frozen=True)
class Dropped:
    """An incomplete chunk set the reassembler gave up on, and whom to tell."""

    client: str
    cid: int
    req: str
    code: str  # "chunk_timeout" or "chunk_evicted" (a ProtocolError reason)
    message: str


@dataclass
class _Holder:
    """What one client holds in incomplete sets."""

    bytes: int = 0
    sets: int = 0


class Reassembler:
    """Collects chunk sets per (client, cid) into whole frames, within per-client and overall bounds."""

    def __init__(
        self,
        *,
        max_frame_bytes: int = frames.MAX_FRAME_BYTES,
        max_pending_bytes: int = 4 * frames.MAX_FRAME_BYTES,
        max_sets: int = 256,
        max_client_bytes: int = 2 * frames.MAX_FRAME_BYTES,
        max_client_sets: int = 8,
        timeout_s: float = 30.0,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_sets = max_sets
        self.max_client_bytes = max_client_bytes
        self.max_client_sets = max_client_sets
        self.timeout_s = timeout_s
        self._sets: dict[tuple[str, int], _Set] = {}
        self._holders: dict[str, _Holder] = {}
        self.pending_bytes = 0
        #: Sets evicted by :meth:`add` to make room for another client's; the caller
        #: takes them with :meth:`take_dropped` and tells their owners.
        self._dropped: list[Dropped] = []

    def __len__(self) -> int:
        return len(self._sets)

    def _drop(self, key: tuple[str, int]) -> _Set | None:
        s = self._sets.pop(key, None)
        if s is not None:
            self.pending_bytes -= s.size
            h = self._holders[key[0]]
            h.bytes -= s.size
            h.sets -= 1
            if not h.sets:
                del self._holders[key[0]]
        return s

    def _evict(self, key: tuple[str, int], why: str) -> None:
        s = self._drop(key)
        if s is not None:
            self._dropped.append(Dropped(key[0], key[1], s.req, "chunk_evicted", why))

    def take_dropped(self) -> list[Dropped]:
        """The sets :meth:`add` evicted since the last call (their owners are to be told)."""
        out, self._dropped = self._dropped, []
        return out

    def holding(self, client: str) -> tuple[int, int]:
        """(bytes, sets) ``client`` holds in incomplete sets."""
        h = self._holders.get(client)
        return (h.bytes, h.sets) if h else (0, 0)

    def drop_client(self, client: str) -> None:
        """Forget every incomplete set of a client (it died or said bye)."""
        for key in [k for k in self._sets if k[0] == client]:
            self._drop(key)

    def expire(self, now_s: float) -> list[Dropped]:
        """Drop sets older than the timeout; returns them (their owners are to be told)."""
        old = [k for k, s in self._sets.items() if now_s - s.started_s > self.timeout_s]
        out = []
        for key in old:
            s = self._drop(key)
            if s is not None:
                out.append(Dropped(key[0], key[1], s.req, "chunk_timeout",
                                   f"incomplete chunk set expired after {self.timeout_s:g} s"))
        return out

    def _oldest_of(self, client: str) -> tuple[str, int]:
        return min((k for k in self._sets if k[0] == client), key=lambda k: self._sets[k].started_s)

    def _heaviest_other(self, client: str, by_sets: bool) -> str | None:
        others = [c for c in self._holders if c != client]
        if not others:
            return None
        if by_sets:
            return max(others, key=lambda c: self._holders[c].sets)
        return max(others, key=lambda c: self._holders[c].bytes)

    def _room_for_set(self, client: str) -> None:
        """Make room for one more set of ``client`` (its own oldest, or the fair-share eviction)."""
        mine = self._holders.get(client, _Holder())
        if mine.sets >= self.max_client_sets:
            self._evict(self._oldest_of(client), "evicted by a newer set of the same client")
        while len(self._sets) >= self.max_sets:
            victim = self._heaviest_other(client, by_sets=True)
            if victim is not None and self._holders[victim].sets > mine.sets + 1:
                self._evict(self._oldest_of(victim), "evicted: the client held the most incomplete sets")
            elif mine.sets:
                self._evict(self._oldest_of(client), "evicted by a newer set of the same client")
            else:
                raise ProtocolError("oversize", "too many incomplete chunk sets pending")

    def _room_for_bytes(self, key: tuple[str, int], n: int) -> None:
        """Make room for ``n`` more bytes of ``key``'s client, or refuse them (dropping ``key``'s set)."""
        client = key[0]
        mine = self._holders[client]
        if mine.bytes + n > self.max_client_bytes:
            self._drop(key)
            raise ProtocolError(
                "oversize", f"this client holds too many bytes in incomplete chunk sets (bound {self.max_client_bytes})"
            )
        while self.pending_bytes + n > self.max_pending_bytes:
            victim = self._heaviest_other(client, by_sets=False)
            if victim is None or self._holders[victim].bytes <= mine.bytes + n:
                # Nobody holds more than this client would: it is over its fair share.
                self._drop(key)
                raise ProtocolError("oversize", "too many bytes pending in incomplete chunk sets")
            self._evict(self._oldest_of(victim), "evicted: the client held the most bytes in incomplete chunk sets")

    def add(self, chunk: frames.Chunk, now_s: float, *, connected: bool = True) -> bytes | None:
        """Add one chunk; returns the whole frame when its last piece arrives.

        ``connected`` says whether the sender is a connected client: only
        those hold pending chunks (fresh client ids cost nothing to make up).
        Any inconsistency drops the whole set and raises ``ProtocolError``.
        """
        key = (chunk.client, chunk.cid)
        if not connected:
            raise ProtocolError("unknown_client", "chunks from a client that is not connected are not kept")
        if chunk.total > self.max_frame_bytes:
            self._drop(key)
            raise ProtocolError("oversize", f"chunked frame of {chunk.total} bytes exceeds {self.max_frame_bytes}")
        if not chunk.data:
            # Empty pieces would let a set hold millions of entries at zero counted bytes.
            self._drop(key)
            raise ProtocolError("chunk_sequence", f"chunk {chunk.seq} carries no data")
        if chunk.seq >= chunk.n:
            self._drop(key)
            raise ProtocolError("chunk_sequence", f"chunk {chunk.seq} of {chunk.n}")
        s = self._sets.get(key)
        if s is None:
            self._room_for_set(chunk.client)
            s = self._sets[key] = _Set(n=chunk.n, total=chunk.total, started_s=now_s, req=chunk.req)
            h = self._holders.setdefault(chunk.client, _Holder())
            h.sets += 1
        elif (s.n, s.total) != (chunk.n, chunk.total):
            self._drop(key)
            raise ProtocolError("chunk_sequence", "chunks of one set disagree on count or total")
        if chunk.seq in s.received:
            self._drop(key)
            raise ProtocolError("chunk_sequence", f"duplicate chunk {chunk.seq}")
        if s.size + len(chunk.data) > s.total:
            self._drop(key)
            raise ProtocolError("chunk_sequence", f"chunks exceed the declared total of {s.total} bytes")
        self._room_for_bytes(key, len(chunk.data))
        s.received[chunk.seq] = chunk.data
        s.size += len(chunk.data)
        self.pending_bytes += len(chunk.data)
        self._holders[chunk.client].bytes += len(chunk.data)
        if len(s.received) < s.n:
            return None
        self._drop(key)
        if s.size != s.total:
            raise ProtocolError("chunk_sequence", f"chunks carry {s.size} bytes, declared {s.total}")
        return b"".join(s.received[i] for i in range(s.n))
