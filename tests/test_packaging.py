"""The distribution: its name, the wheel's contents (PEP 561 markers), and what `clients` exports."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import clients
from ipc import errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "clients", "ipc")


def test_every_public_error_is_importable_from_clients():
    public = {
        name for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, errors.TurnstileError) and not name.startswith("_")
    }
    assert {"LimitError", "NameSquatted", "TurnstileError", "AgentNotFound"} <= public
    for name in sorted(public):
        assert getattr(clients, name) is getattr(errors, name), name
        assert name in clients.__all__, name
    from clients import LimitError  # the line a bot author writes

    assert LimitError is errors.LimitError


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_is_named_turnstile_broker_and_ships_py_typed(tmp_path):
    # Built from a copy, so the build's egg-info and build/ never land in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    cp = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(src), "-w", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    assert wheel.name.startswith("turnstile_broker-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "Name: turnstile-broker" in zf.read(meta).decode()
        assert "turnstile = broker.cli:main" in zf.read(entry).decode()
    for pkg in PACKAGES:
        assert f"{pkg}/py.typed" in names, sorted(names)
