"""Client mailboxes: a shared-memory byte ring plus a one-slot doorbell queue.

One mailbox per client; the broker is its only writer and the client its only
reader. It costs ~100 bytes of the per-user POSIX queue budget (the doorbell:
one message of one byte), so 200 clients fit on default limits where 200
full-size queues would not.

Ring protocol (single producer, single consumer). The header holds two
monotonically increasing 64-bit counters, each written by one side only:
``written`` (broker) and ``read`` (client), each on its own cache line. The
broker copies length-prefixed frames into ``data[written % capacity ...]``,
then publishes ``written``, then rings the doorbell. The client reads up to
``written``, then publishes ``read``. The doorbell's system call is the memory
barrier. A frame larger than the free space is streamed through in pieces as
the client frees room; the reader reassembles it from the byte stream.

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
LAYOUT: Final = 1
DATA_OFFSET: Final = 4096
OFF_WRITTEN: Final = 64
OFF_READ: Final = 128
OFF_FLAGS: Final = 192
OFF_START: Final = 256  # where the current writer's stream begins (set before OFF_GEN)
OFF_GEN: Final = 320  # bumped by every new writer (a broker restart)
FLAG_FAILED: Final = 1  # the broker gave up on this client (client_too_slow)
FLAG_CLOSED: Final = 2  # the broker will write no more
FLAG_DAMAGED: Final = 4  # the broker found the ring damaged (resized, counters out of range)
#: Counters past this are damage, not traffic (2**62 bytes would take decades to stream).
_COUNTER_LIMIT: Final = 1 << 62
#: After copying more than this, the size is checked again before the counter store.
_RECHECK_AFTER_BYTES: Final = 64 * 1024

DEFAULT_CAPACITY: Final = 1 << 20
#: How many bytes the broker holds for a client whose ring is full before failing it.
DEFAULT_MAX_PENDING: Final = frames.MAX_FRAME_BYTES + (1 << 20)

_HEADER = struct.Struct("<IIQQQ")  # magic, layout, capacity, owner pid, owner start time
_LEN = struct.Struct("<I")


def _words(mm: mmap.mmap) -> memoryview:
    """The header as aligned native 64-bit words: each load or store is one machine access.

    The counters and flags are read by the other process while they change, so
    they must never be written with ``struct.pack_into``: it zero-fills its
    target and then writes byte by byte, and a concurrent reader could see 0 or
    a mix of old and new bytes (a torn ``written`` reads as less than ``read``).
    """
    return memoryview(mm)[:DATA_OFFSET].cast("Q")


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

    @property
    def failed(self) -> bool:
        """True once the broker has given up on this client."""
        flags: int = self._words[OFF_FLAGS // 8]
        return bool(flags & FLAG_FAILED)

    def read_frames(self) -> list[bytes]:
        """Every complete frame the ring holds now (possibly none). Never blocks."""
        # Flags before the counter: the broker sets FLAG_FAILED after its last
        # publish, so a counter read after seeing the flag is final.
        failed = self.failed
        words = self._words
        # The counter before the generation: a writer publishes its generation
        # before any byte of its stream, so a counter that includes new-stream
        # bytes is always seen together with the new generation.
        written: int = words[OFF_WRITTEN // 8]
        gen: int = words[OFF_GEN // 8]
        out: list[bytes] = []
        if gen != self._gen:
            start: int = words[OFF_START // 8]
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
            if not out and self._words[OFF_FLAGS // 8] & FLAG_DAMAGED:
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
    ``ftruncate`` the segment under us (touching a mapped page past the file's
    end is SIGBUS). So the frame bytes go in with ``pwrite`` on our own
    descriptor (a system call: a shrunk file grows back, nothing faults), and
    only the header page is mapped, for the counter words, which must be one
    aligned store the reader sees whole. That page is unmapped only when the
    file shrinks to 0 bytes, and the size is checked on our descriptor before
    each pump (and again after copying more than 64 KiB). The window left is a
    client truncating its ring to exactly 0 bytes between that check and the
    next counter access, microseconds: a same-user process racing us on
    purpose, which can as well ``kill`` us (``docs/guarantees.md``, the
    same-user trust limit). Every counter read is
    checked against what we wrote; any damage raises :class:`IPCError` with
    ``reason="ring_damaged"`` and the caller drops that client.
    """

    def __init__(self, session: str, client: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.ring_name = names.mailbox(session, client)
        self.bell_name = names.doorbell(session, client)
        self._seg = shm.Segment.open(self.ring_name, min_size=DATA_OFFSET + 1, mapped=DATA_OFFSET)
        try:
            magic, layout, capacity, pid, start = _HEADER.unpack(self._seg.pread(_HEADER.size, 0))
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
        self._words = _words(self._seg.mm)
        self.failed = False
        try:
            self._check()
            self._written: int = self._words[OFF_WRITTEN // 8]
            self._read: int = self._words[OFF_READ // 8]
            if not 0 <= self._written - self._read <= capacity or self._written >= _COUNTER_LIMIT:
                raise self._damaged(f"counters written={self._written} read={self._read}")
            # Start a new stream generation: the start first, then the generation, so a
            # reader that sees the new generation also sees where its stream begins.
            self._words[OFF_START // 8] = self._written
            self._check()
            self._words[OFF_GEN // 8] = (self._words[OFF_GEN // 8] + 1) % _COUNTER_LIMIT
        except BaseException:
            self.close()
            raise
        self._pending: collections.deque[memoryview] = collections.deque()
        self.pending_bytes = 0
        self.max_pending = max_pending

    def _damaged(self, what: str) -> IPCError:
        return IPCError(f"client mailbox {self.ring_name} is damaged: {what}", name=self.ring_name,
                        reason="ring_damaged")

    def _check(self) -> None:
        """Raise unless the segment still has its size: the header page is safe to touch right after."""
        size = self._seg.current_size()
        if size != self._seg.size:
            raise self._damaged(f"resized to {size} bytes (was {self._seg.size})")

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
        except IPCError:
            self.fail(FLAG_FAILED | FLAG_DAMAGED)
            raise

    def _pump(self) -> int:
        self._check()
        read: int = self._words[OFF_READ // 8]
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
        if w - self._written > _RECHECK_AFTER_BYTES:
            self._check()  # a long copy widens the window since the first check
        self._written = w
        self._words[OFF_WRITTEN // 8] = w
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
        if self._seg.current_size() < DATA_OFFSET:
            return  # the header page may be gone: the client learns it is dropped some other way
        old: int = self._words[OFF_FLAGS // 8]
        self._words[OFF_FLAGS // 8] = old | flags
        self.ring()

    def close(self) -> None:
        """Close this side's handles (the client owns the names)."""
        try:
            self._bell.close()
        except posix_ipc.ExistentialError:
            pass
        self._words.release()
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
