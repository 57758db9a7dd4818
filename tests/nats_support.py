"""The fleet's processes for tests: a real nats-server (or a 3-node cluster) per test and `turnstile gateway` children.

Gateways in tests beat every 0.3 s, go stale after 1 s and redeliver an
untouched request after 6 s, so failure tests take seconds, not minutes.
"""

from __future__ import annotations

from pathlib import Path

from broker.testing.gatewayproc import GatewayProcess
from broker.testing.natsproc import NatsCluster, NatsServer, free_port, nats_server_bin

#: Gateway timings for tests (see the module docstring).
FAST_GATEWAY = ("--heartbeat-s", "0.3", "--stale-after-s", "1.0", "--ack-wait-s", "6")


def fast_gateway(url: str, sessions: list[str], log_path: Path, *, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> GatewayProcess:
    """A gateway process with the fast test timings."""
    return GatewayProcess(url, sessions, log_path, extra_args=(*FAST_GATEWAY, *extra_args), env=env)


__all__ = ["FAST_GATEWAY", "GatewayProcess", "NatsCluster", "NatsServer", "fast_gateway", "free_port",
           "nats_server_bin"]
