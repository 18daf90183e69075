"""A run's clocks: what --time bounds, the training speed, and the time the finish will need."""

from __future__ import annotations

import math
import time


class Clock:
    """Elapsed time over every session of the run (a resume continues it), this session's training
    time and characters (for chars/s), and the measured cost of validations and saves."""

    def __init__(self, *, elapsed_before: float, val_chars: int, world: int, budget: float | None) -> None:
        self.session_start = time.perf_counter()
        self.elapsed_before = elapsed_before
        self.val_chars = val_chars
        self.world = world
        self.budget = budget  # --time in seconds, or None
        self.non_train_time = 0.0  # validations and saves in this session
        self.session_chars = 0
        self.session_steps = 0
        self.last_save = time.perf_counter()
        self.eval_speed: float | None = None  # validation chars/s per process at the last evaluation
        self.save_s = 0.0  # the slowest checkpoint write so far

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def train_time(self) -> float:
        return max(1e-9, time.perf_counter() - self.session_start - self.non_train_time)

    def chars_per_sec(self) -> float:
        return self.session_chars / self.train_time()

    def finish_reserve(self) -> float:
        """Seconds the final validation and checkpoint writes will take, so that --time bounds the
        whole run: the validation text over the speed of the last evaluation (before the first,
        a third of the cost per character of training), plus the slowest save so far, twice."""
        speed = self.eval_speed
        if speed is None and self.session_steps >= 3:  # the first steps pay for warm-up: not a speed
            speed = 3 * self.session_chars / self.train_time() / self.world
        eval_s = self.val_chars / self.world / speed if speed else 0.0
        # never more than half the budget: a machine so slow that validation would take longer
        # still gets half its time for training, and overshoots rather than training nothing
        return min(1.15 * (eval_s + 2 * self.save_s) + 0.2, 0.5 * (self.budget or math.inf))
