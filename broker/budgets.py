"""The broker's memory bounds: bytes of prompts it holds, and giving freed memory back.

A prompt body stays in the broker from its arrival until its request ends
(queued, running, requeued after a preemption), so the bytes of prompts held
are bounded per client and in total; a prompt over either budget is refused
with ``queue_full`` naming the budget and the ``turnstile serve`` flag that
raises it. (Replies buffered for slow readers are bounded in
:mod:`broker.registry`.)

glibc keeps freed heap memory mapped: after clients that sent or were sent
megabytes leave, the broker's RSS would stay high. :class:`Trimmer` hands it
back with ``malloc_trim`` once enough was freed, at most once per tick.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from ipc.errors import QueueFull

#: Free this much since the last trim before trimming again (a trim walks the heap).
TRIM_AFTER_BYTES = 4 * 1024 * 1024


class QueuedBytes:
    """Bytes of prompt frames the broker holds, per (client, request) and in total."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.held = 0
        self._by_request: dict[tuple[str, str], int] = {}
        self._by_client: dict[str, int] = {}

    def admit(self, client: str, req: str, size: int) -> None:
        """Count a prompt of ``size`` bytes in, or raise :class:`QueueFull` naming the budget it would break.

        A request already held (a resubmission the scheduler answers without
        running it again) is not counted twice.
        """
        key = (client, req)
        if key in self._by_request:
            return
        mine = self._by_client.get(client, 0)
        if mine + size > self.per_client:
            raise QueueFull(
                f"prompt of {size} bytes refused: this client already has {mine} bytes of prompts queued or "
                f"running (budget --max-queued-bytes-per-client={self.per_client}; raise it with "
                f"`turnstile serve --max-queued-bytes-per-client=N`, or wait for results)",
                budget="max_queued_bytes_per_client", size=size, held=mine, limit=self.per_client,
            )
        if self.held + size > self.total:
            raise QueueFull(
                f"prompt of {size} bytes refused: the broker holds {self.held} bytes of prompts queued or running "
                f"for all clients (budget --max-queued-bytes={self.total}; raise it with "
                f"`turnstile serve --max-queued-bytes=N`, or wait for results)",
                budget="max_queued_bytes", size=size, held=self.held, limit=self.total,
            )
        self._by_request[key] = size
        self._by_client[client] = mine + size
        self.held += size

    def release(self, client: str, req: str) -> int:
        """The request ended: its bytes no longer count. Returns them (0 if it was not held)."""
        size = self._by_request.pop((client, req), 0)
        if size:
            left = self._by_client[client] - size
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]
            self.held -= size
        return size

    def drop_client(self, client: str) -> int:
        """The client is gone with everything it had queued. Returns the bytes freed."""
        freed = self._by_client.pop(client, 0)
        if freed:
            for key in [k for k in self._by_request if k[0] == client]:
                del self._by_request[key]
            self.held -= freed
        return freed


class Trimmer:
    """Gives freed heap memory back to the system (glibc ``malloc_trim``) once enough was freed."""

    def __init__(self, log: Any, after_bytes: int = TRIM_AFTER_BYTES) -> None:
        self.log = log
        self.after_bytes = after_bytes
        self.freed = 0
        self._trim = _malloc_trim()

    def note_freed(self, n: int) -> None:
        """``n`` bytes of large buffers were just dropped."""
        self.freed += n

    def tick(self) -> None:
        """Trim if enough was freed since the last trim (called once per tick, off the hot path)."""
        if self.freed < self.after_bytes or self._trim is None:
            return
        freed, self.freed = self.freed, 0
        released = self._trim(0)
        self.log.debug("broker.malloc_trim", freed_bytes=freed, released=bool(released))


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None on a C library without it (musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn
