"""Entry points of the benchmarks' child processes: ``python -m benchmarks.children CMD ARGS``.

``mq-echo IN OUT``
    The far end of the queue floor: receive on IN, send the same bytes on OUT,
    until an empty message.
``pipe-reader OUTFILE``
    The far end of the pipe floor: wait on stdin with select() like the sim
    does, read, stamp ``perf_counter_ns``, ack one byte on stdout; at EOF write
    the stamps (int64 array) to OUTFILE.
``read-alone REPS PROMPT ARGV...``
    The broker's read path with nobody listening: an asyncio (uvloop) loop
    spawns the agent through :class:`broker.agentproc.AgentProcess`, writes
    one user message per rep and parses every stdout line with
    :func:`broker.protocol.parse`, as the broker does before routing a line;
    prints one JSON line per rep (bytes, lines, write and result times).
``idle-clients SESSION N``
    Connect N :class:`clients.Client` objects, print ``ready``, hold them
    until stdin closes.
"""

from __future__ import annotations

import array
import json
import os
import select
import sys
import time
import uuid as uuidlib


def mq_echo(in_name: str, out_name: str) -> None:
    """Echo messages from one POSIX queue to another until an empty one arrives."""
    import posix_ipc

    qin = posix_ipc.MessageQueue(in_name)
    qout = posix_ipc.MessageQueue(out_name)
    while True:
        data, _prio = qin.receive()
        if not data:
            break
        qout.send(data)
    qin.close()
    qout.close()


def pipe_reader(out_file: str) -> None:
    """Stamp every read of stdin; ack each on stdout."""
    stamps = array.array("q")
    while True:
        select.select([0], [], [])
        data = os.read(0, 65536)
        t = time.perf_counter_ns()
        if not data:
            break
        stamps.append(t)
        os.write(1, b"k")
    with open(out_file, "wb") as f:
        stamps.tofile(f)


def read_alone(reps: int, prompt: str, argv: list[str]) -> None:
    """Drive the agent through the broker's own process and line-reading code, and only parse."""
    import asyncio

    import uvloop

    from broker import protocol
    from broker.agentproc import AgentProcess
    from broker.agents.base import AgentLaunch

    async def main() -> None:
        done: asyncio.Future[None] | None = None
        count = {"bytes": 0, "lines": 0}

        def on_line(line: bytes) -> None:
            count["bytes"] += len(line) + 1
            count["lines"] += 1
            obj = protocol.parse(line)
            if obj.get("type") == "result" and done is not None and not done.done():
                done.set_result(None)

        agent = AgentProcess(
            AgentLaunch(argv=argv, env=dict(os.environ)),
            on_line=on_line, on_exit=lambda a, rc: None, on_overlong=lambda n: None,
            on_stderr=lambda d: None, max_line_bytes=64 * 1024 * 1024,
        )
        await agent.start()
        loop = asyncio.get_running_loop()
        for _ in range(reps):
            done = loop.create_future()
            count["bytes"] = count["lines"] = 0
            line = protocol.user_message(prompt, str(uuidlib.uuid4()))
            t0 = time.perf_counter_ns()
            agent.write(line)
            await done
            t1 = time.perf_counter_ns()
            sys.stdout.write(json.dumps({"bytes": count["bytes"], "lines": count["lines"], "t0": t0, "t1": t1}) + "\n")
            sys.stdout.flush()
        await agent.stop(1.0)

    uvloop.run(main())


def idle_clients(session: str, n: int) -> None:
    """Hold N connected clients until stdin closes."""
    from clients import Client

    clients = [Client(session, "worker") for _ in range(n)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.read()
    for c in clients:
        c.close()


def main(argv: list[str]) -> None:
    """Dispatch on the command name."""
    cmd, args = argv[0], argv[1:]
    if cmd == "mq-echo":
        mq_echo(args[0], args[1])
    elif cmd == "pipe-reader":
        pipe_reader(args[0])
    elif cmd == "read-alone":
        read_alone(int(args[0]), args[1], args[2:])
    elif cmd == "idle-clients":
        idle_clients(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
