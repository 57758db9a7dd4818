"""The threaded design turnstile replaces, rebuilt small and faithfully, as a baseline.

One process owns the agent subprocess. Worker and webhook *threads* share it:

* ``_lock`` (an RLock) is the session: a turn's holder keeps it for the whole
  turn, reading the agent's stdout itself until the turn's ``result``;
* ``_stdin_lock`` is held around every stdin write + flush, so two threads'
  bytes never interleave past PIPE_BUF (the fix of PR #980);
* a webhook cancels a worker turn by writing ``interrupt`` to stdin itself,
  without ``_lock`` (the worker holds it until it reads its result, "drain to
  boundary", #980);
* ``_preempt_cond`` lets queued webhooks in first: a webhook raises
  ``_preempt_pending`` and notifies; a worker waits for it to reach zero
  before taking ``_lock`` and re-checks after taking it (#984);
* each thread's kind comes from the thread itself, never from a shared
  attribute (#982).

It speaks to the same stamped sim as turnstile, encodes lines with the same
encoder (:mod:`broker.protocol`) and parses them with the same decoder, so the
only difference measured is the architecture: thread wake-ups, lock handoffs
and the GIL are part of what this baseline's figures contain, by design. There
are no sleeps in its paths.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from benchmarks import harness
from benchmarks.harness import StampReader, first, workspace
from benchmarks.scenarios import HOOK_PROMPT, WORKER_PROMPT, Progress, _quiet
from benchmarks.stats import Results
from broker import protocol

_ids = itertools.count(1)


class ThreadedSession:
    """One agent process shared by threads through a lock (the pre-turnstile design)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: str) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=cwd)
        self._lock = threading.RLock()
        self._stdin_lock = threading.Lock()
        self._preempt_cond = threading.Condition()
        self._preempt_pending = 0  # webhooks waiting for the session (guarded by _preempt_cond)
        self._holder_kind: str | None = None  # guarded by _preempt_cond
        self._local = threading.local()

    # ------------------------------------------------------------ stdin

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        with self._stdin_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def _fire_worker_cancel(self) -> None:
        # Without _lock: the worker holds it until it has read its result.
        self._write(protocol.control_request(f"int-{next(_ids)}", "interrupt"))

    # ------------------------------------------------------------ the session lock

    @contextlib.contextmanager
    def hold(self, kind: str) -> Iterator[None]:
        """Hold the session for a turn (or several); webhooks preempt a worker holder."""
        self._local.kind = kind
        if kind == "webhook":
            with self._preempt_cond:
                self._preempt_pending += 1
                preempt = self._holder_kind == "worker"
            if preempt:
                self._fire_worker_cancel()
            self._lock.acquire()
            with self._preempt_cond:
                self._preempt_pending -= 1
                self._holder_kind = self._local.kind
                self._preempt_cond.notify_all()
        else:
            while True:
                with self._preempt_cond:
                    self._preempt_cond.wait_for(lambda: self._preempt_pending == 0)
                self._lock.acquire()
                with self._preempt_cond:
                    if self._preempt_pending == 0:  # a webhook may have queued in the gap
                        self._holder_kind = self._local.kind
                        break
                self._lock.release()
        try:
            yield
        finally:
            with self._preempt_cond:
                self._holder_kind = None
                self._preempt_cond.notify_all()
            self._lock.release()

    # ------------------------------------------------------------ a turn

    def prompt(self, content: str, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Write a user message and read the agent's output until its result (call while holding)."""
        assert self.proc.stdout is not None
        uid = str(uuidlib.uuid4())
        self._write(protocol.user_message(content, uid))
        readline = self.proc.stdout.readline
        while True:
            line = readline()
            if not line:
                raise EOFError("the agent closed stdout")
            obj = protocol.parse(line)
            if on_event is not None:
                on_event(obj)
            if obj.get("type") == "result" and uid in (obj.get("user_message_uuids") or [uid]):
                return obj

    def close(self) -> None:
        """Close stdin and wait for the agent to exit."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def run(res: Results, n: int, warmup: int, progress: Progress = _quiet) -> None:
    """The same preempt and handoff measurements as turnstile's, on the threaded design."""
    preempt: list[int] = []
    handoff: list[int] = []
    webhook: list[int] = []
    with workspace("threaded") as ws:
        stamp_file = ws.path("stamps")
        sess = ThreadedSession(harness.sim_argv(stamp_file, ws.dir / "sim-state"), harness.child_env(),
                               str(ws.home))
        stamps = StampReader(stamp_file)
        go, streaming, worker_done = threading.Event(), threading.Event(), threading.Event()
        fire, hook_done = threading.Event(), threading.Event()
        stop = False
        hook_t0 = [0]
        results: dict[str, Any] = {}
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                while True:
                    go.wait()
                    go.clear()
                    if stop:
                        return

                    def on_event(obj: dict[str, Any]) -> None:
                        if obj.get("type") == "assistant":
                            streaming.set()

                    with sess.hold("worker"):
                        results["worker"] = sess.prompt(WORKER_PROMPT, on_event)
                    worker_done.set()
            except BaseException as exc:
                errors.append(exc)
                streaming.set()
                worker_done.set()

        def hook() -> None:
            try:
                while True:
                    fire.wait()
                    fire.clear()
                    if stop:
                        return
                    # The webhook "arrives" here: its handler thread stamps and asks for the session.
                    hook_t0[0] = time.perf_counter_ns()
                    with sess.hold("webhook"):
                        results["hook"] = sess.prompt(HOOK_PROMPT)
                    hook_done.set()
            except BaseException as exc:
                errors.append(exc)
                hook_done.set()

        threads = [threading.Thread(target=worker, daemon=True), threading.Thread(target=hook, daemon=True)]
        for t in threads:
            t.start()
        rng = random.Random(1)
        try:
            for i in range(warmup + n):
                streaming.clear()
                worker_done.clear()
                hook_done.clear()
                go.set()
                if not streaming.wait(30) or errors:
                    raise RuntimeError(f"worker turn did not stream: {errors}")
                time.sleep(rng.random() * 0.002)
                fire.set()
                if not hook_done.wait(30) or not worker_done.wait(30) or errors:
                    raise RuntimeError(f"iteration {i} did not finish: {errors}")
                if results["worker"].get("subtype") != "error_during_execution" or results["hook"].get("is_error"):
                    raise RuntimeError(f"iteration {i}: worker {results['worker'].get('subtype')}, "
                                       f"webhook error {results['hook'].get('is_error')}")
                t0 = hook_t0[0]
                _r, st = stamps.wait_for(lambda s, t=t0: s.kind == "user" and s.t_ns >= t, 10, "webhook user stamp")
                t_int = first(st, "control_request", t0, "interrupt")
                t_res = first(st, "result_written", t_int.t_ns if t_int else t0)
                t_user = first(st, "user", t_res.t_ns if t_res else t0)
                if t_int is None or t_res is None or t_user is None:
                    raise RuntimeError(f"iteration {i}: missing stamps {[(s.kind, s.detail) for s in st]}")
                # The webhook turn's own result stamp comes later; skip to it.
                stamps.wait_for(lambda s: s.kind == "result_written", 10, "webhook result stamp")
                if i < warmup:
                    continue
                preempt.append(t_int.t_ns - t0)
                handoff.append(t_user.t_ns - t_res.t_ns)
                webhook.append(t_user.t_ns - t0)
                if (i + 1) % 1000 == 0:
                    progress(f"threaded: {i + 1 - warmup}/{n}")
        finally:
            stop = True
            go.set()
            fire.set()
            for t in threads:
                t.join(5)
            stamps.close()
            sess.close()
    res.add_latency("preempt.threaded", "Threaded baseline: webhook → interrupt read by agent", preempt)
    res.add_latency("handoff.threaded", "Threaded baseline: preempted result written → webhook msg read", handoff)
    res.add_latency("preempt.threaded_webhook", "Threaded baseline: webhook → its prompt read by agent", webhook)
