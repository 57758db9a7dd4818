"""A remote client process for the fleet tests: submits prompts over NATS, prints JSON lines.

Run as ``python fleet_client.py SPEC`` where SPEC is JSON: ``url``, ``session``,
``kind``, ``prompts`` (list of ``{"text", "request_id"?}``), optional ``clients``
(that many AsyncClients in this process, each submitting every prompt, for the
scale test), ``connect_timeout_s`` and ``permission`` (``allow``/``deny``: an
``on_permission`` handler answered from this process), and ``hold_lease`` (``{"idle_timeout_s": S}``: take a
lease, print ``leased``, then hold it until killed). Lines: ``submitted`` (durably stored), ``event``,
``result``, ``leased``, ``error``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from clients import AsyncClient, TurnstileError


def out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def permission_handler(mode: str | None) -> Any:
    if mode == "allow":
        return lambda req: {"behavior": "allow", "updatedInput": req.get("input", {})}
    if mode == "deny":
        return lambda req: {"behavior": "deny", "message": f"no-from-remote {req.get('tool_name')}"}
    return None


async def one_client(spec: dict[str, Any], index: int) -> None:
    c = AsyncClient(spec["session"], spec["kind"], nats=spec["url"],
                    connect_timeout_s=spec.get("connect_timeout_s", 10.0),
                    on_permission=permission_handler(spec.get("permission")))
    await c.connect()
    try:
        if "hold_lease" in spec:
            async with c.lease(idle_timeout_s=spec["hold_lease"]["idle_timeout_s"], timeout_s=30):
                out({"ev": "leased", "client": index, "client_id": c.client_id})
                await asyncio.Event().wait()  # until killed
        turns = []
        for p in spec["prompts"]:
            t0 = time.monotonic()
            turn = c.prompt(p["text"], request_id=p.get("request_id"), on_preempt=p.get("on_preempt"))
            await turn.submitted()
            out({"ev": "submitted", "client": index, "req": turn.request_id,
                 "ack_ms": round((time.monotonic() - t0) * 1000, 3)})
            turns.append(turn)
        for turn in turns:
            if spec.get("events", True):
                async for ev in turn.events(timeout_s=spec.get("timeout_s", 60.0)):
                    out({"ev": "event", "client": index, "req": turn.request_id, "data": ev})
            res = await turn.result(timeout_s=spec.get("timeout_s", 60.0))
            out({"ev": "result", "client": index, **res.as_dict()})
    finally:
        await c.close()


async def main(spec: dict[str, Any]) -> int:
    try:
        await asyncio.gather(*(one_client(spec, i) for i in range(spec.get("clients", 1))))
    except TurnstileError as exc:
        out({"ev": "error", "type": type(exc).__name__, "message": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
