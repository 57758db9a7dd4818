"""The benchmark suite: ``python -m benchmarks [--quick | --smoke] [--only NAME ...] [--out DIR] [--publish]``.

Every scenario runs in this one invocation, one after another, so the ratios
to the floor are taken side by side on the same (noisy) machine. Prints a
table and writes ``results.json`` and PNG plots to the output directory
(``benchmarks/out/``, git-ignored, unless ``--out`` says otherwise). Only
``--publish`` (a full run of every scenario) refreshes the committed copy:
``benchmarks/results/`` and the generated section of ``benchmarks/RESULTS.md``.

Scenarios (in run order): floor, ipc_micro (benchmarks.ipc_micro's rows), preempt, threaded, per_turn,
shared_client, throughput, scale, startup, real_cli, fleet. ``floor`` always runs: every ratio needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: Where runs write (git-ignored): a user's `make bench` leaves the tree clean.
DEFAULT_OUT = HERE / "out"
#: The committed copy RESULTS.md shows, rewritten only by ``--publish``.
PUBLISHED = HERE / "results"


@dataclass(frozen=True)
class Sizes:
    """How many samples each scenario takes (after how many warm-up iterations)."""

    floor_n: int
    floor_warmup: int
    ipc_n: int
    ipc_warmup: int
    preempt_n: int
    preempt_warmup: int
    turn_n: int
    turn_warmup: int
    tput_bytes: int
    tput_huge: int
    tput_reps: int
    tput_clients: int
    scale_points: tuple[int, ...]
    scale_n: int
    scale_warmup: int
    scale_fill: int
    startup_n: int
    startup_warmup: int
    realcli_n: int
    realcli_warmup: int
    shared_rounds: int
    shared_warmup: int
    shared_concurrent: int
    fleet_n: int = 1_000
    fleet_warmup: int = 50
    fleet_clients: int = 200


FULL = Sizes(
    floor_n=20_000, floor_warmup=2_000,
    ipc_n=20_000, ipc_warmup=2_000,
    preempt_n=10_000, preempt_warmup=200,
    turn_n=10_000, turn_warmup=500,
    tput_bytes=16 << 20, tput_huge=8 << 20, tput_reps=3, tput_clients=50,
    scale_points=(2, 10, 50, 200), scale_n=1_000, scale_warmup=50, scale_fill=1_100,
    startup_n=30, startup_warmup=3,
    realcli_n=50, realcli_warmup=3,
    shared_rounds=40, shared_warmup=2, shared_concurrent=50,
)
QUICK = Sizes(
    floor_n=5_000, floor_warmup=500,
    ipc_n=2_000, ipc_warmup=200,
    preempt_n=500, preempt_warmup=50,
    turn_n=1_000, turn_warmup=100,
    tput_bytes=8 << 20, tput_huge=2 << 20, tput_reps=1, tput_clients=50,
    scale_points=(2, 10, 50, 200), scale_n=100, scale_warmup=10, scale_fill=1_100,
    startup_n=5, startup_warmup=1,
    realcli_n=5, realcli_warmup=1,
    shared_rounds=10, shared_warmup=1, shared_concurrent=50,
    fleet_n=200, fleet_warmup=10,
)
SMOKE = Sizes(
    floor_n=200, floor_warmup=20,
    ipc_n=100, ipc_warmup=20,
    preempt_n=20, preempt_warmup=5,
    turn_n=50, turn_warmup=5,
    tput_bytes=1 << 20, tput_huge=256 << 10, tput_reps=1, tput_clients=5,
    scale_points=(2, 10), scale_n=10, scale_warmup=2, scale_fill=20,
    startup_n=2, startup_warmup=0,
    realcli_n=1, realcli_warmup=0,
    shared_rounds=2, shared_warmup=0, shared_concurrent=10,
    fleet_n=10, fleet_warmup=2, fleet_clients=20,
)
MODES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}

SCENARIOS = ("floor", "ipc_micro", "preempt", "threaded", "per_turn", "shared_client", "throughput", "scale", "startup",
             "real_cli", "fleet")


def _runners(sz: Sizes, tmp: str) -> dict[str, Callable[[Any, Callable[[str], None]], None]]:
    from benchmarks import fleet, floor, real_cli, scenarios, shared_client, threaded_baseline

    return {
        "floor": lambda res, p: floor.run(res, sz.floor_n, sz.floor_warmup, tmp),
        "ipc_micro": lambda res, p: floor.ipc_micro(res, sz.ipc_n, sz.ipc_warmup),
        "preempt": lambda res, p: scenarios.preempt(res, sz.preempt_n, sz.preempt_warmup, p),
        "threaded": lambda res, p: threaded_baseline.run(res, sz.preempt_n, sz.preempt_warmup, p),
        "per_turn": lambda res, p: scenarios.per_turn(res, sz.turn_n, sz.turn_warmup, p),
        "shared_client": lambda res, p: shared_client.run(res, sz.shared_rounds, sz.shared_warmup,
                                                          sz.shared_concurrent, p),
        "throughput": lambda res, p: scenarios.throughput(res, sz.tput_bytes, sz.tput_reps, sz.tput_huge,
                                                          sz.tput_clients, p),
        "scale": lambda res, p: scenarios.scale(res, list(sz.scale_points), sz.scale_n, sz.scale_warmup, p,
                                                fill=sz.scale_fill),
        "startup": lambda res, p: scenarios.startup(res, sz.startup_n, sz.startup_warmup, p),
        "real_cli": lambda res, p: real_cli.run(res, sz.realcli_n, sz.realcli_warmup, p),
        "fleet": lambda res, p: fleet.run(res, sz.fleet_n, sz.fleet_warmup, sz.fleet_clients, p),
    }


def out_dir(mode_name: str, given: Path | None) -> Path:
    """Where a run of ``mode_name`` writes: ``given``, else under the ignored ``DEFAULT_OUT``."""
    if given is not None:
        return given
    return DEFAULT_OUT if mode_name == "full" else DEFAULT_OUT / mode_name


def publish(out: Path, plot_files: list[str], generated: str, dest: Path = PUBLISHED,
            results_md: Path = HERE / "RESULTS.md") -> list[Path]:
    """Copy a run's ``results.json`` and plots from ``out`` into ``dest`` and rewrite RESULTS.md's generated part.

    Returns the files written. Stale plots in ``dest`` that this run did not
    make are removed, so RESULTS.md never shows a picture of another run.
    """
    from benchmarks import report

    dest.mkdir(parents=True, exist_ok=True)
    names = ["results.json", *(Path(p).name for p in plot_files)]
    for old in dest.glob("*.png"):
        if old.name not in names:
            old.unlink()
    written = []
    for name in names:
        target = dest / name
        shutil.copyfile(out / name, target)
        written.append(target)
    report.update_results_md(results_md, generated)
    written.append(results_md)
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns 0 unless a scenario failed (a missed target is not a failure)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes: checks every scenario still runs")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="NAME",
                    help=f"run only these scenarios (floor always runs): {', '.join(SCENARIOS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: benchmarks/out, git-ignored; quick/ or smoke/ inside it)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--publish", action="store_true",
                    help="after a full run of every scenario, refresh benchmarks/results/ and RESULTS.md (tracked)")
    args = ap.parse_args(argv)
    if args.publish and (args.quick or args.smoke or args.only or args.no_plots):
        ap.error("--publish needs a full run of every scenario with plots (no --quick, --smoke, --only, --no-plots)")

    # Children run `python -m benchmarks.*`: make the project importable from any cwd.
    root = str(HERE.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import plots, report
    from benchmarks.stats import Results

    mode_name = "quick" if args.quick else "smoke" if args.smoke else "full"
    sz = MODES[mode_name]
    out = out_dir(mode_name, args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SCENARIOS if s == "floor" or not args.only or s in args.only]
    meta: dict[str, Any] = {"mode": mode_name, "scenarios": chosen, "sizes": asdict(sz),
                            "machine": report.machine(), "command": report.command_line()}
    res = Results()
    t_start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"  [{time.monotonic() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="turnstile-bench-") as tmp:
        runners = _runners(sz, tmp)
        for name in chosen:
            progress(f"{name} ...")
            t0 = time.monotonic()
            try:
                runners[name](res, progress)
            except Exception as exc:
                res.errors[name] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
            res.durations_s[name] = round(time.monotonic() - t0, 2)
            progress(f"{name} done in {res.durations_s[name]:.1f} s")
    meta["elapsed_s"] = time.monotonic() - t_start
    meta["machine"]["loadavg_end"] = list(os.getloadavg())

    written = [] if args.no_plots else plots.write(res, out, meta)
    (out / "results.json").write_text(json.dumps({"meta": meta, **res.as_dict()}, indent=2, default=str) + "\n")
    print()
    print(report.terminal(res, meta))
    print(f"\nresults: {out / 'results.json'}" + (f"; plots: {len(written)} PNG files in {out}" if written else ""))
    if args.publish:
        for path in publish(out, written, report.markdown(res, meta, written)):
            print(f"published {path.relative_to(HERE.parent)}")
    return 1 if res.errors and any(not v.startswith("skipped") for v in res.errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
