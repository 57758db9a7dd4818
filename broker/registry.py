"""Connected clients: adoption, death watch, their mailboxes, and the pump for slow readers.

A client is adopted from its hello, or from its mailbox header when a dead
broker left its frames unread. Either way the claimed (pid, start time) is
checked after a pidfd pins the process, so a pid reused by a later process is
never taken for the client; the pidfd then tells the loop when the client
dies. Replies go through :meth:`Registry.send`, which never blocks: what does
not fit a full ring waits in the writer's bounded buffer, and the pump moves it
in as the client frees room.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.budgets import Trimmer
from broker.config import BrokerConfig
from broker.publisher import Publisher
from broker.scheduler import ClientGone, Connected, SchedEvent
from ipc import frames, mailbox, names, sweep
from ipc.errors import ClientTooSlow, IPCError, LimitError, TooManyConnections

#: While a client's mailbox is full, how often the broker moves its buffered frames in as it frees room.
PUMP_S = 0.001
#: Every this many ticks, remove the mailboxes of clients that died unwatched.
SWEEP_EVERY = 10
#: What a connected client costs the broker in open descriptors: its pidfd, its ring's
#: mapping (mmap keeps a duplicate of the segment's descriptor) and its doorbell queue.
FDS_PER_CLIENT = 3
#: Descriptors held back so that a client refused for want of descriptors can still be
#: told: opening its mailbox needs two at once for the ring, one for the doorbell, and
#: one to read /proc for its owner's identity.
RESERVE_FDS = 4


#: Descriptors adopting a client needs at its peak (see :meth:`Registry.adopt`).
ADOPT_FDS = FDS_PER_CLIENT + 2


def _out_of_descriptors(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) is EMFILE/ENFILE: no descriptor could be had."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and (
            seen.errno in (errno.EMFILE, errno.ENFILE)
            # posix_ipc raises EMFILE/ENFILE as an OSError without errno, by message only.
            or (seen.errno is None and "maximum number of files" in str(seen))
        ):
            return True
        seen = seen.__cause__
    return False


def _hold_descriptors(n: int) -> list[int]:
    """Open up to ``n`` descriptors on /dev/null (as many as can be had now)."""
    held = []
    for _ in range(n):
        try:
            held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            break
    return held


@dataclass
class ClientConn:
    """What the broker knows of one connected client."""

    id: str
    kind: frames.Kind
    pid: int
    start_time: int
    writer: mailbox.MailboxWriter
    pidfd: int
    handles: list[str] = field(default_factory=list)
    label: str = ""  # the client's human name from its hello, shown by `turnstile status`


class Registry:
    """The session's connected clients, keyed by client id."""

    def __init__(
        self, cfg: BrokerConfig, log: Any, publisher: Publisher, feed: Callable[[SchedEvent], None], trimmer: Trimmer
    ) -> None:
        self.session = cfg.session
        self.max_pending = cfg.client_buffer_bytes
        self.max_per_process = cfg.max_clients_per_process
        self.max_buffered = cfg.max_buffered_bytes
        self.trimmer = trimmer
        self.log = log
        self.publisher = publisher
        self.feed = feed
        #: Called with a client's id when it goes, before the scheduler hears of it
        #: (the agent link answers its relays, ingress drops its chunk sets).
        self.gone_hooks: list[Callable[[str], None]] = []
        self._clients: dict[str, ClientConn] = {}
        self._slow: set[str] = set()
        self._pump_handle: asyncio.TimerHandle | None = None
        self._ticks = 0
        self._reserve = _hold_descriptors(RESERVE_FDS)

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, client: str) -> ClientConn | None:
        """The connected client ``client``, or None."""
        return self._clients.get(client)

    def label(self, client: str) -> str:
        """The label client ``client`` gave in its hello ("" when none, or when it is not connected)."""
        conn = self._clients.get(client)
        return conn.label if conn is not None else ""

    def adopt(
        self, client: str, kind: frames.Kind | None, hello: frames.Hello | None = None, *, req: str = ""
    ) -> ClientConn | None:
        """Register a client from its hello, or from its mailbox header (frames a dead broker never read).

        A client the broker has no descriptors for is told so at once (a
        ``limit`` error naming the open-file limit, for ``req``: "" for a
        hello, which the client takes as the refusal of its connection).
        """
        if hello is not None:
            pid, start = hello.pid, hello.start_time
        else:
            try:
                owner = mailbox.read_owner(self.session, client)
            except OSError as exc:
                if _out_of_descriptors(exc):
                    self._refuse(client, req, exc)
                return None
            if owner is None:
                return None
            pid, start = owner
        if kind is None:
            return None
        held = sum(1 for c in self._clients.values() if c.pid == pid)
        if held >= self.max_per_process:
            self.log.warning("client.too_many_connections", client=client, pid=pid, limit=self.max_per_process)
            raise TooManyConnections(
                f"process {pid} already holds {held} connections to session {self.session!r}, the most one "
                f"process may (turnstile serve --max-clients-per-process)",
                pid=pid, limit=self.max_per_process,
            )
        # Make sure of the descriptors adopting takes before taking any: what the client
        # keeps, one more while its ring is mapped, and one for each /proc read (a check
        # that cannot open its file must not read as a forged claim). One stays held
        # for reading /proc/<pid>/maps below.
        spare = _hold_descriptors(ADOPT_FDS)
        if len(spare) < ADOPT_FDS:
            for fd in spare:
                os.close(fd)
            self._refuse(client, req, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
            return None
        for fd in spare[1:]:
            os.close(fd)
        try:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                if _out_of_descriptors(exc):
                    self._refuse(client, req, exc)
                return None
            try:
                # The pidfd now pins the process; checking the start time after opening it
                # makes sure it is the client, not a later process that reused the pid.
                same = names.proc_start_time(pid) == start
                writer = mailbox.MailboxWriter(self.session, client, max_pending=self.max_pending) if same else None
            except (OSError, IPCError) as exc:
                os.close(pidfd)
                if _out_of_descriptors(exc):
                    self._refuse(client, req, exc)
                else:
                    self.log.warning("client.mailbox_refused", client=client, error=str(exc))
                return None
        finally:
            os.close(spare[0])
        if writer is None:
            os.close(pidfd)
            return None
        if (writer.owner_pid, writer.owner_start) != (pid, start):
            writer.close()
            os.close(pidfd)
            self.log.warning("client.mailbox_owner_mismatch", client=client)
            return None
        if not mailbox.held_by(self.session, client, pid):
            # Anyone can write any pid into a hello and a header; only the real reader
            # has the ring mapped. A claim we cannot check this way is refused.
            writer.close()
            os.close(pidfd)
            self.log.warning("client.mailbox_not_held", client=client, pid=pid)
            return None
        conn = ClientConn(client, kind, pid, start, writer, pidfd, list(hello.handles) if hello else [],
                          (hello.label or "") if hello else "")
        self._clients[client] = conn
        asyncio.get_running_loop().add_reader(pidfd, self.gone, client, "died")
        self.feed(Connected(time.monotonic(), client, kind))
        self.publisher.mark_dirty()
        self.log.info("client.connected", client=client, kind=kind, pid=pid, via="hello" if hello else "mailbox")
        return conn

    def _refuse(self, client: str, req: str, exc: BaseException) -> None:
        """Tell a client we have no descriptors for that it is refused, with descriptors held in reserve."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.publisher.count("rejected_frames")
        self.log.error("client.refused_no_descriptors", client=client, req=req, error=str(exc), nofile=soft)
        message = (
            f"the broker cannot open this client's mailbox: it is at its open-file limit (RLIMIT_NOFILE {soft}, "
            f"hard {hard}; each client costs it {FDS_PER_CLIENT} descriptors, and `turnstile serve` already raised "
            "its soft limit to the hard one). Raise the hard limit for the broker (`ulimit -n N` before "
            "`turnstile serve`, LimitNOFILE= in a systemd unit) or connect fewer clients."
        )
        for fd in self._reserve:
            os.close(fd)
        self._reserve = []
        try:
            self.send_to_mailbox(client, frames.Error(client=client, req=req, code=LimitError.code, message=message))
        except (OSError, IPCError) as err:
            self.log.error("client.refusal_unsent", client=client, error=str(err))
        finally:
            self._reserve = _hold_descriptors(RESERVE_FDS)

    def gone(self, client: str, why: str) -> None:
        """The client died, said bye or was failed: tell the hooks, then the scheduler."""
        conn = self._clients.get(client)
        if conn is None:
            return
        self.log.info("client.gone", client=client, kind=conn.kind, why=why)
        for hook in self.gone_hooks:
            hook(client)
        self.feed(ClientGone(time.monotonic(), client, reason=why))

    def drop(self, client: str) -> None:
        """Forget the client and remove its mailbox (the scheduler is done with it)."""
        conn = self._clients.get(client)
        if conn is not None:
            self._close(conn)
            mailbox.unlink(self.session, client)

    def close_all(self) -> None:
        """Close every client's handles (the broker stops; clients own their names)."""
        for conn in list(self._clients.values()):
            self._close(conn)
        for fd in self._reserve:
            os.close(fd)
        self._reserve = []

    def _close(self, conn: ClientConn) -> None:
        self.trimmer.note_freed(conn.writer.pending_bytes)
        self._clients.pop(conn.id, None)
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(conn.pidfd)
        with contextlib.suppress(OSError):
            os.close(conn.pidfd)
        conn.writer.close()
        self._slow.discard(conn.id)

    def send(self, client: str, frame: frames.ReplyFrame) -> None:
        """Queue ``frame`` to a connected client; a client over its buffer bound is failed."""
        conn = self._clients.get(client)
        if conn is None:
            return
        try:
            conn.writer.send(frames.encode(frame))
        except ClientTooSlow as exc:
            self._failed_slow(client, getattr(exc, "pending_bytes", 0),
                              f"{exc}: raise it with `turnstile serve --client-buffer-bytes=N`")
            return
        except IPCError as exc:
            self._damaged(client, exc)
            return
        except Exception as exc:
            self._failed_send(conn, exc)
            return
        if conn.writer.pending_bytes:
            self._slow.add(client)
            self._arm_pump()
            self._check_buffered()

    def _check_buffered(self) -> None:
        """Keep the replies buffered for all slow readers within --max-buffered-bytes.

        Over it, the client holding most is failed (client_too_slow): it is the
        one not reading, and a small reply to a reading client never pays for it.
        """
        held = {c: conn.writer.pending_bytes for c in self._slow if (conn := self._clients.get(c)) is not None}
        total = sum(held.values())
        while total > self.max_buffered and held:
            victim = max(held, key=held.__getitem__)
            size = held.pop(victim)
            self._clients[victim].writer.fail()
            self._slow.discard(victim)
            self._failed_slow(victim, size, (
                f"replies buffered for clients that do not read reached {total} bytes (budget "
                f"--max-buffered-bytes={self.max_buffered}; raise it with `turnstile serve --max-buffered-bytes=N`): "
                f"this client held most, {size} bytes"
            ))
            total -= size

    def _failed_slow(self, client: str, freed: int, why: str) -> None:
        self.trimmer.note_freed(freed)
        self.publisher.count("clients_failed_slow")
        self.log.error("client.too_slow", client=client, error=why)
        self.gone(client, "client_too_slow")

    def send_to_mailbox(self, client: str, frame: frames.ReplyFrame) -> None:
        """Send to ``client`` whether or not it is connected (yet), if a live owner holds its mailbox."""
        if client in self._clients:
            self.send(client, frame)
            return
        owner = mailbox.read_owner(self.session, client)
        if owner is None or not names.is_alive(*owner):
            return
        try:
            writer = mailbox.MailboxWriter(self.session, client)
        except (OSError, IPCError):
            return
        with contextlib.suppress(ClientTooSlow, IPCError):
            writer.send(frames.encode(frame))
        writer.close()

    def _damaged(self, client: str, exc: IPCError) -> None:
        # The ring is the client's own memory: damage there ends that client only.
        self.log.error("client.mailbox_damaged", client=client, error=str(exc))
        self.gone(client, "mailbox_damaged")

    def _arm_pump(self) -> None:
        # The client frees ring room without telling us: poll while it lags, rather
        # than leave its frames buffered until the next tick.
        if self._pump_handle is None:
            self._pump_handle = asyncio.get_running_loop().call_later(PUMP_S, self._on_pump_timer)

    def _on_pump_timer(self) -> None:
        self._pump_handle = None
        if self._pump():
            self._arm_pump()

    def _pump(self) -> bool:
        """Move buffered frames of slow clients into their rings; True while some still lag."""
        for client in list(self._slow):
            conn = self._clients.get(client)
            try:
                lagging = conn is not None and conn.writer.pump() > 0
            except IPCError as exc:
                self._damaged(client, exc)
                lagging = False
            except Exception as exc:
                assert conn is not None
                self._failed_send(conn, exc)
                lagging = False
            if not lagging:
                self._slow.discard(client)
        return bool(self._slow)

    def _failed_send(self, conn: ClientConn, exc: Exception) -> None:
        # Writing to this client's mailbox failed in a way no bound explains (a ring its
        # owner damaged, say): that client is dropped, and whatever the broker was doing
        # (delivering a turn's result line, pumping others) goes on for everyone else.
        self.log.error("client.send_failed", client=conn.id, error=repr(exc), exc_info=exc)
        self._slow.discard(conn.id)
        self.trimmer.note_freed(conn.writer.pending_bytes)
        with contextlib.suppress(Exception):
            conn.writer.fail()
        self.gone(conn.id, "send_failed")

    def sweep(self) -> None:
        """Remove mailboxes of clients that died unwatched (while no broker ran, or before their hello)."""
        for r in sweep.sweep_dead_clients(self.session):
            if r.kind == "mailbox":
                self.log.info("client.mailbox_swept", name=r.name, why=r.reason)

    def tick(self) -> None:
        """Periodic work: pump slow readers, and now and then sweep dead clients' mailboxes."""
        self._pump()
        self._ticks += 1
        if self._ticks % SWEEP_EVERY == 0:
            self.sweep()
