"""Shared-memory segments created exclusively with mode 0600 and checked on open.

A segment another process can ``ftruncate`` is hostile memory: touching a page
of a mapping that lies past the file's end raises SIGBUS, which kills the
process. :class:`Segment` keeps the descriptor a mapping was made from, so its
holder can check the size (``fstat``) before it touches the mapping, and can
read and write the bytes with ``pread``/``pwrite``, which return short counts
or grow the file instead of faulting.
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


class Segment:
    """A segment's descriptor, kept open, and a mapping of its first ``mapped`` bytes.

    ``size`` is the size the holder expects; :meth:`intact` compares it with the
    file's size now. The mapping is only safe to touch while the file still
    covers it, which the holder checks just before (see :meth:`intact`).
    """

    def __init__(self, fd: int, size: int, mapped: int, writable: bool) -> None:
        self.fd = fd
        self.size = size
        try:
            self.mm = _map(fd, mapped, writable)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, name: str, size: int, *, mapped: int | None = None) -> Segment:
        """Create ``name`` exclusively (0600) and keep its descriptor."""
        return cls(_create_fd(name, size), size, size if mapped is None else mapped, True)

    @classmethod
    def open(cls, name: str, *, min_size: int, mapped: int | None = None, writable: bool = True) -> Segment:
        """Open an existing segment of ours (0600, at least ``min_size`` bytes) and keep its descriptor."""
        fd, size = _open_fd(name, writable=writable, min_size=min_size)
        return cls(fd, size, size if mapped is None else min(mapped, size), writable)

    def current_size(self) -> int:
        """The file's size now (another process may have truncated or grown it)."""
        # lseek to the end is fstat's st_size without building a stat result; the
        # descriptor's offset is unused (every access is pread/pwrite or the mapping).
        return os.lseek(self.fd, 0, os.SEEK_END)

    def intact(self) -> bool:
        """True while the file still has the size the holder expects."""
        return self.current_size() == self.size

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset``: short (never a fault) past the file's end."""
        return os.pread(self.fd, n, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset`` through the descriptor (a shrunk file grows back; no fault)."""
        n = os.pwrite(self.fd, data, offset)
        if n < len(data):  # rare (a signal, a full tmpfs): finish the rest
            view = memoryview(data)[n:]
            offset += n
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n

    def close(self) -> None:
        """Unmap and close the descriptor."""
        self.mm.close()
        os.close(self.fd)


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
