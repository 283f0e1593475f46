"""The engine loop: one thread owns the engine (it is not thread-safe) and steps it while there is work.

Request handlers live on the asyncio loop. They hand sequences in and out through an inbox (`submit`, `abort`);
the engine thread hands each step's new text back through the request's asyncio.Queue with
`loop.call_soon_threadsafe`. Nothing else touches the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from tandem.engine import Engine, Sequence

log = logging.getLogger("tandem.serve")

RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


@dataclass(slots=True)
class Event:
    """What one engine step produced for one request."""

    text: str
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error"
    completion_tokens: int
    error: str | None = None


class Handle:
    """One submitted sequence and the asyncio queue its events arrive on."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop):
        self.seq, self.loop = seq, loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False  # set on the asyncio side once the final event was taken

    def post(self, event: Event) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the asyncio loop is closed: nobody is listening any more
            pass


@dataclass(slots=True)
class Stats:
    """A snapshot of the engine, written by the engine thread after every step, read by /metrics."""

    waiting: int = 0
    running: int = 0
    used_blocks: int = 0
    num_blocks: int = 0
    tokens_generated: int = 0
    steps: int = 0
    errors: int = 0


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = Stats(num_blocks=engine.cache.num_blocks)
        self._inbox: deque[tuple[str, Handle]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens_generated) samples
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)

    # ------------------------------------------------------------------ asyncio side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every sequence, end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, seq: Sequence) -> Handle:
        handle = Handle(seq, asyncio.get_running_loop())
        self._send("add", handle)
        return handle

    def abort(self, handle: Handle) -> None:
        self._send("abort", handle)

    def _send(self, op: str, handle: Handle) -> None:
        self._inbox.append((op, handle))
        self._wake.set()

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        samples = [s for s in list(self._rate) if now - s[0] <= RATE_WINDOW_S]
        if not samples:
            return 0.0
        t0, n0 = samples[0]
        return (self.stats.tokens_generated - n0) / max(now - t0, 1.0)

    def queued(self) -> int:
        """Requests not yet running: in the engine's queue or still in the inbox."""
        return self.stats.waiting + sum(1 for op, _ in list(self._inbox) if op == "add")

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        handles: dict[int, Handle] = {}
        while True:
            self._drain(handles)
            if self._stopping:
                self._fail_all(handles, "abort", None)
                self._publish()
                return
            if not self.engine.has_work():
                self._publish()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                advanced = self.engine.step()
            except Exception as e:  # a failed step must not take the server down: fail its requests
                log.exception("engine step failed; aborting %d requests", len(handles))
                self.stats.errors += 1
                self._fail_all(handles, "error", f"internal error in the engine: {type(e).__name__}: {e}")
                self._publish()
                continue
            for seq in advanced:
                handle = handles.get(seq.id)
                if handle is None:
                    continue
                handle.post(Event(seq.take_text(), seq.finish_reason, len(seq.output)))
                if seq.finished:
                    del handles[seq.id]
            self._publish()

    def _drain(self, handles: dict[int, Handle]) -> None:
        while self._inbox:
            op, handle = self._inbox.popleft()
            seq = handle.seq
            if op == "add":
                try:
                    self.engine.add(seq)
                except ValueError as e:
                    handle.post(Event("", "error", 0, str(e)))
                    continue
                handles[seq.id] = handle
            elif handles.pop(seq.id, None) is not None:
                self.engine.abort(seq)

    def _fail_all(self, handles: dict[int, Handle], reason: str, error: str | None) -> None:
        for handle in handles.values():
            self.engine.abort(handle.seq)
            handle.post(Event("", reason, len(handle.seq.output), error))
        handles.clear()
        for seq in list(self.engine.waiting) + list(self.engine.running):  # none expected; never leak blocks
            self.engine.abort(seq)

    def _publish(self) -> None:
        e, s = self.engine, self.stats
        s.waiting, s.running = len(e.waiting), len(e.running)
        s.used_blocks, s.tokens_generated = e.cache.used_blocks, e.tokens_generated
        s.steps += 1
        now = time.monotonic()
        if not self._rate or now - self._rate[-1][0] >= 0.25:
            self._rate.append((now, e.tokens_generated))
        while self._rate and now - self._rate[0][0] > RATE_WINDOW_S + 1:
            self._rate.popleft()
