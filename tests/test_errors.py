"""The error tree: one root, exit codes on the classes, one table, pickling kept, results raised as errors."""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker import exits, protocol
from clients.core import TurnResult
from ipc import errors, names

_BIN = Path(sys.executable).with_name("turnstile")
TURNSTILE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "broker.cli"]

TREE = [obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, errors.TurnstileError)]


def _sample(cls: type[errors.TurnstileError]) -> errors.TurnstileError:
    if cls is errors.ProtocolError:
        return cls("oversize", "too big", size=9)
    if cls is errors.AgentNotFound:
        return cls(["/a/claude", "PATH"], "install it")
    return cls(f"{cls.__name__} happened", session="s1", turn=7)


def test_errors_that_lived_outside_the_tree_are_in_it():
    assert issubclass(errors.AgentNotFound, errors.TurnstileError)
    assert issubclass(errors.AlreadyRunning, errors.TurnstileError)
    assert issubclass(protocol.BadLine, errors.AgentError)
    assert issubclass(errors.QueueGone, errors.IPCError)
    with pytest.raises(errors.InvalidArgument) as bad:
        names.check_session("../x")
    assert isinstance(bad.value, ValueError) and bad.value.argument == "session"
    with pytest.raises(protocol.BadLine) as line:
        protocol.parse(b"[1]")
    assert line.value.reason == "not_an_object"


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_every_error_survives_pickling_with_its_attributes_and_exit_code(cls):
    err = _sample(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err)
    assert back.attrs == err.attrs and back.exit_code == err.exit_code == cls.exit_code
    for key, value in err.attrs.items():
        assert getattr(back, key) == value
    if cls is errors.AgentNotFound:
        assert back.searched == ["/a/claude", "PATH"] and back.hint == "install it"


def test_the_exit_table_covers_every_class_and_help_prints_it():
    assert {cls.exit_code for cls in TREE} | {errors.EXIT_OK, errors.EXIT_SIGNAL} == set(exits.EXIT_CODES)
    # Every class that introduces a code names it; a subclass never silently reuses another's words.
    for cls in exits.ERRORS:
        assert exits.EXIT_CODES[cls.exit_code] == cls.exit_meaning
    out = subprocess.run([*TURNSTILE, "--help"], capture_output=True, text=True, timeout=30).stdout
    for code, meaning in exits.EXIT_CODES.items():
        assert f"{code:<3} {meaning}" in out, (code, out)


CASES: list[tuple[dict[str, Any], type[errors.TurnstileError] | None]] = [
    ({"status": "ok"}, None),
    ({"status": "preempted"}, errors.Preempted),
    ({"status": "cancelled"}, errors.Cancelled),
    ({"status": "error", "error_code": "broker_unavailable", "error": "gone"}, errors.BrokerUnavailable),
    ({"status": "error", "error_code": "agent_restarted", "error": "crashed"}, errors.AgentError),
    ({"status": "error"}, errors.AgentError),
]


@pytest.mark.parametrize(("fields", "raised"), CASES)
def test_raise_for_status_raises_what_ended_the_turn(fields, raised):
    res = TurnResult(turn=3, request_id="r1", **fields)
    if raised is None:
        assert res.raise_for_status() is res
        return
    with pytest.raises(raised) as caught:
        res.raise_for_status()
    assert type(caught.value) is raised
    assert caught.value.turn == 3 and caught.value.request_id == "r1"
    if fields.get("error_code"):
        assert caught.value.reason == fields["error_code"] and fields["error_code"] in str(caught.value)
