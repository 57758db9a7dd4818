"""Shared-memory segments created exclusively with mode 0600 and checked on open.

A segment another process can ``ftruncate`` is hostile memory: touching a page
of a mapping that lies past the file's end raises SIGBUS, which kills the
process, and no size check closes that race (the file can shrink between the
check and the access). So a process that must survive such a segment keeps a
:class:`Handle`: a descriptor and no mapping, read and written with
``pread``/``pwrite``, which return short counts or grow the file instead of
faulting. :class:`Segment` adds a mapping, for the side that may only hurt
itself.

A ``pwrite`` is a kernel copy (``rep movsb`` here), not one store: an 8-byte
word written that way may reach a reader that loads it through a mapping in
pieces. Two things make words written through a descriptor safe to read
anyway, both resting on stores of separate system calls reaching memory in
order (a write to a tmpfs page ends with locked instructions after the copy,
the page's unlock and release: a full barrier on Intel and AMD alike). A word whose new value differs from the old
in one byte cannot be seen torn: :func:`seq_code` numbers a sequence so that
each step changes one byte (a base-256 reflected Gray code). And a value that
changes arbitrarily is published in the slot a sequence word does not name,
then the sequence word is stepped to name it (see ``ipc/mailbox.py``), or it
sits between an odd and an even step of one (the seqlock in ``ipc/state.py``).
"""

from __future__ import annotations

import mmap
import os

import posix_ipc

from ipc import names
from ipc.errors import IPCError, NameSquatted


def _create_fd(name: str, size: int) -> int:
    """Create ``name`` (O_EXCL, 0600) of ``size`` bytes; returns a checked descriptor."""
    try:
        seg = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    except posix_ipc.ExistentialError as exc:
        raise FileExistsError(name) from exc
    except (posix_ipc.PermissionsError, OSError, ValueError) as exc:
        raise IPCError(f"cannot create shared memory {name}: {exc}", name=name) from exc
    try:
        names.check_owner(seg.fd, name)
    except BaseException:
        seg.close_fd()
        raise
    return int(seg.fd)


def _open_fd(name: str, *, writable: bool, min_size: int) -> tuple[int, int]:
    """Open an existing segment after checking it is ours and 0600: (descriptor, size)."""
    try:
        seg = posix_ipc.SharedMemory(name, 0, read_only=not writable)
    except posix_ipc.ExistentialError as exc:
        raise FileNotFoundError(name) from exc
    except posix_ipc.PermissionsError as exc:
        raise NameSquatted(f"{name} exists but we may not open it: another user owns it", name=name) from exc
    try:
        names.check_owner(seg.fd, name)
        size = os.fstat(seg.fd).st_size
        if size < max(min_size, 1):
            raise IPCError(f"shared memory {name} is {size} bytes, expected at least {min_size}", name=name)
    except BaseException:
        seg.close_fd()
        raise
    return int(seg.fd), size


def _map(fd: int, size: int, writable: bool) -> mmap.mmap:
    return mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))


def create(name: str, size: int) -> mmap.mmap:
    """Create ``name`` (O_EXCL, 0600) of ``size`` bytes and map it. EEXIST raises FileExistsError."""
    fd = _create_fd(name, size)
    try:
        return _map(fd, size, True)
    finally:
        os.close(fd)


def open_existing(name: str, *, writable: bool = True, min_size: int = 0) -> mmap.mmap:
    """Map an existing segment after checking it is ours and 0600."""
    fd, size = _open_fd(name, writable=writable, min_size=min_size)
    try:
        return _map(fd, size, writable)
    finally:
        os.close(fd)


#: The lowest bit of every byte of a 64-bit word.
_BYTE_LOW_BITS = 0x0101010101010101
_WORD = 1 << 64


def seq_code(n: int) -> int:
    """The word that stands for step ``n`` of a sequence: steps n and n+1 differ in exactly one byte.

    Base-256 reflected Gray code: byte j is the byte j of ``n``, inverted when
    byte j+1 of ``n`` is odd. Each step changes one byte by one up or down, so
    the sum of the bytes changes parity at every step: :func:`seq_odd` reads
    the step's parity off the word.
    """
    n %= _WORD
    return n ^ (((n >> 8) & _BYTE_LOW_BITS) * 0xFF)


def seq_step(code: int) -> int:
    """The step ``n`` whose :func:`seq_code` is ``code`` (every 64-bit word is one)."""
    n = 0
    odd = 0  # whether the byte above the current one (in n) is odd
    for j in range(7, -1, -1):
        byte = (code >> (8 * j)) & 0xFF
        d = byte ^ (0xFF if odd else 0)
        n |= d << (8 * j)
        odd = d & 1
    return n


def seq_odd(code: int) -> bool:
    """True when ``code`` stands for an odd step (a seqlock's "write in progress")."""
    return bool((code & _BYTE_LOW_BITS).bit_count() & 1)


class Handle:
    """A segment's descriptor, kept open, and no mapping: every access is a system call that cannot fault.

    ``size`` is the size the holder expects; :meth:`intact` compares it with
    the file's size now.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    @classmethod
    def create(cls, name: str, size: int) -> Handle:
        """Create ``name`` exclusively (0600) and keep its descriptor."""
        return Handle(_create_fd(name, size), size)

    @classmethod
    def open(cls, name: str, *, min_size: int) -> Handle:
        """Open an existing segment of ours (0600, at least ``min_size`` bytes) read-write."""
        return Handle(*_open_fd(name, writable=True, min_size=min_size))

    def current_size(self) -> int:
        """The file's size now (another process may have truncated or grown it)."""
        # lseek to the end is fstat's st_size without building a stat result; the
        # descriptor's offset is unused (every access is pread/pwrite).
        return os.lseek(self.fd, 0, os.SEEK_END)

    def intact(self) -> bool:
        """True while the file still has the size the holder expects."""
        return self.current_size() == self.size

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset``: short (never a fault) past the file's end."""
        return os.pread(self.fd, n, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset`` through the descriptor (a shrunk file grows back; no fault).

        ``OSError`` when it cannot (a full ``/dev/shm``).
        """
        n = os.pwrite(self.fd, data, offset)
        if n < len(data):  # rare (a signal, a full tmpfs): finish the rest
            view = memoryview(data)[n:]
            offset += n
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n

    def read_word(self, offset: int) -> int | None:
        """The 64-bit word at ``offset`` (little-endian), or None past the file's end."""
        raw = os.pread(self.fd, 8, offset)
        return int.from_bytes(raw, "little") if len(raw) == 8 else None

    def write_word(self, offset: int, value: int) -> None:
        """Write one 64-bit word (a copy, not one store: see the module docstring)."""
        self.pwrite(value.to_bytes(8, "little"), offset)

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)


class Segment(Handle):
    """A :class:`Handle` plus a mapping of the segment's first ``mapped`` bytes.

    The mapping is only safe to touch while the file still covers it, which the
    holder checks just before (see :meth:`intact`), and even then a truncation
    in between faults: only for a side that hurts nobody else if it dies.
    """

    def __init__(self, fd: int, size: int, mapped: int, writable: bool) -> None:
        super().__init__(fd, size)
        try:
            self.mm = _map(fd, mapped, writable)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create_mapped(cls, name: str, size: int) -> Segment:
        """Create ``name`` exclusively (0600), keep its descriptor and map all of it."""
        return cls(_create_fd(name, size), size, size, True)

    @classmethod
    def open_mapped(cls, name: str, *, min_size: int, writable: bool = True) -> Segment:
        """Open an existing segment of ours (0600, at least ``min_size`` bytes) and map all of it."""
        fd, size = _open_fd(name, writable=writable, min_size=min_size)
        return cls(fd, size, size, writable)

    def close(self) -> None:
        """Unmap and close the descriptor."""
        self.mm.close()
        super().close()


def read_head(name: str, n: int) -> bytes:
    """The first ``n`` bytes of a segment of ours, read without mapping it (short if it is smaller)."""
    fd, _size = _open_fd(name, writable=False, min_size=0)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def mapped_by(name: str, pid: int) -> bool:
    """True when process ``pid`` has segment ``name`` mapped now (read from ``/proc/<pid>/maps``).

    A process of another user (pid 1, say) keeps its maps from us: that reads
    as False, which is the answer that matters, since such a process cannot
    hold a 0600 segment of ours without being root.
    """
    try:
        st = os.stat(_path(name))
    except OSError:
        return False
    # By device and inode, not by path: /dev/shm may be reached through a symlink.
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and _dev_ino(fields[3], fields[4]) == want:
                    return True
    except OSError:
        return False
    return False


def _dev_ino(dev: bytes, ino: bytes) -> tuple[int, int, int] | None:
    """(major, minor, inode) of a maps line's "major:minor" (hex) and inode fields."""
    try:
        major, minor = dev.split(b":")
        return int(major, 16), int(minor, 16), int(ino)
    except ValueError:
        return None


def _path(name: str) -> str:
    """Where the segment ``name`` lives in the file system."""
    return "/dev/shm/" + name.lstrip("/")


def unlink(name: str) -> bool:
    """Remove a segment's name; True if it was there."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
