"""The systemd units shipped in docs/systemd/ parse, carry the settings docs/deploy.md promises, and match it."""

from __future__ import annotations

import configparser
import getpass
import grp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
UNITS = DOCS / "systemd"
BROKER_UNIT = UNITS / "turnstile@.service"
METRICS_UNIT = UNITS / "turnstile-metrics.service"
TURNSTILE = Path(sys.executable).parent / "turnstile"

REQUIRED = {
    BROKER_UNIT: {
        "Service": {"ExecStart", "KillMode", "LimitMSGQUEUE", "LimitNOFILE", "Restart", "RemoveIPC", "User"},
        "Install": {"WantedBy"},
    },
    METRICS_UNIT: {"Service": {"ExecStart", "Restart", "User"}, "Install": {"WantedBy"}},
}


def _parse(path: Path) -> configparser.ConfigParser:
    # systemd allows repeated keys; configparser's strict mode would refuse them.
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive in systemd
    cp.read_string(path.read_text())
    return cp


@pytest.mark.parametrize("unit", sorted(REQUIRED), ids=lambda p: p.name)
def test_unit_has_the_required_keys(unit: Path) -> None:
    cp = _parse(unit)
    for section, keys in REQUIRED[unit].items():
        assert cp.has_section(section), f"{unit.name}: no [{section}]"
        missing = keys - set(cp[section])
        assert not missing, f"{unit.name} [{section}] lacks {sorted(missing)}"


def test_broker_unit_settings() -> None:
    svc = _parse(BROKER_UNIT)["Service"]
    assert svc["KillMode"] == "mixed"
    assert svc["Restart"] == "on-failure"
    assert svc["RemoveIPC"] == "no"
    exec_start = svc["ExecStart"].split()
    assert exec_start[1:4] == ["serve", "--session", "%i"]
    assert re.fullmatch(r"\d+[KMG]?", svc["LimitMSGQUEUE"])
    assert int(svc["LimitNOFILE"]) >= 1024


def test_metrics_unit_runs_the_exporter() -> None:
    exec_start = _parse(METRICS_UNIT)["Service"]["ExecStart"].split()
    assert exec_start[1] == "metrics" and "--port" in exec_start


def _blocks(markdown: str) -> list[str]:
    return re.findall(r"```ini\n(.*?)```", markdown, flags=re.S)


def _settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_deploy_md_shows_the_shipped_units() -> None:
    """The unit text in docs/deploy.md is the shipped files' (comments aside): the two cannot drift."""
    shown = [_settings(b) for b in _blocks((DOCS / "deploy.md").read_text())]
    for unit in REQUIRED:
        assert _settings(unit.read_text()) in shown, f"docs/deploy.md does not show {unit.name} as shipped"


def _localised(unit: Path, dest: Path) -> None:
    """The unit with this machine's turnstile and user, so verify can check the executable and user exist."""
    text = unit.read_text().replace("/opt/turnstile/.venv/bin/turnstile", str(TURNSTILE))
    text = re.sub(r"(?m)^User=.*$", f"User={getpass.getuser()}", text)
    text = re.sub(r"(?m)^Group=.*$", f"Group={grp.getgrgid(os.getgid()).gr_name}", text)
    dest.write_text(text)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", sorted(REQUIRED), ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    # A template is verified through an instance; unknown keys and bad values are only
    # warnings (exit 0), so any line naming our file fails the test too.
    name = unit.name.replace("@.", "@t1.")
    dest = tmp_path / name
    _localised(unit, dest)
    if "@" in unit.name:
        _localised(unit, tmp_path / unit.name)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(dest)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name.split("@")[0] in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr
