"""The session's request queue: one POSIX message queue, many writers, one reader.

Clients send msgpack frames with the mq priority of their class (control >
webhook > worker), so urgent frames are dequeued first even while the broker
is busy or restarting. The queue outlives a broker crash: frames sent while no
broker runs are served by the next one.
"""

from __future__ import annotations

import os
import time
from typing import Final

import posix_ipc

from ipc import chunks, frames, names
from ipc.errors import IPCError, LimitError, NameSquatted, QueueFull, QueueGone
from ipc.limits import limit_error, mq_limits

DEFAULT_MAX_MESSAGES: Final = 10
DEFAULT_MESSAGE_BYTES: Final = 8192


class RequestQueue:
    """A handle on one session's request queue."""

    def __init__(self, mq: posix_ipc.MessageQueue, name: str) -> None:
        self._mq = mq
        self.name = name
        self.max_message_bytes: int = mq.max_message_size
        self.max_messages: int = mq.max_messages

    # ---------------------------------------------------------------- open

    @classmethod
    def create(
        cls,
        session: str,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
    ) -> RequestQueue:
        """Broker side: create the queue exclusively (0600), or adopt one a dead broker left.

        Adopting keeps the frames clients sent while no broker ran. The adopted
        queue must be ours and 0600.
        """
        name = names.request_queue(session)
        limits = mq_limits()
        if limits.msg_max is not None:
            max_messages = min(max_messages, limits.msg_max)
        if limits.msgsize_max is not None:
            max_message_bytes = min(max_message_bytes, limits.msgsize_max)
        try:
            mq = posix_ipc.MessageQueue(
                name, posix_ipc.O_CREX, mode=0o600,
                max_messages=max_messages, max_message_size=max_message_bytes,
            )
        except posix_ipc.ExistentialError:
            return cls.open(session, _name=name)
        except posix_ipc.PermissionsError as exc:
            raise IPCError(f"cannot create {name}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise limit_error(f"request queue {name}", exc) from exc
        return cls._checked(mq, name)

    @classmethod
    def open(cls, session: str, *, _name: str | None = None) -> RequestQueue:
        """Client side: open an existing queue, refusing one not ours or not 0600."""
        name = _name or names.request_queue(session)
        try:
            mq = posix_ipc.MessageQueue(name)
        except posix_ipc.ExistentialError as exc:
            raise IPCError(f"no request queue {name}", name=name) from exc
        except posix_ipc.PermissionsError as exc:
            raise NameSquatted(
                f"{name} exists but we may not open it: another user owns it", name=name
            ) from exc
        except OSError as exc:
            raise limit_error(f"open {name}", exc) from exc
        return cls._checked(mq, name)

    @classmethod
    def _checked(cls, mq: posix_ipc.MessageQueue, name: str) -> RequestQueue:
        # Created or opened, the queue is used only if it is ours and 0600: a name another
        # user squatted (or a queue made open to others) is closed and refused.
        q = cls(mq, name)
        try:
            names.check_owner(mq.mqd, name)
        except BaseException:
            q.close()
            raise
        return q

    # ---------------------------------------------------------------- use

    def fileno(self) -> int:
        """The queue descriptor; pollable on Linux (readable when a message waits)."""
        return int(self._mq.mqd)

    def unlinked(self) -> bool:
        """True once this queue's name was removed (stopped broker, or RemoveIPC).

        Frames sent to an unlinked queue reach nobody once the broker that read
        it has moved to a new queue of the same name: a client that sees this
        reattaches. One fstat of our own descriptor, no name lookup.
        """
        try:
            return os.fstat(self.fileno()).st_nlink == 0
        except OSError:
            return True

    @property
    def current_messages(self) -> int:
        """Messages waiting now."""
        return int(self._mq.current_messages)

    def send_bytes(self, data: bytes, priority: int, *, timeout_s: float = 5.0) -> None:
        """Send one message, waiting at most ``timeout_s`` for room, else QueueFull."""
        try:
            self._mq.send(data, timeout=timeout_s, priority=priority)
        except posix_ipc.BusyError:
            raise QueueFull(
                f"request queue {self.name} stayed full for {timeout_s:g} s "
                f"({self.max_messages} messages): the broker is not keeping up or not running",
                name=self.name,
                timeout_s=timeout_s,
            ) from None
        except posix_ipc.ExistentialError as exc:
            raise QueueGone(f"request queue {self.name} vanished: {exc}", name=self.name) from exc

    def send_frame(self, frame: frames.RequestFrame, *, timeout_s: float = 5.0) -> None:
        """Encode and send a frame at its class's priority, chunked if it is large.

        ``timeout_s`` bounds the whole send (all chunks).
        """
        data = frames.encode(frame)
        priority = frames.priority_of(frame)
        parts = chunks.split(
            data, client=frame.client, req=frame.req, max_message_bytes=self.max_message_bytes
        )
        deadline = time.monotonic() + timeout_s
        for part in parts:
            self.send_bytes(part, priority, timeout_s=max(0.0, deadline - time.monotonic()))

    def receive_nowait(self) -> tuple[bytes, int] | None:
        """One message (bytes, priority) if one waits, else None. Never blocks."""
        try:
            data, priority = self._mq.receive(timeout=0)
        except posix_ipc.BusyError:
            return None
        return data, priority

    def receive(self, timeout_s: float | None) -> tuple[bytes, int] | None:
        """One message, waiting up to ``timeout_s`` (None: forever); None on timeout."""
        try:
            data, priority = self._mq.receive(timeout=timeout_s)
        except posix_ipc.BusyError:
            return None
        return data, priority

    def close(self) -> None:
        """Close this handle (the queue stays)."""
        try:
            self._mq.close()
        except posix_ipc.ExistentialError:
            pass

    def unlink(self) -> None:
        """Remove the queue's name."""
        try:
            self._mq.unlink()
        except posix_ipc.ExistentialError:
            pass


def exists(session: str) -> bool:
    """True while the session's request queue name exists."""
    try:
        posix_ipc.MessageQueue(names.request_queue(session)).close()
    except posix_ipc.ExistentialError:
        return False
    except (posix_ipc.PermissionsError, OSError):
        return True
    return True


def unlink(session: str) -> bool:
    """Remove a session's request queue by name; True if one was there."""
    try:
        posix_ipc.unlink_message_queue(names.request_queue(session))
    except posix_ipc.ExistentialError:
        return False
    return True


__all__ = ["DEFAULT_MAX_MESSAGES", "DEFAULT_MESSAGE_BYTES", "LimitError", "QueueFull", "RequestQueue", "unlink"]
