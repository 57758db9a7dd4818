"""The fleet registry: a KV bucket of served sessions, claimed by compare-and-set, kept by heartbeats.

A gateway claims a session with ``kv.create`` (only if absent) or, when the
entry's heartbeat is older than its stated staleness, with ``kv.update(last=
revision)``; of two racing claimers exactly one wins. Each heartbeat is again an
update against the revision it last wrote, so a gateway that was replaced while
it was cut off learns it at its next heartbeat and stops serving.
"""

from __future__ import annotations

import time

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.kv import KeyValue

from clients import fleet_wire as wire
from ipc.errors import AlreadyRunning

#: Registry entries of gateways gone for this long vanish from ``status --nats``.
REGISTRY_TTL_S = 24 * 3600.0


class GatewayConflict(AlreadyRunning):
    """Another live gateway serves the session (or took it over from this one): exit 10, like a second broker."""

    code = "gateway_conflict"


def alive(reg: wire.Registration, now_unix: float | None = None) -> bool:
    """True when the entry's heartbeat is fresh."""
    now = time.time() if now_unix is None else now_unix
    return now - reg.heartbeat_unix < reg.stale_after_s


async def open_bucket(js: JetStreamContext, *, create: bool, replicas: int = 1) -> KeyValue | None:
    """The registry bucket; made when ``create`` (a gateway), else None if absent (a status reader)."""
    try:
        return await js.key_value(wire.REGISTRY_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
    return await js.create_key_value(bucket=wire.REGISTRY_BUCKET, history=1, ttl=REGISTRY_TTL_S,
                                     storage=StorageType.FILE, replicas=replicas)


def _claimed_just_now(session: str) -> GatewayConflict:
    return GatewayConflict(f"session {session!r} was claimed by another gateway just now", session=session)


class Registry:
    """One gateway's claims in the registry."""

    def __init__(self, kv: KeyValue, gateway_id: str) -> None:
        self.kv = kv
        self.gateway_id = gateway_id
        self.revisions: dict[str, int] = {}

    async def claim(self, reg: wire.Registration) -> None:
        """Claim ``reg.session`` or raise :class:`GatewayConflict`."""
        data = wire.encode_registration(reg)
        if await self._write(reg.session, data, None):
            return
        found = await self._current(reg.session)
        if found is None:
            # Deleted between our create and get: try once more from the top.
            if await self._write(reg.session, data, None):
                return
            raise _claimed_just_now(reg.session)
        current, revision = found
        if current.gateway != self.gateway_id and alive(current):
            raise GatewayConflict(
                f"session {reg.session!r} is already served by gateway {current.gateway} "
                f"(host {current.host}, pid {current.pid}, heartbeat {time.time() - current.heartbeat_unix:.1f} s ago)",
                session=reg.session, gateway=current.gateway, host=current.host, pid=current.pid,
            )
        if not await self._write(reg.session, data, revision):
            raise _claimed_just_now(reg.session)

    async def heartbeat(self, reg: wire.Registration) -> None:
        """Refresh the entry; raise :class:`GatewayConflict` if another gateway replaced this one."""
        data = wire.encode_registration(reg)
        if await self._write(reg.session, data, self.revisions[reg.session]):
            return
        # In a failover an update can be stored while its reply is lost (the client timed
        # out): the entry then is ours at a revision we never heard of. Only another
        # gateway's entry (or none) means this one was replaced.
        found = await self._current(reg.session)
        if found is None or found[0].gateway != self.gateway_id or not await self._write(reg.session, data, found[1]):
            raise GatewayConflict(f"session {reg.session!r} was taken over by another gateway", session=reg.session)

    async def _write(self, session: str, data: bytes, last: int | None) -> bool:
        """Store the entry, created (``last`` None) or over revision ``last``; False if that revision moved on."""
        try:
            if last is None:
                self.revisions[session] = await self.kv.create(session, data)
            else:
                self.revisions[session] = await self.kv.update(session, data, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def _current(self, session: str) -> tuple[wire.Registration, int] | None:
        """The entry in the bucket now, with its revision; None if there is none."""
        try:
            entry = await self.kv.get(session)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return wire.decode_registration(entry.value), entry.revision

    async def release(self, session: str) -> None:
        """Remove this gateway's entry (only if it is still ours)."""
        rev = self.revisions.pop(session, None)
        if rev is not None:
            await self.kv.delete(session, last=rev)


async def list_fleet(js: JetStreamContext) -> list[wire.Registration]:
    """Every registered session, sorted by name."""
    kv = await open_bucket(js, create=False)
    if kv is None:
        return []
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    out = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue
        if entry.value:
            out.append(wire.decode_registration(entry.value))
    return sorted(out, key=lambda r: r.session)
