"""``python -m broker.testing.fake_api``: serve the fake Messages API until SIGTERM or SIGINT.

Prints one JSON line ``{"url": ..., "port": ...}`` when ready.  ``--record
FILE`` appends one JSON line per request received (:meth:`RecordedRequest.to_json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from broker.testing.fake_api.server import OfflineAPI


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: serve until SIGTERM or SIGINT, then exit 0."""
    parser = argparse.ArgumentParser(
        prog="python -m broker.testing.fake_api",
        description="Offline fake Anthropic Messages API (loopback, deterministic).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = ephemeral (default)")
    parser.add_argument("--record", metavar="FILE", help="append one JSON line per request")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)

    got_signal = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only record the signal; the main thread does the shutdown.
        got_signal.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    with contextlib.ExitStack() as stack:
        record = stack.enter_context(open(args.record, "a", encoding="utf-8")) if args.record else None
        api = stack.enter_context(OfflineAPI(args.host, args.port, record_file=record, verbose=args.verbose))
        sys.stdout.write(json.dumps({"url": api.url, "port": api.port}) + "\n")
        sys.stdout.flush()
        while not got_signal.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

