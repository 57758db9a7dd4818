"""Connecting to a fleet's NATS server: options, credentials, TLS, and a bounded first connect.

The first connect is bounded (a typed :class:`FleetUnavailable` naming the URL,
never a hang); once connected, the client reconnects for as long as it lives,
so a NATS restart costs a pause, not the connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client as NATS

from ipc.errors import FleetUnavailable, InvalidArgument

#: Environment default for ``--nats``.
ENV_URL = "TURNSTILE_NATS"


@dataclass(frozen=True)
class FleetOptions:
    """Where and how to reach NATS: a URL (``nats://user:pass@host:port`` works too) and credentials."""

    url: str
    creds: str | None = None
    user: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    connect_timeout_s: float = 5.0

    @classmethod
    def of(cls, nats_arg: str | FleetOptions) -> FleetOptions:
        """Accept a bare URL or ready options."""
        return nats_arg if isinstance(nats_arg, FleetOptions) else cls(url=nats_arg)

    @property
    def has_credentials(self) -> bool:
        """True when some identity is presented (creds file, user/password, or one in the URL)."""
        return bool(self.creds or self.user or urlsplit(self.url).username)


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


#: URL schemes the NATS client speaks; a bare ``host:port`` means ``nats://``.
SCHEMES = ("nats", "tls", "ws", "wss")


def check_url(url: str) -> None:
    """Raise :class:`InvalidArgument` for a server URL NATS cannot use (say ``http://``), before any wait."""
    for one in url.split(","):
        one = one.strip()
        scheme = one.split("://", 1)[0].lower() if "://" in one else "nats"
        if not one or scheme not in SCHEMES:
            raise InvalidArgument(
                f"{redact(one) or 'an empty server'} is not a NATS URL: use nats://HOST:PORT "
                f"(or {', '.join(s + '://' for s in SCHEMES[1:])})", argument="nats")


def is_loopback(url: str) -> bool:
    """True when every server of ``url`` (comma-separated allowed) is on this host's loopback."""
    for one in url.split(","):
        host = urlsplit(one.strip() if "://" in one else f"nats://{one.strip()}").hostname or ""
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def _tls(opts: FleetOptions) -> ssl.SSLContext | None:
    if opts.tls_ca is None and not opts.url.startswith("tls://"):
        return None
    ctx = ssl.create_default_context(cafile=opts.tls_ca)
    return ctx


async def connect(opts: FleetOptions, *, session: str = "", name: str | None = None,
                  on_error: Callable[[Exception], None] | None = None) -> NATS:
    """Connect, or raise :class:`FleetUnavailable` within ``connect_timeout_s``.

    ``on_error`` sees the errors NATS reports asynchronously (a permissions
    violation, for one, arrives that way and not as the answer of the request
    that caused it).
    """
    check_url(opts.url)
    errors: list[Exception] = []

    async def noted(exc: Exception) -> None:
        # nats-py prints every failed (re)connect attempt by default; keep them for the message instead.
        errors[:] = [exc]
        if on_error is not None:
            on_error(exc)

    kwargs: dict[str, Any] = {
        "servers": [u.strip() for u in opts.url.split(",")],
        "name": name or f"turnstile-{os.getpid()}",
        "connect_timeout": max(1, int(opts.connect_timeout_s)),
        "reconnect_time_wait": 0.25,
        "max_reconnect_attempts": -1,
        "error_cb": noted,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    if opts.creds:
        kwargs["user_credentials"] = opts.creds
    if opts.user:
        kwargs["user"] = opts.user
        kwargs["password"] = opts.password or ""
    tls = _tls(opts)
    if tls is not None:
        kwargs["tls"] = tls
    try:
        return await asyncio.wait_for(nats.connect(**kwargs), opts.connect_timeout_s)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        cause = errors[0] if isinstance(exc, TimeoutError) and errors else exc
        detail = "no answer" if isinstance(cause, TimeoutError) else f"{type(cause).__name__}: {cause}"
        raise FleetUnavailable(
            f"cannot reach NATS at {redact(opts.url)} ({detail}, waited up to {opts.connect_timeout_s:g} s)",
            url=redact(opts.url), session=session, waited_s=opts.connect_timeout_s,
        ) from None
