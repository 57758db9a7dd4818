"""README's Python examples run as written, against a real broker with the simulated agent.

Each ```python block is a script of its own. The only change made to it is the
session name (the README says "home"; the test's session is unique). The sim
asks ``can_use_tool`` for a Bash ``echo`` on every turn (``--permission``), so
the permission handler example really decides.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clients import Client
from ipc import state
from tests.realcli import require_claude_bin

ROOT = Path(__file__).resolve().parent.parent
#: The NATS URL README's remote-client examples use; the test points it at its own server.
FLEET_URL = "nats://127.0.0.1:4222"
_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)


def python_blocks() -> list[str]:
    """The README's Python code blocks, dedented (a block in a list item is indented)."""
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(m.group(2)) for m in _BLOCK.finditer(text)]


def test_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert any("on_permission" in b for b in blocks)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", range(len(python_blocks())))
def test_readme_python_block_runs(n, broker_factory, session_name, request):
    code = python_blocks()[n]
    assert 'session="home"' in code, "every example names its session, so the test can point it at its own"
    broker_factory(agent_args=("--permission",))
    code = code.replace('session="home"', f'session="{session_name}"')
    if FLEET_URL in code:
        # A remote-client example: a real nats-server and a gateway for the test's session.
        server = request.getfixturevalue("nats_factory")()
        request.getfixturevalue("gateway_factory")(server.url)
        code = code.replace(FLEET_URL, server.url)
    cp = subprocess.run([sys.executable, "-c", code],
                        capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"README block {n}:\n{code}\n{cp.stdout}\n{cp.stderr}"
    if "on_permission" in code:
        assert "[permission: allowed]" in cp.stdout, cp.stdout


def offline_recipe() -> str:
    """README's shell recipe that runs the real CLI offline."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S) if "broker.testing.fake_api" in b]
    return block


@pytest.mark.timeout(120)
def test_readme_offline_recipe_serves_and_leaves_home_alone(session_name, tmp_path):
    """The recipe, run by bash: a real CLI answers through it, on a free port, and the user's HOME stays empty."""
    require_claude_bin()
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "CLAUDE"))}
    env.update(HOME=str(user_home), TMPDIR=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    script = offline_recipe().replace("--session home", f"--session {session_name}")
    sh = subprocess.Popen(["bash", "-euc", script], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        with Client(session=session_name, kind="webhook", connect_timeout_s=60) as c:
            res = c.prompt("hello offline").result(timeout_s=60)
        assert res.ok, res
        block = state.StateBlock.open(session_name)
        broker_pid = block.read_record().broker_pid
        block.close()
        os.kill(broker_pid, signal.SIGTERM)  # the recipe's serve, a child of our bash: it stops, the recipe cleans up
        _out, err = sh.communicate(timeout=30)
        assert sh.returncode == 0, err
    finally:
        # The group this test started: whatever of the recipe is left (bash, its background fake API).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sh.pid, signal.SIGKILL)
        sh.communicate()
    assert list(user_home.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["user-home"]  # the recipe's temporary HOME is gone
