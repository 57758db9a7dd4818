"""A session's JetStream objects: its request stream, its results bucket, its two pull consumers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType
from nats.js.kv import KeyValue

from clients import fleet_wire as wire


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
    await js.add_stream(
        name=name, subjects=[wire.request_subject(session, "*")], retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE, num_replicas=cfg.replicas, duplicate_window=cfg.duplicate_window_s,
    )


async def ensure_results(js: JetStreamContext, session: str, cfg: StoreConfig) -> KeyValue:
    """The session's results bucket (made if absent)."""
    try:
        return await js.key_value(wire.results_bucket(session))
    except nats.js.errors.BucketNotFoundError:
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
        await js.add_consumer(stream, ConsumerConfig(
            durable_name=kind, filter_subject=wire.request_subject(session, kind), ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=cfg.ack_wait_s, max_ack_pending=cfg.max_in_flight,
            max_deliver=-1, num_replicas=cfg.replicas,
        ))
