"""A webhook server that asks the shared agent session, with aiohttp.

Every handler uses one ``AsyncClient(kind="webhook")``, opened when the app
starts and closed when it stops, the way a web app shares one database or
HTTP client. Webhook turns preempt a running worker turn; webhooks queue first
in, first out among themselves.

    python examples/webhook_server.py --session demo --port 8080
    curl -s localhost:8080/webhook -d '{"event": "push", "text": "summarise the push to main"}'

It prints one JSON line once it listens: ``{"url": "http://127.0.0.1:PORT"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from aiohttp import web

from clients import AsyncClient, TurnstileError

CLIENT: web.AppKey[AsyncClient] = web.AppKey("turnstile_client", AsyncClient)


async def handle_webhook(request: web.Request) -> web.Response:
    """POST /webhook with ``{"event": ..., "text": ...}``: one turn, answered with the agent's reply."""
    try:
        body: dict[str, Any] = await request.json()
        text = str(body["text"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": 'send a JSON object with a "text" field'}, status=400)
    event = str(body.get("event", "webhook"))
    client = request.app[CLIENT]
    try:
        result = await client.prompt(f"[{event}] {text}").result(timeout_s=120)
    except TurnstileError as exc:
        # Broker gone for longer than the client's reconnect window, or no answer in time.
        return web.json_response({"error": str(exc), "code": exc.code}, status=503)
    return web.json_response({
        "status": result.status,
        "text": result.text,
        "turn": result.turn,
        "queued_ms": result.queued_ms,
        "turn_ms": result.turn_ms,
        "error": result.error,
    }, status=200 if result.ok else 502)


def make_app(session: str) -> web.Application:
    """The app: one shared webhook client for its whole life."""
    app = web.Application()

    async def client_ctx(app: web.Application) -> Any:
        async with AsyncClient(session, kind="webhook", label="webhook-server") as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(client_ctx)
    app.router.add_post("/webhook", handle_webhook)
    return app


async def serve(session: str, host: str, port: int) -> None:
    """Run until cancelled (Ctrl-C or SIGTERM)."""
    runner = web.AppRunner(make_app(session))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(json.dumps({"url": f"http://{host}:{bound}"}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    """Parse arguments and serve."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--session", default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = p.parse_args()
    try:
        asyncio.run(serve(args.session, args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
