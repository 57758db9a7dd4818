"""A background worker on the shared agent session.

It runs its tasks one after another as ``Client(kind="worker")`` turns. A
webhook preempts a worker turn; by default the broker reruns it after the
webhooks (``on_preempt="requeue"``), so a tool the agent ran in the preempted
attempt may run again: keep worker tools idempotent, or pass
``on_preempt="return"`` and decide yourself.

    python examples/worker.py --session demo "refactor the billing module" "update the changelog"

Prints one JSON line per event it cares about: ``started``, ``preempted``, ``result``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from clients import Client, TurnstileError


def emit(**obj: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps(obj), flush=True)


def run(session: str, tasks: list[str]) -> int:
    """Run every task; 0 when all completed."""
    failed = 0
    with Client(session, kind="worker", label="example-worker") as client:
        for task in tasks:
            turn = client.prompt(task)
            emit(ev="submitted", request_id=turn.request_id, task=task)
            for event in turn:
                if event.get("type") == "system" and event.get("subtype") == "init":
                    emit(ev="started", turn=turn.turn_id)
                elif event.get("type") == "turnstile" and event.get("subtype") == "preempted":
                    emit(ev="preempted", turn=event.get("turn"))
            result = turn.result()
            emit(ev="result", status=result.status, text=result.text, turn=result.turn,
                 preemptions=result.preemptions, turn_ms=result.turn_ms)
            failed += not result.ok
    return 1 if failed else 0


def main() -> None:
    """Parse arguments and run the tasks."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--session", default="default")
    p.add_argument("tasks", nargs="+")
    args = p.parse_args()
    # SIGTERM leaves like Ctrl-C: the client says goodbye and the broker drops its queued work.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sys.exit(run(args.session, args.tasks))
    except TurnstileError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
