"""Helpers for the ops tests (status listing, metrics, examples): background commands that are always reaped."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator

from tests.support import ClientProc


@contextlib.contextmanager
def processes() -> Iterator[Callable[[list[str]], ClientProc]]:
    """Start commands (argv) with their JSON stdout read by :class:`ClientProc`; SIGKILLed and reaped on exit."""
    started: list[ClientProc] = []

    def start(argv: list[str]) -> ClientProc:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        started.append(ClientProc(proc))
        return started[-1]

    try:
        yield start
    finally:
        for cp in started:
            if cp.proc.poll() is None:
                cp.kill()
            for f in (cp.proc.stdout, cp.proc.stderr):
                if f is not None:
                    f.close()
