"""PNG plots of one run: latency CDFs per scenario, the scale curves, throughput bars.

matplotlib (the ``bench`` extra) is imported lazily with the Agg backend; a
run without it still prints its table and writes its JSON.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.stats import Results

#: Plot name → (title, latency keys drawn together).
GROUPS: dict[str, tuple[str, list[str]]] = {
    "floor": ("Floors: the IPC primitives alone", ["floor.queue_rtt", "floor.pipe_rtt", "floor.pipe_oneway"]),
    "preempt": ("Preempt signal: webhook submit → interrupt read by the agent",
                ["preempt.turnstile", "preempt.turnstile_broker", "preempt.threaded", "floor.queue_rtt"]),
    "handoff": ("Handoff: preempted result written → webhook's message read by the agent",
                ["handoff.turnstile", "handoff.turnstile_broker", "handoff.threaded", "floor.queue_rtt"]),
    "per_turn": ("Per-turn overhead against a client writing to the agent's pipe itself",
                 ["turn.submit_turnstile", "turn.submit_direct", "turn.return_turnstile", "turn.return_direct"]),
    "real_cli": ("Real Claude Code CLI: webhook submit → its prompt at the Messages API",
                 ["realcli.webhook_to_api", "realcli.broker_share", "realcli.cli_interrupt_to_result",
                  "realcli.cli_prompt_to_api"]),
    "startup": ("`turnstile prompt` start-up", ["startup.to_queue", "startup.to_agent", "startup.whole"]),
}


def _cdf(ax: Any, samples_ns: list[int], label: str) -> None:
    xs = sorted(x / 1000 for x in samples_ns)
    n = len(xs)
    ys = [(i + 1) / n for i in range(n)]
    ax[0].plot(xs, ys, label=label, linewidth=1.2)
    # Complementary CDF on a log scale: the tail (p99, p99.9, max) is readable.
    ax[1].plot(xs, [max(1 - y, 0.5 / n) for y in ys], label=label, linewidth=1.2)


def write(res: Results, out_dir: Path, meta: dict[str, Any]) -> list[str]:
    """Write the plots; return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[str] = []
    sub = f"{meta['machine']['nproc']} × {meta['machine']['cpu']}, {meta['mode']} run"
    for name, (title, keys) in GROUPS.items():
        present = [k for k in keys if k in res.latencies]
        if not present or (name != "floor" and all(k.startswith("floor.") for k in present)):
            continue
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for k in present:
            lat = res.latencies[k]
            _cdf(ax, lat.samples_ns, f"{lat.label.strip()} (p50 {lat.summary.p50:.0f} µs)")
        ax[0].set_xscale("log")
        ax[0].set_xlabel("µs")
        ax[0].set_ylabel("fraction ≤ x")
        ax[0].grid(True, which="both", alpha=0.3)
        ax[1].set_xscale("log")
        ax[1].set_yscale("log")
        ax[1].set_xlabel("µs")
        ax[1].set_ylabel("fraction > x (tail)")
        for q, lbl in ((1e-2, "p99"), (1e-3, "p99.9")):
            ax[1].axhline(q, color="grey", linewidth=0.6, linestyle=":")
            ax[1].text(ax[1].get_xlim()[0], q, lbl, fontsize=7, va="bottom")
        ax[1].grid(True, which="both", alpha=0.3)
        ax[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{title}\n{sub}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"cdf_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    scale = res.series.get("scale")
    if scale:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        xs = [p["clients"] for p in scale]
        for col, style in (("p50", "o-"), ("p99", "s--"), ("p999", "^:")):
            ax[0].plot(xs, [p["preempt"][col] for p in scale], style, label=f"preempt {col}")
        ax[0].plot(xs, [p["broker_preempt"]["p50"] for p in scale], "x-", label="broker-internal preempt p50")
        ax[0].axhline(2000, color="red", linewidth=0.8, linestyle=":", label="target p99 at 200 clients")
        ax[0].set_xscale("log")
        ax[0].set_yscale("log")
        ax[0].set_xlabel("clients connected")
        ax[0].set_ylabel("µs")
        ax[0].legend(fontsize=7)
        ax[0].grid(True, which="both", alpha=0.3)
        ax[1].plot(xs, [p["rss_kib"]["VmRSS"] / 1024 for p in scale], "o-", label="VmRSS")
        ax[1].plot(xs, [p["rss_kib"].get("RssAnon", math.nan) / 1024 for p in scale], "s--", label="RssAnon")
        ax[1].plot(xs, [p["rss_kib"].get("RssShmem", math.nan) / 1024 for p in scale], "^:", label="RssShmem")
        ax[1].set_xlabel("clients connected")
        ax[1].set_ylabel("broker MiB")
        ax[1].legend(fontsize=7)
        ax[1].grid(True, alpha=0.3)
        fig.suptitle(f"Scale: preempt latency and broker memory by clients connected\n{sub}", fontsize=10)
        fig.tight_layout()
        path = out_dir / "scale.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    tput = [(k, v) for k, v in res.scalars.items() if k.startswith("tput.") and v.unit == "MB/s"]
    if tput:
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.barh([v.label for _, v in tput][::-1], [v.value for _, v in tput][::-1])
        ax.set_xlabel("MB/s")
        ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"Event throughput\n{sub}", fontsize=10)
        fig.tight_layout()
        path = out_dir / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written
