"""The IPC micro-benchmark runs end to end with a few samples and reports every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ipc_micro, stats
from ipc import sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_ipc_micro_smoke(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "ipc_micro.json"  # the directory is created by the benchmark
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.ipc_micro", "--samples", "200", "--json", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    doc = json.loads(out.read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert tuple(rows) == ipc_micro.ROWS
    assert set(ipc_micro.ROWS) == {
        "frame_encode_prompt",
        "frame_decode_prompt",
        "frame_encode_event",
        "frame_decode_event",
        "rq_one_way",
        "rq_round_trip",
        "mailbox_one_way",
        "mailbox_throughput_4k",
        "mailbox_throughput_64k",
    }
    for name, r in rows.items():
        if name.startswith("mailbox_throughput"):
            assert r["unit"] == "MB/s" and r["value"] > 0, r
        else:
            assert r["samples"] == 200, r
            assert 0 < r["p50"] <= r["p99"] <= r["p999"] <= r["max"], r
        assert name in stdout
    assert doc["meta"]["samples"] == 200
    # Nothing of the run is left behind.
    tag = f"bench{proc.pid}-"
    leftovers = [e for d in (sweep.SHM_DIR, sweep.MQUEUE_DIR) if os.path.isdir(d) for e in os.listdir(d) if tag in e]
    assert leftovers == []


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert ipc_micro.percentile(values, 0.5) == 500
    assert ipc_micro.percentile(values, 0.99) == 990
    assert ipc_micro.percentile(values, 0.999) == 999
    assert ipc_micro.percentile([7.0], 0.999) == 7


def test_percentile_has_no_float_rounding_error() -> None:
    # 0.07 * 100 is 7.000000000000001 in floating point: a plain ceil gave the 8th value.
    values = list(range(1, 101))
    assert [stats.percentile(values, q / 100) for q in (7, 14, 28, 55, 56)] == [7, 14, 28, 55, 56]
    assert ipc_micro.percentile is stats.percentile
