"""Hostile shared memory and forged identities, against a real broker (issue 13: items 2a, 3, 5, 7, 12).

A client owns its mailbox ring and can write anything into it, or truncate it;
any same-user process can scribble on the session's state block. None of that
may crash the broker or hurt another client: the broker drops the client whose
ring is damaged, repairs the state block it owns, and refuses identities it
cannot check. The "victim" clients here are raw (a mailbox and frames sent by
hand) so the test can damage exactly what it means to; the bystanders are real
client processes (``FCLIENT``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.testing.launcher import BrokerProcess
from ipc import chunks, frames, mailbox, names, rqueue, shm, state, sweep
from ipc.errors import ProtocolError, StateDamaged
from tests.support import ClientProc, broker_log, rec, session_objects, wait_until

SHM = "/dev/shm"


def shm_path(name: str) -> str:
    return os.path.join(SHM, name.lstrip("/"))


class RawClient:
    """A client made by hand in the test process: a real mailbox and hand-sent frames."""

    def __init__(self, session: str, kind: frames.Kind = "worker") -> None:
        self.session = session
        self.kind: frames.Kind = kind
        self.id = names.new_client_id()
        self.box = mailbox.MailboxReader(session, self.id)
        self.rq = rqueue.RequestQueue.open(session)
        self.frames: list[frames.ReplyFrame] = []

    def hello(self, b: BrokerProcess) -> None:
        pid, start = names.self_identity()
        self.rq.send_frame(frames.Hello(client=self.id, kind=self.kind, pid=pid, start_time=start))

        def connected() -> bool:
            mine = [e for e in broker_log(b) if e.get("client") == self.id]
            assert_alive(b)
            assert not any(e.get("event") == "client.hello_refused" for e in mine), mine
            return any(e.get("event") == "client.connected" for e in mine)

        wait_until(connected, 20, f"the broker to connect raw client {self.id}")

    def prompt(self, req: str, content: str) -> None:
        self.rq.send_frame(frames.Prompt(client=self.id, req=req, kind=self.kind, content=content))

    def poll(self) -> list[frames.ReplyFrame]:
        """Frames that arrived since the last call (only safe while the ring is intact)."""
        self.box.clear_bell()
        got = [frames.decode_reply(d) for d in self.box.read_frames()]
        self.frames += got
        return got

    def wait_frame(self, pred: Callable[[frames.ReplyFrame], bool], timeout_s: float = 30.0) -> frames.ReplyFrame:
        def found() -> frames.ReplyFrame | None:
            self.poll()
            return next((f for f in self.frames if pred(f)), None)

        got: frames.ReplyFrame = wait_until(found, timeout_s, "a reply frame")
        return got

    def close(self) -> None:
        self.rq.close()
        with contextlib.suppress(OSError):
            self.box.close()


@pytest.fixture
def raw(session_name: str) -> Iterator[Callable[..., RawClient]]:
    made: list[RawClient] = []

    def make(kind: frames.Kind = "worker") -> RawClient:
        c = RawClient(session_name, kind)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def alive(b: BrokerProcess) -> bool:
    assert b.proc is not None
    return b.proc.poll() is None


def assert_alive(b: BrokerProcess) -> None:
    assert b.proc is not None
    rc = b.proc.poll()
    assert rc is None, f"the broker died with {rc} (-7 is SIGBUS); log tail: {b.log_text()[-3000:]}"


def dropped(b: BrokerProcess, client_id: str) -> bool:
    return any(e.get("event") == "client.gone" and e.get("client") == client_id for e in broker_log(b))


def bystander_ok(client: Callable[..., ClientProc], text: str = "bystander") -> None:
    c = client("webhook", text)
    res = c.ev("result", timeout_s=60)
    assert res["status"] == "ok", res
    assert c.finish() == 0


# ---------------------------------------------------------------- item 2(a): counters are validated


@pytest.mark.timeout(120)
def test_a_read_counter_of_2_62_fails_only_that_client(broker_factory, client, raw):
    b = broker_factory()
    victim = raw()
    victim.hello(b)
    victim.box._words[mailbox.OFF_READ // 8] = 1 << 62  # the client's own counter, set to a lie
    victim.prompt("big-1", "[sim:bytes=3000000] big reply")
    wait_until(lambda: dropped(b, victim.id), 30, "the broker to drop the client with the lying counter")
    assert_alive(b)

    def ring_error() -> ProtocolError | None:
        # Frames the broker wrote before it needed the counter come first, then the error.
        try:
            victim.poll()
        except ProtocolError as exc:
            return exc
        return None

    error = wait_until(ring_error, 10, "the victim to learn its ring was found damaged")
    assert error.reason == "ring"
    events = [e for e in broker_log(b) if e.get("event") == "client.mailbox_damaged"]
    assert events and events[0]["client"] == victim.id and "read counter" in events[0]["error"]
    # The agent-output reader is intact: the next client's turn runs and ends.
    bystander_ok(client)
    assert_alive(b)


# ---------------------------------------------------------------- item 3: truncation is not SIGBUS


@pytest.mark.timeout(120)
def test_a_client_truncating_its_mailbox_is_dropped_and_the_broker_lives(broker_factory, client, raw, session_name):
    b = broker_factory()
    victim = raw()
    victim.hello(b)
    # The broker has the whole ring mapped now; shrink it under it to one page.
    fd = os.open(shm_path(names.mailbox(session_name, victim.id)), os.O_RDWR)
    try:
        os.ftruncate(fd, 4096)
    finally:
        os.close(fd)
    victim.prompt("small-1", "[sim:bytes=20000] reply that lands past the first page")
    wait_until(lambda: dropped(b, victim.id) or not alive(b), 30, "the truncated client to be dropped")
    assert_alive(b)
    assert victim.box.failed  # told through the header page, which the truncation left
    bystander_ok(client)
    assert_alive(b)


@pytest.mark.timeout(120)
def test_a_client_truncating_its_mailbox_to_zero_is_dropped(broker_factory, client, raw, session_name):
    b = broker_factory()
    victim = raw()
    victim.hello(b)
    fd = os.open(shm_path(names.mailbox(session_name, victim.id)), os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    victim.prompt("small-1", "hello")
    wait_until(lambda: dropped(b, victim.id) or not alive(b), 30, "the truncated client to be dropped")
    assert_alive(b)
    bystander_ok(client)


@pytest.mark.timeout(120)
def test_a_state_block_truncated_to_zero_is_restored_by_the_broker(broker_factory, client, session_name):
    b = broker_factory()
    path = shm_path(names.state_block(session_name))
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    wait_until(lambda: not alive(b) or os.stat(path).st_size == state.SIZE, 10, "the broker to restore the block")
    assert_alive(b)
    wait_until(lambda: b.snapshot() is not None and b.snapshot().broker_alive, 10, "a readable state record")  # type: ignore[union-attr]
    bystander_ok(client)
    assert any(e.get("event") == "state.repaired" for e in broker_log(b))


# A process that truncates to exactly 0 bytes between the broker's size check and its next
# access: run the broker-side code in a child with the truncation hooked in right after the
# check, so the race is lost every time. A mapped access there dies of SIGBUS (-7).
TRUNCATE_AFTER_CHECK = r"""
import os, sys
from ipc import mailbox, names, state
from ipc.errors import IPCError
session, client, what = sys.argv[1:4]
path = "/dev/shm/" + (names.state_block(session) if what == "state" else names.mailbox(session, client))


def truncating(check):
    def hooked(self, *args):
        out = check(self, *args)
        fd = os.open(path, os.O_RDWR)
        os.ftruncate(fd, 0)  # after the check passed, before the access it guards
        os.close(fd)
        return out
    return hooked


if what == "state":
    block = state.StateBlock.create(session)
    state.StateBlock.repair = truncating(state.StateBlock.repair)
    block.write(state.StateRecord(turn=1))
    block.read_cancel()
    block.clear_cancel()
    print("survived", flush=True)
else:
    if what == "ring-open":
        mailbox.MailboxWriter._check = truncating(mailbox.MailboxWriter._check)
    try:
        w = mailbox.MailboxWriter(session, client)
        mailbox.MailboxWriter._check = truncating(mailbox.MailboxWriter._check)
        w.send(b"x" * 200)
        w.send(b"y" * 200)
    except IPCError as exc:
        print("damaged", exc.reason, flush=True)
    else:
        print("survived", flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["ring-open", "ring-pump", "state"])
def test_a_truncation_to_zero_right_after_the_size_check_cannot_kill_the_broker_side(
    spawn_client, session_name, what
):
    client_id = names.new_client_id()
    reader = mailbox.MailboxReader(session_name, client_id) if what.startswith("ring") else None
    try:
        p = spawn_client(TRUNCATE_AFTER_CHECK, session_name, client_id, what)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, f"the broker side died with {p.returncode} (-7 is SIGBUS): {err[-2000:]}"
        if reader is None:
            assert out.strip() == "survived", out
        else:
            assert out.strip() == "damaged ring_damaged", out  # that client is dropped, nothing else
    finally:
        if reader is not None:
            with contextlib.suppress(OSError):
                reader.close()


# Against a real broker: a process cuts the state block to 0 bytes as fast as it can (the
# broker puts it back before each write, so the cut lands between its check and its access)
# and flips each victim's ring between 0 bytes and its size, while traffic runs. A broker
# that touched either through a mapping died of SIGBUS here.
FLIPPER = r"""
import os, sys, time
deadline = time.monotonic() + float(sys.argv[1])
block = os.open(sys.argv[2], os.O_RDWR)
ring = os.open(sys.argv[3], os.O_RDWR)
ring_size = os.fstat(ring).st_size
flips = 0
while time.monotonic() < deadline:
    for _ in range(100):
        os.ftruncate(block, 0)
        os.ftruncate(ring, 0)
        os.ftruncate(block, 0)
        os.ftruncate(ring, ring_size)
    flips += 100
print(flips, flush=True)
"""
FLIP_S = 1.5


@pytest.mark.timeout(240)
def test_a_state_block_and_rings_flipped_to_zero_and_back_under_traffic_leave_the_broker_up(
    broker_factory, client, raw, spawn_client, session_name
):
    b = broker_factory()
    bystanders = [client(kind, prompts=[{"text": f"[sim:bytes=2000] {kind}-{i}"} for i in range(30)])
                  for kind in ("worker", "webhook")]
    for c in bystanders:
        c.ev("connected", timeout_s=30)
    state_path = shm_path(names.state_block(session_name))
    flipped = 0
    for k in range(3):
        victim = raw()
        victim.hello(b)
        ring_path = shm_path(names.mailbox(session_name, victim.id))
        flipper = spawn_client(FLIPPER, str(FLIP_S), state_path, ring_path)
        deadline = time.monotonic() + FLIP_S
        n = 0
        while time.monotonic() < deadline and not dropped(b, victim.id):
            victim.prompt(f"v{k}-{n}", "[sim:bytes=300000] victim")
            n += 1
            assert_alive(b)
        out, err = flipper.communicate(timeout=30)
        assert flipper.returncode == 0, err
        flipped += int(out)
        assert_alive(b)
        victim.close()
    for c in bystanders:
        c.wait_for(lambda o: o.get("ev") == "exit", 180)
        results = c.results()
        assert len(results) == 30 and all(r["status"] == "ok" for r in results), results
        assert c.finish() == 0
    print(f"{flipped} cuts of the state block and flips of a ring, broker up")
    assert_alive(b)
    bystander_ok(client, "after the flips")


# ---------------------------------------------------------------- item 7: a damaged state block is repaired


def _block_words(session: str) -> tuple[shm.Segment, memoryview]:
    seg = shm.Segment.open_mapped(names.state_block(session), min_size=state.SIZE)
    return seg, memoryview(seg.mm)[: state.SIZE].cast("Q")


@pytest.mark.timeout(120)
def test_a_sequence_word_set_odd_is_repaired_and_readers_say_damaged_not_dead(broker_factory, client, session_name):
    b = broker_factory()
    seg, words = _block_words(session_name)
    reader = state.StateBlock.open(session_name)
    try:
        # Freeze the broker so the damage stays while we look at it.
        os.kill(b.pid, signal.SIGSTOP)
        try:
            words[state.OFF_SEQ // 8] = words[state.OFF_SEQ // 8] ^ 1  # a stable step turned odd
            with pytest.raises(StateDamaged) as info:
                reader.read_record(timeout_s=0.2)
            assert info.value.broker_alive is True  # type: ignore[attr-defined]
            assert "died" not in str(info.value)
            seg.mm[0:4] = b"JUNK"  # a garbage magic number
            with pytest.raises(StateDamaged):
                state.StateBlock.open(session_name).close()
            from clients import Client
            from ipc.errors import BrokerUnavailable

            with pytest.raises(BrokerUnavailable) as unavailable:
                Client(session_name, "worker", connect_timeout_s=0.3)
            assert unavailable.value.damaged is True  # type: ignore[attr-defined]
            assert "damaged" in str(unavailable.value) and "Start one" not in str(unavailable.value)
        finally:
            os.kill(b.pid, signal.SIGCONT)
        # The broker owns the block: its next publish rewrites header and sequence.
        wait_until(lambda: not shm.seq_odd(words[state.OFF_SEQ // 8]) and bytes(seg.mm[0:4]) != b"JUNK", 10,
                   "the broker to repair the block")
        state.StateBlock.open(session_name).close()
        assert reader.read_record(timeout_s=1.0).broker_pid == b.pid
        cp = subprocess.run([str(Path(sys.executable).with_name("turnstile")), "status", "--session", session_name],
                            capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        bystander_ok(client)
        assert any(e.get("event") == "state.repaired" for e in broker_log(b))
    finally:
        reader.close()
        words.release()
        seg.close()


# ---------------------------------------------------------------- item 12: forged identities


FORGER = r"""
import os, sys
from ipc import frames, mailbox, names, rqueue
session = sys.argv[1]
start1 = names.proc_start_time(1)
rq = rqueue.RequestQueue.open(session)
ids = []
for _ in range(3):
    cid = names.new_client_id()
    box = mailbox.MailboxReader(session, cid, capacity=4096)
    box._mm[16:24] = (1).to_bytes(8, "little")          # the header names pid 1 ...
    box._mm[24:32] = start1.to_bytes(8, "little")       # ... with its real start time
    rq.send_frame(frames.Hello(client=cid, kind="worker", pid=1, start_time=start1))
    ids.append(cid)
print(" ".join(ids), flush=True)
os._exit(0)  # leave without removing anything
"""


@pytest.mark.timeout(120)
def test_a_hello_naming_pid_1_is_refused_and_its_objects_do_not_outlive_the_broker(
    broker_factory, spawn_client, session_name
):
    b = broker_factory()
    p = spawn_client(FORGER, session_name)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ids = out.split()
    assert len(ids) == 3

    def seen_all() -> bool:
        log = broker_log(b)
        return all(any(e.get("client") == cid and e.get("event", "").startswith("client.") for e in log)
                   for cid in ids)

    wait_until(seen_all, 20, "the broker to read the three hellos")
    assert rec(b).clients == 0, "a hello naming a process that does not hold the mailbox was accepted"
    # A non-forced sweep removes them: pid 1 is alive but does not hold them.
    removed = {r.name for r in sweep.sweep(session=session_name)}
    for cid in ids:
        assert names.mailbox(session_name, cid) in removed
    assert all(cid not in n for n in session_objects(session_name) for cid in ids)


@pytest.mark.timeout(120)
def test_forged_mailboxes_left_by_a_dead_sender_are_gone_after_the_broker_stops(
    broker_factory, spawn_client, session_name
):
    b = broker_factory()
    p = spawn_client(FORGER, session_name)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ids = out.split()
    wait_until(lambda: all(any(e.get("client") == cid for e in broker_log(b)) for cid in ids), 20, "the hellos")
    assert b.stop() == 0
    assert session_objects(session_name) == []


# ---------------------------------------------------------------- item 5: per-client chunk budgets


def _chunk_set(client_id: str, req: str, total: int, pieces: int, step: int, cid: int) -> Iterator[bytes]:
    """Encoded chunks 0..pieces-1 of a set that declares ``total`` bytes (never completed if pieces*step < total)."""
    piece = b"x" * step
    n = -(-total // step)
    for seq in range(pieces):
        yield frames.encode(frames.Chunk(client=client_id, req=req, cid=cid, seq=seq, n=n, total=total, data=piece))


@pytest.mark.timeout(180)
def test_a_chunk_spray_under_fresh_ids_cannot_evict_a_connected_clients_set(broker_factory, raw):
    b = broker_factory()
    legit = raw()
    legit.hello(b)
    content = "[sim:bytes=10] " + "p" * (2 << 20)
    parts = chunks.split(
        frames.encode(frames.Prompt(client=legit.id, req="legit-1", kind="worker", content=content)),
        client=legit.id, req="legit-1", max_message_bytes=legit.rq.max_message_bytes,
    )
    half = len(parts) // 2
    for m in parts[:half]:
        legit.rq.send_bytes(m, frames.PRIORITY["worker"])
    # 300 one-chunk sets, each under a fresh client id that never said hello.
    step = legit.rq.max_message_bytes - chunks.CHUNK_OVERHEAD
    for i in range(300):
        for m in _chunk_set(names.new_client_id(), f"s{i}", 2 * step, 1, step, 1):
            legit.rq.send_bytes(m, frames.PRIORITY["worker"])
    for m in parts[half:]:
        legit.rq.send_bytes(m, frames.PRIORITY["worker"])
    res = legit.wait_frame(lambda f: isinstance(f, frames.Result | frames.Error) and f.req == "legit-1", 60)
    assert isinstance(res, frames.Result) and res.status == "ok", res
    assert_alive(b)


@pytest.mark.timeout(300)
def test_chunk_budgets_are_per_client_and_an_evicted_owner_is_told_its_request(broker_factory, raw):
    b = broker_factory()
    hogs = [raw(), raw()]
    for h in hogs:
        h.hello(b)
    rq = hogs[0].rq
    step = rq.max_message_bytes - chunks.CHUNK_OVERHEAD
    total = frames.MAX_FRAME_BYTES - step  # just under the frame bound
    pieces = total // step - 1  # every piece but the last: never completes
    # Each hog tries three incomplete sets; the per-client bound (2 frames) refuses its third.
    for hi, h in enumerate(hogs):
        for k in range(3):
            for m in _chunk_set(h.id, f"hog{hi}-{k}", total, pieces, step, k + 1):
                rq.send_bytes(m, frames.PRIORITY["worker"])
    for hi, h in enumerate(hogs):
        err = h.wait_frame(lambda f, hi=hi: isinstance(f, frames.Error) and f.req == f"hog{hi}-2", 120)
        assert isinstance(err, frames.Error) and err.code == "oversize", err
    # A third client's large prompt still goes through: it evicts a hog's oldest set,
    # and that hog is told which request it lost.
    other = raw()
    other.hello(b)
    content = "[sim:bytes=10] " + "q" * (20 << 20)
    other.rq.send_frame(frames.Prompt(client=other.id, req="big-1", kind="worker", content=content), timeout_s=30)
    res = other.wait_frame(lambda f: isinstance(f, frames.Result | frames.Error) and f.req == "big-1", 120)
    assert isinstance(res, frames.Result) and res.status == "ok", res
    evicted = [f for h in hogs for f in (h.poll() or h.frames) if isinstance(f, frames.Error)
               and f.code == "chunk_evicted"]
    assert evicted and all(f.req.startswith("hog") for f in evicted)
    assert_alive(b)


@pytest.mark.timeout(120)
def test_the_client_library_keeps_an_error_that_names_no_request(broker_factory, session_name):
    from clients import Client

    broker_factory()
    with Client(session_name, "worker") as c:
        rq = rqueue.RequestQueue.open(session_name)
        try:  # a second hello in its name, of the other kind: refused with no request id
            rq.send_frame(frames.Hello(client=c.client_id, kind="webhook", pid=os.getpid(),
                                       start_time=names.self_identity()[1]))
        finally:
            rq.close()
        assert c.prompt("after").result(timeout_s=30).ok
        wait_until(lambda: c._conn.errors, 10, "the error to be kept")
        assert [e.code for e in c._conn.errors] == ["kind_mismatch"]


# ---------------------------------------------------------------- fuzz: random bytes while traffic runs


FUZZ_S = 8.0


@pytest.mark.timeout(240)
def test_fuzz_random_bytes_in_a_clients_mailbox_and_the_state_block_hurt_nobody_else(
    broker_factory, client, raw, session_name
):
    b = broker_factory()
    bystanders = [client(kind, prompts=[{"text": f"[sim:bytes={1000 * (i + 1)}] {kind}-{i}"} for i in range(40)])
                  for kind in ("worker", "webhook")]
    for c in bystanders:
        c.ev("connected", timeout_s=30)  # attached before the damage starts: the broker is under test
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "1313")))
    st_fd = os.open(shm_path(names.state_block(session_name)), os.O_RDWR)
    victims = 0
    mutations = 0
    deadline = time.monotonic() + FUZZ_S
    try:
        while time.monotonic() < deadline:
            victim = raw()
            victim.hello(b)
            victims += 1
            fd = os.open(shm_path(names.mailbox(session_name, victim.id)), os.O_RDWR)
            try:
                for k in range(rng.randint(1, 6)):
                    victim.prompt(f"v{victims}-{k}", f"[sim:bytes={rng.randint(1, 3_000_000)}] victim")
                    for _ in range(rng.randint(1, 20)):
                        mutations += 1
                        # Through the descriptor, never our mapping: a truncation cannot fault us.
                        what = rng.random()
                        if what < 0.05:
                            os.ftruncate(fd, rng.choice([0, 1, 64, 4096, 4097, 8192, 1 << 21]))
                        elif what < 0.5:
                            off = rng.choice([mailbox.OFF_SEQ, mailbox.OFF_READ, 0, 8, 16]
                                             + [mailbox.OFF_SLOTS + 64 * k + 8 * i for k in (0, 1) for i in range(4)])
                            os.pwrite(fd, rng.randbytes(8), off)
                        else:
                            os.pwrite(fd, rng.randbytes(rng.randint(1, 64)), rng.randint(0, 1 << 20))
                        where = rng.random()
                        if where < 0.02:
                            os.ftruncate(st_fd, rng.choice([0, 1, 8, 4095]))
                        elif where < 0.3:
                            os.pwrite(st_fd, rng.randbytes(rng.randint(1, 16)), rng.randint(0, state.SIZE - 1))
                    assert_alive(b)
            finally:
                os.close(fd)
            victim.close()
        assert_alive(b)
        for c in bystanders:
            c.wait_for(lambda o: o.get("ev") == "exit", 180)
            results = c.results()
            assert len(results) == 40 and all(r["status"] == "ok" for r in results), results
            assert c.finish() == 0
    finally:
        os.close(st_fd)
    print(f"fuzz: {victims} victim clients, {mutations} mutations, broker up")
    assert_alive(b)
    bystander_ok(client, "after the fuzz")
