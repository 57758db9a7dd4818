"""examples/ run for real: a broker (sim agent), the worker, the aiohttp webhook server, webhooks posted.

So the examples cannot rot: the webhooks get their answers while the worker's
long turn is preempted, and the worker's turn still finishes afterwards.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.testing.launcher import BrokerProcess
from tests.support import ClientProc, processes, running, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def example() -> Iterator[Callable[..., ClientProc]]:
    """Start an example script as its own process; SIGKILLed and reaped at teardown."""
    with processes() as start:
        yield lambda script, *args: start([sys.executable, str(EXAMPLES / script), *args])


async def _post_all(url: str, texts: list[str]) -> list[tuple[int, dict[str, Any]]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def post(text: str) -> tuple[int, dict[str, Any]]:
            async with http.post(f"{url}/webhook", json={"event": "push", "text": text}) as resp:
                return resp.status, await resp.json()

        return list(await asyncio.gather(*(post(t) for t in texts)))


def test_webhook_server_and_worker(
    broker_factory: Callable[..., BrokerProcess], session_name: str, example: Callable[..., ClientProc]
) -> None:
    b = broker_factory()
    server = example("webhook_server.py", "--session", session_name, "--port", "0")
    url = server.wait_for(lambda o: "url" in o, timeout_s=30)["url"]
    worker = example("worker.py", "--session", session_name, "[sim:turn_ms=2500] nightly refactor")
    worker.ev("submitted")
    wait_until(running(b, "worker"), what="the worker's turn running")

    texts = [f"summarise push {i}" for i in range(3)]
    answers = asyncio.run(_post_all(url, texts))

    for text, (code, body) in zip(texts, answers, strict=True):
        assert code == 200, body
        assert body["status"] == "ok" and text in body["text"], body
    worker.ev("preempted")
    result = worker.ev("result", timeout_s=30)
    assert result["status"] == "ok" and "nightly refactor" in result["text"], result
    assert result["preemptions"] >= 1, result
    assert worker.finish() == 0, worker.stderr
    # The worker's rerun started after every webhook's turn: its turn id is the highest.
    assert result["turn"] > max(body["turn"] for _, body in answers), (result, answers)
    bad = server.stderr.strip()
    assert "Traceback" not in bad, bad


def test_webhook_server_refuses_a_malformed_body(
    broker_factory: Callable[..., BrokerProcess], session_name: str, example: Callable[..., ClientProc]
) -> None:
    broker_factory()
    server = example("webhook_server.py", "--session", session_name, "--port", "0")
    url = server.wait_for(lambda o: "url" in o, timeout_s=30)["url"]

    async def post_raw() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.post(f"{url}/webhook", data=b"not json") as resp:
            return resp.status, json.loads(await resp.text())

    code, body = asyncio.run(post_raw())
    assert code == 400 and "text" in body["error"]
