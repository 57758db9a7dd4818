"""The results table, the targets (met or missed, never asserted), the machine, RESULTS.md."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.stats import SHOWN, Results, fmt_ratio, fmt_us

GENERATED_BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks rewrites this section after a full run -->"
GENERATED_END = "<!-- END GENERATED -->"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loadavg_start": list(os.getloadavg()),
        "started_unix": time.time(),
    }


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    """One performance target from the design, checked against a run."""

    name: str
    rule: str
    check: Callable[[Results], tuple[str, bool | None]]


def _lat(res: Results, key: str, col: str = "p50") -> float:
    lat = res.latencies.get(key)
    return lat.summary.get(col) if lat else math.nan


def _sc(res: Results, key: str) -> float:
    sc = res.scalars.get(key)
    return sc.value if sc else math.nan


def _verdict(ok: bool, *values: float) -> bool | None:
    return None if any(math.isnan(v) for v in values) else ok


def _hot(res: Results, v: float) -> str:
    fh = _lat(res, "floor.queue_rtt_hot")
    return "" if math.isnan(fh) else f"; {v / fh:.0f}× the back-to-back RTT {fmt_us(fh)}"


def _preempt_rtt(res: Results) -> tuple[str, bool | None]:
    p, f = _lat(res, "preempt.turnstile"), _lat(res, "floor.queue_rtt")
    return f"p50 {fmt_us(p)} = {p / f:.1f}× RTT {fmt_us(f)}{_hot(res, p)}", _verdict(p <= 2 * f, p, f)


def _preempt_p99(res: Results) -> tuple[str, bool | None]:
    p = _lat(res, "preempt.turnstile", "p99")
    return f"p99 {fmt_us(p)}", _verdict(p <= 1000, p)


def _preempt_threaded(res: Results) -> tuple[str, bool | None]:
    p, t = _lat(res, "preempt.turnstile"), _lat(res, "preempt.threaded")
    return f"p50 {fmt_us(p)} vs threaded p50 {fmt_us(t)}", _verdict(p < t, p, t)


def _handoff(res: Results) -> tuple[str, bool | None]:
    h, f = _lat(res, "handoff.turnstile"), _lat(res, "floor.queue_rtt")
    b = _lat(res, "handoff.turnstile_broker")
    return (f"p50 {fmt_us(h)} = {h / f:.1f}× RTT {fmt_us(f)}{_hot(res, h)} "
            f"(broker-internal p50 {fmt_us(b)} = {b / f:.1f}×)", _verdict(h <= f, h, f))


def _per_turn(res: Results) -> tuple[str, bool | None]:
    s = _lat(res, "turn.submit_turnstile") - _lat(res, "turn.submit_direct")
    r = _lat(res, "turn.return_turnstile") - _lat(res, "turn.return_direct")
    return f"submit +{fmt_us(s)}, return +{fmt_us(r)} over direct pipe (p50)", _verdict(s <= 250 and r <= 250, s, r)


def _tput(res: Results) -> tuple[str, bool | None]:
    a, b = _sc(res, "tput.one_client_lines_ratio"), _sc(res, "tput.one_client_huge_ratio")
    return f"lines {a:.0%}, huge line {b:.0%} of read-alone", _verdict(a >= 0.5 and b >= 0.5, a, b)


def _scale_p99(res: Results) -> tuple[str, bool | None]:
    keys = sorted((k for k in res.latencies if k.startswith("scale.preempt_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if not keys:
        return "not run", None
    k = keys[-1]
    p = _lat(res, k, "p99")
    clients = int(k.rsplit("_", 1)[1])
    text = f"p99 {fmt_us(p)} at {clients} clients"
    return (text, _verdict(p <= 2000, p)) if clients >= 200 else (text + " (200 not measured)", None)


def _rss(res: Results) -> tuple[str, bool | None]:
    v = _sc(res, "scale.rss_per_client_VmRSS")
    return f"{v:.0f} KiB per idle client", _verdict(v <= 1024, v)


def _real_cli(res: Results) -> tuple[str, bool | None]:
    p = _lat(res, "realcli.webhook_to_api")
    return f"p50 {fmt_us(p)}", _verdict(p <= 60_000, p)


def _startup(res: Results) -> tuple[str, bool | None]:
    p = _lat(res, "startup.to_queue")
    return f"p50 {fmt_us(p)}", _verdict(p <= 150_000, p)


def _shared_client(res: Results) -> tuple[str, bool | None]:
    s, o = _lat(res, "shared.one_client"), _lat(res, "shared.client_per_request")
    s99, o99 = _lat(res, "shared.one_client", "p99"), _lat(res, "shared.client_per_request", "p99")
    return (f"p50 {fmt_us(s)} vs {fmt_us(o)} one client per request (p99 {fmt_us(s99)} vs {fmt_us(o99)})",
            _verdict(s - o <= 2000, s, o))


def _gateway(res: Results) -> tuple[str, bool | None]:
    # Same path but remote: the difference is what NATS and the gateway add.
    d50 = _lat(res, "fleet.remote_webhook") - _lat(res, "preempt.turnstile_webhook")
    d99 = _lat(res, "fleet.remote_webhook", "p99") - _lat(res, "preempt.turnstile_webhook", "p99")
    return f"+{fmt_us(d50)} p50, +{fmt_us(d99)} p99 over the local webhook", _verdict(d50 <= 1000 and d99 <= 5000,
                                                                                     d50, d99)


TARGETS = [
    Target("preempt vs RTT", "preempt p50 ≤ 2× queue RTT", _preempt_rtt),
    Target("preempt p99", "preempt p99 ≤ 1 ms", _preempt_p99),
    Target("preempt vs threaded", "preempt p50 below the threaded design's p50", _preempt_threaded),
    Target("handoff", "handoff p50 ≤ 1× queue RTT", _handoff),
    Target("per-turn overhead", "per-turn overhead p50 ≤ 250 µs each way", _per_turn),
    Target("shared AsyncClient", "concurrent requests on one AsyncClient: overhead p50 within 2 ms of "
           "one client per request", _shared_client),
    Target("throughput", "to one client ≥ 50% of read-alone", _tput),
    Target("scale p99", "at 200 clients preempt p99 ≤ 2 ms", _scale_p99),
    Target("gateway overhead", "remote webhook over NATS: ≤ +1 ms p50, ≤ +5 ms p99 over local", _gateway),
    Target("RSS per client", "≤ 1 MiB broker RSS per idle client", _rss),
    Target("real CLI", "webhook prompt at the API p50 ≤ 60 ms", _real_cli),
    Target("CLI start-up", "`turnstile prompt` start → queue ≤ 150 ms", _startup),
]


# ---------------------------------------------------------------- tables


def latency_rows(res: Results) -> list[list[str]]:
    """One row per latency: label, n, the shown percentiles, their ratios to the floor."""
    rows = []
    for lat in res.latencies.values():
        s = lat.summary
        floor = res.latencies.get(lat.floor) if lat.floor else None
        ratio = [fmt_ratio(s.get(c) / floor.summary.get(c)) if floor else "" for c in SHOWN]
        rows.append([lat.label, str(s.n), *(fmt_us(s.get(c)) for c in SHOWN), *ratio])
    return rows


def scalar_rows(res: Results) -> list[list[str]]:
    """One row per scalar."""
    rows = []
    for sc in res.scalars.values():
        if sc.unit == "×":
            val = f"{sc.value:.0%}"
        elif sc.unit == "count":
            val = f"{sc.value:.0f}"
        else:
            val = f"{sc.value:,.0f} {sc.unit}" if abs(sc.value) >= 10 else f"{sc.value:.1f} {sc.unit}"
        rows.append([sc.label, val])
    return rows


def target_rows(res: Results) -> list[list[str]]:
    """One row per target."""
    rows = []
    for t in TARGETS:
        try:
            text, ok = t.check(res)
        except (KeyError, ZeroDivisionError):
            text, ok = "not run", None
        if ok is None and ("nan" in text or " -" in text):
            text = "not run"
        rows.append([t.rule, text, {True: "met", False: "MISSED", None: "-"}[ok]])
    return rows


LAT_HEAD = ["latency", "n", "p50", "p99", "p99.9", "max", "p50 ×floor", "p99 ×floor", "p99.9 ×floor", "max ×floor"]


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _md_cell(c: str) -> str:
    c = c.replace("|", "\\|")
    return "↳ " + c.strip() if c.startswith("  ") else c


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    # Sub-rows are indented in the terminal; Markdown would drop the spaces.
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def terminal(res: Results, meta: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    parts = [
        f"turnstile benchmarks ({meta['mode']}) on {meta['machine']['nproc']} × {meta['machine']['cpu']}, "
        f"Linux {meta['machine']['kernel']}, Python {meta['machine']['python']}; "
        f"load average {meta['machine']['loadavg_start'][0]:.2f} → {meta['machine'].get('loadavg_end', [0])[0]:.2f}",
        "Ratios: each percentile over the same percentile of the floor: the POSIX queue round trip measured with the "
        "scenarios' idle rhythm (0-2 ms idle before each sample).",
        "",
        _text_table(LAT_HEAD, latency_rows(res)),
    ]
    if res.scalars:
        parts += ["", _text_table(["value", ""], scalar_rows(res))]
    parts += ["", _text_table(["target", "measured", "verdict"], target_rows(res))]
    if res.errors:
        parts += ["", "scenarios that failed or were skipped:"]
        parts += [f"  {k}: {v}" for k, v in res.errors.items()]
    return "\n".join(parts)


def markdown(res: Results, meta: dict[str, Any], plots: list[str]) -> str:
    """The generated section of RESULTS.md."""
    m = meta["machine"]
    lines = [
        GENERATED_BEGIN,
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(m['started_unix']))} "
        f"({meta['mode']}, {meta['elapsed_s']:.0f} s).",
        "",
        f"- Machine: {m['nproc']} CPUs, {m['cpu']}; Linux {m['kernel']}; {m['implementation']} {m['python']}",
        f"- Load average (1 min) at start {m['loadavg_start'][0]:.2f}, at end {m.get('loadavg_end', [0])[0]:.2f} "
        "(other work on the machine shows up in the tails)",
        f"- Reproduce: `{meta['command']}` (same as `make bench`)",
        "",
        "Ratios are each percentile over the same percentile of the floor measured in the same run: "
        "the POSIX queue round trip between two processes, each sample taken after 0-2 ms idle "
        "(the preempt scenarios' rhythm; the back-to-back round trip is shown too).",
        "",
        "### Latencies",
        "",
        _md_table(LAT_HEAD, latency_rows(res)),
        "",
    ]
    if res.scalars:
        lines += ["### Throughput and memory", "", _md_table(["value", ""], scalar_rows(res)), ""]
    lines += ["### Targets", "", _md_table(["target", "measured", "verdict"], target_rows(res)), ""]
    if res.errors:
        lines += ["### Not measured", ""] + [f"- {k}: {v}" for k, v in res.errors.items()] + [""]
    if plots:
        lines += ["### Plots", ""] + [f"![{Path(p).stem}](results/{Path(p).name})" for p in plots] + [""]
    lines.append(GENERATED_END)
    return "\n".join(lines)


def update_results_md(path: Path, generated: str) -> None:
    """Replace the generated section of RESULTS.md (keeping the hand-written notes around it)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = "# turnstile benchmark results\n\n" + GENERATED_BEGIN + "\n" + GENERATED_END + "\n"
    if GENERATED_BEGIN in text and GENERATED_END in text:
        head, _, rest = text.partition(GENERATED_BEGIN)
        _, _, tail = rest.partition(GENERATED_END)
        text = head + generated + tail
    else:
        text = text.rstrip() + "\n\n" + generated + "\n"
    path.write_text(text)


def command_line() -> str:
    """How this run was started, without this machine's paths."""
    args = [a for a in sys.argv[1:]]
    return " ".join([".venv/bin/python -m benchmarks", *args])
