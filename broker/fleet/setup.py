"""A session's JetStream objects: its request stream, its results bucket, its two pull consumers.

Each is made with the configured number of replicas; a NATS that cannot place
that many (a single server, or a cluster with fewer servers up) is a typed
:class:`ReplicasUnavailable` naming the object, not a bare server error.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType
from nats.js.kv import KeyValue

from clients import fleet_wire as wire
from ipc.errors import InvalidArgument

#: JetStream's error code for more than one replica on a server that is not in a cluster.
JS_NOT_CLUSTERED = 10074
#: JetStream's error code for fewer servers (up, with JetStream) in the cluster than replicas asked for.
JS_NO_SUITABLE_PEERS = 10005


class ReplicasUnavailable(InvalidArgument):
    """NATS cannot keep ``replicas`` copies of ``what``: it is one server, or its cluster has fewer servers up.

    A usage error (exit 2): ``--replicas`` asks for more copies than the NATS it
    names can hold. ``server_code`` / ``server_error`` are JetStream's own.
    """

    code = "replicas_unavailable"


@contextlib.asynccontextmanager
async def placing(what: str, replicas: int) -> AsyncIterator[None]:
    """Turn JetStream's "cannot place that many replicas" errors, raised inside, into :class:`ReplicasUnavailable`."""
    try:
        yield
    except nats.js.errors.APIError as exc:
        if exc.err_code == JS_NOT_CLUSTERED:
            why = "the NATS server is not in a cluster, so it keeps one replica"
        elif exc.err_code == JS_NO_SUITABLE_PEERS:
            why = f"the NATS cluster has fewer than {replicas} JetStream servers"
        else:
            raise
        raise ReplicasUnavailable(
            f"cannot make {what} with --replicas {replicas}: {why} (JetStream error {exc.err_code}: "
            f"{exc.description}). Give --replicas at most the number of JetStream servers in the cluster "
            "(1 for a single server).",
            argument="replicas", replicas=replicas, what=what, server_code=exc.err_code,
            server_error=exc.description,
        ) from None


@dataclass(frozen=True)
class StoreConfig:
    """How durable and how long-lived the session's objects are."""

    #: JetStream replicas (1 for one server; 3 on a production cluster).
    replicas: int = 1
    #: How long a request id de-duplicates in the stream (a later duplicate still finds its stored result).
    duplicate_window_s: float = 120.0
    #: How long a result stays collectable by request id.
    results_ttl_s: float = 3600.0
    #: A pulled request not acknowledged (nor touched as in progress) for this long is delivered again.
    ack_wait_s: float = 30.0
    #: Requests of one kind handed to the gateway and not yet finished, at most.
    max_in_flight: int = 1000


async def ensure_stream(js: JetStreamContext, session: str, cfg: StoreConfig) -> None:
    """Create the session's request stream unless it exists (its config is then left as it is)."""
    name = wire.stream_name(session)
    try:
        await js.stream_info(name)
        return
    except nats.js.errors.NotFoundError:
        pass
    # Work-queue retention: a request leaves the stream when the gateway acknowledges it,
    # which it does only once the request's result is stored.
    async with placing(f"the request stream {name}", cfg.replicas):
        await js.add_stream(
            name=name, subjects=[wire.request_subject(session, "*")], retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE, num_replicas=cfg.replicas, duplicate_window=cfg.duplicate_window_s,
        )


async def ensure_results(js: JetStreamContext, session: str, cfg: StoreConfig) -> KeyValue:
    """The session's results bucket (made if absent)."""
    try:
        return await js.key_value(wire.results_bucket(session))
    except nats.js.errors.BucketNotFoundError:
        pass
    async with placing(f"the results bucket {wire.results_bucket(session)}", cfg.replicas):
        return await js.create_key_value(bucket=wire.results_bucket(session), history=1, ttl=cfg.results_ttl_s,
                                         storage=StorageType.FILE, replicas=cfg.replicas, direct=True)


async def fresh_consumers(js: JetStreamContext, session: str, cfg: StoreConfig) -> None:
    """(Re)create the webhook and worker consumers.

    Called by the gateway that just claimed the session: the previous gateway is
    gone, so requests it pulled and never acknowledged are delivered at once to
    the new consumers instead of after the ack wait (work-queue retention keeps
    them in the stream until acknowledged).
    """
    stream = wire.stream_name(session)
    for kind in wire.CONSUMERS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, kind)
        async with placing(f"the {kind} consumer of {stream}", cfg.replicas):
            await js.add_consumer(stream, ConsumerConfig(
                durable_name=kind, filter_subject=wire.request_subject(session, kind), ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL, ack_wait=cfg.ack_wait_s, max_ack_pending=cfg.max_in_flight,
                max_deliver=-1, num_replicas=cfg.replicas,
            ))
