"""RunState: the counters that, with the weights, optimizer, RNG and recurrent state, continue a run exactly.

It travels in every checkpoint header as the "state" entry, so it is read back from untrusted
JSON: from_dict() is the one schema, used by checkpoint.read_header and by resume alike. The
recurrent state is not here: it is tensors, carried beside this by the loop and saved as hidden.*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class RunState:
    """Every counter starts at its lowest valid value, so the defaults are also the lower bounds."""

    step: int = 0
    epoch: int = 0
    chunk: int = 0  # steps done in the current epoch
    chars: int = 0  # characters trained on, all processes together
    elapsed: float = 0.0  # seconds of the run before this session (the saved header holds the total)
    best_val: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    plateau_scale: float = 1.0  # the plateau schedule's factor on the learning rate
    plateau_best: float = math.inf
    plateau_bad: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    last_eval_step: int = -1
    train_loss: float | None = None
    world: int = 1  # processes that trained the run (the global batch is world x batch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunState:
        """Validated rebuild: a resume does arithmetic on every value. Missing counters take their
        starting values and other keys are ignored; ValueError names the first bad value."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < f.default:
                    raise ValueError(f"{f.name} = {value!r}")
            elif not (value is None and "None" in f.type):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    raise ValueError(f"{f.name} = {value!r}")
                value = float(value)
            values[f.name] = value
        return cls(**values)

    def evaluated(self, loss: float, config: TrainConfig) -> bool:
        """Count one validation loss: the best so far, and the plateau schedule's patience.
        True when it is the best so far."""
        improved = loss < self.best_val
        if improved:
            self.best_val, self.best_step, self.evals_since_best = loss, self.step, 0
        else:
            self.evals_since_best += 1
        if loss < self.plateau_best - 1e-4:
            self.plateau_best, self.plateau_bad = loss, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > config.plateau_patience:
                self.plateau_scale = max(config.lr_floor, self.plateau_scale * config.plateau_factor)
                self.plateau_bad = 0
        return improved
