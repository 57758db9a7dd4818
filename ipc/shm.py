"""Shared-memory segments created exclusively with mode 0600 and checked on open."""

from __future__ import annotations

import mmap
import os

import posix_ipc

from ipc import names
from ipc.errors import IPCError, NameSquatted


def create(name: str, size: int) -> mmap.mmap:
    """Create ``name`` (O_EXCL, 0600) of ``size`` bytes and map it. EEXIST raises FileExistsError."""
    try:
        seg = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    except posix_ipc.ExistentialError as exc:
        raise FileExistsError(name) from exc
    except (posix_ipc.PermissionsError, OSError, ValueError) as exc:
        raise IPCError(f"cannot create shared memory {name}: {exc}", name=name) from exc
    try:
        names.check_owner(seg.fd, name)
        return mmap.mmap(seg.fd, size)
    finally:
        seg.close_fd()


def open_existing(name: str, *, writable: bool = True, min_size: int = 0) -> mmap.mmap:
    """Map an existing segment after checking it is ours and 0600."""
    flags = 0
    try:
        seg = posix_ipc.SharedMemory(name, flags, read_only=not writable)
    except posix_ipc.ExistentialError as exc:
        raise FileNotFoundError(name) from exc
    except posix_ipc.PermissionsError as exc:
        raise NameSquatted(f"{name} exists but we may not open it: another user owns it", name=name) from exc
    try:
        names.check_owner(seg.fd, name)
        size = os.fstat(seg.fd).st_size
        if size < max(min_size, 1):
            raise IPCError(f"shared memory {name} is {size} bytes, expected at least {min_size}", name=name)
        return mmap.mmap(seg.fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        seg.close_fd()


def unlink(name: str) -> bool:
    """Remove a segment's name; True if it was there."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
