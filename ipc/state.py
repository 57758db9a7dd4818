"""The session's shared-memory state block.

Written only by the broker, read by anyone (``turnstile status`` reads it
without talking to the broker, so status works while the broker is stuck).
A seqlock keeps readers from seeing a torn record: the writer makes the
sequence odd, writes, makes it even; a reader retries until it saw the same
even sequence before and after copying. The record names the broker by pid
and start time, so a reader can tell a block left by a dead broker.

The cancel slot is the one part clients write: (incarnation, turn id) of the
turn they want cancelled. The broker clears it on start.

Any same-user process can scribble on the block or truncate it. The broker
owns it and repairs it: before every write it checks the size (``fstat``, and
``ftruncate`` back), the header, and the sequence word, which it keeps in its
own memory instead of trusting the shared one (so a sequence word left odd
cannot make the broker's writes look stable mid-write). Readers tell a
damaged block (:class:`StateDamaged`) from a missing one (``FileNotFoundError``).
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
from ipc.errors import IPCError, StateDamaged

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

    def __init__(self, seg: shm.Segment, name: str, writer: bool) -> None:
        self._seg = seg
        self._mm = seg.mm
        self._words = _words(seg.mm)
        self.name = name
        self.writer = writer
        seq: int = self._words[_SEQ]
        # The writer's own copy of the sequence word: what it writes next never
        # depends on what someone else left in the shared one.
        self._seq = seq + (seq & 1)

    @classmethod
    def create(cls, session: str) -> StateBlock:
        """Broker side: create the block (0600), or take over one a dead broker left."""
        name = names.state_block(session)
        try:
            seg = shm.Segment.create(name, SIZE)
        except FileExistsError:
            seg = shm.Segment.open(name, min_size=0)
            if seg.size != SIZE:
                seg.close()
                raise StateDamaged(f"{name} is not a turnstile state block ({seg.size} bytes)", name=name,
                                   broker_alive=False) from None
            magic, layout = _HEAD.unpack_from(seg.mm, 0)
            if magic not in (0, MAGIC) or layout not in (0, LAYOUT):
                seg.close()
                raise IPCError(f"{name} is not a turnstile state block (layout {layout})", name=name) from None
            rec = _unpack(_RECORD.unpack_from(seg.mm, OFF_RECORD))
            if not rec.closed and names.is_alive(rec.broker_pid, rec.broker_start) and rec.broker_pid != os.getpid():
                seg.close()
                raise IPCError(
                    f"session state {name} belongs to a live broker (pid {rec.broker_pid})",
                    name=name,
                    pid=rec.broker_pid,
                ) from None
        _HEAD.pack_into(seg.mm, 0, MAGIC, LAYOUT)
        block = cls(seg, name, writer=True)
        # A dead writer may have left the sequence odd: make it even again.
        block._words[_SEQ] = block._seq
        block.clear_cancel()
        return block

    @classmethod
    def open(cls, session: str) -> StateBlock:
        """Reader side: map the block read-write (clients write the cancel slot).

        ``FileNotFoundError`` when there is none; :class:`StateDamaged` when it
        is there but not a usable block (its broker, if alive, repairs it).
        """
        name = names.state_block(session)
        seg = shm.Segment.open(name, min_size=0)
        if seg.size != SIZE:
            seg.close()
            raise StateDamaged(f"state block {name} is damaged: {seg.size} bytes, not {SIZE}", name=name,
                               broker_alive=None)
        magic, layout = _HEAD.unpack_from(seg.mm, 0)
        if magic != MAGIC or layout != LAYOUT:
            seg.close()
            raise StateDamaged(f"{name} is not a turnstile state block (damaged header)", name=name,
                               broker_alive=None)
        return cls(seg, name, writer=False)

    def repair(self) -> list[str]:
        """Broker side: put the block back in shape if someone damaged it; what was wrong.

        Called before every write. The broker owns the block, so it restores the
        size, the header and its own sequence word; the record and cancel slot
        are rewritten by the next write and clear.
        """
        problems: list[str] = []
        size = self._seg.current_size()
        if size != SIZE:
            os.ftruncate(self._seg.fd, SIZE)  # the pages come back as zeros
            problems.append(f"resized to {size} bytes")
        magic, layout = _HEAD.unpack_from(self._mm, 0)
        if (magic, layout) != (MAGIC, LAYOUT):
            _HEAD.pack_into(self._mm, 0, MAGIC, LAYOUT)
            problems.append(f"header {magic:#x}/{layout}")
        seq: int = self._words[_SEQ]
        if seq != self._seq:
            problems.append(f"sequence word {seq} (expected {self._seq})")
        return problems

    def write(self, rec: StateRecord) -> list[str]:
        """Publish a record (broker only). Odd sequence while writing.

        Returns what :meth:`repair` found wrong (and fixed) first; usually nothing.
        """
        values = _pack(rec)  # outside the odd window, which readers spin on
        problems = self.repair()
        words = self._words
        seq = self._seq
        words[_SEQ] = seq + 1
        _RECORD.pack_into(self._mm, OFF_RECORD, *values)
        self._seq = seq + 2
        words[_SEQ] = seq + 2
        return problems

    def read_record(self, *, timeout_s: float = 1.0) -> StateRecord:
        """A consistent record; retries while a write is in progress."""
        mm = self._mm
        words = self._words
        deadline = time.monotonic() + timeout_s
        spins = 0
        size = self._seg.current_size()
        if size != SIZE:
            raise StateDamaged(f"state block {self.name} is damaged: {size} bytes, not {SIZE}", name=self.name,
                               broker_alive=None)
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
                    raise self._stuck()
                time.sleep(0.0001)

    def _stuck(self) -> StateDamaged:
        """The error for a sequence word that stayed odd: whose fault depends on whether the broker lives."""
        # The record may be torn; the broker's identity is all we take from it.
        rec = _unpack(_RECORD.unpack_from(self._mm, OFF_RECORD))
        if names.is_alive(rec.broker_pid, rec.broker_start):
            return StateDamaged(
                f"state block {self.name} is damaged (its sequence word stays odd) but its broker "
                f"(pid {rec.broker_pid}) is alive: it rewrites the block at its next publish",
                name=self.name, broker_alive=True, pid=rec.broker_pid,
            )
        return StateDamaged(f"state block {self.name} stays mid-write: its broker died while writing",
                            name=self.name, broker_alive=False, pid=rec.broker_pid)

    def snapshot(self) -> Snapshot:
        """Record, broker liveness and cancel slot, for status displays."""
        rec = self.read_record()
        alive = not rec.closed and names.is_alive(rec.broker_pid, rec.broker_start)
        inc, turn = self.read_cancel()
        return Snapshot(record=rec, broker_alive=alive, cancel_incarnation=inc, cancel_turn=turn)

    # ---------------------------------------------------------------- cancel slot

    def _guard(self) -> None:
        """Before touching the mapping: the writer repairs a resized block, a reader refuses it."""
        if self.writer:
            self.repair()
        elif (size := self._seg.current_size()) != SIZE:
            raise StateDamaged(f"state block {self.name} is damaged: {size} bytes, not {SIZE}", name=self.name,
                               broker_alive=None)

    def write_cancel(self, incarnation: str, turn: int) -> None:
        """Client side: ask for the turn (incarnation, turn) to be cancelled."""
        self._guard()
        seq: int = self._words[_CANCEL_SEQ] | 1
        self._words[_CANCEL_SEQ] = seq
        _CANCEL_BODY.pack_into(self._mm, OFF_CANCEL + 8, incarnation.encode()[:16], turn, time.time_ns())
        self._words[_CANCEL_SEQ] = seq + 1

    def read_cancel(self) -> tuple[str, int]:
        """(incarnation, turn) in the cancel slot; ("", 0) when clear."""
        self._guard()
        for _ in range(1000):
            seq: int = self._words[_CANCEL_SEQ]
            if not seq & 1:
                inc, turn, _t = _CANCEL_BODY.unpack_from(self._mm, OFF_CANCEL + 8)
                if self._words[_CANCEL_SEQ] == seq:
                    return inc.rstrip(b"\0").decode(errors="replace"), turn
        return "", 0

    def clear_cancel(self) -> None:
        """Broker side: empty the slot (on start, and once a cancel is handled)."""
        self._guard()
        seq: int = self._words[_CANCEL_SEQ] | 1
        self._words[_CANCEL_SEQ] = seq
        _CANCEL_BODY.pack_into(self._mm, OFF_CANCEL + 8, b"", 0, 0)
        self._words[_CANCEL_SEQ] = seq + 1

    def close(self) -> None:
        """Unmap."""
        self._words.release()
        self._seg.close()


def unlink(session: str) -> bool:
    """Remove a session's state block by name."""
    return shm.unlink(names.state_block(session))


def exists(session: str) -> bool:
    """True while the session's state block name exists."""
    return os.path.exists(os.path.join("/dev/shm", names.state_block(session).lstrip("/")))
