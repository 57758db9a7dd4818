"""``turnstile ARGS`` with a SIGINT raised while reply frames are off the ring but not yet applied.

Run as ``python tests/sigint_midframe.py prompt ...`` (the ``turnstile`` arguments).
The first mailbox read that takes an agent event raises SIGINT in this process
right after the frames left the ring and before the client applies them: the
place where a Ctrl-C landing part-way through a reply frame used to cost
frames (and with them, under load, the cancelled result). Each event taken in
that read is written to stderr as ``taken: <json>``, so a test can check that
the command still printed it.
"""

from __future__ import annotations

import signal
import sys

from broker.cli import main
from ipc import frames, mailbox
from ipc.errors import ProtocolError

_read_frames = mailbox.MailboxReader.read_frames
_armed = True


def _events(data: list[bytes]) -> list[bytes]:
    out = []
    for raw in data:
        try:
            frame = frames.decode_reply(raw)
        except ProtocolError:
            continue
        if isinstance(frame, frames.Event):
            out.append(frame.data)
    return out


def _read_then_interrupt(self: mailbox.MailboxReader) -> list[bytes]:
    global _armed
    data = _read_frames(self)
    taken = _events(data) if _armed else []
    if taken:
        _armed = False
        for event in taken:
            sys.stderr.write(f"taken: {event.decode()}\n")
        sys.stderr.flush()
        signal.raise_signal(signal.SIGINT)
    return data


if __name__ == "__main__":
    mailbox.MailboxReader.read_frames = _read_then_interrupt  # type: ignore[method-assign]
    main(sys.argv[1:], prog_name="turnstile")
