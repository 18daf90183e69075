"""Concurrent generations on one model, stepped together as one batch.

A recurrent model's state is a few vectors per stream, so serving many people at once needs no
queue: one worker thread per model keeps every running generation as a row of one batch and runs
one step for all of them. A request joins between two steps (after its seed has been read in its own
forward pass) and leaves when it is done, stopped or disconnected. Each row keeps its own settings
and random stream (sample.make_picker, sample.new_generator), so a request writes the same text with
the same rng_seed as `charlm sample --rng-seed` does, whoever else is being served (exactly so with
int8 weights, the CPU default, whose integer products do not depend on the batch).

Characters reach the request's asyncio queue in small bundles (every FLUSH_S, and at the end), so a
busy server does not wake the event loop once per character per client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..device import ThreadTuner, cpu_settings
from ..errors import CharlmError
from ..sample import Picker, StopRule, check_options, check_stops, encode_seed, make_picker, new_generator

if TYPE_CHECKING:
    from ..lm import CharLM

FLUSH_S = 0.05


class PoolFull(CharlmError):
    """Every generation slot is taken: the client should try again shortly (HTTP 429)."""


@dataclass(frozen=True)
class Request:
    seed: str = ""
    length: int = 500
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    rng_seed: int | None = None
    stop: tuple[str, ...] = ()  # as `charlm sample --stop`: each ends the sample, left out unless include_stop
    lines: int | None = None
    include_stop: bool = False


@dataclass(frozen=True)
class Event:
    """What a generation's reader receives: kind 'chars' (text), then one 'done' or 'error'."""

    kind: str
    text: str = ""
    summary: dict = field(default_factory=dict)


class Generation:
    """One request's row: its picker and random stream, what it has written, and its outbox."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.request = request
        self.loop = loop
        self.deadline = deadline
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.written = 0  # characters the model wrote (what --length caps)
        self.sent = 0  # characters passed on: a stop string left out, or held back, is not
        self.rule = StopRule(request.stop, request.lines, include_stop=request.include_stop)
        self.pending: list[str] = []
        self.began = time.perf_counter()
        self.first_char_s: float | None = None
        self.pick: Picker | None = None
        self.next_id: torch.Tensor | None = None  # [1]: the character it just wrote, the next step's input

    def cancel(self) -> None:
        """The client went away or pressed stop: the worker drops the row before its next step."""
        self.cancelled.set()

    def _post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def flush(self) -> None:
        text = "".join(self.pending)
        self.pending.clear()
        if text:
            self.sent += len(text)
            self._post(Event("chars", text))

    def finish(self, stopped: str) -> None:
        if stopped in ("length", "timeout"):
            self.pending.append(self.rule.flush())  # what was held back as a possible stop string
        self.flush()
        elapsed = time.perf_counter() - self.began
        self._post(
            Event(
                "done",
                summary={
                    "chars": self.sent,
                    "stopped": stopped,
                    "seconds": round(elapsed, 4),
                    "first_char_s": None if self.first_char_s is None else round(self.first_char_s, 4),
                    "chars_per_sec": round(self.written / elapsed, 1) if elapsed > 0 else None,
                },
            )
        )

    def fail(self, message: str) -> None:
        self.flush()
        self._post(Event("error", summary={"error": message}))


class GenerationPool:
    """Runs the generations of one model; `start` is called from the event loop."""

    def __init__(self, lm: CharLM) -> None:
        self.lm = lm
        self._joining: list[Generation] = []
        self._priming = 0  # taken from _joining by the worker, not yet in _rows
        self._rows: list[Generation] = []
        self._lock = threading.Condition()
        self._closed = ""  # why the pool was closed, once it is
        self._thread = threading.Thread(target=self._run, name="charlm-generate", daemon=True)
        self._thread.start()
        self.served = 0  # generations finished, for /api/models and the benchmark

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._rows) + len(self._joining) + self._priming

    def start(self, request: Request, *, timeout_s: float = 120.0) -> Generation:
        """Checks the request (ConfigError, VocabError) and queues it to join the batch; it ends after
        `timeout_s` seconds however far it got. How many may run at once is the caller's rule (the
        app counts over every model), checked against `active` in the same event-loop turn."""
        check_options(
            length=request.length,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            num_samples=1,
        )
        check_stops(request.stop, request.lines)
        encode_seed(request.seed, self.lm.vocab)
        generation = Generation(request, asyncio.get_running_loop(), time.perf_counter() + timeout_s)
        with self._lock:
            if self._closed:
                raise PoolFull(self._closed, "try again in a moment")
            self._joining.append(generation)
            self._lock.notify()
        return generation

    def close(self, reason: str = "the server is shutting down") -> None:
        """Ends every generation (with an error event naming `reason`) and the worker thread."""
        with self._lock:
            self._closed = reason
            self._lock.notify()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        step = self.lm.sampler.step
        chars = self.lm.vocab.chars
        last_flush = time.perf_counter()
        # one thread or all cores, whichever steps faster now (device.ThreadTuner): measured with 16
        # clients on 2 cores, two threads halved the quiet throughput and beside a CPU-bound
        # neighbour cut it to a twelfth (bench/serve.py)
        tuner = ThreadTuner(self.lm.device, self.lm.threads)
        with cpu_settings(self.lm.threads), torch.inference_mode(), tuner:
            while True:
                with self._lock:
                    while not self._rows and not self._joining and not self._closed:
                        self._lock.wait()
                    if self._closed:
                        for g in self._rows + self._joining:
                            g.fail(self._closed)
                        return
                    joining, self._joining = self._joining, []
                    self._priming = len(joining)
                try:
                    try:
                        self._regroup(step, joining)
                    finally:
                        with self._lock:
                            self._priming = 0
                    if self._rows:
                        with tuner.unit(len(self._rows)):
                            self._advance(step, chars)
                except Exception as e:  # a bug in a step ends the generations in it, not the server
                    for g in self._rows:
                        g.fail(f"generation failed: {type(e).__name__}: {e}")
                    self._rows = []
                now = time.perf_counter()
                if now - last_flush >= FLUSH_S:
                    for g in self._rows:
                        g.flush()
                    last_flush = now

    def _regroup(self, step, joining: list[Generation]) -> None:  # noqa: ANN001 - sample.StepModel
        """Drops finished rows and adds primed new ones, carrying every kept row's state."""
        now = time.perf_counter()
        kept, states = [], []
        for i, g in enumerate(self._rows):
            if g.cancelled.is_set():
                g.finish("cancelled")
            elif g.rule.stopped:
                g.finish(g.rule.stopped)
            elif g.written >= g.request.length:
                g.finish("length")
            elif now > g.deadline:
                g.finish("timeout")
            else:
                kept.append(i)
        changed = len(kept) != len(self._rows) or joining
        if not changed:
            return
        if kept:
            old = step.state
            states.append(tuple(t[:, kept] for t in old))
        rows = [self._rows[i] for i in kept]
        for g in joining:
            if g.cancelled.is_set():
                g.finish("cancelled")
                continue
            try:
                state = self._prime(g)
            except Exception as e:  # this request alone fails
                g.fail(f"generation failed: {type(e).__name__}: {e}")
                continue
            if g.rule.stopped:
                g.finish(g.rule.stopped)
                continue
            if g.written >= g.request.length:
                g.finish("length")
                continue
            rows.append(g)
            states.append(state)
        self._rows = rows
        if rows:
            step.reset(tuple(torch.cat(parts, 1) for parts in zip(*states, strict=True)))

    def _prime(self, g: Generation) -> tuple[torch.Tensor, ...]:
        """Reads the seed in one forward pass and writes the first character, as Sampler.stream does."""
        r = g.request
        generator = new_generator(self.lm.device, r.rng_seed)
        logits, state = self.lm.sampler.prime(r.seed, 1)
        g.pick = make_picker(
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, length=r.length, generator=generator
        )
        self._emit(g, g.pick(logits), self.lm.vocab.chars)
        return state

    def _advance(self, step, chars: list[str]) -> None:  # noqa: ANN001 - sample.StepModel
        ids = torch.cat([g.next_id for g in self._rows])  # [B]
        logits = step(ids)  # [B, V]
        for i, g in enumerate(self._rows):
            self._emit(g, g.pick(logits[i : i + 1]), chars)

    @staticmethod
    def _emit(g: Generation, next_id: torch.Tensor, chars: list[str]) -> None:
        g.next_id = next_id
        ch = chars[int(next_id)]
        g.pending.append(g.rule.feed(ch) if g.rule.active else ch)
        g.written += 1
        if g.first_char_s is None:
            g.first_char_s = time.perf_counter() - g.began
            g.flush()
