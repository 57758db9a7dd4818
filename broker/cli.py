"""The ``turnstile`` command: parses arguments, builds a config, calls into the library.

Imports are deferred into each command so that ``turnstile prompt`` (run by
shell webhook handlers) loads only what it needs.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from broker import exits
from broker.agents.base import DEFAULT_HOOK_EVENTS
from broker.fleet import cli as fleet_cli
from ipc import defaults
from ipc.errors import (
    AgentError,
    AgentNotFound,
    AlreadyRunning,
    BrokerUnavailable,
    Cancelled,
    Interrupted,
    InvalidArgument,
    IPCError,
    Preempted,
    StateDirError,
    TurnstileError,
    TurnTimeout,
)

if TYPE_CHECKING:  # annotations only: `prompt` imports the client when it runs
    from types import FrameType

    from clients.client import Client, Turn
    from clients.requests import TurnResult

#: The agent's permission modes (Claude Code's --permission-mode choices).
PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "manual", "plan")

# Each command's exit codes, generated from the error classes that end it (broker/exits.py).
SERVE_EXITS = exits.epilog(
    (exits.RET_OK, "clean stop (SIGTERM/SIGINT, turn drained)"), TurnstileError, InvalidArgument,
    AlreadyRunning, IPCError, AgentNotFound, StateDirError,
    (exits.RET_SIGNAL, "stopped at once by a second SIGINT/SIGTERM"),
)
PROMPT_EXITS = exits.epilog(
    (exits.RET_OK, "ok"), TurnstileError, InvalidArgument, Preempted, Cancelled, BrokerUnavailable, AgentError,
    TurnTimeout, IPCError, (exits.RET_SIGNAL, "interrupted (Ctrl-C): the request was cancelled"),
)
# status, cancel and sweep send no prompt, so their code 2 is only a bad argument.
_BAD_ARGUMENTS = (exits.RET_USAGE, "usage error (bad arguments)")
STATUS_EXITS = exits.epilog(
    (exits.RET_OK, "a live broker serves the session"), _BAD_ARGUMENTS, BrokerUnavailable,
)
CANCEL_EXITS = exits.epilog(
    (exits.RET_OK, "cancel sent (honoured only if that turn still runs)"),
    (exits.RET_ERROR, "no turn is running (--holder), or any other error"), _BAD_ARGUMENTS, BrokerUnavailable,
    IPCError,
)
METRICS_EXITS = exits.epilog(
    (exits.RET_OK, "stopped by SIGTERM/SIGINT"), (exits.RET_USAGE, "bad arguments, or the address cannot be bound"),
)
SWEEP_EXITS = exits.epilog((exits.RET_OK, "swept"), TurnstileError, _BAD_ARGUMENTS)
DEMO_EXITS = exits.epilog(
    (exits.RET_OK, "every request got its result, in the right order"),
    (exits.RET_ERROR, "a request failed or finished out of order"),
)
ALL_EXITS = exits.epilog(*exits.EXIT_CODES.items(), title="Exit codes of every command")


def _dumps(obj: Any) -> str:
    # msgspec is loaded already by the client; the json module would cost start-up time.
    import msgspec

    return msgspec.json.encode(obj).decode()


def _check_session(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # Validated while parsing, so a bad name is a usage error before anything is opened or sent.
    from ipc.names import check_session

    if value is None:
        return None
    try:
        return check_session(value)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc)) from None


def _check_utf8(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    # A non-UTF-8 argument reaches Python as lone surrogates, which no frame can carry.
    try:
        value.encode()
    except UnicodeEncodeError:
        raise click.BadParameter("is not valid UTF-8") from None
    return value


def _check_turn(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    # The bound is the wire's (a signed 64-bit id); ipc.frames is imported only when a turn is named.
    from ipc.frames import MAX_TURN

    if value is not None and value > MAX_TURN:
        raise click.BadParameter(f"{value} is above the largest turn id {MAX_TURN}")
    return value


session_option = click.option(
    "--session", "-s", default=defaults.SESSION, show_default=True, envvar="TURNSTILE_SESSION",
    callback=_check_session, help="Session name: 1-64 of A-Z a-z 0-9 _ - (env TURNSTILE_SESSION).",
)
_positive_s = click.FloatRange(min=0, min_open=True)
_CANCEL_WAIT_S = defaults.DRAIN_TIMEOUT_S  # how long Ctrl-C on `prompt` waits for the cancelled turn to end
# What `status` reports as current even when the broker is dead; the rest of the block goes under last_known.
_BROKER_FIELDS = ("session", "broker_alive", "broker_pid", "broker_start", "incarnation", "started_unix_ns",
                  "heartbeat_unix_ns", "heartbeat_age_s", "closed")


class _Main(click.Group):
    """The command group; the one place where an error becomes an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a :class:`TurnstileError` ends it with one line and the error's exit code."""
        try:
            return super().invoke(ctx)
        except TurnstileError as exc:
            click.echo(f"turnstile: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Main, epilog=ALL_EXITS, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """turnstile: share one coding-agent session among many processes.

    One broker per session owns the agent (Claude Code in stream-json mode);
    worker and webhook clients submit turns; webhooks preempt workers.
    """


fleet_cli.register(main)


# ---------------------------------------------------------------- serve


@main.command(epilog=SERVE_EXITS)
@session_option
@click.option("--agent", type=click.Choice(["claude", "sim"]), default=defaults.AGENT, show_default=True,
              help="The real Claude Code CLI, or the simulated agent.")
@click.option("--claude-bin", type=click.Path(dir_okay=False), default=None,
              help="Path of the claude binary (default: `claude` on PATH, else the one bundled in claude-agent-sdk).")
@click.option("--agent-arg", "agent_args", multiple=True, help="Extra argument for the agent (repeatable).")
@click.option("--cwd", "agent_cwd", type=click.Path(exists=True, file_okay=False), default=None, envvar="TURNSTILE_CWD",
              help="The agent's working directory (env TURNSTILE_CWD; default: where serve runs).")
@click.option("--model", default=None, help="Model to start the agent with.")
@click.option("--permission-mode", type=click.Choice(PERMISSION_MODES), default=None,
              help="Passed to the agent's --permission-mode (default: the agent's own default).")
@click.option("--default-permission", type=click.Choice(["deny", "allow"]), default="deny", show_default=True,
              help="The answer to a tool permission request when the turn's holder has no on_permission handler.")
@click.option("--hook-events", default=",".join(DEFAULT_HOOK_EVENTS), show_default=True,
              help="Comma-separated hook events relayed to the holder's on_hook ('' for none).")
# Not click.Path(file_okay=False): a regular file here is StateDirError's exit 13, checked below.
@click.option("--state-dir", type=click.Path(), default=None, envvar="TURNSTILE_STATE_DIR",
              help="Where the agent session id persists (env TURNSTILE_STATE_DIR; "
                   "default: $XDG_STATE_HOME/turnstile).")
@click.option("--drain-timeout-s", type=_positive_s, default=defaults.DRAIN_TIMEOUT_S, show_default=True,
              help="How long an interrupted turn may take to end before the agent is killed and resumed.")
@click.option("--model-timeout-s", type=_positive_s, default=defaults.MODEL_TIMEOUT_S, show_default=True,
              help="How long a model switch may wait for the agent's answer before it is restarted with --model.")
@click.option("--lease-idle-s", type=_positive_s, default=defaults.LEASE_IDLE_S, show_default=True,
              help="A lease with no request this long is released (a client may ask for its own idle timeout).")
@click.option("--agent-start-timeout-s", type=_positive_s, default=defaults.AGENT_START_TIMEOUT_S, show_default=True,
              help="A (re)started agent that prints nothing for its first turn this long failed to start.")
@click.option("--agent-unavailable-timeout-s", type=_positive_s, default=defaults.AGENT_UNAVAILABLE_TIMEOUT_S,
              show_default=True,
              help="While the agent cannot be started (retried with back-off), requests wait at most this long, "
                   "then end with an agent_unavailable error.")
@click.option("--max-clients-per-process", type=click.IntRange(min=1), default=defaults.MAX_CLIENTS_PER_PROCESS,
              show_default=True,
              help="Connections one client process may hold; more are refused with too_many_connections "
                   "(each costs a POSIX queue of the user's budget).")
@click.option("--idle-output-timeout-s", type=_positive_s, default=1800.0, show_default=True,
              help="A running turn with no agent output this long restarts the agent.")
@click.option("--max-line-bytes", type=click.IntRange(min=1024), default=64 * 1024 * 1024, show_default=True,
              help="Longest agent stdout line kept; a longer one is dropped and logged (and restarts a running turn).")
@click.option("--client-buffer-bytes", type=click.IntRange(min=1024), default=None,
              help="Bytes held for a client whose mailbox is full before it is failed with client_too_slow "
                   "(default: 65 MiB, one largest frame plus the ring).")
@click.option("--max-buffered-bytes", type=click.IntRange(min=1024), default=512 * 1024 * 1024, show_default=True,
              help="Bytes of replies buffered for all clients that do not read; over it, the client holding most "
                   "is failed with client_too_slow.")
@click.option("--max-queued-bytes-per-client", type=click.IntRange(min=1024), default=256 * 1024 * 1024,
              show_default=True, help="Bytes of prompts one client may have queued or running; a prompt over it "
                                      "is refused with queue_full.")
@click.option("--max-queued-bytes", type=click.IntRange(min=1024), default=1024 * 1024 * 1024, show_default=True,
              help="Bytes of prompts all clients together may have queued or running; over it, queue_full.")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto", show_default=True,
              help="Log lines as JSON or for people; auto: console on a terminal, else JSON.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Least severe log level written (to stderr).")
def serve(session: str, agent: str, claude_bin: str | None, agent_args: tuple[str, ...], agent_cwd: str | None,
          model: str | None, permission_mode: str | None, default_permission: str, hook_events: str,
          state_dir: str | None, drain_timeout_s: float, model_timeout_s: float,
          lease_idle_s: float, agent_start_timeout_s: float, agent_unavailable_timeout_s: float,
          max_clients_per_process: int, idle_output_timeout_s: float, max_line_bytes: int,
          client_buffer_bytes: int | None, max_buffered_bytes: int, max_queued_bytes_per_client: int,
          max_queued_bytes: int, log_format: str, log_level: str) -> None:
    """Run the broker for a session in the foreground."""
    from broker.config import BrokerConfig
    from broker.server import run

    cfg = BrokerConfig(
        session=session, agent=agent, claude_bin=claude_bin, agent_args=list(agent_args), agent_cwd=agent_cwd,
        model=model, permission_mode=permission_mode, default_permission=default_permission,
        hook_events=tuple(e.strip() for e in hook_events.split(",") if e.strip()), drain_timeout_s=drain_timeout_s,
        model_timeout_s=model_timeout_s, lease_idle_s=lease_idle_s,
        agent_start_timeout_s=agent_start_timeout_s, agent_unavailable_timeout_s=agent_unavailable_timeout_s,
        max_clients_per_process=max_clients_per_process,
        idle_output_timeout_s=idle_output_timeout_s, max_line_bytes=max_line_bytes, log_format=log_format,
        log_level=log_level, max_buffered_bytes=max_buffered_bytes,
        max_queued_bytes_per_client=max_queued_bytes_per_client, max_queued_bytes=max_queued_bytes,
    )
    if client_buffer_bytes is not None:
        cfg.client_buffer_bytes = client_buffer_bytes
    if state_dir is not None:
        from pathlib import Path

        cfg.state_dir = Path(state_dir)
    cfg.check_state_dir()
    sys.exit(run(cfg))


# ---------------------------------------------------------------- prompt


@main.command(epilog=PROMPT_EXITS)
@session_option
@click.option("--kind", type=click.Choice(["worker", "webhook"]), default=defaults.PROMPT_KIND, show_default=True,
              help="worker (the default) waits its turn behind webhooks; webhook preempts a running worker turn.")
@click.option("--model", default=None,
              help="Switch the session to this model before the turn (it stays for later turns).")
@click.option("--on-preempt", type=click.Choice(["requeue", "return"]), default="requeue", show_default=True,
              help="A preempted worker turn: rerun it after the webhooks, or end with exit 3.")
@click.option("--timeout-s", type=_positive_s, default=None,
              help="Give up after this many seconds (exit 7); the request is abandoned, so the broker cancels it.")
@click.option("--connect-timeout-s", type=_positive_s, default=defaults.CONNECT_TIMEOUT_S, show_default=True,
              help="How long to wait for a broker to serve the session (else exit 5).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: accepted, agent, preempted, result.")
@click.option("--label", default=None, envvar="TURNSTILE_LABEL",
              help="Name shown by `turnstile status` for this client (1-32 of A-Z a-z 0-9 _ . : @ / + -).")
@fleet_cli.nats_option
@click.argument("text", callback=_check_utf8)
def prompt(session: str, kind: str, model: str | None, on_preempt: str, timeout_s: float | None,
           connect_timeout_s: float, as_json: bool, label: str | None, nats_url: str | None, text: str) -> None:
    """Send TEXT (or - for stdin) as one turn and stream the answer."""
    from clients.client import Client

    if text == "-":
        try:
            text = sys.stdin.buffer.read().decode()
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"stdin is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                  argument="text") from None
    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(_dumps(obj) + "\n")
        out.flush()

    at_line_start = True  # plain output: whether the last text written ended a line

    def show_text(ev: dict[str, Any]) -> None:
        nonlocal at_line_start
        for block in (ev.get("message") or {}).get("content") or []:
            if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                out.write(block["text"])
                out.flush()
                at_line_start = block["text"].endswith("\n")

    def show_notice(ev: dict[str, Any]) -> None:
        # The preempted attempt's partial text stays on its own line; the rerun starts a fresh one.
        nonlocal at_line_start
        if ev.get("subtype") != "preempted":
            return
        if not at_line_start:
            out.write("\n")
            out.flush()
            at_line_start = True
        then = "rerunning" if ev.get("requeued") else "returning"
        click.echo(f"turnstile: preempted by a webhook; {then}", err=True)

    def show(events: Iterator[dict[str, Any]]) -> None:
        for ev in events:
            if ev.get("type") == "turnstile":
                if as_json:
                    rest = {k: v for k, v in ev.items() if k not in ("type", "subtype")}
                    emit({"event": ev.get("subtype"), **rest})
                else:
                    show_notice(ev)
            elif as_json:
                emit({"event": "agent", "data": ev})
            elif ev.get("type") == "assistant":
                show_text(ev)

    ctrl_c = _CtrlC()
    try:
        nats = fleet_cli.fleet_options(nats_url, connect_timeout_s) if nats_url else None
        with Client(session, kind, connect_timeout_s=connect_timeout_s, label=label,  # type: ignore[arg-type]
                    nats=nats) as c, ctrl_c.deferred(c):
            turn = c.prompt(text, model=model, on_preempt=on_preempt)  # type: ignore[arg-type]
            try:
                if as_json:
                    emit({"event": "accepted", "request_id": turn.request_id, "session": session, "kind": kind})
                show(turn.events(timeout_s))
                res = turn.result(timeout_s)
            except Interrupted:
                res = _cancel_and_read_on(turn, show)
            except TurnTimeout:
                if not at_line_start:
                    out.write("\n")  # the error goes under the partial text, not after it
                    out.flush()
                # Leaving ends the request: the broker cancels the turn of a client that is gone.
                raise TurnTimeout(f"no result within {timeout_s:g} s; the request was abandoned "
                                  "(the broker cancels it as this client leaves)", session=session) from None
    except KeyboardInterrupt:  # the second Ctrl-C (the first is only recorded: _CtrlC)
        click.echo("turnstile: interrupted", err=True)
        sys.exit(exits.RET_SIGNAL)
    if as_json:
        emit({"event": "result", **res.as_dict()})
    elif not at_line_start:
        out.write("\n")
    if ctrl_c.seen:
        click.echo(f"turnstile: interrupted (turn {res.turn} ended {res.status})", err=True)
        sys.exit(exits.RET_SIGNAL)
    res.raise_for_status()


class _CtrlC:
    """SIGINT during ``prompt``: the first is only recorded, the second stops at once.

    Python runs a signal handler between any two bytecodes, so a handler that
    raised would leave the client part-way through a reply frame (taken off the
    ring, not yet applied) and lose it, the cancelled result with it. Recorded
    instead, the signal is acted on by the client's waiting loop between frames
    (:meth:`clients.client.Client.interrupt_when`), within one wait slice.
    """

    def __init__(self) -> None:
        self.seen = False
        self._taken = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        if self.seen:
            raise KeyboardInterrupt  # the second Ctrl-C: stop waiting for the cancelled result
        self.seen = True

    def take(self) -> bool:
        """True once, the first time it is asked after the first SIGINT (the wait to interrupt)."""
        if self.seen and not self._taken:
            self._taken = True
            return True
        return False

    @contextlib.contextmanager
    def deferred(self, client: Client) -> Iterator[None]:
        """Record SIGINT instead of raising it, and let ``client``'s waits act on it, while inside."""
        previous = signal.signal(signal.SIGINT, self)
        client.interrupt_when(self.take)
        try:
            yield
        finally:
            client.interrupt_when(None)
            signal.signal(signal.SIGINT, previous)


def _cancel_and_read_on(turn: Turn, show: Callable[[Iterator[dict[str, Any]]], None]) -> TurnResult:
    """After the first Ctrl-C: cancel the turn, show what it still sends, and return its (cancelled) result.

    Bounded by ``_CANCEL_WAIT_S``; the client stays until the result came, so
    the broker ends the turn by its cancel, not because its client left.
    """
    turn.cancel()
    try:
        show(turn.events(_CANCEL_WAIT_S))
        return turn.result(_CANCEL_WAIT_S)
    except TurnstileError as exc:
        click.echo(f"turnstile: interrupted; no cancelled result: {exc}", err=True)
        sys.exit(exits.RET_SIGNAL)


# ---------------------------------------------------------------- status


@main.command(epilog=STATUS_EXITS)
@click.option("--session", "-s", default=None, envvar="TURNSTILE_SESSION", callback=_check_session,
              help="Session name (env TURNSTILE_SESSION); without it, one line for every session on the host.")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON (a list without --session).")
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval-s", type=_positive_s, default=0.5, show_default=True, help="Refresh period of --watch.")
@fleet_cli.nats_option
def status(session: str | None, as_json: bool, watch: bool, interval_s: float, nats_url: str | None) -> None:
    """Show the holder, the line, the model and the counters (read from shared memory, not the broker).

    Without --session: one line per session on the host (session, broker, agent,
    holder, line, model); exit 0 when at least one of them has a live broker.
    With --nats: every session of the fleet (or the one given with --session), from its registry.
    """
    import time

    if nats_url:
        sys.exit(fleet_cli.fleet_status(nats_url, session, as_json))

    def show() -> bool:
        if session is None:
            return _show_all(as_json)
        d = _as_reported(_read_status(session))
        if as_json:
            click.echo(_dumps(d if d is not None else {"session": session, "broker_alive": False}))
        elif d is None:
            click.echo(f"session {session}: no broker (start one with: turnstile serve --session {session})")
        else:
            from broker.render import status_table

            status_table(session, d)
        return bool(d and d["broker_alive"])

    if not watch:
        alive = show()
        if session is not None:
            from ipc import reach

            # Alive or not from here, a broker may run out of this process's reach: say so, or
            # "start one" would be wrong advice.
            found = reach.diagnose(session)
            if found is not None:
                click.echo(f"turnstile: {found.message}", err=True)
        sys.exit(exits.RET_OK if alive else exits.RET_UNAVAILABLE)
    try:
        while True:
            if not as_json:
                click.clear()
            show()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        pass


def _read_status(session: str) -> dict[str, Any] | None:
    """One session's state as a dict, or None when there is no readable block (a damaged one is said on stderr).

    A damaged block is not "no broker": a live broker rewrites it at its next
    publish (heartbeat 0.5 s), so look again for a moment before saying so.
    """
    import time

    from ipc.errors import StateDamaged

    deadline = time.monotonic() + 1.5
    while True:
        try:
            return _read_status_once(session)
        except StateDamaged as exc:
            if getattr(exc, "broker_alive", None) is False or time.monotonic() > deadline:
                click.echo(f"turnstile: session {session}: {exc}", err=True)
                return None
            time.sleep(0.05)  # polling the block inside a deadline


def _read_status_once(session: str) -> dict[str, Any] | None:
    import time

    from ipc import state
    from ipc.errors import StateDamaged

    try:
        block = state.StateBlock.open(session)
    except StateDamaged:
        raise
    except (FileNotFoundError, IPCError):
        return None
    try:
        snap = block.snapshot()
    except StateDamaged:
        raise
    except IPCError as exc:
        # The writer stopped mid-write (a broker frozen or killed while publishing):
        # say so instead of failing with a traceback.
        click.echo(f"turnstile: session {session}: {exc}", err=True)
        return None
    finally:
        block.close()
    d = snap.record.as_dict()
    d["session"] = session
    d["broker_alive"] = snap.broker_alive
    d["heartbeat_age_s"] = round((time.time_ns() - snap.record.heartbeat_unix_ns) / 1e9, 3)
    return d


def _as_reported(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """``d`` as status reports it: a dead broker's block is its last word, so all but the broker's own facts
    go under ``last_known``."""
    if d is None or d["broker_alive"]:
        return d
    rest = dict(d)
    broker = {k: rest.pop(k) for k in _BROKER_FIELDS}
    return {**broker, "last_known": rest}


def _show_all(as_json: bool) -> bool:
    """Every session on the host, one line (or one JSON object in a list) each; True if any broker is alive."""
    from broker.render import sessions_table
    from ipc.names import sessions_on_host

    found = [d for d in map(_read_status, sessions_on_host()) if d is not None]
    if as_json:
        click.echo(_dumps([_as_reported(d) for d in found]))
    elif not found:
        click.echo("no turnstile sessions on this host (for this user)")
    else:
        sessions_table(found)
    return any(d["broker_alive"] for d in found)


# ---------------------------------------------------------------- metrics


@main.command(epilog=METRICS_EXITS)
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="TCP port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (IPv4).")
@click.option("--session", "-s", "sessions", multiple=True,
              help="Only these sessions (repeatable; default: every session on the host, found at each scrape).")
def metrics(port: int, host: str, sessions: tuple[str, ...]) -> None:
    """Serve Prometheus metrics for the host's sessions on http://HOST:PORT/metrics.

    Read from the shared-memory state blocks at scrape time, never from a broker,
    so a stuck or stopped broker is still reported. Prints the URL once listening.
    """
    from broker.metrics import serve as serve_metrics
    from ipc.names import check_session

    try:
        for s in sessions:
            check_session(s)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    def ready(url: str) -> None:
        click.echo(f"turnstile metrics: serving {url}")

    try:
        serve_metrics(host, port, sessions or None, on_ready=ready)
    except OSError as exc:
        click.echo(f"turnstile: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        sys.exit(exits.RET_USAGE)


# ---------------------------------------------------------------- cancel


@main.command(epilog=CANCEL_EXITS)
@session_option
@click.option("--turn", "turn_id", type=click.IntRange(min=1), default=None, callback=_check_turn,
              help="Turn id to cancel (of the current broker).")
@click.option("--holder", is_flag=True, help="Cancel whatever turn runs now.")
@fleet_cli.nats_option
def cancel(session: str, turn_id: int | None, holder: bool, nats_url: str | None) -> None:
    """Cancel one turn. A cancel names its turn: it never hits a later one."""
    from clients.core import Connection
    from ipc import state

    if (turn_id is None) == (not holder):
        raise click.UsageError("give exactly one of --turn ID or --holder")
    if nats_url:
        sys.exit(fleet_cli.fleet_cancel(nats_url, session, turn_id, holder))
    try:
        block = state.StateBlock.open(session)
        rec = block.read_record()
        block.close()
    except (FileNotFoundError, IPCError):
        raise BrokerUnavailable(f"no broker for session {session}", session=session) from None
    target = rec.turn if holder else turn_id
    if not target:
        click.echo("turnstile: no turn is running", err=True)
        sys.exit(exits.RET_ERROR)
    conn = Connection(session, "webhook")
    try:
        if not conn.try_attach():
            raise BrokerUnavailable(f"no live broker for session {session}", session=session)
        conn.cancel_turn(rec.incarnation, int(target))
    finally:
        conn.close()
    click.echo(f"cancel sent for turn {target} (incarnation {rec.incarnation})")


# ---------------------------------------------------------------- sweep


@main.command(epilog=SWEEP_EXITS)
@click.option("--session", "-s", default=None, callback=_check_session, help="Only this session.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as a JSON list.")
def sweep(session: str | None, as_json: bool) -> None:
    """Remove queues, state blocks and mailboxes whose owner process is gone."""
    from ipc import sweep as sw

    removed = sw.sweep(session=session)
    if as_json:
        click.echo(_dumps([r.__dict__ for r in removed]))
        return
    for r in removed:
        click.echo(f"removed {r.kind} {r.name} ({r.reason})")
    click.echo(f"{len(removed)} object(s) removed")


# ---------------------------------------------------------------- demo


@main.command(epilog=DEMO_EXITS)
@click.option("--agent", type=click.Choice(["sim", "claude"]), default="sim", show_default=True,
              help="The simulated agent, or the real CLI against the offline fake Messages API.")
@click.option("--webhooks", type=int, default=3, show_default=True, help="How many webhooks preempt the worker.")
@click.option("--worker-ms", type=int, default=3000, show_default=True, help="Length of the worker's long turn.")
@click.option("--plain", is_flag=True, help="No live view; print events as lines.")
@click.option("--fleet", is_flag=True, help="Webhooks arrive over NATS through a gateway (private nats-server; "
                                            "each webhook in its own IPC namespace when root allows).")
def demo(agent: str, webhooks: int, worker_ms: int, plain: bool, fleet: bool) -> None:
    """A broker on a private session, a long worker turn and webhooks preempting it, live."""
    from broker.demo import run_demo

    if fleet:
        from broker.fleet.demo import run_fleet_demo

        sys.exit(run_fleet_demo(webhooks=webhooks, worker_ms=worker_ms, plain=plain))

    sys.exit(run_demo(agent=agent, webhooks=webhooks, worker_ms=worker_ms, plain=plain))


if __name__ == "__main__":
    main()
