"""Ctrl-C and SIGTERM during training: stop at the next step boundary, so the resume checkpoint is whole.
`charlm chat` stops a reply the same way, on Ctrl-C alone, so the conversation's state stays whole."""

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
def graceful_stop(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[StopRequest]:
    """First Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary; a second one
    interrupts at once. Outside the main thread nothing is installed.

    A flag rather than Python's KeyboardInterrupt: that exception is raised wherever the main thread
    happens to be, and one raised inside a finaliser is printed and dropped, so a Ctrl-C could be
    lost (a chat reply once ran on for a minute after it in CI), or land between two updates of
    the state."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signal = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
