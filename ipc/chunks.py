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
    received: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunk sets per (client, cid) into whole frames, within bounds."""

    def __init__(
        self,
        *,
        max_frame_bytes: int = frames.MAX_FRAME_BYTES,
        max_pending_bytes: int = 4 * frames.MAX_FRAME_BYTES,
        max_sets: int = 256,
        timeout_s: float = 30.0,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_sets = max_sets
        self.timeout_s = timeout_s
        self._sets: dict[tuple[str, int], _Set] = {}
        self.pending_bytes = 0

    def __len__(self) -> int:
        return len(self._sets)

    def _drop(self, key: tuple[str, int]) -> None:
        s = self._sets.pop(key, None)
        if s is not None:
            self.pending_bytes -= s.size

    def drop_client(self, client: str) -> None:
        """Forget every incomplete set of a client (it died or said bye)."""
        for key in [k for k in self._sets if k[0] == client]:
            self._drop(key)

    def expire(self, now_s: float) -> list[tuple[str, int]]:
        """Drop sets older than the timeout; returns their keys (for typed errors)."""
        old = [k for k, s in self._sets.items() if now_s - s.started_s > self.timeout_s]
        for key in old:
            self._drop(key)
        return old

    def add(self, chunk: frames.Chunk, now_s: float) -> bytes | None:
        """Add one chunk; returns the whole frame when its last piece arrives.

        Any inconsistency drops the whole set and raises ``ProtocolError``.
        """
        key = (chunk.client, chunk.cid)
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
            if len(self._sets) >= self.max_sets:
                oldest = min(self._sets, key=lambda k: self._sets[k].started_s)
                self._drop(oldest)
            s = self._sets[key] = _Set(n=chunk.n, total=chunk.total, started_s=now_s)
        elif (s.n, s.total) != (chunk.n, chunk.total):
            self._drop(key)
            raise ProtocolError("chunk_sequence", "chunks of one set disagree on count or total")
        if chunk.seq in s.received:
            self._drop(key)
            raise ProtocolError("chunk_sequence", f"duplicate chunk {chunk.seq}")
        if s.size + len(chunk.data) > s.total:
            self._drop(key)
            raise ProtocolError("chunk_sequence", f"chunks exceed the declared total of {s.total} bytes")
        if self.pending_bytes + len(chunk.data) > self.max_pending_bytes:
            self._drop(key)
            raise ProtocolError("oversize", "too many bytes pending in incomplete chunk sets")
        s.received[chunk.seq] = chunk.data
        s.size += len(chunk.data)
        self.pending_bytes += len(chunk.data)
        if len(s.received) < s.n:
            return None
        self._drop(key)
        if s.size != s.total:
            raise ProtocolError("chunk_sequence", f"chunks carry {s.size} bytes, declared {s.total}")
        return b"".join(s.received[i] for i in range(s.n))
