"""What a new user hits in the first hour with the command line, each checked with real processes.

Install hints, plain `prompt` output around a preemption, exit codes for a
state dir that is a file and for Ctrl-C, help text for every option, the fake CLI's `--help`, the demo's summary off a
terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import click
import pytest

from broker.cli import main
from tests.support import TURNSTILE, published, rec, running, ts, wait_until

ROOT = Path(__file__).resolve().parent.parent
DIST = "turnstile-broker"
SIGINT_MIDFRAME = Path(__file__).with_name("sigint_midframe.py")


@pytest.fixture
def start_ts() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `turnstile ARGS...` (or ``cmd`` ARGS...) in the background; killed if still running, and reaped,
    at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, cmd: Sequence[str] = TURNSTILE) -> subprocess.Popen[str]:
        procs.append(subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, stdin=subprocess.DEVNULL))
        return procs[-1]

    yield start
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.communicate()


# ---------------------------------------------------------------- install lines


def test_missing_agent_names_the_real_distribution(session_name, tmp_path):
    cp = ts("serve", "--session", session_name, "--agent", "claude", "--claude-bin", str(tmp_path / "nope"),
            "--state-dir", str(tmp_path / "state"), timeout_s=20)
    assert cp.returncode == 12, cp.stderr
    assert f"pip install '{DIST}[claude]'" in cp.stderr


def test_no_install_line_names_the_wrong_distribution():
    """`turnstile` on PyPI is another project: every install line names turnstile-broker."""
    wrong = re.compile(r"(?<![\w-])turnstile\[")
    hits = []
    for top in ("README.md", "pyproject.toml", "Makefile", "broker", "clients", "ipc", "tests", "docs", "examples"):
        base = ROOT / top
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in (".py", ".md", ".toml")]
        for path in files:
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if wrong.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


# ---------------------------------------------------------------- plain prompt output


def test_plain_prompt_marks_a_preemption_and_starts_the_rerun_on_a_new_line(broker_factory, session_name, start_ts):
    b = broker_factory()
    w = start_ts("prompt", "--session", session_name, "--kind", "worker", "[sim:turn_ms=4000] long")
    assert w.stdout is not None
    # One byte straight from the pipe (communicate() reads the descriptor, not the text wrapper's buffer):
    # the first attempt's text is on the terminal, so the preemption cuts it.
    head = os.read(w.stdout.fileno(), 1).decode()
    wait_until(running(b, "worker"), what="worker running")
    assert ts("prompt", "--session", session_name, "--kind", "webhook", "hook").returncode == 0
    out, err = w.communicate(timeout=30)
    rc = w.returncode
    assert rc == 0, err
    assert "turnstile: preempted by a webhook; rerunning" in err
    first, rerun = (head + out).split("\n", 1)
    assert first.startswith("sim: ") and "[turnstile:" not in first  # the first attempt, on its own line
    assert rerun.startswith("sim: [turnstile: your previous answer")
    assert out.endswith("\n")


# ---------------------------------------------------------------- exit codes


def test_serve_state_dir_that_is_a_file_exits_13(session_name, tmp_path):
    regular = tmp_path / "notes.md"
    regular.write_text("x")
    cp = ts("serve", "--agent", "sim", "--session", session_name, "--state-dir", str(regular), timeout_s=20)
    assert cp.returncode == 13, cp.stderr
    assert cp.stderr.startswith("turnstile: ") and len(cp.stderr.splitlines()) == 1, cp.stderr
    assert "Not a directory" in cp.stderr


def test_ctrl_c_on_prompt_cancels_and_exits_130(broker_factory, session_name, start_ts):
    b = broker_factory()
    w = start_ts("prompt", "--session", session_name, "--kind", "worker", "[sim:turn_ms=20000] interrupt me")
    wait_until(running(b, "worker"), what="worker running")
    w.send_signal(signal.SIGINT)
    _out, err = w.communicate(timeout=30)
    rc = w.returncode
    assert rc == 130, err
    assert "Aborted!" not in err and "Traceback" not in err and "turnstile: interrupted" in err
    # The turn was cancelled by its request (not left to run for 20 s, nor ended because its
    # client left), and no frame was refused.
    published(b, lambda r: r.counters["results_cancelled"] == 1, what="the cancelled result counted")
    assert rec(b).counters["cancels"] == 1 and rec(b).counters["rejected_frames"] == 0
    assert "130 interrupted (Ctrl-C)" in " ".join(ts("prompt", "--help").stdout.split())


def test_ctrl_c_while_frames_are_being_read_loses_none_and_prints_the_cancelled_result(
    broker_factory, session_name, start_ts
):
    """A SIGINT that lands after reply frames left the mailbox and before they were applied.

    The signal only marks the prompt interrupted; the frames in hand are applied and printed,
    the cancel goes out between frames, and the cancelled result is read and printed.
    """
    b = broker_factory()
    p = start_ts("prompt", "--session", session_name, "--json", "[sim:turn_ms=20000] interrupt me",
                 cmd=[sys.executable, str(SIGINT_MIDFRAME)])
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    taken = [json.loads(line.removeprefix("taken: ")) for line in err.splitlines() if line.startswith("taken: ")]
    assert taken, err
    lines = [json.loads(line) for line in out.splitlines()]
    printed = [line["data"] for line in lines if line["event"] == "agent"]
    assert all(event in printed for event in taken), (taken, printed)
    assert lines[-1]["event"] == "result" and lines[-1]["status"] == "cancelled", lines[-1]
    published(b, lambda r: r.counters["results_cancelled"] == 1, what="the cancelled result counted")


def test_second_ctrl_c_stops_waiting_for_the_cancelled_result(broker_factory, session_name, start_ts):
    # The agent answers the interrupt but sends its interrupted result only 60 s later (and the
    # broker's drain timeout is longer still), so the first Ctrl-C's wait for the result is long.
    b = broker_factory(extra_args=("--drain-timeout-s", "120"))
    w = start_ts("prompt", "--session", session_name, "[sim:turn_ms=20000] [sim:interrupt_ms=60000] interrupt me")
    wait_until(running(b, "worker"), what="worker running")
    w.send_signal(signal.SIGINT)
    published(b, lambda r: r.counters["cancels"] == 1, what="the first Ctrl-C's cancel read by the broker")
    w.send_signal(signal.SIGINT)
    _out, err = w.communicate(timeout=30)
    assert w.returncode == 130, err
    assert "Traceback" not in err and "turnstile: interrupted" in err
    assert "no cancelled result" not in err, err  # it stopped at the second Ctrl-C, not at its own bound


# ---------------------------------------------------------------- help


def _options() -> list[tuple[str, click.Option]]:
    assert isinstance(main, click.Group)
    return [
        (name, p) for name, cmd in sorted(main.commands.items()) for p in cmd.params if isinstance(p, click.Option)
    ]


@pytest.mark.parametrize(("cmd", "opt"), [pytest.param(c, o, id=f"{c}-{o.name}") for c, o in _options()])
def test_every_option_has_help(cmd, opt):
    assert opt.help or opt.hidden, f"turnstile {cmd} {opt.opts[0]} has no help text"


@pytest.mark.parametrize("cmd", ["status", "cancel", "sweep"])
def test_exit_code_2_of_commands_without_a_prompt(cmd):
    out = ts(cmd, "--help").stdout
    (line,) = [s for s in out.splitlines() if s.strip().startswith("2 ")]
    assert "usage error" in line and "prompt" not in line


# ---------------------------------------------------------------- the test kit and the demo


def test_fake_cli_help_prints_usage_and_exits_0():
    cp = subprocess.run([sys.executable, "-m", "broker.testing.fake_cli", "--help"], capture_output=True, text=True,
                        timeout=30, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("usage: ") and "[sim:turn_ms=N]" in cp.stdout


def test_demo_summary_is_not_cut_off_a_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    cp = subprocess.run([*TURNSTILE, "demo", "--plain", "--worker-ms", "600", "--webhooks", "1"],
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                        env={**env, "TMPDIR": str(tmp_path)})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "…" not in cp.stdout, cp.stdout
    assert re.search(r"webhook-1\s.*\sok\s", cp.stdout), cp.stdout
