"""The session's shared-memory state block.

Written only by the broker, read by anyone (``turnstile status`` reads it
without talking to the broker, so status works while the broker is stuck).
A seqlock keeps readers from seeing a torn record: the writer makes the
sequence odd, writes, makes it even; a reader retries until it saw the same
even sequence before and after copying. The record names the broker by pid
and start time, so a reader can tell a block left by a dead broker.

The cancel slot is the one part clients write: (incarnation, turn id) of the
turn they want cancelled. The broker clears it on start.

Any same-user process can scribble on the block or truncate it, at any
moment. The broker never maps it (a truncation would make a mapped access
SIGBUS, whatever it checked just before): it reads and writes the block with
``pread``/``pwrite`` on its descriptor, which cannot fault. An 8-byte
``pwrite`` is a copy, not one store, so the sequence words count in
``shm.seq_code`` steps, each of which changes one byte of the word and so is
seen whole; a step's parity (``shm.seq_odd``) says "write in progress". The
broker owns the block and repairs it: before every write it checks the size
(and ``ftruncate``s it back), the header, and the sequence word, which it
keeps in its own memory instead of trusting the shared one (so a sequence word
left odd cannot make the broker's writes look stable mid-write). Readers, who
map the block (a reader that dies of someone's truncation hurts only itself),
tell a damaged block (:class:`StateDamaged`) from a missing one
(``FileNotFoundError``).
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
#: 2: the sequence words count in ``shm.seq_code`` steps. A layout-1 reader would take a
#: step's lowest bit for its parity and could show a torn record, so it must refuse the block.
LAYOUT: Final = 2
#: A block left by a broker of this layout is taken over (its record reads the same).
_OLD_LAYOUTS: Final = (0, 1)
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
    # older broker writes reads as empty histograms and no label (the layout did not change for it).
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
_CANCEL_SEQ: Final = OFF_CANCEL // 8


def _words(mm: mmap.mmap) -> memoryview:
    """The block as aligned native 64-bit words: each load or store is one machine access.

    The sequence words are read by other processes while they change, so a
    mapping's holder must never write them with ``struct.pack_into``: it
    zero-fills its target and then writes byte by byte, and a reader could see
    a mix of old and new bytes that reads as "stable" in the middle of a write.
    """
    return memoryview(mm)[:SIZE].cast("Q")


def _damaged_size(name: str, size: int) -> StateDamaged:
    return StateDamaged(f"state block {name} is damaged: {size} bytes, not {SIZE}", name=name, broker_alive=None)


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
    """The session's state block: the broker writes it through its descriptor, readers map it."""

    def __init__(self, handle: shm.Handle, name: str, writer: bool) -> None:
        self._h = handle
        # Readers load the sequence words through a mapping: one aligned load each.
        self._mm = handle.mm if isinstance(handle, shm.Segment) else None
        self._words = _words(self._mm) if self._mm is not None else None
        self.name = name
        self.writer = writer
        # The writer's own sequence step: what it writes next never depends on
        # what someone else left in the shared word (an odd step becomes the next even one).
        step = shm.seq_step(self._word(OFF_SEQ))
        self._step = step + (step & 1)

    @classmethod
    def create(cls, session: str) -> StateBlock:
        """Broker side: create the block (0600), or take over one a dead broker left."""
        name = names.state_block(session)
        try:
            h = shm.Handle.create(name, SIZE)
        except FileExistsError:
            h = shm.Handle.open(name, min_size=0)
            if h.size != SIZE:
                h.close()
                raise StateDamaged(f"{name} is not a turnstile state block ({h.size} bytes)", name=name,
                                   broker_alive=False) from None
            magic, layout = _HEAD.unpack(h.pread(_HEAD.size, 0).ljust(_HEAD.size, b"\0"))
            if magic not in (0, MAGIC) or layout not in (*_OLD_LAYOUTS, LAYOUT):
                h.close()
                raise IPCError(f"{name} is not a turnstile state block (layout {layout})", name=name) from None
            rec = _unpack(_RECORD.unpack(h.pread(_RECORD.size, OFF_RECORD).ljust(_RECORD.size, b"\0")))
            if not rec.closed and names.is_alive(rec.broker_pid, rec.broker_start) and rec.broker_pid != os.getpid():
                h.close()
                raise IPCError(
                    f"session state {name} belongs to a live broker (pid {rec.broker_pid})",
                    name=name,
                    pid=rec.broker_pid,
                ) from None
        h.pwrite(_HEAD.pack(MAGIC, LAYOUT), 0)
        block = cls(h, name, writer=True)
        # A dead writer may have left the sequence odd: make it even again.
        h.write_word(OFF_SEQ, shm.seq_code(block._step))
        block.clear_cancel()
        return block

    @classmethod
    def open(cls, session: str) -> StateBlock:
        """Reader side: map the block read-write (clients write the cancel slot).

        ``FileNotFoundError`` when there is none; :class:`StateDamaged` when it
        is there but not a usable block (its broker, if alive, repairs it).
        """
        name = names.state_block(session)
        seg = shm.Segment.open_mapped(name, min_size=0)
        if seg.size != SIZE:
            seg.close()
            raise _damaged_size(name, seg.size)
        magic, layout = _HEAD.unpack_from(seg.mm, 0)
        if magic != MAGIC or layout != LAYOUT:
            seg.close()
            raise StateDamaged(f"{name} is not a turnstile state block (damaged header)", name=name,
                               broker_alive=None)
        return cls(seg, name, writer=False)

    def _word(self, offset: int) -> int:
        """One 64-bit word: a single load from the mapping, or a ``pread`` without one."""
        if self._words is not None:
            return int(self._words[offset // 8])
        word = self._h.read_word(offset)
        if word is None:
            raise _damaged_size(self.name, self._h.current_size())
        return word

    def _bytes(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, from the mapping or through the descriptor."""
        if self._mm is not None:
            return self._mm[offset : offset + n]
        raw = self._h.pread(n, offset)
        if len(raw) < n:
            raise _damaged_size(self.name, self._h.current_size())
        return raw

    def repair(self) -> list[str]:
        """Broker side: put the block back in shape if someone damaged it; what was wrong.

        Called before every write. The broker owns the block, so it restores the
        size, the header and its own sequence word; the record and cancel slot
        are rewritten by the next write and clear. Everything here goes through
        the descriptor: a truncation at any moment makes a read short or a write
        grow the file, never a fault.
        """
        problems: list[str] = []
        h = self._h
        size = h.current_size()
        if size != SIZE:
            os.ftruncate(h.fd, SIZE)  # the pages come back as zeros
            problems.append(f"resized to {size} bytes")
        magic, layout = _HEAD.unpack(h.pread(_HEAD.size, 0).ljust(_HEAD.size, b"\0"))
        if (magic, layout) != (MAGIC, LAYOUT):
            h.pwrite(_HEAD.pack(MAGIC, LAYOUT), 0)
            problems.append(f"header {magic:#x}/{layout}")
        seq = h.read_word(OFF_SEQ)
        if seq != shm.seq_code(self._step):
            problems.append(f"sequence word {seq} (expected {shm.seq_code(self._step)})")
        return problems

    def write(self, rec: StateRecord) -> list[str]:
        """Publish a record (broker only): an odd sequence step while writing, the next even one after.

        Returns what :meth:`repair` found wrong (and fixed) first; usually nothing.
        """
        record = _RECORD.pack(*_pack(rec))  # outside the odd window, which readers spin on
        problems = self.repair()
        h = self._h
        step = self._step
        # Three system calls, so three string copies that reach memory in order;
        # each sequence step changes one byte of the word, so it is seen whole.
        h.write_word(OFF_SEQ, shm.seq_code(step + 1))
        h.pwrite(record, OFF_RECORD)
        self._step = step + 2
        h.write_word(OFF_SEQ, shm.seq_code(step + 2))
        return problems

    def read_record(self, *, timeout_s: float = 1.0) -> StateRecord:
        """A consistent record; retries while a write is in progress."""
        deadline = time.monotonic() + timeout_s
        spins = 0
        size = self._h.current_size()
        if size != SIZE:
            raise _damaged_size(self.name, size)
        while True:
            s1 = self._word(OFF_SEQ)
            if not shm.seq_odd(s1):
                raw = self._bytes(OFF_RECORD, _RECORD.size)
                if self._word(OFF_SEQ) == s1:
                    return _unpack(_RECORD.unpack(raw))
            spins += 1
            if spins > 1000:
                if time.monotonic() > deadline:
                    raise self._stuck()
                time.sleep(0.0001)

    def _stuck(self) -> StateDamaged:
        """The error for a sequence word that stayed odd: whose fault depends on whether the broker lives."""
        # The record may be torn; the broker's identity is all we take from it.
        rec = _unpack(_RECORD.unpack(self._bytes(OFF_RECORD, _RECORD.size)))
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
        """Before touching the block: the writer repairs a resized block, a reader refuses it."""
        if self.writer:
            self.repair()
        elif (size := self._h.current_size()) != SIZE:
            raise _damaged_size(self.name, size)

    def write_cancel(self, incarnation: str, turn: int) -> None:
        """Client side: ask for the turn (incarnation, turn) to be cancelled."""
        self._fill_cancel(_CANCEL_BODY.pack(incarnation.encode()[:16], turn, time.time_ns()))

    def read_cancel(self) -> tuple[str, int]:
        """(incarnation, turn) in the cancel slot; ("", 0) when clear."""
        self._guard()
        try:
            for _ in range(1000):
                seq = self._word(OFF_CANCEL)
                if not shm.seq_odd(seq):
                    inc, turn, _t = _CANCEL_BODY.unpack(self._bytes(OFF_CANCEL + 8, _CANCEL_BODY.size))
                    if self._word(OFF_CANCEL) == seq:
                        return inc.rstrip(b"\0").decode(errors="replace"), turn
        except StateDamaged:
            pass  # truncated under the broker's descriptor after its repair: no slot, so no cancel to read
        return "", 0

    def clear_cancel(self) -> None:
        """Broker side: empty the slot (on start, and once a cancel is handled)."""
        self._fill_cancel(_CANCEL_BODY.pack(b"", 0, 0))

    def _fill_cancel(self, body: bytes) -> None:
        """Write the cancel slot between an odd and the next even step of its sequence word.

        Through the mapping when there is one (a client), else through the
        descriptor (the broker, which maps nothing a client can truncate).
        """
        self._guard()
        words, mm, h = self._words, self._mm, self._h
        if words is not None and mm is not None:
            step = shm.seq_step(int(words[_CANCEL_SEQ])) | 1
            words[_CANCEL_SEQ] = shm.seq_code(step)
            mm[OFF_CANCEL + 8 : OFF_CANCEL + 8 + len(body)] = body
            words[_CANCEL_SEQ] = shm.seq_code(step + 1)
        else:
            step = shm.seq_step(h.read_word(OFF_CANCEL) or 0) | 1
            h.write_word(OFF_CANCEL, shm.seq_code(step))
            h.pwrite(body, OFF_CANCEL + 8)
            h.write_word(OFF_CANCEL, shm.seq_code(step + 1))

    def close(self) -> None:
        """Unmap (a reader) and close the descriptor."""
        if self._words is not None:
            self._words.release()
        self._h.close()


def unlink(session: str) -> bool:
    """Remove a session's state block by name."""
    return shm.unlink(names.state_block(session))


def exists(session: str) -> bool:
    """True while the session's state block name exists."""
    return os.path.exists(os.path.join("/dev/shm", names.state_block(session).lstrip("/")))
