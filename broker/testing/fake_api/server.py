"""The fake Messages API's HTTP server: :class:`OfflineAPI`, on a background thread.

The real Claude Code CLI runs unchanged against it when ``ANTHROPIC_BASE_URL``
points here, so tests drive turns through the CLI's normal path while the fake
decides what the "model" says.  Everything is deterministic: the default reply
is ``"echo: <newest piece>"`` of the last user message
(:mod:`broker.testing.fake_api.recording`), and ``[api:...]`` directives in
it script the reply (:mod:`broker.testing.fake_api.directives`).  Every
request is recorded, and a test can wait on what was received and sent.
"""


from __future__ import annotations

import contextlib
import hashlib
import json
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import IO, Any

from broker.testing.fake_api.directives import Directives, big_text, parse_directives
from broker.testing.fake_api.recording import (
    CLIENT_GONE,
    RecordedRequest,
    has_tool_result,
    last_user,
    prompt_pieces,
)

__all__ = ["OfflineAPI", "serve"]

# Spacing of deltas in a slow stream: small enough that an interrupt lands
# mid-stream, large enough not to flood the CLI with thousands of lines.
_SLOW_TICK_S = 0.02
# Big replies go out in pieces so no single SSE event holds megabytes.
_BIG_CHUNK = 64 * 1024
# How often a waiting handler re-checks the stop flag when its socket is quiet.
_POLL_S = 0.05


class _ClientGone(Exception):
    """The client closed the connection, or the server is stopping."""


class _Server(ThreadingHTTPServer):
    # Handler threads are joined explicitly in OfflineAPI.stop(), after their
    # sockets are shut down; daemon threads keep a stuck handler from blocking
    # interpreter exit.
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, api: OfflineAPI, address: tuple[str, int]) -> None:
        self.api = api
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A CLI killed mid-request resets its keep-alive connection: expected, not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionResetError | BrokenPipeError | _ClientGone):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the CLI keeps its connection alive, as with the real API.
    protocol_version = "HTTP/1.1"
    server: _Server
    _t_ns: int = 0
    _seq: int = -1

    # -- plumbing ---------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.api._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._track(self.connection, add=False)

    def parse_request(self) -> bool:
        # Called right after the request line is read: the arrival stamp.
        self._t_ns = time.perf_counter_ns()
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet by default: tests read the recorded requests, not stderr.
        if self.server.api.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer section ends with an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, obj: Any, extra_headers: Sequence[tuple[str, str]] = ()) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", f"req_offline_{self._t_ns}")
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, kind: str, message: str, *, retry: bool = True) -> None:
        headers = [] if retry else [("x-should-retry", "false")]
        body = {"type": "error", "error": {"type": kind, "message": message}}
        self._send_json(status, body, headers)

    def _wait(self, timeout_s: float) -> None:
        """Sleep up to ``timeout_s``, raising ``_ClientGone`` the moment the
        peer disconnects or the server stops.

        Waiting on the socket, not on a failed write, is what makes the abort
        prompt: a write to a closed peer can succeed once before it fails.
        """
        deadline = time.monotonic() + timeout_s
        api = self.server.api
        while True:
            if api.stopping:
                raise _ClientGone
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                readable, _, _ = select.select([self.connection], [], [], min(left, _POLL_S))
            except (OSError, ValueError) as exc:
                raise _ClientGone from exc
            if readable:
                try:
                    peek = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _ClientGone from exc
                if not peek:
                    raise _ClientGone
                # Unexpected bytes from the client while we stream: not a
                # disconnect, but select would spin, so just sleep instead.
                if api._stop_event.wait(min(left, _POLL_S)):
                    raise _ClientGone

    # -- SSE ----------------------------------------------------------------

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", f"req_offline_{self._t_ns}")
        self.end_headers()
        self.wfile.flush()

    def _event(self, name: str, data: dict[str, Any]) -> None:
        payload = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone from exc
        self.server.api._note(self._seq, name)

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone from exc

    # -- routes -------------------------------------------------------------

    def do_POST(self) -> None:
        """Route ``/v1/messages`` and ``/v1/messages/count_tokens``."""
        path = self.path.split("?", 1)[0]
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self._record(path, {}, len(raw))
            self._error(400, "invalid_request_error", "request body is not a JSON object")
            return
        record = self._record(path, body, len(raw))
        if path == "/v1/messages":
            self._messages(body, record)
        elif path == "/v1/messages/count_tokens":
            self._send_json(200, {"input_tokens": max(1, len(raw) // 4)})
        else:
            self._not_found()

    def do_GET(self) -> None:
        """Every GET is unknown here."""
        self._record(self.path.split("?", 1)[0], {}, 0)
        self._not_found()

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _not_found(self) -> None:
        self._error(404, "not_found_error", f"no such endpoint: {self.command} {self.path}")

    def _record(self, path: str, body: dict[str, Any], body_bytes: int) -> RecordedRequest:
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        last = last_user(messages)
        pieces = prompt_pieces(last.get("content")) if last else []
        model = body.get("model")
        rec = RecordedRequest(
            method=self.command,
            path=path,
            model=model if isinstance(model, str) else None,
            messages=messages,
            stream=body.get("stream") is True,
            t_ns=self._t_ns,
            prompt="\n".join(pieces),
            latest=pieces[-1] if pieces else "",
            body_bytes=body_bytes,
            headers={k: v for k, v in self.headers.items()},
        )
        rec = self.server.api._add(rec)
        self._seq = rec.seq
        return rec

    def _messages(self, body: dict[str, Any], rec: RecordedRequest) -> None:
        last = last_user(rec.messages)
        # A tool_result means the turn is continuing after our tool_use: answer
        # with text, never re-apply the directives of the original prompt.
        after_tool = has_tool_result(last)
        # Only the newest piece: after an API error the CLI sends the failed
        # prompt again in front of the next one, and reading the whole text
        # would replay an old [api:status=...] forever and wedge the session.
        d = Directives() if after_tool else parse_directives(rec.latest)
        model = rec.model or "claude-offline"
        if not self.server.api.serves(model):
            # The real API's answer to an unknown model id (the CLI reports it as an API error).
            self._error(404, "not_found_error", f"model: {model}", retry=False)
            return

        if d.status is not None:
            if d.status_times is None:
                self._error(d.status, _error_type(d.status), "scripted error", retry=False)
                return
            key = hashlib.sha256(json.dumps(rec.messages, sort_keys=True).encode()).hexdigest()
            if self.server.api._count_attempt(key) <= d.status_times:
                self._error(d.status, _error_type(d.status), "scripted transient error")
                return

        msg_id = f"msg_offline_{self._t_ns}"
        input_tokens = max(1, rec.body_bytes // 4)
        blocks: list[dict[str, Any]]
        if d.tool is not None:
            name, tool_input = d.tool
            tool_id = (
                "toolu_offline_"
                + hashlib.sha256(json.dumps([name, tool_input, len(rec.messages)]).encode()).hexdigest()[:20]
            )
            blocks = [{"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}]
            stop_reason = "tool_use"
        else:
            text = big_text(d.big) if d.big is not None else f"echo: {rec.latest}"
            blocks = [{"type": "text", "text": text}]
            stop_reason = "end_turn"
        output_tokens = max(1, sum(len(json.dumps(b)) for b in blocks) // 4)

        if not rec.stream:
            if d.hang:
                with contextlib.suppress(_ClientGone):
                    self._wait(float("inf"))
                self.close_connection = True
                self.server.api._note(rec.seq, CLIENT_GONE)
                return
            self._send_json(
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": blocks,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": _usage(input_tokens, output_tokens),
                },
            )
            return

        self._start_stream()
        try:
            self._event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": _usage(input_tokens, 1),
                    },
                },
            )
            if d.hang:
                self._wait(float("inf"))
            for index, block in enumerate(blocks):
                self._stream_block(index, block, d.slow_ms)
            self._event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
            )
            self._event("message_stop", {"type": "message_stop"})
            self._end_stream()
        except _ClientGone:
            self.close_connection = True
            self.server.api._note(rec.seq, CLIENT_GONE)

    def _stream_block(self, index: int, block: dict[str, Any], slow_ms: int | None) -> None:
        if block["type"] == "tool_use":
            start = {**block, "input": {}}
            pieces = [json.dumps(block["input"])]
            delta_kind, delta_key = "input_json_delta", "partial_json"
        else:
            start = {"type": "text", "text": ""}
            pieces = _split(block["text"], slow_ms)
            delta_kind, delta_key = "text_delta", "text"
        self._event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
        gap_s = (slow_ms / 1000 / len(pieces)) if slow_ms and pieces else 0.0
        for piece in pieces:
            self._event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": delta_kind, delta_key: piece},
                },
            )
            if gap_s:
                self._wait(gap_s)
        self._event("content_block_stop", {"type": "content_block_stop", "index": index})


def _split(text: str, slow_ms: int | None) -> list[str]:
    """Cut reply text into the deltas of one stream."""
    if not text:
        return [""]
    if not slow_ms:
        return [text[i : i + _BIG_CHUNK] for i in range(0, len(text), _BIG_CHUNK)]
    # About one delta per tick, but never empty pieces: a short text gets
    # fewer, more widely spaced deltas and still lasts slow_ms in total.
    n = max(1, min(len(text), round(slow_ms / 1000 / _SLOW_TICK_S)))
    size = -(-len(text) // n)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")


class OfflineAPI:
    """A fake Messages API server on a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    ``port=0`` picks a free ephemeral port; read it back from :attr:`port`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        record_file: IO[str] | None = None,
        verbose: bool = False,
        models: Sequence[str] | None = None,
    ) -> None:
        self.host = host
        #: The models served; any other is refused with a 404, as the real API does.
        #: None: every id starting with ``claude-`` (the form of every real model id).
        self.models = None if models is None else frozenset(models)
        self._requested_port = port
        self._record_file = record_file
        self.verbose = verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._attempts: dict[str, int] = {}
        self._sent: dict[int, list[str]] = {}
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stop_event = threading.Event()

    def serves(self, model: str) -> bool:
        """True if a request for ``model`` is answered (else it gets the real API's 404)."""
        return model.startswith("claude-") if self.models is None else model in self.models

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> OfflineAPI:
        """Bind and start serving; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("OfflineAPI already started")
        self._stop_event.clear()
        self._server = _Server(self, (self.host, self._requested_port))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_S},
            name=f"offline-api-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, cut open connections (releasing hung streams) and
        wait for the handler threads.  Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stop_event.set()
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = dict(self._conns)
        for conn in conns:
            # Wakes handlers blocked in readline (keep-alive) or in _wait.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout_s
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None

    def __enter__(self) -> OfflineAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has begun."""
        return self._stop_event.is_set()

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("OfflineAPI not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL for ``ANTHROPIC_BASE_URL``."""
        return f"http://{self.host}:{self.port}"

    # -- recorded requests --------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    def messages_requests(self) -> list[RecordedRequest]:
        """The recorded ``POST /v1/messages`` requests only."""
        return [r for r in self.requests if r.path == "/v1/messages"]

    def wait_for(self, predicate: Callable[[RecordedRequest], bool], timeout_s: float) -> RecordedRequest:
        """Return the first recorded request (past or future) matching
        ``predicate``; raise ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for rec in self._requests[seen:]:
                    if predicate(rec):
                        return rec
                seen = len(self._requests)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching request within {timeout_s} s")
                self._cond.wait(left)

    def sent_events(self, rec: RecordedRequest) -> list[str]:
        """Names of the SSE events sent so far in answer to ``rec``, in order;
        ends with :data:`CLIENT_GONE` if the stream was cut short."""
        with self._cond:
            return list(self._sent.get(rec.seq, ()))

    def wait_for_sent(self, rec: RecordedRequest, name: str, timeout_s: float, count: int = 1) -> None:
        """Wait until event ``name`` (or :data:`CLIENT_GONE`) has been sent
        ``count`` times for ``rec``; raise ``TimeoutError`` after ``timeout_s``.

        Lets a test act at a known point of a stream (say, interrupt after the
        first delta) without sleeping.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._sent.get(rec.seq, []).count(name) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{name} not sent for request {rec.seq} within {timeout_s} s")
                self._cond.wait(left)

    @property
    def active_connections(self) -> int:
        """Connections currently open (a handler thread runs for each)."""
        with self._cond:
            return len(self._conns)

    def wait_idle(self, timeout_s: float) -> None:
        """Wait until no connection is open (every handler has returned);
        raise ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._conns:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._conns)} connections still open after {timeout_s} s")
                self._cond.wait(left)

    def _add(self, rec: RecordedRequest) -> RecordedRequest:
        with self._cond:
            rec = replace(rec, seq=len(self._requests))
            self._requests.append(rec)
            if self._record_file is not None:
                self._record_file.write(json.dumps(rec.to_json()) + "\n")
                self._record_file.flush()
            self._cond.notify_all()
            return rec

    def _note(self, seq: int, name: str) -> None:
        with self._cond:
            self._sent.setdefault(seq, []).append(name)
            self._cond.notify_all()

    def _count_attempt(self, key: str) -> int:
        with self._cond:
            self._attempts[key] = self._attempts.get(key, 0) + 1
            return self._attempts[key]

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._conns[conn] = threading.current_thread()
                if self.stopping:
                    # Accepted just before stop() took its snapshot: cut it too.
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
            else:
                self._conns.pop(conn, None)
            self._cond.notify_all()


@contextlib.contextmanager
def serve(host: str = "127.0.0.1", port: int = 0) -> Iterator[OfflineAPI]:
    """Context manager shorthand: ``with serve() as api: ...``."""
    with OfflineAPI(host, port) as api:
        yield api
