"""Client mailboxes: a shared-memory byte ring plus a one-slot doorbell queue.

One mailbox per client; the broker is its only writer and the client its only
reader. It costs ~100 bytes of the per-user POSIX queue budget (the doorbell:
one message of one byte), so 200 clients fit on default limits where 200
full-size queues would not.

Ring protocol (single producer, single consumer). The header holds two
monotonically increasing 64-bit counters, each written by one side only:
``written`` (broker) and ``read`` (client), on their own cache lines. The
broker copies length-prefixed frames into ``data[written % capacity ...]``,
then publishes ``written``, then rings the doorbell. The client reads up to
``written``, then publishes ``read``. The doorbell's system call is the memory
barrier. A frame larger than the free space is streamed through in pieces as
the client frees room; the reader reassembles it from the byte stream.

The broker never maps the ring (a client can truncate it: a mapped access
would be SIGBUS); it writes through its descriptor, where an 8-byte ``pwrite``
is a copy a reader may see in pieces. So what it publishes (``written``, the
flags, where its stream starts, its generation) sits in two slots: it fills the
slot the sequence word does not name, then steps the sequence word to name it.
Consecutive sequence words differ in one byte (``shm.seq_code``), so that step
is seen whole; the client copies the named slot and keeps it if the sequence
word did not move meanwhile (the slot it copied is rewritten only after the
word moved on). The client's ``read`` is one aligned store of its own, which
the broker loads twice through its descriptor and takes only when both loads
agree and it lies between what the client had read and what was written.

The doorbell holds at most one message, so ringing a rung bell is a no-op:
no lost wake-up is possible because the reader always reads the ring *after*
taking the doorbell message.
"""

from __future__ import annotations

import collections
import mmap
import struct
from typing import Final

import posix_ipc

from ipc import frames, names, shm
from ipc.errors import ClientTooSlow, IPCError, ProtocolError
from ipc.limits import limit_error

MAGIC: Final = 0x54534D42  # "TSMB"
LAYOUT: Final = 2
DATA_OFFSET: Final = 4096
OFF_SEQ: Final = 64  # the broker's sequence word: step n names slot n % 2
OFF_READ: Final = 128  # the client's read counter
OFF_SLOTS: Final = 192  # slot k at OFF_SLOTS + 64 * k, each on its own cache line
#: A slot: written, flags, where the current writer's stream starts, and its
#: generation (bumped by every new writer: a broker restart).
_SLOT = struct.Struct("<QQQQ")
FLAG_FAILED: Final = 1  # the broker gave up on this client (client_too_slow)
FLAG_CLOSED: Final = 2  # the broker will write no more
FLAG_DAMAGED: Final = 4  # the broker found the ring damaged (resized, counters out of range)
#: Counters past this are damage, not traffic (2**62 bytes would take decades to stream).
_COUNTER_LIMIT: Final = 1 << 62
#: Attempts at two agreeing loads of the client's read counter before taking no progress for now.
_READ_TRIES: Final = 3
#: Loads of the published slot before a reader gives up on a sequence word that never holds still.
_SLOT_TRIES: Final = 100_000

DEFAULT_CAPACITY: Final = 1 << 20
#: How many bytes the broker holds for a client whose ring is full before failing it.
DEFAULT_MAX_PENDING: Final = frames.MAX_FRAME_BYTES + (1 << 20)

_HEADER = struct.Struct("<IIQQQ")  # magic, layout, capacity, owner pid, owner start time
_LEN = struct.Struct("<I")


def _words(mm: mmap.mmap) -> memoryview:
    """The header as aligned native 64-bit words: each load or store is one machine access.

    The client's read counter is read by the broker while it changes, so it
    must never be written with ``struct.pack_into``: it zero-fills its target
    and then writes byte by byte, and the broker could see 0 or a mix of old and
    new bytes (a torn counter that looks like progress).
    """
    return memoryview(mm)[:DATA_OFFSET].cast("Q")


def _slot_offset(seq_word: int) -> int:
    """Where the slot that ``seq_word`` names starts."""
    return OFF_SLOTS + 64 * shm.seq_odd(seq_word)


class MailboxReader:
    """Client side: creates the mailbox, waits on the doorbell, reads frames."""

    def __init__(self, session: str, client: str, *, capacity: int = DEFAULT_CAPACITY) -> None:
        self.session = session
        self.client = client
        self.ring_name = names.mailbox(session, client)
        self.bell_name = names.doorbell(session, client)
        self.capacity = capacity
        pid, start = names.self_identity()
        self._mm = shm.create(self.ring_name, DATA_OFFSET + capacity)
        _HEADER.pack_into(self._mm, 0, MAGIC, LAYOUT, capacity, pid, start)
        self._words = _words(self._mm)
        try:
            self._bell = posix_ipc.MessageQueue(
                self.bell_name, posix_ipc.O_CREX, mode=0o600, max_messages=1, max_message_size=1
            )
        except posix_ipc.ExistentialError as exc:
            self._drop_ring()
            raise IPCError(f"doorbell {self.bell_name} already exists", name=self.bell_name) from exc
        except (OSError, ValueError) as exc:
            self._drop_ring()
            raise limit_error(f"mailbox doorbell {self.bell_name}", exc) from exc
        self._read = 0
        self._gen = 0
        self._buf = bytearray()
        self.closed = False

    def _drop_ring(self) -> None:
        self._words.release()
        self._mm.close()
        shm.unlink(self.ring_name)

    def fileno(self) -> int:
        """The doorbell descriptor: readable when the broker has rung."""
        return int(self._bell.mqd)

    def wait(self, timeout_s: float | None) -> bool:
        """Block until the doorbell rings or ``timeout_s`` passes; True if it rang."""
        try:
            self._bell.receive(timeout=timeout_s)
        except posix_ipc.BusyError:
            return False
        return True

    def clear_bell(self) -> None:
        """Take a pending doorbell message without waiting (before reading the ring)."""
        try:
            self._bell.receive(timeout=0)
        except posix_ipc.BusyError:
            pass

    def published(self) -> tuple[int, int, int, int]:
        """What the broker published last, as one consistent set: (written, flags, start, gen)."""
        words = self._words
        for _ in range(_SLOT_TRIES):
            seq: int = words[OFF_SEQ // 8]
            i = _slot_offset(seq) // 8
            got = (int(words[i]), int(words[i + 1]), int(words[i + 2]), int(words[i + 3]))
            # The slot we copied is rewritten only after the sequence word moved on.
            if words[OFF_SEQ // 8] == seq:
                return got
        raise ProtocolError("ring", "the mailbox's sequence word never held still")

    @property
    def failed(self) -> bool:
        """True once the broker has given up on this client."""
        return bool(self.published()[1] & FLAG_FAILED)

    def read_frames(self) -> list[bytes]:
        """Every complete frame the ring holds now (possibly none). Never blocks."""
        # One consistent set: a failed flag comes with the final counter, and a
        # counter that includes new-stream bytes with the new generation and start.
        written, flags, start, gen = self.published()
        failed = bool(flags & FLAG_FAILED)
        out: list[bytes] = []
        if gen != self._gen:
            if self._gen and self._read <= start <= written:
                # A new writer (a restarted broker) began at ``start``. Whole frames
                # the old one finished are still delivered; the head of a frame it
                # died streaming can never complete, so it is dropped.
                self._pull(start)
                out += self._parse()
                self._buf.clear()
            self._gen = gen
        self._pull(written)
        out += self._parse()
        if failed:
            if not out and flags & FLAG_DAMAGED:
                raise ProtocolError("ring", "the broker found this mailbox damaged and dropped this client")
            if not out:
                # Nothing more will come; what is left in buf is the head of a
                # frame the broker dropped, which can never complete.
                raise ClientTooSlow("the broker failed this client: it read its mailbox too slowly")
            # The broker's last ring may already be consumed: ring again so the
            # caller comes back and learns of the failure instead of waiting forever.
            self._ring_self()
        return out

    def _pull(self, upto: int) -> None:
        """Copy ring bytes [read, upto) into the buffer and publish the read counter."""
        r = self._read
        if upto == r:
            return
        if upto - r > self.capacity or upto < r:
            raise ProtocolError("ring", f"ring counters inconsistent: written={upto} read={r}")
        pos = r % self.capacity
        n = upto - r
        first = min(n, self.capacity - pos)
        base = DATA_OFFSET
        self._buf += self._mm[base + pos : base + pos + first]
        if n > first:
            self._buf += self._mm[base : base + n - first]
        self._read = upto
        self._words[OFF_READ // 8] = upto

    def _parse(self) -> list[bytes]:
        """Complete length-prefixed frames from the buffer."""
        out = []
        buf = self._buf
        off = 0
        while len(buf) - off >= 4:
            (size,) = _LEN.unpack_from(buf, off)
            if size > frames.MAX_FRAME_BYTES:
                raise ProtocolError("oversize", f"mailbox frame of {size} bytes")
            if len(buf) - off - 4 < size:
                break
            out.append(bytes(buf[off + 4 : off + 4 + size]))
            off += 4 + size
        if off:
            del buf[:off]
        return out

    def discard_partial(self) -> int:
        """Drop the head of a frame that can never complete; returns the bytes dropped.

        For when the writer died: it may have published only the first part
        of a frame it was streaming in, and the next writer starts a fresh
        frame right after those bytes. Call it after the last
        :meth:`read_frames` of the dead writer's bytes.
        """
        n = len(self._buf)
        self._buf.clear()
        return n

    def _ring_self(self) -> None:
        try:
            self._bell.send(b"\x01", timeout=0)
        except posix_ipc.BusyError:
            pass

    def close(self) -> None:
        """Remove the mailbox (ring and doorbell)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._bell.close()
        finally:
            try:
                posix_ipc.unlink_message_queue(self.bell_name)
            except posix_ipc.ExistentialError:
                pass
            self._words.release()
            self._mm.close()
            shm.unlink(self.ring_name)


class MailboxWriter:
    """Broker side: streams length-prefixed frames into a client's ring.

    Never blocks: what does not fit waits in a bounded per-client buffer that
    :meth:`pump` moves into the ring as the client frees room. Overflowing the
    bound raises :class:`ClientTooSlow` and marks the ring failed.

    The ring is the client's memory, so nothing read from it is trusted and
    nothing in it may crash the broker. A client can write any counter, or
    ``ftruncate`` the segment under us at any moment (touching a mapped page
    past the file's end is SIGBUS, and no size check closes that race). So the
    ring is never mapped here: every access is ``pread``/``pwrite`` on our own
    descriptor (a shrunk file reads short or grows back; nothing faults), and
    what we publish goes through the sequence word and its two slots (module
    docstring). A ring whose size changed, whose counters are out of range, or
    that reads short is damaged: :class:`IPCError` with ``reason="ring_damaged"``,
    and the caller drops that client.
    """

    def __init__(self, session: str, client: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.ring_name = names.mailbox(session, client)
        self.bell_name = names.doorbell(session, client)
        self._seg = shm.Handle.open(self.ring_name, min_size=DATA_OFFSET + 1)
        try:
            head = self._seg.pread(_HEADER.size, 0).ljust(_HEADER.size, b"\0")  # short if truncated meanwhile
            magic, layout, capacity, pid, start = _HEADER.unpack(head)
            if magic != MAGIC or layout != LAYOUT or capacity <= 0 or DATA_OFFSET + capacity != self._seg.size:
                raise IPCError(f"{self.ring_name} is not a turnstile mailbox", name=self.ring_name)
            self.capacity: int = capacity
            self.owner_pid: int = pid
            self.owner_start: int = start
            try:
                self._bell = posix_ipc.MessageQueue(self.bell_name)
            except posix_ipc.ExistentialError as exc:
                raise IPCError(f"no doorbell {self.bell_name}", name=self.bell_name) from exc
            try:
                names.check_owner(self._bell.mqd, self.bell_name)
            except BaseException:
                self._bell.close()
                raise
        except BaseException:
            self._seg.close()
            raise
        self.failed = False
        try:
            self._check()
            self._step, (self._written, self._flags, _start, gen) = self._load_published()
            self._read = self._load_read(0)
            if not 0 <= self._written - self._read <= capacity or self._written >= _COUNTER_LIMIT:
                raise self._damaged(f"counters written={self._written} read={self._read}")
            # A new stream generation, starting where the last writer stopped.
            self._start = self._written
            self._gen = (gen + 1) % _COUNTER_LIMIT
            self._publish()
        except OSError as exc:  # a full /dev/shm refusing our write: that ring is unusable
            self.close()
            raise self._damaged(f"cannot write its header: {exc}") from exc
        except BaseException:
            self.close()
            raise
        self._pending: collections.deque[memoryview] = collections.deque()
        self.pending_bytes = 0
        self.max_pending = max_pending

    @property
    def written(self) -> int:
        """Bytes published into the ring so far (our own count, not read back from the ring)."""
        return self._written

    def _damaged(self, what: str) -> IPCError:
        return IPCError(f"client mailbox {self.ring_name} is damaged: {what}", name=self.ring_name,
                        reason="ring_damaged")

    def _check(self) -> None:
        """Raise unless the segment still has its size (a resized ring is damage, whoever did it)."""
        size = self._seg.current_size()
        if size != self._seg.size:
            raise self._damaged(f"resized to {size} bytes (was {self._seg.size})")

    def _load_published(self) -> tuple[int, tuple[int, int, int, int]]:
        """The last writer's sequence step and the slot it names (nobody else writes them)."""
        seq = self._seg.read_word(OFF_SEQ)
        raw = self._seg.pread(_SLOT.size, _slot_offset(seq or 0))
        if seq is None or len(raw) < _SLOT.size:
            raise self._damaged("its header reads short (truncated)")
        return shm.seq_step(seq), _SLOT.unpack(raw)

    def _load_read(self, fallback: int) -> int:
        """The client's read counter: two loads through our descriptor that agree, else ``fallback``.

        A load through ``pread`` is a copy that may take the word in pieces while
        the client stores it; two agreeing loads are taken as its value. When the
        client keeps moving it, ``fallback`` (what it had read before, so less
        room than there is, never more) serves until the next pump.
        """
        for _ in range(_READ_TRIES):
            first = self._seg.read_word(OFF_READ)
            second = self._seg.read_word(OFF_READ)
            if first is None or second is None:
                raise self._damaged("its header reads short (truncated)")
            if first == second:
                return first
        return fallback

    def _publish(self) -> None:
        """Fill the slot the sequence word does not name, then step the word to name it."""
        step = self._step + 1
        code = shm.seq_code(step)
        self._seg.pwrite(_SLOT.pack(self._written, self._flags, self._start, self._gen), _slot_offset(code))
        # Separate system calls: the slot's bytes reach memory before the step,
        # which changes one byte of the word and so is seen whole.
        self._seg.write_word(OFF_SEQ, code)
        self._step = step

    def send(self, frame: bytes) -> None:
        """Queue one frame for the client and move what fits into the ring now.

        Raises :class:`ClientTooSlow` when the bounded buffer overflows and
        :class:`IPCError` (``reason="ring_damaged"``) when the ring is damaged;
        either way the writer is failed and later sends do nothing.
        """
        if self.failed:
            return
        self._pending.append(memoryview(_LEN.pack(len(frame)) + frame))
        self.pending_bytes += 4 + len(frame)
        self.pump()
        if self.pending_bytes > self.max_pending:
            pending = self.pending_bytes  # fail() zeroes it
            self.fail()
            raise ClientTooSlow(
                f"client mailbox {self.ring_name} full and {pending} bytes buffered "
                f"(bound {self.max_pending})",
                pending_bytes=pending,
            )

    def pump(self) -> int:
        """Copy buffered bytes into free ring space, publish, ring. Returns bytes still buffered.

        A damaged ring fails the writer and raises :class:`IPCError` (``reason="ring_damaged"``).
        """
        if not self._pending or self.failed:
            return 0
        try:
            return self._pump()
        except OSError as exc:  # a full /dev/shm refusing a write that would regrow a truncated ring
            self.fail(FLAG_FAILED | FLAG_DAMAGED)
            raise self._damaged(f"cannot write: {exc}") from exc
        except IPCError:
            self.fail(FLAG_FAILED | FLAG_DAMAGED)
            raise

    def _pump(self) -> int:
        self._check()
        free = self.capacity - (self._written - self._read)
        if free < self.pending_bytes:
            # The client's counter only grows, so the room we last saw is there still;
            # load it (two system calls) only when that is not enough.
            read = self._load_read(self._read)
            # The client only ever moves its counter forward, and never past what we published.
            if not self._read <= read <= self._written:
                raise self._damaged(f"read counter {read} outside [{self._read}, {self._written}]")
            self._read = read
            free = self.capacity - (self._written - read)
        if free <= 0:
            return self.pending_bytes
        w = self._written
        cap = self.capacity
        seg = self._seg
        while self._pending and free > 0:
            chunk = self._pending[0]
            n = min(len(chunk), free)
            pos = w % cap
            first = min(n, cap - pos)
            seg.pwrite(chunk[:first], DATA_OFFSET + pos)
            if n > first:
                seg.pwrite(chunk[first:n], DATA_OFFSET)
            w += n
            free -= n
            self.pending_bytes -= n
            if n == len(chunk):
                self._pending.popleft()
            else:
                self._pending[0] = chunk[n:]
        self._written = w
        self._publish()
        self.ring()
        return self.pending_bytes

    def ring(self) -> None:
        """Wake the client (a no-op if the bell is already rung)."""
        try:
            # A rung bell has not been taken yet, and the client reads the ring only
            # after taking it, so it will see what we published: skip the send, which
            # on a full queue costs tens of microseconds (timeout=0 still arms a timer).
            if self._bell.current_messages:
                return
            self._bell.send(b"\x01", timeout=0)
        except posix_ipc.BusyError:
            pass
        except posix_ipc.ExistentialError:
            pass

    def fail(self, flags: int = FLAG_FAILED) -> None:
        """Give up on this client: drop what is buffered and tell it so through the flags."""
        self.failed = True
        self._pending.clear()
        self.pending_bytes = 0
        self._flags |= flags
        try:
            self._publish()
        except OSError:
            return  # a full /dev/shm: the client learns it is dropped some other way
        self.ring()

    def close(self) -> None:
        """Close this side's handles (the client owns the names)."""
        try:
            self._bell.close()
        except posix_ipc.ExistentialError:
            pass
        self._seg.close()


def unlink(session: str, client: str) -> bool:
    """Remove a client's mailbox by name (the broker does this for a dead client).

    The doorbell goes first: whoever sees the ring gone may take the ring's
    absence to mean the whole mailbox is gone and create one of the same name.
    """
    removed = False
    try:
        posix_ipc.unlink_message_queue(names.doorbell(session, client))
        removed = True
    except posix_ipc.ExistentialError:
        pass
    return shm.unlink(names.mailbox(session, client)) or removed


def read_owner(session: str, client: str) -> tuple[int, int] | None:
    """(pid, start time) recorded in a mailbox header, or None if unreadable."""
    # Read through the descriptor, never a mapping: the client may truncate it under us.
    try:
        head = shm.read_head(names.mailbox(session, client), _HEADER.size)
    except (OSError, IPCError):
        return None
    if len(head) < _HEADER.size:
        return None
    magic, _layout, _cap, pid, start = _HEADER.unpack(head)
    return (pid, start) if magic == MAGIC else None


def held_by(session: str, client: str, pid: int) -> bool:
    """True when process ``pid`` has the mailbox ring of ``client`` mapped (it is its reader)."""
    return shm.mapped_by(names.mailbox(session, client), pid)


__all__ = ["DEFAULT_CAPACITY", "MailboxReader", "MailboxWriter", "held_by", "read_owner", "unlink"]
