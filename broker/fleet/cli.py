"""The fleet's commands: ``turnstile gateway``, and the ``--nats`` forms of ``status`` and ``cancel``.

Registered into the main click group by :func:`register`; NATS is imported only
when a fleet command runs, so local commands start as fast as before.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click


def _gateway_exits() -> str:
    from broker import exits

    return exits.epilog(
        (exits.RET_OK, "clean stop (SIGTERM/SIGINT; running requests drained or left to NATS)"),
        (exits.RET_ERROR, "unexpected error"),
        (exits.RET_USAGE, "usage error (also: a non-loopback URL without credentials, unless --insecure; "
                           "--replicas more than the NATS cluster's JetStream servers)"),
        (exits.RET_UNAVAILABLE, "NATS unreachable"),
        (exits.RET_ALREADY_RUNNING, "another live gateway serves one of the sessions (or took it over)"),
        (exits.RET_SIGNAL, "stopped at once by a second SIGINT/SIGTERM"),
    )

F = Callable[..., Any]


def nats_option(fn: F) -> F:
    """``--nats URL`` (env ``TURNSTILE_NATS``): talk to the session through its gateway over NATS."""
    return click.option(
        "--nats", "nats_url", default=None, envvar="TURNSTILE_NATS", metavar="URL",
        help="Reach the session over NATS through its gateway (env TURNSTILE_NATS; credentials in the URL, "
             "or env TURNSTILE_NATS_CREDS / TURNSTILE_NATS_TLS_CA).",
    )(fn)


def fleet_options(url: str, connect_timeout_s: float = 5.0) -> Any:
    """The client-side :class:`~clients.fleet_conn.FleetOptions` for ``--nats URL``."""
    from clients.fleet_conn import FleetOptions

    return FleetOptions(url=url, creds=os.environ.get("TURNSTILE_NATS_CREDS") or None,
                        tls_ca=os.environ.get("TURNSTILE_NATS_TLS_CA") or None, connect_timeout_s=connect_timeout_s)


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


def fleet_status(url: str, session: str | None, as_json: bool) -> int:
    """``turnstile status --nats URL``: every session of the fleet (or one); exit 5 if none is served."""
    import time

    import msgspec

    from broker.fleet import registry
    from clients.fleet_conn import connect
    from ipc.errors import FleetUnavailable

    async def read() -> list[Any]:
        nc = await connect(fleet_options(url), name="turnstile-status")
        try:
            return await registry.list_fleet(nc.jetstream())
        finally:
            await nc.close()

    regs = _run(read())  # FleetUnavailable: exit 5, by the group's error mapping
    if session is not None:
        regs = [r for r in regs if r.session == session]
    now = time.time()
    rows = [{**msgspec.structs.asdict(r), "gateway_alive": registry.alive(r, now),
             "heartbeat_age_s": round(now - r.heartbeat_unix, 3)} for r in regs]
    if as_json:
        click.echo(msgspec.json.encode(rows if session is None else (rows[0] if rows else
                   {"session": session, "gateway_alive": False})).decode())
    elif not rows:
        click.echo("no session is served" + (f" as {session}" if session else "") + " on this fleet")
    else:
        click.echo(f"{'session':<20} {'host':<16} {'gateway':<8} {'broker':<7} {'holder':<24} {'line':<10} model")
        for d in rows:
            holder = f"{d['holder_kind']} turn {d['turn']}" if d["holder_client"] else "-"
            click.echo(f"{d['session']:<20} {d['host'][:16]:<16} {'alive' if d['gateway_alive'] else 'STALE':<8} "
                       f"{'up' if d['broker_alive'] else 'DOWN':<7} {holder:<24} "
                       f"{d['webhooks_queued']}w/{d['workers_queued']}k{'':<5} {d['model'] or '-'}")
    return 0 if any(d["gateway_alive"] for d in rows) else FleetUnavailable.exit_code


def fleet_cancel(url: str, session: str, turn_id: int | None, holder: bool) -> int:
    """``turnstile cancel --nats URL``: cancel a turn of a remote session through its gateway."""
    from broker.fleet import registry
    from clients.fleet_conn import connect
    from clients.remote import RemoteCore
    from ipc.errors import FleetUnavailable

    async def go() -> tuple[str, int]:
        nc = await connect(fleet_options(url), name="turnstile-cancel")
        try:
            regs = {r.session: r for r in await registry.list_fleet(nc.jetstream())}
        finally:
            await nc.close()
        reg = regs.get(session)
        if reg is None or not registry.alive(reg):
            raise FleetUnavailable(f"no live gateway serves session {session!r} on that fleet", session=session)
        target = reg.turn if holder else int(turn_id or 0)
        if not target:
            return reg.incarnation, 0
        core = RemoteCore(session, "webhook", fleet_options(url))
        await core.connect()
        try:
            await core.cancel_turn(reg.incarnation, target)
        finally:
            await core.close()
        return reg.incarnation, target

    incarnation, target = _run(go())  # FleetUnavailable: exit 5, by the group's error mapping
    if not target:
        click.echo("turnstile: no turn is running", err=True)
        return 1
    click.echo(f"cancel sent for turn {target} (incarnation {incarnation})")
    return 0


@click.command(epilog=_gateway_exits())
@click.option("--nats", "nats_url", required=True, envvar="TURNSTILE_NATS", metavar="URL",
              help="NATS server(s), comma-separated (env TURNSTILE_NATS).")
@click.option("--session", "-s", "sessions", multiple=True, required=True,
              help="A session of this host to serve (repeatable).")
@click.option("--creds", type=click.Path(dir_okay=False, exists=True), default=None, help="NATS credentials file.")
@click.option("--user", default=None, help="NATS user (with --password).")
@click.option("--password", default=None, envvar="TURNSTILE_NATS_PASSWORD", help="NATS password.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), default=None, help="CA file for TLS.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback URL without credentials.")
@click.option("--replicas", type=click.IntRange(1, 5), default=1, show_default=True,
              help="JetStream replicas of the session's stream and buckets (3 on a cluster).")
@click.option("--results-ttl-s", type=float, default=3600.0, show_default=True,
              help="How long a result stays collectable by its request id.")
@click.option("--dedup-window-s", type=click.FloatRange(min=1.0), default=120.0, show_default=True,
              help="How long JetStream itself drops a request id seen before (the results bucket de-duplicates "
                   "for --results-ttl-s either way).")
@click.option("--ack-wait-s", type=float, default=30.0, show_default=True,
              help="A relayed request not touched for this long is delivered again.")
@click.option("--heartbeat-s", type=float, default=1.0, show_default=True,
              help="How often the gateway renews its claim on its sessions in the registry.")
@click.option("--stale-after-s", type=float, default=3.0, show_default=True,
              help="A gateway silent this long loses its sessions to the next gateway.")
@click.option("--broker-wait-s", type=float, default=600.0, show_default=True,
              help="How long a relayed request waits for a broker that went away.")
@click.option("--drain-timeout-s", type=float, default=10.0, show_default=True,
              help="On SIGTERM, how long running remote requests may take before the gateway stops.")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto", show_default=True,
              help="Log lines as JSON, for a console, or auto (console on a TTY).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Lowest level logged.")
def gateway(nats_url: str, sessions: tuple[str, ...], creds: str | None, user: str | None, password: str | None,
            tls_ca: str | None, insecure: bool, replicas: int, results_ttl_s: float, dedup_window_s: float,
            ack_wait_s: float,
            heartbeat_s: float, stale_after_s: float, broker_wait_s: float, drain_timeout_s: float,
            log_format: str, log_level: str) -> None:
    """Make this host's sessions reachable over NATS JetStream (run beside their brokers)."""
    from broker.fleet.gateway import GatewayConfig, run
    from broker.fleet.setup import StoreConfig
    from clients.fleet_conn import FleetOptions, is_loopback, redact
    from ipc.names import check_session

    for s in sessions:
        try:
            check_session(s)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    if creds and user:
        raise click.UsageError("give --creds FILE or --user/--password, not both")
    opts = FleetOptions(url=nats_url, creds=creds, user=user, password=password, tls_ca=tls_ca)
    if not is_loopback(nats_url) and not opts.has_credentials and not insecure:
        raise click.UsageError(
            f"{redact(nats_url)} is not a loopback address and no credentials were given: anyone who reaches it "
            "could drive these sessions. Give --creds FILE or --user/--password (or --insecure to accept that).")
    if stale_after_s <= heartbeat_s:
        raise click.UsageError("--stale-after-s must be longer than --heartbeat-s")
    cfg = GatewayConfig(
        opts=opts, sessions=list(dict.fromkeys(sessions)),
        store=StoreConfig(replicas=replicas, results_ttl_s=results_ttl_s, duplicate_window_s=dedup_window_s,
                          ack_wait_s=ack_wait_s),
        heartbeat_s=heartbeat_s, stale_after_s=stale_after_s, broker_wait_s=broker_wait_s,
        drain_timeout_s=drain_timeout_s, log_format=log_format, log_level=log_level,
    )
    sys.exit(run(cfg))


def register(group: click.Group) -> None:
    """Add the fleet commands to the ``turnstile`` group."""
    group.add_command(gateway)
