"""Terminal rendering for `turnstile status` (rich on a TTY, plain text otherwise)."""

from __future__ import annotations

import sys
from typing import Any


def holder_name(d: dict[str, Any]) -> str:
    """Who holds the session: its label when the client gave one, else its id; "-" when nobody does."""
    if not d["holder_client"]:
        return "-"
    return str(d.get("holder_label") or d["holder_client"])


def status_lines(session: str, d: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows describing one state snapshot.

    A dead broker's snapshot keeps its session state under ``last_known``:
    those rows say "last known", since nothing keeps them current.
    """
    last_known = d.get("last_known")
    if last_known is not None:
        rows = _rows(session, {**d, **last_known})
        return rows[:2] + [(k, f"last known: {v}") for k, v in rows[2:]]
    return _rows(session, d)


def _rows(session: str, d: dict[str, Any]) -> list[tuple[str, str]]:
    holder = f"{holder_name(d)} ({d['holder_kind']}, req {d['holder_req']})" if d["holder_client"] else "-"
    c = d["counters"]
    lat = d["latencies"]
    return [
        ("session", session),
        ("broker", f"pid {d['broker_pid']} {'alive' if d['broker_alive'] else 'DEAD'}, incarnation {d['incarnation']}, "
                   f"heartbeat {d['heartbeat_age_s']} s ago"),
        ("agent", f"pid {d['agent_pid']} {d['agent_state']}, session {d['session_id'] or '-'}"),
        ("model", d["model"] or "(agent default)"),
        ("turn", f"{d['turn']} {d['turn_state']}" if d["turn"] else "idle"),
        ("holder", holder),
        ("lease", d["lease_client"] or "-"),
        ("line", f"{d['webhooks_queued']} webhook(s), {d['workers_queued']} worker(s); {d['clients']} client(s)"),
        ("requests", f"{c['requests']} accepted, {c['turns']} turns, ok {c['results_ok']}, "
                     f"error {c['results_error']}, cancelled {c['results_cancelled']}, "
                     f"preempted {c['results_preempted']}"),
        ("preemption", f"{c['preempts']} preempts, {c['requeues']} requeues; last signal "
                       f"{lat['last_preempt_signal_us']} µs, last handoff {lat['last_handoff_us']} µs"),
        ("faults", f"restarts {c['agent_restarts']}, drain timeouts {c['drain_timeouts']}, rejected frames "
                   f"{c['rejected_frames']}, stale cancels {c['stale_cancels']}, client deaths "
                   f"{c['client_deaths']}, slow clients {c['clients_failed_slow']}"),
    ]


def status_table(session: str, d: dict[str, Any]) -> None:
    """Print the snapshot: a rich table on a TTY, aligned text otherwise."""
    rows = status_lines(session, d)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, box=None)
        table.add_column(style="bold cyan")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
        return
    for k, v in rows:
        print(f"{k:<11} {v}")


SESSION_COLUMNS = ("session", "broker", "agent", "holder", "line", "model")


def session_row(d: dict[str, Any]) -> tuple[str, ...]:
    """One session's line in the host listing, by :data:`SESSION_COLUMNS`."""
    holder = f"{d['holder_kind']} {holder_name(d)}" if d["holder_client"] else "-"
    return (
        d["session"],
        f"alive pid {d['broker_pid']}" if d["broker_alive"] else "DEAD",
        d["agent_state"] if d["broker_alive"] else "-",
        holder,
        f"{d['webhooks_queued']} webhook, {d['workers_queued']} worker",
        d["model"] or "(default)",
    )


def sessions_table(snapshots: list[dict[str, Any]]) -> None:
    """Print one line per session: a rich table on a TTY, aligned text otherwise."""
    rows = [session_row(d) for d in snapshots]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None)
        for col in SESSION_COLUMNS:
            table.add_column(col.upper(), style="bold cyan" if col == "session" else None)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(SESSION_COLUMNS)]
    for row in [tuple(c.upper() for c in SESSION_COLUMNS), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
