"""Profile the broker process while a scenario loads it: ``python -m benchmarks.profile_broker [preempt|perturn|tput]``.

Samples the broker with py-spy (``pip install py-spy`` into the venv; it is
not a project dependency) and prints the functions with the largest shares
of the broker's busy samples, inclusive and self. Idle time (waiting in
epoll) is not sampled, so shares are of the CPU time the broker spent.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import scenarios
from benchmarks.harness import workspace
from clients import Client


def _top(collapsed: Path, k: int) -> str:
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        for f in set(frames):
            incl[f] += count
        self_[frames[-1]] += count
    out = [f"{total} busy samples", "", "inclusive share:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(k)]
    out += ["", "self share:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_.most_common(k)]
    return "\n".join(out)


def main() -> int:
    """Run a scenario's load against one broker and profile that broker."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_broker")
    ap.add_argument("scenario", choices=["preempt", "perturn", "tput"], nargs="?", default="preempt")
    ap.add_argument("-n", type=int, default=2000, help="iterations")
    ap.add_argument("--rate", type=int, default=2000, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None, help="keep the collapsed stacks here")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    with workspace("profile") as ws:
        out = args.out or ws.path("profile.txt")
        if args.scenario == "preempt":
            rig = scenarios.PreemptRig(ws)
            pid = rig.broker.pid
        else:
            stamp_file = ws.path("stamps")
            pid = ws.start_broker(stamp_file).pid
        rec = subprocess.Popen([spy, "record", "-p", str(pid), "-r", str(args.rate), "-f", "raw", "-o", str(out),
                                "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t0 = time.perf_counter()
        try:
            if args.scenario == "preempt":
                rig.run(args.n, 0)
                rig.close()
            elif args.scenario == "perturn":
                with Client(ws.session, "webhook") as c:
                    for _ in range(args.n):
                        t = c.prompt(scenarios.PING_PROMPT)
                        t.result(timeout_s=30)
            else:
                with Client(ws.session, "worker") as c:
                    for _ in range(max(1, args.n // 1000)):
                        t = c.prompt("[sim:bytes=16777216][sim:chunks=16384] throughput")
                        for _ev in t.events(timeout_s=300):
                            pass
        finally:
            el = time.perf_counter() - t0
            rec.send_signal(2)
            rec.wait(30)
        print(f"{args.scenario}: {args.n} iterations in {el:.1f} s")
        print(_top(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
