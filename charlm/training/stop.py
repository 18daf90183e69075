"""Ctrl-C and SIGTERM during training: stop at the next step boundary, so the resume checkpoint is whole."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class StopRequest:
    """Set by the first Ctrl-C (SIGINT) or SIGTERM: the loop stops at the next step boundary, writes
    its resume checkpoint, and the CLI exits 128 + the signal's number (130, 143)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def is_set(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """First Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary; a second one
    interrupts at once. Outside the main thread nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
