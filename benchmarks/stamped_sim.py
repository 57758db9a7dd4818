"""The simulated agent, plus one stamp the benchmarks need: when each ``result`` line was written.

The sim's ``--stamp-file`` records when each stdin line was read. To time the
handoff (the preempted turn's ``result`` written → the next user message read)
and the return path of a turn (``result`` written → the client holding its
TurnResult), this subclass appends ``<perf_counter_ns>\\tresult_written\\t<uuid>``
for each ``result`` line, the time being taken right before the line's
``write`` to the stdout pipe (its bytes are encoded by then). Stamped after the
write instead, the time would often be late: the reader it wakes can take the
CPU from the sim before the sim reads the clock. The stamp itself is written
after the result is out, so it delays nothing that is measured.

Run as ``python -m benchmarks.stamped_sim`` with the sim's arguments. The
benchmarks start the broker with ``--agent claude --claude-bin WRAPPER``, where
WRAPPER is a two-line shell script that execs this module: the broker then
drives it exactly as it drives the sim.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from broker.testing.fake_cli import cli as _sim
from broker.testing.fake_cli.argv import UsageError, parse_argv


class StampedSim(_sim.FakeCLI):
    """:class:`broker.testing.fake_cli.cli.FakeCLI` that also stamps each ``result`` it writes."""

    _result_t_ns = 0
    _in_result = False

    def _write(self, data: bytes) -> None:
        if self._in_result and not self._result_t_ns:
            self._result_t_ns = time.perf_counter_ns()
        super()._write(data)

    def _emit_result(self, turn: Any, **kw: Any) -> None:
        self._in_result, self._result_t_ns = True, 0
        try:
            super()._emit_result(turn, **kw)
        finally:
            self._in_result = False
        uuid = turn.uuids[0] if turn is not None and turn.uuids else None
        self._stamp(self._result_t_ns, "result_written", uuid)


def main() -> None:
    """Entry point: parse the sim's argv and serve stdin."""
    try:
        opts = parse_argv(sys.argv[1:])
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(1)
    StampedSim(opts).run()


if __name__ == "__main__":
    main()
