"""`turnstile status` without --session lists every session; client labels travel in the hello and show there."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from broker.testing.launcher import BrokerProcess
from clients import Client, InvalidArgument
from ipc import frames, sweep
from tests.support import TURNSTILE, ClientProc, processes, running, ts, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def bg() -> Iterator[Callable[..., ClientProc]]:
    """Background ``turnstile`` commands, reaped at teardown."""
    with processes() as start:
        yield lambda *args: start([*TURNSTILE, *args])


@pytest.fixture
def second_broker(session_name: str, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker (sim) on a second session of this test, stopped and swept at teardown."""
    name = f"{session_name}-b"
    home = tmp_path / "home2"
    home.mkdir()
    b = BrokerProcess(name, tmp_path / "state2", agent="sim", env={"HOME": str(home)},
                      log_path=tmp_path / "broker-b.log", cwd=str(home))
    try:
        b.start(wait=True, timeout_s=30)
        yield b
    finally:
        b.stop(timeout_s=15)
        sweep.sweep(session=name, force=True)


def test_status_lists_every_session_with_the_holders_label(
    broker_factory: Callable[..., BrokerProcess], session_name: str, second_broker: BrokerProcess,
    bg: Callable[..., ClientProc],
) -> None:
    a = broker_factory()
    worker = bg("prompt", "--session", session_name, "--kind", "worker", "--label", "nightly-refactor", "--json",
                "[sim:turn_ms=120000] long")
    wait_until(running(a, "worker"), what="the labelled worker's turn running")
    wait_until(lambda: a.snapshot() is not None and a.snapshot().record.holder_label == "nightly-refactor",  # type: ignore[union-attr]
               what="the holder's label published")

    cp = ts("status", "--json", timeout_s=20)
    assert cp.returncode == 0, cp.stderr
    listed = {d["session"]: d for d in json.loads(cp.stdout)}
    mine = listed[session_name]
    assert mine["broker_alive"] and mine["holder_kind"] == "worker" and mine["holder_label"] == "nightly-refactor"
    other = listed[second_broker.session]
    assert other["broker_alive"] and other["holder_client"] == "" and other["agent_state"] == "up"

    plain = ts("status", timeout_s=20)
    assert plain.returncode == 0, plain.stderr
    header, *lines = plain.stdout.splitlines()
    assert header.split() == ["SESSION", "BROKER", "AGENT", "HOLDER", "LINE", "MODEL"]
    line = next(ln for ln in lines if ln.split()[0] == session_name)
    assert "worker nightly-refactor" in line and "alive" in line
    assert mine["holder_client"] not in line  # the label replaces the hex id
    assert any(ln.split()[0] == second_broker.session for ln in lines)

    one = json.loads(ts("status", "--session", session_name, "--json").stdout)
    assert one["holder_label"] == "nightly-refactor"
    assert "nightly-refactor (worker" in ts("status", "--session", session_name).stdout
    worker.kill()


def test_a_bad_label_is_refused_before_anything_is_sent(session_name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        Client(session_name, "worker", label="has space", connect_timeout_s=0.1)
    assert err.value.argument == "label"
    cp = ts("prompt", "--session", session_name, "--label", "x" * 33, "hi")
    assert cp.returncode == 2 and "label" in cp.stderr, cp.stderr


def test_hello_label_is_optional_on_the_wire() -> None:
    """An unlabelled hello is byte-identical to the one before labels (older brokers decode it)."""
    base = dict(client="0123456789abcdef", kind="worker", pid=10, start_time=5)
    unlabelled = frames.encode(frames.Hello(**base))  # type: ignore[arg-type]
    assert b"label" not in unlabelled
    labelled = frames.decode_request(frames.encode(frames.Hello(**base, label="pr-webhook")))  # type: ignore[arg-type]
    assert isinstance(labelled, frames.Hello) and labelled.label == "pr-webhook"
    bad = msgspec.msgpack.encode({"t": "hello", "v": 1, **base, "label": "a b"})
    with pytest.raises(frames.ProtocolError):
        frames.decode_request(bad)
