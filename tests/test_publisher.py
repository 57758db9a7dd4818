"""The publisher's unit rules (pure: a stand-in block, no shared memory)."""

from __future__ import annotations

import errno
from types import SimpleNamespace
from typing import Any, cast

from broker.publisher import Publisher
from broker.scheduler import Scheduler
from broker.session_store import SessionStore


class _FullShm:
    """A state block whose every write fails as one over a full /dev/shm does."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _fail(self, what: str) -> None:
        self.calls.append(what)
        raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, rec: Any) -> list[str]:
        self._fail("write")
        return []

    def read_cancel(self) -> tuple[str, int] | None:
        self._fail("read_cancel")
        return None

    def clear_cancel(self) -> None:
        self._fail("clear_cancel")


class _Log:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, event: str, **_kw: Any) -> None:
        self.errors.append(event)


def test_a_block_that_cannot_be_written_is_logged_and_tried_again_not_raised() -> None:
    """A truncated block over a full /dev/shm fails its writes with ENOSPC: the broker logs it and goes on."""
    log = _Log()
    store = cast(SessionStore, SimpleNamespace(session_id=None))
    pub = Publisher("s", log, "inc", Scheduler(), store, agent_pid=lambda: 0, client_count=lambda: 0)
    block = _FullShm()
    pub.block = cast(Any, block)
    pub.publish()
    assert pub.read_cancel() is None
    pub.clear_cancel()
    pub.publish()  # the next publish tries again
    assert block.calls == ["write", "read_cancel", "clear_cancel", "write"]
    assert log.errors == ["state.write_failed"] * 4
