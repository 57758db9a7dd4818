"""The session's shared-memory state block.

Written only by the broker, read by anyone (``turnstile status`` reads it
without talking to the broker, so status works while the broker is stuck).
A seqlock keeps readers from seeing a torn record: the writer makes the
sequence odd, writes, makes it even; a reader retries until it saw the same
even sequence before and after copying. The record names the broker by pid
and start time, so a reader can tell a block left by a dead broker.

The cancel slot is the one part clients write: (incarnation, turn id) of the
turn they want cancelled. The broker clears it on start.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from ipc import histogram, names, shm
from ipc.errors import IPCError

MAGIC: Final = 0x54535354  # "TSST"
LAYOUT: Final = 1
SIZE: Final = 4096
OFF_SEQ: Final = 8
OFF_RECORD: Final = 64
OFF_CANCEL: Final = 2048

COUNTERS: Final = (
    "requests",
    "turns",
    "results_ok",
    "results_error",
    "results_cancelled",
    "results_preempted",
    "preempts",
    "requeues",
    "cancels",
    "stale_cancels",
    "rejected_frames",
    "agent_restarts",
    "drain_timeouts",
    "model_switches",
    "client_deaths",
    "clients_failed_slow",
    "unrouted_lines",
)
LATENCIES: Final = (
    "last_preempt_signal_us",
    "last_handoff_us",
    "last_submit_to_write_us",
    "last_drain_ms",
)


@dataclass
class StateRecord:
    """One consistent snapshot of the session's state."""

    broker_pid: int = 0
    broker_start: int = 0
    incarnation: str = ""
    started_unix_ns: int = 0
    heartbeat_unix_ns: int = 0
    closed: bool = False
    agent_pid: int = 0
    agent_state: str = ""
    session_id: str = ""
    model: str = ""
    turn: int = 0
    turn_state: str = ""
    turn_started_unix_ns: int = 0
    holder_client: str = ""
    holder_kind: str = ""
    holder_req: str = ""
    lease_client: str = ""
    webhooks_queued: int = 0
    workers_queued: int = 0
    clients: int = 0
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    latencies: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LATENCIES, 0))
    histograms: dict[str, histogram.Histogram] = field(default_factory=histogram.empty)
    holder_label: str = ""

    # Field layout on the wire: name, struct code, max bytes for strings.
    _LAYOUT: ClassVar[list[tuple[str, str]]] = [
        ("broker_pid", "Q"),
        ("broker_start", "Q"),
        ("incarnation", "16s"),
        ("started_unix_ns", "Q"),
        ("heartbeat_unix_ns", "Q"),
        ("closed", "?"),
        ("agent_pid", "Q"),
        ("agent_state", "16s"),
        ("session_id", "64s"),
        ("model", "128s"),
        ("turn", "Q"),
        ("turn_state", "16s"),
        ("turn_started_unix_ns", "Q"),
        ("holder_client", "16s"),
        ("holder_kind", "8s"),
        ("holder_req", "64s"),
        ("lease_client", "16s"),
        ("webhooks_queued", "Q"),
        ("workers_queued", "Q"),
        ("clients", "Q"),
    ]
    # Appended after layout 1's record, whose tail in the block is zeros: a block an
    # older broker writes reads as empty histograms and no label, so LAYOUT stays 1.
    _TAIL: ClassVar[list[tuple[str, str]]] = [
        ("holder_label", "32s"),
    ]

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (for JSON)."""
        return dataclasses.asdict(self)


_FMT = (
    "<"
    + "".join(code for _, code in StateRecord._LAYOUT)
    + "Q" * (len(COUNTERS) + len(LATENCIES) + len(histogram.NAMES) * histogram.WORDS)
    + "".join(code for _, code in StateRecord._TAIL)
)
_RECORD = struct.Struct(_FMT)
_NO_HISTOGRAM: Final = (0,) * histogram.WORDS
assert OFF_RECORD + _RECORD.size < OFF_CANCEL
_HEAD = struct.Struct("<II")
_CANCEL_BODY = struct.Struct("<16sQQ")  # after the slot's sequence word: incarnation, turn, requested unix ns
_SEQ: Final = OFF_SEQ // 8
_CANCEL_SEQ: Final = OFF_CANCEL // 8


def _words(mm: mmap.mmap) -> memoryview:
    """The block as aligned native 64-bit words: each load or store is one machine access.

    The sequence words are read by other processes while they change, so they
    must never be written with ``struct.pack_into``: it zero-fills its target
    and then writes byte by byte, and a reader could see 0 (even: "stable") or
    a mix of old and new bytes in the middle of a write.
    """
    return memoryview(mm)[:SIZE].cast("Q")


def _pack(rec: StateRecord) -> tuple[Any, ...]:
    values: list[Any] = []
    for name, code in StateRecord._LAYOUT:
        v = getattr(rec, name)
        values.append(v.encode()[: int(code[:-1])] if code.endswith("s") else v)
    values.extend(rec.counters.get(k, 0) for k in COUNTERS)
    values.extend(rec.latencies.get(k, 0) for k in LATENCIES)
    hists = rec.histograms
    for h in histogram.NAMES:
        hist = hists.get(h)
        if hist is None:
            values.extend(_NO_HISTOGRAM)
        else:
            values.extend(hist.buckets)
            values.append(hist.total)
    for name, code in StateRecord._TAIL:
        values.append(getattr(rec, name).encode()[: int(code[:-1])])
    return tuple(values)


def _unpack(values: tuple[Any, ...]) -> StateRecord:
    rec = StateRecord()
    i = 0
    for name, code in StateRecord._LAYOUT:
        v = values[i]
        setattr(rec, name, v.rstrip(b"\0").decode(errors="replace") if code.endswith("s") else v)
        i += 1
    rec.counters = dict(zip(COUNTERS, values[i : i + len(COUNTERS)], strict=True))
    i += len(COUNTERS)
    rec.latencies = dict(zip(LATENCIES, values[i : i + len(LATENCIES)], strict=True))
    i += len(LATENCIES)
    for h in histogram.NAMES:
        rec.histograms[h] = histogram.Histogram.from_words(h, list(values[i : i + histogram.WORDS]))
        i += histogram.WORDS
    for name, _code in StateRecord._TAIL:
        setattr(rec, name, values[i].rstrip(b"\0").decode(errors="replace"))
        i += 1
    return rec


@dataclass
class Snapshot:
    """What a reader saw: the record and whether its broker is still alive."""

    record: StateRecord
    broker_alive: bool
    cancel_incarnation: str
    cancel_turn: int


class StateBlock:
    """A mapped state block; the broker opens it to write, anyone to read."""

    def __init__(self, mm: mmap.mmap, name: str, writer: bool) -> None:
        self._mm = mm
        self._words = _words(mm)
        self.name = name
        self.writer = writer

    @classmethod
    def create(cls, session: str) -> StateBlock:
        """Broker side: create the block (0600), or take over one a dead broker left."""
        name = names.state_block(session)
        try:
            mm = shm.create(name, SIZE)
        except FileExistsError:
            mm = shm.open_existing(name, min_size=SIZE)
            magic, layout = _HEAD.unpack_from(mm, 0)
            if magic not in (0, MAGIC) or layout not in (0, LAYOUT):
                mm.close()
                raise IPCError(f"{name} is not a turnstile state block (layout {layout})", name=name) from None
            rec = _unpack(_RECORD.unpack_from(mm, OFF_RECORD))
            if not rec.closed and names.is_alive(rec.broker_pid, rec.broker_start) and rec.broker_pid != os.getpid():
                mm.close()
                raise IPCError(
                    f"session state {name} belongs to a live broker (pid {rec.broker_pid})",
                    name=name,
                    pid=rec.broker_pid,
                ) from None
        _HEAD.pack_into(mm, 0, MAGIC, LAYOUT)
        block = cls(mm, name, writer=True)
        # A dead writer may have left the sequence odd: make it even again.
        seq: int = block._words[_SEQ]
        block._words[_SEQ] = seq + (seq & 1)
        block.clear_cancel()
        return block

    @classmethod
    def open(cls, session: str) -> StateBlock:
        """Reader side: map the block read-write (clients write the cancel slot)."""
        name = names.state_block(session)
        mm = shm.open_existing(name, min_size=SIZE)
        magic, layout = _HEAD.unpack_from(mm, 0)
        if magic != MAGIC or layout != LAYOUT:
            mm.close()
            raise IPCError(f"{name} is not a turnstile state block", name=name)
        return cls(mm, name, writer=False)

    def write(self, rec: StateRecord) -> None:
        """Publish a record (broker only). Odd sequence while writing."""
        values = _pack(rec)  # outside the odd window, which readers spin on
        words = self._words
        seq: int = words[_SEQ]
        words[_SEQ] = seq + 1
        _RECORD.pack_into(self._mm, OFF_RECORD, *values)
        words[_SEQ] = seq + 2

    def read_record(self, *, timeout_s: float = 1.0) -> StateRecord:
        """A consistent record; retries while a write is in progress."""
        mm = self._mm
        words = self._words
        deadline = time.monotonic() + timeout_s
        spins = 0
        while True:
            s1: int = words[_SEQ]
            if not s1 & 1:
                raw = mm[OFF_RECORD : OFF_RECORD + _RECORD.size]
                s2: int = words[_SEQ]
                if s1 == s2:
                    return _unpack(_RECORD.unpack(raw))
            spins += 1
            if spins > 1000:
                if time.monotonic() > deadline:
                    # The writer died mid-write: the record may be torn. Say so.
                    raise IPCError(f"state block {self.name} stays mid-write: its broker died while writing")
                time.sleep(0.0001)

    def snapshot(self) -> Snapshot:
        """Record, broker liveness and cancel slot, for status displays."""
        rec = self.read_record()
        alive = not rec.closed and names.is_alive(rec.broker_pid, rec.broker_start)
        inc, turn = self.read_cancel()
        return Snapshot(record=rec, broker_alive=alive, cancel_incarnation=inc, cancel_turn=turn)

    # ---------------------------------------------------------------- cancel slot

    def write_cancel(self, incarnation: str, turn: int) -> None:
        """Client side: ask for the turn (incarnation, turn) to be cancelled."""
        seq: int = self._words[_CANCEL_SEQ] | 1
        self._words[_CANCEL_SEQ] = seq
        _CANCEL_BODY.pack_into(self._mm, OFF_CANCEL + 8, incarnation.encode()[:16], turn, time.time_ns())
        self._words[_CANCEL_SEQ] = seq + 1

    def read_cancel(self) -> tuple[str, int]:
        """(incarnation, turn) in the cancel slot; ("", 0) when clear."""
        for _ in range(1000):
            seq: int = self._words[_CANCEL_SEQ]
            if not seq & 1:
                inc, turn, _t = _CANCEL_BODY.unpack_from(self._mm, OFF_CANCEL + 8)
                if self._words[_CANCEL_SEQ] == seq:
                    return inc.rstrip(b"\0").decode(errors="replace"), turn
        return "", 0

    def clear_cancel(self) -> None:
        """Broker side: empty the slot (on start, and once a cancel is handled)."""
        seq: int = self._words[_CANCEL_SEQ] | 1
        self._words[_CANCEL_SEQ] = seq
        _CANCEL_BODY.pack_into(self._mm, OFF_CANCEL + 8, b"", 0, 0)
        self._words[_CANCEL_SEQ] = seq + 1

    def close(self) -> None:
        """Unmap."""
        self._words.release()
        self._mm.close()


def unlink(session: str) -> bool:
    """Remove a session's state block by name."""
    return shm.unlink(names.state_block(session))


def exists(session: str) -> bool:
    """True while the session's state block name exists."""
    return os.path.exists(os.path.join("/dev/shm", names.state_block(session).lstrip("/")))
