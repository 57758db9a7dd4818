"""The session's shared-memory state block: the record, publishing it, keeping its name alive.

The broker is the block's only writer (except the cancel slot, which a client
writes and the broker reads and clears). Publishing is coalesced: a change
marks the record dirty and one write follows after the hot path, so an
interrupt or a prompt reaches the agent before the record is rewritten. The
tick republishes anyway, as the heartbeat ``turnstile status`` reads.

Names can vanish under a running broker (systemd's ``RemoveIPC=yes`` removes a
user's POSIX objects at logout): :meth:`Publisher.check_names` recreates the
state block and has ingress recreate the request queue.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from broker.scheduler import Scheduler
from broker.session_store import SessionStore
from ipc import histogram, names, rqueue, state

if TYPE_CHECKING:
    from broker.ingress import Ingress

T = TypeVar("T")


class Publisher:
    """Builds the state record from the broker's parts and writes it to the block."""

    def __init__(
        self,
        session: str,
        log: Any,
        incarnation: str,
        sched: Scheduler,
        store: SessionStore,
        *,
        agent_pid: Callable[[], int],
        client_count: Callable[[], int],
        client_label: Callable[[str], str] = lambda _client: "",
    ) -> None:
        self.session = session
        self.log = log
        self.incarnation = incarnation
        self.sched = sched
        self.store = store
        self.agent_pid = agent_pid
        self.client_count = client_count
        self.client_label = client_label
        self.block: state.StateBlock | None = None
        #: Broker-side counters, added to the scheduler's when published.
        self.counters: dict[str, int] = dict.fromkeys(state.COUNTERS, 0)
        self.latencies: dict[str, int] = dict.fromkeys(state.LATENCIES, 0)
        #: Cumulative bucket counts since this broker started (``turnstile metrics`` exports them).
        self.histograms = histogram.empty()
        self.started_unix_ns = time.time_ns()
        self._broker_start = names.self_identity()[1]  # constant: not re-read from /proc at every publish
        self._dirty = False

    def create(self) -> None:
        """Create the block (exclusively; a squatted name is refused) and publish the first record."""
        self.block = state.StateBlock.create(self.session)
        self.publish()

    def observe(self, name: str, value: float) -> None:
        """Count one value into histogram ``name`` (unit as its name says); published with the record."""
        self.histograms[name].observe(value)

    def count(self, counter: str, n: int = 1) -> None:
        """Add to a broker-side counter."""
        self.counters[counter] += n

    def record(self) -> state.StateRecord:
        """The record as of now."""
        s = self.sched
        holder = s.holder()
        counters = dict(self.counters)
        for k, v in s.counters.values.items():
            if k in counters:
                counters[k] += v
        agent_pid = self.agent_pid()
        return state.StateRecord(
            broker_pid=os.getpid(),
            broker_start=self._broker_start,
            incarnation=self.incarnation,
            started_unix_ns=self.started_unix_ns,
            heartbeat_unix_ns=time.time_ns(),
            agent_pid=agent_pid,
            agent_state=s.agent_state() if agent_pid or not s.agent_up else "down",
            session_id=self.store.session_id,
            model=s.model or "",
            turn=s.turn.id if s.turn else 0,
            turn_state=s.turn.phase if s.turn else "idle",
            holder_client=holder[0] if holder else "",
            holder_kind=holder[1] if holder else "",
            holder_req=holder[2] if holder else "",
            holder_label=self.client_label(holder[0]) if holder else "",
            lease_client=s.lease.client if s.lease else "",
            webhooks_queued=len(s.webhooks),
            workers_queued=len(s.workers),
            clients=self.client_count(),
            counters=counters,
            latencies=dict(self.latencies),
            histograms=self.histograms,
        )

    def publish(self) -> None:
        """Write the record now."""
        if self.block is not None:
            no_problems: list[str] = []
            problems = self._on_block(lambda b: b.write(self.record()), no_problems)
            if problems:
                # The broker owns the block: whoever damaged it, this write just repaired it.
                self.log.error("state.repaired", problems=problems)
            self._dirty = False

    def mark_dirty(self) -> None:
        """Publish soon, once: after the hot path (the interrupt or prompt is written first)."""
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self.publish)

    def read_cancel(self) -> tuple[str, int] | None:
        """The (incarnation, turn) a client wrote into the cancel slot, if there is a block."""
        return self._on_block(lambda b: b.read_cancel(), None)

    def clear_cancel(self) -> None:
        """Empty the cancel slot (it was acted on, or it is stale)."""
        self._on_block(lambda b: b.clear_cancel(), None)

    def _on_block(self, op: Callable[[state.StateBlock], T], failed: T) -> T:
        """``op(block)``, or ``failed`` when there is no block or writing it failed.

        The block is written through our descriptor, so a truncated block whose pages
        cannot come back (a full /dev/shm) is an OSError here, not a SIGBUS: it is logged,
        and the next publish (the tick's heartbeat at the latest) tries again.
        """
        if self.block is None:
            return failed
        try:
            return op(self.block)
        except OSError as exc:
            self.log.error("state.write_failed", error=str(exc))
            return failed

    def check_names(self, ingress: Ingress) -> None:
        """Recreate the queue or state block if something removed their names (systemd RemoveIPC=yes)."""
        if ingress.rq is not None and not rqueue.exists(self.session):
            ingress.recreate_queue()
            self.log.error("ipc.recreated", object=ingress.queue_name, why="its name vanished (RemoveIPC?)")
        if self.block is not None and not state.exists(self.session):
            self.block.close()
            self.block = state.StateBlock.create(self.session)
            self.log.error("ipc.recreated", object=self.block.name, why="its name vanished (RemoveIPC?)")

    def tick(self, ingress: Ingress) -> None:
        """Periodic work: keep the names alive, then publish (the heartbeat readers see)."""
        self.check_names(ingress)
        self.publish()

    def publish_closed(self) -> None:
        """Publish a last record marked closed (a clean stop: readers know no broker serves)."""
        if self.block is not None:
            rec = self.record()
            rec.closed = True
            self.block.write(rec)

    def close(self) -> None:
        """Remove the block's name and unmap it."""
        if self.block is not None:
            state.unlink(self.session)
            self.block.close()
            self.block = None
