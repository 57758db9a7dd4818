"""Exhaustive exploration of the scheduler over a bounded event alphabet.

Breadth first over every interleaving of the events in
:func:`tests.sched_model.small_alphabet` and, separately and less deep,
:func:`tests.sched_model.starts_alphabet` (failed and mute agent starts,
clients taking turns), or with ``TURNSTILE_EXPLORE=large`` ``large_alphabet``
(a third webhook, more cancels) and ``large_starts_alphabet`` (both in one): the clients' scripted actions, a plausible
agent's output, the implausible lines it must ignore, and a ``Tick`` to the
next deadline. States are de-duplicated by a canonical digest of the
scheduler's state plus the tracker's (ids and times made relative; timing
fields that no decision depends on dropped). Every transition runs
``Scheduler.check()`` and every rule the tracker knows; every state where
nothing is pending on the agent's or the clock's side is checked for the
terminal-reply rule.

A violation fails with the event path that reaches it, ready to paste into a
unit test.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests import sched_model as m

#: (alphabet, depth bound) runs per mode. The default alphabet's bound is today's; the starts
#: alphabet branches widely (each depth costs ~2x), so it stops at 8 and adds about half the
#: default's time. ``make verify`` runs the large alphabet to depth 10, as before the failed
#: and mute starts were modelled, and the large alphabet with those starts added to depth 8:
#: that one holds about four times as many states per depth (757,083 at depth 8), so depth 10
#: would take several hours on the 2-core machine, and ``make verify`` must fit in its hour.
MODES: dict[str, list[tuple[Callable[[], m.Alphabet], int]]] = {
    "default": [(m.small_alphabet, 13), (m.starts_alphabet, 8)],
    "large": [(m.large_alphabet, 10), (m.large_starts_alphabet, 8)],
}


@dataclass
class Stats:
    """What one exploration covered."""

    states: int = 0
    transitions: int = 0
    settled: int = 0
    depth: int = 0
    frontier_left: int = 0
    seconds: float = 0.0


#: The event labels leading to a state, newest first, sharing their tails.
Trail = tuple[str, "Trail"] | None


def _path(node: Trail) -> list[str]:
    labels: list[str] = []
    while node is not None:
        label, node = node
        labels.append(label)
    return labels[::-1]


#: Seconds between progress lines inside one depth (a ``large`` depth can take an hour).
PROGRESS_EVERY_S = 60.0


def _report(line: str) -> None:
    # stderr, flushed: ``make verify`` runs with -s, and a run cut short must still say how far it got.
    print(f"[explore {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def explore(alphabet: m.Alphabet, max_depth: int, progress: bool = False) -> Stats:
    """Visit every state reachable in at most ``max_depth`` events; raise on the first broken rule.

    With ``progress``, print a line after every depth and every :data:`PROGRESS_EVERY_S` within one.
    """
    t0 = time.perf_counter()
    next_report = t0 + PROGRESS_EVERY_S
    root = alphabet.world()
    seen = {hash(root.key())}
    frontier: list[tuple[bytes, Trail]] = [(pickle.dumps(root, pickle.HIGHEST_PROTOCOL), None)]
    st = Stats(states=1)
    for depth in range(1, max_depth + 1):
        nxt: list[tuple[bytes, Trail]] = []
        for done, (blob, path) in enumerate(frontier):
            if progress and time.perf_counter() >= next_report:
                next_report = time.perf_counter() + PROGRESS_EVERY_S
                _report(f"depth {depth}: {done}/{len(frontier)} parents expanded, {len(seen)} states, "
                        f"{st.transitions} transitions, {st.settled} quiescent, no rule broken, "
                        f"{time.perf_counter() - t0:.0f} s")
            parent = pickle.loads(blob)
            moves = parent.enabled(alphabet)
            # Lines that must be ignored go first, on the parent itself: World.step checks
            # that each leaves the state as it was (or fails the run), so no copy is needed.
            moves.sort(key=lambda mv: not mv.free)
            for i, (label, ev, budget, free) in enumerate(moves):
                # The last successor may consume the parent itself: one unpickling saved per state.
                w = parent if free or i == len(moves) - 1 else pickle.loads(blob)
                st.transitions += 1
                try:
                    w.fire(label, ev, budget)
                except AssertionError as exc:  # InvariantBroken or SchedulerBug
                    trail = "\n    ".join([*_path(path), label])
                    raise AssertionError(f"{exc}\n  path ({depth} events):\n    {trail}") from None
                if free:
                    continue
                k = hash(w.key())
                if k in seen:
                    continue
                seen.add(k)
                if w.settled():
                    st.settled += 1
                    try:
                        w.tracker.check_settled()
                    except AssertionError as exc:
                        trail = "\n    ".join([*_path(path), label])
                        raise AssertionError(f"at quiescence: {exc}\n  path:\n    {trail}") from None
                if depth < max_depth:
                    nxt.append((pickle.dumps(w, pickle.HIGHEST_PROTOCOL), (label, path)))
        st.depth = depth
        st.states = len(seen)
        if progress:
            _report(f"depth {depth} done: {st.states} states, {st.transitions} transitions, {st.settled} quiescent, "
                    f"next frontier {len(nxt)}, no rule broken, {time.perf_counter() - t0:.0f} s")
        frontier = nxt
        if not frontier:
            break
    st.frontier_left = len(frontier)
    st.seconds = round(time.perf_counter() - t0, 1)
    return st


MODE = os.environ.get("TURNSTILE_EXPLORE", "default")


# The marker wins over --timeout on the command line, so the large bound gets its own.
@pytest.mark.timeout(3600 if MODE == "large" else 600)
@pytest.mark.parametrize("run", range(len(MODES[MODE])), ids=lambda i: MODES[MODE][i][0].__name__)
def test_explore_every_interleaving(run: int, record_property: Callable[[str, object], None]) -> None:
    make_alphabet, depth = MODES[MODE][run]
    alphabet = make_alphabet()
    st = explore(alphabet, depth, progress=MODE == "large" or bool(os.environ.get("TURNSTILE_EXPLORE_PROGRESS")))
    line = (f"explored {st.states} states ({st.transitions} transitions, {st.settled} quiescent) "
            f"of alphabet {alphabet.name!r} to depth {st.depth} in {st.seconds} s")
    print("\n" + line)
    for name in ("states", "transitions", "settled", "depth", "seconds"):
        record_property(f"explore_{name}", getattr(st, name))
    assert st.settled > 0, "no quiescent state reached: the bound is too small to check the terminal-reply rule"
