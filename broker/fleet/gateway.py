"""``turnstile gateway``: one asyncio lifecycle — connect → claim → serve → drain → release.

The gateway is a client of the local broker(s) like any other (through the
public client library), so its death costs at most the turns it was relaying,
which NATS delivers again to the next gateway. Signal handlers only record the
signal; a second one stops at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from broker import exits
from broker import log as logging_setup
from broker.fleet import registry, setup
from broker.fleet.locals import LocalClients
from broker.fleet.relay import SessionRelay
from clients import fleet_wire as wire
from clients.fleet_conn import FleetOptions, connect, redact
from ipc import names, state
from ipc.errors import IPCError, TurnstileError

RET_OK = exits.RET_OK
RET_CONFLICT = registry.GatewayConflict.exit_code
RET_SIGNAL = exits.RET_SIGNAL


@dataclass
class GatewayConfig:
    """Everything `turnstile gateway` can be told."""

    opts: FleetOptions
    sessions: list[str]
    store: setup.StoreConfig = field(default_factory=setup.StoreConfig)
    heartbeat_s: float = 1.0
    #: A registry entry whose heartbeat is older than this is free for another gateway to take.
    stale_after_s: float = 3.0
    #: How long a relayed request waits for a broker that went away before it ends in an error.
    broker_wait_s: float = 600.0
    drain_timeout_s: float = 10.0
    log_format: str = "auto"
    log_level: str = "info"


def registration(session: str, gateway_id: str, stale_after_s: float) -> wire.Registration:
    """This gateway's registry entry for ``session``, with the broker's state read from its state block."""
    reg = wire.Registration(session=session, gateway=gateway_id, host=socket.gethostname(), pid=os.getpid(),
                            heartbeat_unix=time.time(), stale_after_s=stale_after_s)
    try:
        block = state.StateBlock.open(session)
    except (FileNotFoundError, IPCError):
        return reg
    try:
        snap = block.snapshot()
    except IPCError:
        return reg
    finally:
        block.close()
    r = snap.record
    reg.broker_alive = snap.broker_alive
    reg.holder_client, reg.holder_kind, reg.turn, reg.turn_state = r.holder_client, r.holder_kind, r.turn, r.turn_state
    reg.webhooks_queued, reg.workers_queued, reg.model, reg.incarnation = (
        r.webhooks_queued, r.workers_queued, r.model, r.incarnation)
    return reg


class Gateway:
    """Serves the configured sessions until a signal (or a lost claim)."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.id = names.new_client_id()
        self.log = logging_setup.get("turnstile.gateway").bind(gateway=self.id)
        self.stop_event = asyncio.Event()
        self.signals = 0
        self.code = RET_OK

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        self.log.info("gateway.signal", signal=signal.Signals(sig).name, count=self.signals)
        self.stop_event.set()
        if self.signals > 1:
            raise SystemExit(RET_SIGNAL)

    async def run(self) -> int:
        """The whole lifecycle; returns the exit code."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        nc = await connect(cfg.opts, name=f"turnstile-gateway-{self.id}")
        relays: list[SessionRelay] = []
        reg: registry.Registry | None = None
        try:
            js = nc.jetstream()
            async with setup.placing("the fleet registry", cfg.store.replicas):
                kv = await registry.open_bucket(js, create=True, replicas=cfg.store.replicas)
            assert kv is not None
            reg = registry.Registry(kv, self.id)
            for s in cfg.sessions:
                await reg.claim(registration(s, self.id, cfg.stale_after_s))
            for s in cfg.sessions:
                await setup.ensure_stream(js, s, cfg.store)
                results = await setup.ensure_results(js, s, cfg.store)
                await setup.fresh_consumers(js, s, cfg.store)
                clients = LocalClients(s, broker_wait_s=cfg.broker_wait_s)
                relay = SessionRelay(nc, s, results, clients, self.log, ack_wait_s=cfg.store.ack_wait_s)
                await relay.start()
                relays.append(relay)
            self.log.info("gateway.serving", url=redact(cfg.opts.url), sessions=cfg.sessions)
            beat = loop.create_task(self._heartbeats(reg))
            await self.stop_event.wait()
            beat.cancel()
        finally:
            for relay in relays:
                await relay.stop(cfg.drain_timeout_s)
                await relay.clients.close()
            if reg is not None:
                for s in list(reg.revisions):
                    try:
                        await reg.release(s)
                    except Exception as exc:  # NATS away at exit: the entry goes stale by itself
                        self.log.warning("gateway.release_failed", session=s, error=repr(exc))
            await nc.close()
            self.log.info("gateway.stopped", code=self.code)
        return self.code

    async def _heartbeats(self, reg: registry.Registry) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            for s in self.cfg.sessions:
                try:
                    await reg.heartbeat(registration(s, self.id, self.cfg.stale_after_s))
                except registry.GatewayConflict as exc:
                    self.log.error("gateway.claim_lost", session=s, error=str(exc))
                    self.code = RET_CONFLICT
                    self.stop_event.set()
                    return
                except Exception as exc:  # NATS restarting: beat again next time
                    self.log.warning("gateway.heartbeat_failed", session=s, error=repr(exc))


def run(cfg: GatewayConfig) -> int:
    """Run a gateway in the foreground; returns its exit code.

    Raises :class:`FleetUnavailable` (NATS unreachable) and :class:`GatewayConflict`
    (another gateway serves a session); the CLI turns them into their exit codes.
    """
    logging_setup.configure(cfg.log_format, cfg.log_level)
    import uvloop

    try:
        return int(uvloop.run(Gateway(cfg).run()))
    except TurnstileError as exc:
        logging_setup.get("turnstile.gateway").error("gateway.refused", error=str(exc), code=exc.code)
        raise
