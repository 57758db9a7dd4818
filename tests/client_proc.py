"""A turnstile client as a separate process, driven by the integration tests.

Run as ``python tests/client_proc.py SPEC`` where SPEC is a JSON object. It
prints one JSON line per thing it saw, each stamped ``t`` (its
``time.monotonic()``, comparable across processes), and reads lines on stdin
where the spec says to wait. ``tests.support.ClientProc`` reads its output;
the ``client`` fixture (tests/conftest.py) starts it.

SPEC keys (all optional but ``session`` and ``kind``):

- ``role``: ``"client"`` (default: a ``clients.Client``) or ``"slow_reader"``
  (a bare connection with a small mailbox that stops reading; see below).
- ``prompts``: ``[{text, model?, on_preempt?, resume_prompt?, cancel_after_event?, timeout_s?}]``,
  run one after another.
- ``lease`` (bool), ``lease_idle_s``: run the prompts inside a lease;
  ``lease_go``: wait for a stdin line once the lease is granted;
  ``hold_lease``: wait for a stdin line before releasing it.
- ``go``: wait for a stdin line before submitting anything.
- ``then``: prompts run after a stdin line, once the rest is done.
- ``linger``: wait for stdin EOF before leaving.
- ``permission``: ``"allow"`` or ``"deny"`` every ``can_use_tool`` request.
- ``hook``: ``"continue"``, ``"block"`` or ``"raise"`` on every ``hook_callback``
  request (each request is printed as ``hook`` first).
- ``connect_timeout_s``, ``reconnect_timeout_s``, ``send_timeout_s`` (the
  bounded wait of a send to a full queue).
- ``fill``, ``fill_text``: submit up to ``fill`` prompts ``"<fill_text> fill-<i>"``
  until ``QueueFull``, then wait for their results.
- slow reader: ``capacity`` (mailbox bytes), ``text`` (submitted at once),
  ``late_text`` (submitted after the broker gave up on it).

Output lines (``ev``): ``connected``, ``submitted`` (req, text), ``event``
(req, data), ``cancel_sent``, ``result`` (req, the ``TurnResult`` fields; with
``handler_error`` when ``result()`` raised ``HandlerError``), ``hook`` (request),
``queue_full``, ``lease_granted``, ``lease_idle``, ``lease_released``,
``exit``; the slow reader prints ``too_slow`` or ``never_failed``, and
``late_sent``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from clients import Client, HandlerError, QueueFull
from clients.core import Connection
from ipc.errors import ClientTooSlow

Spec = dict[str, Any]


def out(**obj: Any) -> None:
    """Print one stamped JSON line and flush it (the test reads it at once)."""
    obj["t"] = time.monotonic()
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _permission(spec: Spec) -> Any:
    if spec.get("permission") == "allow":
        return lambda req: {"behavior": "allow", "updatedInput": req.get("input", {})}
    if spec.get("permission") == "deny":
        return lambda req: {"behavior": "deny", "message": "no-from-test"}
    return None


def _hook(spec: Spec) -> Any:
    answer = spec.get("hook")
    if answer is None:
        return None

    def on_hook(req: dict[str, Any]) -> dict[str, Any]:
        out(ev="hook", request=req)
        if answer == "raise":
            raise RuntimeError("hook-bug-from-test")
        if answer == "block":
            return {"decision": "block", "reason": "no-hook-from-test"}
        return {}

    return on_hook


def submit(c: Client, p: Spec) -> Any:
    """Submit one prompt; print ``submitted``."""
    turn = c.prompt(p["text"], model=p.get("model"), on_preempt=p.get("on_preempt"),
                    resume_prompt=p.get("resume_prompt"))
    out(ev="submitted", req=turn.request_id, text=p["text"])
    return turn


def finish(turn: Any, p: Spec) -> None:
    """Print every event of ``turn`` (cancelling after the n-th if asked), then its result."""
    for n, e in enumerate(turn.events(timeout_s=p.get("timeout_s", 60)), start=1):
        out(ev="event", req=turn.request_id, data=e)
        if p.get("cancel_after_event") == n:
            turn.cancel()
            out(ev="cancel_sent", req=turn.request_id)
    try:
        r = turn.result(timeout_s=p.get("timeout_s", 60))
    except HandlerError as exc:
        out(ev="result", req=turn.request_id, handler_error=str(exc), **exc.result.as_dict())
        return
    out(ev="result", req=turn.request_id, **r.as_dict())


def _fill(c: Client, spec: Spec) -> None:
    turns = []
    for i in range(spec["fill"]):
        t0 = time.monotonic()
        try:
            turns.append(submit(c, {"text": f"{spec['fill_text']} fill-{i}"}))
        except QueueFull as exc:
            out(ev="queue_full", waited_s=time.monotonic() - t0, error=type(exc).__name__, code=exc.code,
                message=str(exc))
            break
    for t in turns:
        finish(t, {})


def _run(c: Client, spec: Spec) -> None:
    if spec.get("fill"):
        _fill(c, spec)
        return
    for p in spec.get("prompts", []):
        finish(submit(c, p), p)


def run_client(spec: Spec) -> None:
    """The ordinary client: connect, (lease,) run the prompts, then what ``then``/``linger`` ask."""
    with Client(spec["session"], spec["kind"], connect_timeout_s=spec.get("connect_timeout_s", 15),
                reconnect_timeout_s=spec.get("reconnect_timeout_s", 30), on_permission=_permission(spec),
                on_hook=_hook(spec)) as c:
        if "send_timeout_s" in spec:
            c._conn.send_timeout_s = spec["send_timeout_s"]  # the bounded wait of a send to a full queue
        out(ev="connected", client=c.client_id, pid=os.getpid(), incarnation=c.incarnation)
        if spec.get("go"):
            sys.stdin.readline()
        if spec.get("lease"):
            with c.lease(idle_timeout_s=spec.get("lease_idle_s")):
                out(ev="lease_granted")
                if spec.get("lease_go"):
                    sys.stdin.readline()
                _run(c, spec)
                out(ev="lease_idle")
                if spec.get("hold_lease"):
                    sys.stdin.readline()
            out(ev="lease_released")
        else:
            _run(c, spec)
        if spec.get("then"):
            sys.stdin.readline()
            for p in spec["then"]:
                finish(submit(c, p), p)
        if spec.get("linger"):
            sys.stdin.read()
    out(ev="exit")


def run_slow_reader(spec: Spec) -> None:
    """Submit one prompt through a small mailbox, then read nothing until a stdin line says so."""
    conn = Connection(spec["session"], spec["kind"], mailbox_capacity=spec["capacity"])
    deadline = time.monotonic() + 15
    while not conn.try_attach():
        assert time.monotonic() < deadline, "no broker"
        time.sleep(0.01)  # polling for the broker to appear (bounded by the deadline)
    out(ev="connected", client=conn.client_id)
    frame = conn.prompt_frame(spec["text"], model=None, on_preempt=None, resume_prompt=None, request_id=None)
    conn.submit(frame)
    out(ev="submitted", req=frame.req)
    sys.stdin.readline()  # stop reading the mailbox until the test says so
    frames_read = 0
    try:
        for _ in range(10_000):
            frames_read += conn.drain_mailbox()
        out(ev="never_failed", frames=frames_read)
    except ClientTooSlow as exc:
        out(ev="too_slow", frames=frames_read, error=type(exc).__name__, code=exc.code)
    # A frame sent after the broker gave up on us must not be served.
    late = conn.prompt_frame(spec["late_text"], model=None, on_preempt=None, resume_prompt=None, request_id=None)
    conn.submit(late)
    out(ev="late_sent", req=late.req)
    sys.stdin.readline()


def main(argv: list[str]) -> None:
    """Run the role the JSON spec in ``argv[1]`` names."""
    spec: Spec = json.loads(argv[1])
    if spec.get("role", "client") == "slow_reader":
        run_slow_reader(spec)
    else:
        run_client(spec)


if __name__ == "__main__":
    main(sys.argv)
