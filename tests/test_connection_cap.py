"""One process cannot take every connection (issue 13, item 9).

Each connection costs a POSIX queue of the user's budget; a process that opened
252 of them once left everyone else with ``LimitError``. The broker caps the
connections one process holds (``serve --max-clients-per-process``): the one
over the cap gets a typed ``too_many_connections`` error at once, while other
processes keep being served.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from broker.testing.launcher import BrokerProcess
from clients import Client
from tests.support import rec, wait_until

CAP = 3

pytestmark = pytest.mark.timeout(90)

OTHER_PROCESS = """
import json, sys
from clients import Client
with Client(sys.argv[1], "webhook") as c:
    r = c.prompt("from another process").result(timeout_s=30)
    print(json.dumps({"status": r.status, "error_code": r.error_code}), flush=True)
"""


def test_connections_over_the_per_process_cap_are_refused_typed_and_at_once(
    broker_factory: Callable[..., BrokerProcess], spawn_client: Callable[..., subprocess.Popen[str]],
) -> None:
    b = broker_factory(extra_args=("--max-clients-per-process", str(CAP)))
    held = [Client(b.session, "worker") for _ in range(CAP)]
    try:
        wait_until(lambda: rec(b).clients == CAP, 20, f"{CAP} clients connected")
        assert held[0].prompt("within the cap").result(timeout_s=30).status == "ok"
        with Client(b.session, "webhook") as extra:
            t0 = time.monotonic()
            res = extra.prompt("over the cap").result(timeout_s=30)
            waited_s = time.monotonic() - t0
        assert (res.status, res.error_code) == ("error", "too_many_connections"), res
        assert "--max-clients-per-process" in (res.error or "")
        assert waited_s < 10, f"the refusal took {waited_s:.1f} s: it must come at once, not at a timeout"
        assert rec(b).clients == CAP
        # Another process is not affected by this one's connections.
        p = spawn_client(OTHER_PROCESS, b.session)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"status": "ok", "error_code": None}
        # A connection freed is one the process may use again.
        held.pop().close()
        wait_until(lambda: rec(b).clients == CAP - 1, 20, "the closed client to be gone")
        with Client(b.session, "webhook") as again:
            assert again.prompt("back within the cap").result(timeout_s=30).status == "ok"
    finally:
        for c in held:
            c.close()
