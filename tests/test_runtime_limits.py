"""Red-team findings on the broker's runtime, reproduced with real processes (issue 13, items 2, 4, 6, 8).

- A failure while handling one agent line costs that line only, never the
  line reader; a session.json save that fails (full disk) is logged and
  retried, and delivery goes on.
- The broker's memory is bounded: queued prompt bodies and buffered replies
  have byte budgets, per client and in total, refused with typed errors.
- A client whose request queue was recreated under it (RemoveIPC) notices
  and reattaches.
- A client the broker cannot open (out of descriptors) is refused at once.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import posix_ipc
import pytest

from broker.agentproc import LineSplitter
from broker.testing.launcher import BrokerProcess
from ipc import names
from tests.support import broker_log, rec, vm_rss_kib, wait_until

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------- item 2: the line reader


def test_a_failing_line_handler_costs_only_its_own_line():
    """The reader contract: a handler that raises on one line never glues that line to the next."""
    lines: list[bytes] = []
    failed: list[tuple[str, bytes]] = []

    def on_line(line: bytes) -> None:
        if line.startswith(b"boom"):
            raise OSError(errno.ENOSPC, "No space left on device")
        lines.append(line)

    sp = LineSplitter(on_line, lambda n: None, max_line_bytes=1024,
                      on_error=lambda exc, line: failed.append((type(exc).__name__, line)))
    sp.feed(b'{"a":1}\nboom-1\n{"b":2}\n{"c"')
    sp.feed(b":3}\nboom-2\n")
    sp.feed(b'{"d":4}\n')
    assert lines == [b'{"a":1}', b'{"b":2}', b'{"c":3}', b'{"d":4}']
    assert failed == [("OSError", b"boom-1"), ("OSError", b"boom-2")]


#: A client that damages its own mailbox ring (the read counter far past what was written), then asks
#: for a reply larger than the ring: writing it fails in the broker, inside the handling of an agent line.
RING_BREAKER = r"""
import json, sys
from clients.core import Connection
from ipc import mailbox

spec = json.loads(sys.argv[1])
conn = Connection(spec["session"], "webhook")
assert conn.try_attach()
# Be connected first (a small turn answered), so the damage is met while writing, not at the hello.
first = conn.submit(conn.prompt_frame("connect", model=None, on_preempt=None, resume_prompt=None, request_id=None))
while first.result is None:
    conn.mailbox.wait(0.25)
    conn.drain_mailbox()
conn.mailbox._words[mailbox.OFF_READ // 8] = 2**62
frame = conn.prompt_frame(spec["text"], model=None, on_preempt=None, resume_prompt=None, request_id=None)
conn.submit(frame)
print("submitted", flush=True)
sys.stdin.readline()
"""


def test_a_client_whose_mailbox_cannot_be_written_is_dropped_and_the_session_goes_on(
    broker_factory, spawn_client, session_name
):
    """A failure while delivering one agent line to its client drops that client only: its turn ends, the line
    reader and the other clients go on."""
    import json
    import subprocess

    from clients import Client

    b = broker_factory()
    spec = {"session": session_name, "text": "[sim:bytes=3000000] [sim:chunks=3] breaks-its-ring"}
    p = spawn_client(RING_BREAKER, json.dumps(spec), stdin=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "submitted"
        with Client(session_name, "webhook") as c:
            res = c.prompt("after-the-breaker").result(timeout_s=15)
            assert res.ok and res.text == "sim: after-the-breaker"
            assert c.prompt("and-again").result(timeout_s=15).ok
        assert b.proc is not None and b.proc.poll() is None
        wait_until(lambda: rec(b).clients == 0, timeout_s=10, what="the breaker dropped (and the other gone)")
        # Either the ring's counters are found bad before writing (client.mailbox_damaged), or the write
        # fails (client.send_failed): both drop that client only.
        assert any(e.get("event") in ("client.mailbox_damaged", "client.send_failed") for e in broker_log(b))
    finally:
        assert p.stdin is not None
        p.stdin.close()


def _can_mount_tmpfs() -> str | None:
    """Why a private tmpfs cannot be mounted here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace (unshare --mount)"
    if shutil.which("unshare") is None:
        return "needs unshare(1) for a private mount namespace"
    return None


def _tmpfs_broker(session: str, tmp_path: Path, size: str) -> BrokerProcess:
    """A broker whose --state-dir is a tmpfs of ``size``, mounted in its own private mount namespace."""
    state_dir = tmp_path / "tmpfs-state"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    b = BrokerProcess(session, state_dir, env={"HOME": str(home)}, log_path=tmp_path / "broker0.log",
                      cwd=str(home))
    # unshare and sh exec in place: the broker keeps the pid the launcher sees.
    b.argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs -o size={size},mode=0700 tmpfs "$0" && exec "$@"', str(state_dir), *b.argv]
    return b


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        block = bytes(4096)
        while True:
            try:
                written += f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written


def test_full_state_disk_at_the_first_turn_loses_no_event_and_the_save_is_retried(session_name, tmp_path):
    """session.json cannot be saved at the first system/init: the client still gets every event, then a
    later heartbeat saves it once there is room."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    from clients import Client

    b = _tmpfs_broker(session_name, tmp_path, "64k")
    try:
        b.start(timeout_s=30)
        # The broker's view of its state dir: its own mount namespace, reached through /proc.
        seen = Path(f"/proc/{b.pid}/root") / str(b.state_dir).lstrip("/")
        session_json = seen / session_name / "session.json"
        assert session_json.exists()
        filler = seen / "filler"
        assert _fill(filler) < 64 * 1024
        with Client(session_name, "webhook", connect_timeout_s=15) as c:
            turn = c.prompt("first-turn-on-a-full-disk")
            events = list(turn.events(timeout_s=20))
            res = turn.result(timeout_s=20)
            assert res.ok and res.text == "sim: first-turn-on-a-full-disk"
            kinds = [(e.get("type"), e.get("subtype")) for e in events]
            assert ("system", "init") in kinds, kinds
            assert any(t == "assistant" for t, _ in kinds), kinds
            # The reader is intact: a second turn is served whole too.
            assert c.prompt("second").result(timeout_s=20).text == "sim: second"
        failed = [e for e in broker_log(b) if e.get("event") == "session.save_failed"]
        assert failed and "No space left" in failed[0]["error"]
        assert '"resumable": false' in session_json.read_text()
        filler.unlink()
        wait_until(lambda: '"resumable": true' in session_json.read_text(), timeout_s=10,
                   what="the save retried once there is room")
        assert any(e.get("event") == "session.saved" for e in broker_log(b))
    finally:
        b.stop()


# ---------------------------------------------------------------- item 6: the request queue recreated


def _unlink_queue_and_wait_for_the_new_one(b: BrokerProcess, session: str) -> None:
    """Remove the request queue's name, as logind's RemoveIPC=yes does; wait until the broker made a new one."""
    posix_ipc.unlink_message_queue(names.request_queue(session))
    wait_until(lambda: any(e.get("event") == "ipc.recreated" and e.get("object") == names.request_queue(session)
                           for e in broker_log(b)), timeout_s=10, what="the broker to recreate its queue")


def test_a_client_reattaches_when_its_request_queue_is_recreated(broker_factory, session_name):
    """A connected Client's next prompt after the queue was recreated is served at once, not after a timeout."""
    from clients import Client

    b = broker_factory()
    with Client(session_name, "worker") as c:
        assert c.prompt("before").result(timeout_s=10).text == "sim: before"
        _unlink_queue_and_wait_for_the_new_one(b, session_name)
        t0 = time.monotonic()
        res = c.prompt("after-recreate").result(timeout_s=5)
        took_s = time.monotonic() - t0
        print(f"prompt after the queue was recreated: result in {took_s * 1000:.0f} ms")
        assert res.ok and res.text == "sim: after-recreate"
        assert took_s < 2.0
    assert rec(b).counters["requests"] == 2


def test_an_async_client_waiting_reattaches_when_its_request_queue_is_recreated(broker_factory, session_name,
                                                                                 monkeypatch):
    """The asyncio client too, and for a prompt sent to the old queue after the broker moved (the wait notices)."""
    import asyncio

    from clients import AsyncClient
    from ipc import rqueue

    b = broker_factory()

    async def main() -> float:
        async with AsyncClient(session_name, "worker") as c:
            assert (await c.prompt("before").result(timeout_s=10)).ok
            old = c._conn.rq
            assert old is not None
            _unlink_queue_and_wait_for_the_new_one(b, session_name)
            # Keep the stale handle through the submit: the frame goes where nobody reads.
            monkeypatch.setattr(rqueue.RequestQueue, "unlinked", lambda self: False, raising=False)
            turn = c.prompt("sent-to-the-old-queue")
            monkeypatch.undo()
            assert c._conn.rq is old
            t0 = time.monotonic()
            res = await turn.result(timeout_s=5)
            assert res.ok and res.text == "sim: sent-to-the-old-queue"
            return time.monotonic() - t0

    took_s = asyncio.run(main())
    print(f"a prompt stranded in the old queue: result {took_s * 1000:.0f} ms later")
    assert took_s < 2.0


# ---------------------------------------------------------------- item 8: out of descriptors

#: Runs the broker with a hard open-file limit (what `ulimit -n 64` does to a shell's children).
_LOW_NOFILE = (
    "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def test_a_client_the_broker_has_no_descriptors_for_is_refused_at_once(session_name, tmp_path):
    """At the broker's open-file limit a new client gets a typed LimitError within seconds, not a timeout;
    once descriptors are free again, clients are served."""
    from clients import Client
    from clients.core import Connection
    from ipc.errors import LimitError

    home = tmp_path / "home"
    home.mkdir()
    b = BrokerProcess(session_name, tmp_path / "state", env={"HOME": str(home)}, log_path=tmp_path / "broker0.log",
                      cwd=str(home))
    b.argv = [b.argv[0], "-c", _LOW_NOFILE, "64", *b.argv[1:]]
    idle: list[Connection] = []
    try:
        b.start(timeout_s=30)
        start = next(e for e in broker_log(b) if e.get("event") == "broker.nofile")
        assert start["soft"] == start["hard"] == 64
        refused: Connection | None = None
        for i in range(64):
            conn = Connection(session_name, "worker")
            idle.append(conn)
            assert conn.try_attach()

            def settled(conn: Connection = conn, want: int = i + 1) -> bool:
                conn.drain_mailbox()
                return conn.refusal is not None or rec(b).clients == want

            wait_until(settled, timeout_s=5, what=f"idle client {i} connected or refused")
            if conn.refusal is not None:
                refused = conn
                break
        assert refused is not None, "64 idle clients and the broker never ran out of descriptors"
        connected = rec(b).clients
        print(f"broker at RLIMIT_NOFILE 64: {connected} idle clients connected, the next refused")
        t0 = time.monotonic()
        with Client(session_name, "webhook", connect_timeout_s=5) as c:
            res = c.prompt("over-the-limit").result(timeout_s=10)
        took_s = time.monotonic() - t0
        assert res.error_code == "limit", res
        assert "open-file limit" in (res.error or "") and "ulimit -n" in (res.error or "")
        with pytest.raises(LimitError):
            res.raise_for_status()
        assert took_s < 3.0, f"the refusal took {took_s:.1f} s"
        assert b.proc is not None and b.proc.poll() is None
        # Descriptors freed: the next client is served.
        for conn in idle[:4]:
            conn.close()
        wait_until(lambda: rec(b).clients <= connected - 3, timeout_s=10, what="idle clients gone")
        with Client(session_name, "webhook", connect_timeout_s=5) as c:
            assert c.prompt("room-again").result(timeout_s=10).text == "sim: room-again"
    finally:
        for conn in idle:
            conn.close()
        b.stop()
        from ipc import sweep

        sweep.sweep(session=session_name, force=True)


# ---------------------------------------------------------------- item 4: memory budgets

MiB = 1024 * 1024


def test_queued_prompt_bodies_have_a_byte_budget_per_client_and_in_total(broker_factory, session_name):
    """Large prompts queued behind a long turn: refused with queue_full past the per-client and the total budget
    (naming the flag that raises each), and the broker's RSS grows by no more than the budgets allow."""
    from clients import Client
    from ipc.errors import QueueFull

    b = broker_factory(extra_args=(f"--max-queued-bytes-per-client={4 * MiB}", f"--max-queued-bytes={6 * MiB}"))
    body = "x" * 1_000_000
    with Client(session_name, "webhook") as holder, Client(session_name, "worker") as a, \
            Client(session_name, "worker") as bb:
        long_turn = holder.prompt("[sim:turn_ms=60000] hold the session")
        wait_until(lambda: rec(b).turn_state == "running", what="the long turn running")
        rss0 = vm_rss_kib(b.pid)
        a_turns = [a.prompt(f"{body} a-{i}") for i in range(40)]
        b_turns = [bb.prompt(f"{body} b-{i}") for i in range(4)]
        # A frame's reply comes in order: once the last one is answered, all were read.
        a_last = a_turns[-1].result(timeout_s=30)
        b_last = b_turns[-1].result(timeout_s=30)
        rss1 = vm_rss_kib(b.pid)
        grown_mib = (rss1 - rss0) / 1024
        print(f"40 + 4 queued prompts of 1 MB, budgets 4/6 MiB: broker VmRSS {rss0} -> {rss1} KiB "
              f"(+{grown_mib:.0f} MiB)")
        assert a_last.error_code == "queue_full" and "--max-queued-bytes-per-client=" in (a_last.error or "")
        assert b_last.error_code == "queue_full" and "--max-queued-bytes=" in (b_last.error or "")
        with pytest.raises(QueueFull):
            a_last.raise_for_status()
        queued = rec(b).workers_queued
        assert queued == 4 + 2, f"{queued} prompts queued, budgets allow 4 of a's and 2 of b's"
        assert grown_mib < 24, f"the broker grew {grown_mib:.0f} MiB holding 6 MiB of prompts"
        long_turn.cancel()
        assert long_turn.result(timeout_s=20).status == "cancelled"
        # What was accepted runs.
        accepted = [t for t in a_turns[:4]] + [t for t in b_turns[:2]]
        for t in accepted:
            assert t.result(timeout_s=30).ok


SLOW_READER = r"""
import json, sys
from clients.core import Connection

spec = json.loads(sys.argv[1])
conn = Connection(spec["session"], "worker", mailbox_capacity=64 * 1024)
assert conn.try_attach()
frame = conn.prompt_frame(spec["text"], model=None, on_preempt=None, resume_prompt=None, request_id=None)
conn.submit(frame)
print("submitted", flush=True)
sys.stdin.readline()  # never read the mailbox; leave when told
"""


def test_buffered_replies_have_a_total_budget_and_memory_returns_after_slow_readers_leave(
    broker_factory, spawn_client, session_name
):
    """Clients that never read, each sent a large reply: past the total reply budget the newest is failed
    client_too_slow naming --max-buffered-bytes; once they leave, the broker's RSS returns near where it was."""
    import json
    import subprocess

    b = broker_factory(extra_args=(f"--max-buffered-bytes={16 * MiB}",))
    from clients import Client

    with Client(session_name, "webhook") as warm:
        assert warm.prompt("[sim:bytes=2000000] warm-up").result(timeout_s=20).ok
    rss0 = vm_rss_kib(b.pid)
    readers = []
    for i in range(8):
        spec = {"session": session_name, "text": f"[sim:bytes=2000000] [sim:chunks=20] never-read-{i}"}
        p = spawn_client(SLOW_READER, json.dumps(spec), stdin=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline().strip() == "submitted"
        readers.append(p)

    def all_ran() -> bool:
        r = rec(b)
        return r.counters["turns"] >= 1 + 8 and r.turn_state == "idle" and r.workers_queued == 0

    wait_until(all_ran, timeout_s=60, what="every slow reader's turn ended")
    rss_full = vm_rss_kib(b.pid)
    failed = [e for e in broker_log(b) if e.get("event") == "client.too_slow"]
    print(f"8 slow readers of 2 MB replies, total budget 16 MiB: broker VmRSS {rss0} -> {rss_full} KiB, "
          f"{len(failed)} failed")
    assert failed and all("--max-buffered-bytes" in e["error"] for e in failed)
    assert rec(b).counters["clients_failed_slow"] == len(failed) >= 3
    for p in readers:
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
    for p in readers:
        p.wait(10)
        p.stdin.close()
    wait_until(lambda: rec(b).clients == 0, timeout_s=10, what="every slow reader gone")
    wait_until(lambda: vm_rss_kib(b.pid) - rss0 < 16 * 1024, timeout_s=10,
               what=f"broker RSS back near {rss0} KiB (now {vm_rss_kib(b.pid)} KiB)")
    print(f"after the slow readers left: broker VmRSS {vm_rss_kib(b.pid)} KiB")
