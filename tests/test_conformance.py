"""The sim (``python -m broker.testing.fake_cli``) against the real Claude Code CLI.

Every scripted exchange of :mod:`tests.conformance_script` runs against both,
each in a fresh process, HOME and session; the normalised outputs (kinds in
order, control-response shapes, result shapes, per-message lifecycles, exit
code) must agree.  Known differences are listed with the exchange, aspect by
aspect: those aspects are reported as xfail, every other aspect is still
checked, and the test fails once a listed difference disappears.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from broker.agents.sim import SimAgent
from broker.testing.fake_api import OfflineAPI
from broker.testing.fake_cli.script import parse_directives
from tests.conformance_script import (
    ASPECTS,
    EXCHANGES,
    Agent,
    Exchange,
    Normalised,
    normalise,
    record_exchange,
)
from tests.realcli import DEFAULT_MODEL, StdioProcess, real_cli, require_claude_bin, spawn, temp_home

pytestmark = pytest.mark.e2e


def _let_stderr_drain(proc: StdioProcess) -> None:
    """Once the agent has exited, let its stderr reader reach EOF.

    ``StdioProcess.kill`` closes the pipes without joining the reader
    threads, so a reader still between two reads of an exited agent's stderr
    (a malformed line makes the agent write there and exit) meets a closed
    file: ``ValueError`` in the thread, which pytest reports as an error.
    """
    if proc.proc.poll() is not None:
        proc._err_reader.join(timeout=5)


@contextlib.contextmanager
def real_agent(api: OfflineAPI) -> Iterator[Agent]:
    """The real CLI against ``api`` (see :func:`tests.realcli.real_cli`)."""
    with real_cli(api) as proc:
        try:
            yield proc
        finally:
            _let_stderr_drain(proc)


@contextlib.contextmanager
def sim_agent(*extra_args: str) -> Iterator[Agent]:
    """The sim, launched exactly as the real CLI is (same argv shape and model)."""
    with temp_home("turnstile-sim-") as home:
        launch = SimAgent(extra_args=extra_args, env={"HOME": home}, cwd=home).launch(
            session_id=str(uuid.uuid4()), resume=False, model=DEFAULT_MODEL
        )
        proc = spawn(launch.argv, launch.env, launch.cwd)
        proc.busy_hook = functools.partial(_sim_streaming, proc)
        try:
            yield proc
        finally:
            _let_stderr_drain(proc)
            proc.kill()


def _sim_streaming(proc: StdioProcess, prompt: str, text_started: bool, timeout_s: float) -> None:
    """The sim's side of :class:`tests.conformance_script.Busy`.

    Like the real CLI, the sim prints nothing while a text block streams, but
    its clock says how far the block is: its text arrives evenly over the
    block's share of ``[sim:turn_ms]`` from the turn's start, which comes just
    before its ``system/init``.  So wait for that line, then, with
    ``text_started``, for five characters' worth of time (the real CLI's hook
    waits for five deltas).
    """
    proc.read_kind("system/init", timeout_s)
    if text_started:
        turn_ms = int(parse_directives(prompt).get("turn_ms") or 0)
        assert turn_ms > 0, f"a Busy(text_started=True) prompt for the sim needs [sim:turn_ms]: {prompt!r}"
        time.sleep(5 * turn_ms / 1000 / len(f"sim: {prompt}"))


def _render(value: Any) -> list[str]:
    return json.dumps(value, indent=1, sort_keys=True).splitlines()


def _diff(aspect: str, real: Any, sim: Any) -> str:
    lines = difflib.unified_diff(_render(real), _render(sim), "real CLI", "sim", lineterm="", n=3)
    return f"{aspect} differ:\n" + "\n".join(lines)


def test_every_drift_names_a_known_aspect() -> None:
    for ex in EXCHANGES:
        assert set(ex.drifts) <= set(ASPECTS), ex.name
    assert len({ex.name for ex in EXCHANGES}) == len(EXCHANGES)


def compare(real: Normalised, sim: Normalised, exchange: Exchange) -> tuple[list[str], list[str]]:
    """Return (diffs in aspects that must agree, listed drifts that now agree)."""
    failures = [
        _diff(aspect, real.aspect(aspect), sim.aspect(aspect))
        for aspect in ASPECTS
        if aspect not in exchange.drifts and real.aspect(aspect) != sim.aspect(aspect)
    ]
    fixed = [a for a in exchange.drifts if real.aspect(a) == sim.aspect(a)]
    return failures, fixed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exchange", EXCHANGES, ids=lambda ex: ex.name)
def test_sim_conforms_to_real_cli(api: OfflineAPI, exchange: Exchange) -> None:
    require_claude_bin()
    real_t = record_exchange(lambda: real_agent(api), exchange)
    sim_t = record_exchange(sim_agent, exchange)
    real = normalise(real_t, loose_controls=exchange.loose_controls)
    sim = normalise(sim_t, loose_controls=exchange.loose_controls)

    failures, fixed = compare(real, sim, exchange)
    assert not failures, f"{exchange.name}: the sim drifted from the real CLI\n" + "\n\n".join(failures)
    assert not fixed, f"{exchange.name}: known drift in {fixed} is gone; remove it from the exchange"
    if exchange.drifts:
        pytest.xfail("; ".join(f"{a}: {why}" for a, why in exchange.drifts.items()))


@pytest.mark.timeout(60)
def test_a_drifted_sim_is_caught(api: OfflineAPI) -> None:
    """The comparison has teeth: a sim told to misbehave does not conform."""
    require_claude_bin()
    exchange = next(ex for ex in EXCHANGES if ex.name == "one_turn")
    real = normalise(record_exchange(lambda: real_agent(api), exchange))
    for flags in (("--error", "budget"), ("--tool",)):
        sim = normalise(record_exchange(functools.partial(sim_agent, *flags), exchange))
        failures, _ = compare(real, sim, exchange)
        assert failures, f"sim with {flags} passed as conforming"
