"""System limits on POSIX queues, read so that errors can say what to raise."""

from __future__ import annotations

import resource
from dataclasses import dataclass

from ipc.errors import LimitError


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class MqLimits:
    """The limits in force for this process."""

    msg_max: int | None
    msgsize_max: int | None
    queues_max: int | None
    rlimit_msgqueue: int

    def describe(self) -> str:
        """One line naming every limit and how to raise it."""
        return (
            f"RLIMIT_MSGQUEUE={self.rlimit_msgqueue} bytes per user (raise with `ulimit -q` or "
            f"LimitMSGQUEUE= in a systemd unit); /proc/sys/fs/mqueue/queues_max={self.queues_max}, "
            f"msg_max={self.msg_max}, msgsize_max={self.msgsize_max} (raise with sysctl fs.mqueue.*)"
        )


def mq_limits() -> MqLimits:
    """Read the current queue limits."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    return MqLimits(
        msg_max=_read_int("/proc/sys/fs/mqueue/msg_max"),
        msgsize_max=_read_int("/proc/sys/fs/mqueue/msgsize_max"),
        queues_max=_read_int("/proc/sys/fs/mqueue/queues_max"),
        rlimit_msgqueue=soft,
    )


def limit_error(what: str, exc: BaseException) -> LimitError:
    """A LimitError for a failed queue creation, naming the limits to raise."""
    limits = mq_limits()
    return LimitError(
        f"cannot create {what}: {exc}. A POSIX queue limit was hit: {limits.describe()}",
        limits=limits.__dict__.copy(),
    )
