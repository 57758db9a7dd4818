"""The fleet layer: a gateway that makes a host's sessions reachable over NATS JetStream.

``registry`` (which gateway serves which session), ``setup`` (streams, buckets,
consumers), ``relay`` (one session's requests through local clients), ``gateway``
(the process lifecycle), ``locals`` (the gateway's local clients), ``cli`` (the
commands), ``demo`` (``turnstile demo --fleet``). The remote client side lives in
``clients/remote.py``, ``clients/remote_aio.py``, ``clients/remote_sync.py``, ``clients/fleet_wire.py`` and
``clients/fleet_conn.py``.
"""
