"""What a training run tells its caller: events while it runs, a TrainResult when it ends.

The loop never prints; console.TrainView and tensorboard.TensorBoardLog are sinks that take
every event. `Stepped` is the per-step event (rich's progress bar is console's business).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ModelConfig, TrainConfig
from ..units import bits_per_char, perplexity

if TYPE_CHECKING:
    from ..evaluate import Metrics


@dataclass
class Started:
    model: ModelConfig
    config: TrainConfig
    params: int
    device: str
    precision: str
    corpus: dict
    train_chars: int
    val_chars: int
    eval_every: int
    checkpoint: Path
    resumed_step: int | None = None
    init_from: str | None = None
    new_chars: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)  # the settings the rule chose, each with its reason


@dataclass
class Stepped:
    step: int
    epoch: float
    chars: int
    elapsed_s: float
    fraction: float | None  # of the budget, when there is one
    lr: float
    train_loss: float | None = None  # set every log_every steps
    chars_per_sec: float | None = None


@dataclass
class Evaluated:
    step: int
    val: Metrics
    train_loss: float | None
    best: bool
    best_val: float
    evals_since_best: int


@dataclass
class Note:
    """Something the user should know that is not an error (a skipped step, a replaced file)."""

    text: str


Event = Started | Stepped | Evaluated | Note
EventSink = Callable[[Event], None]


@dataclass
class TrainResult:
    checkpoint: Path
    last_checkpoint: Path
    metrics_log: Path
    steps: int
    epochs: float
    params: int
    train_loss: float | None
    val_loss: float
    best_step: int
    chars_per_sec: float
    elapsed_s: float
    stopped: str
    skipped_steps: int = 0
    signal: int | None = None  # the signal that interrupted the run (SIGINT, SIGTERM)
    threads: int | None = None  # CPU threads in use at the end (the tuner's last choice)

    @property
    def exit_code(self) -> int:
        """What a shell expects after the run: 0, or 128 + the signal that stopped it (130, 143)."""
        return 128 + self.signal if self.signal else 0

    @property
    def val_perplexity(self) -> float:
        return perplexity(self.val_loss)

    @property
    def val_bpc(self) -> float:
        return bits_per_char(self.val_loss)

    def to_dict(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "last_checkpoint": str(self.last_checkpoint),
            "metrics_log": str(self.metrics_log),
            "steps": self.steps,
            "epochs": round(self.epochs, 4),
            "params": self.params,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_perplexity": self.val_perplexity,
            "val_bpc": self.val_bpc,
            "best_step": self.best_step,
            "chars_per_sec": self.chars_per_sec,
            "elapsed_s": self.elapsed_s,
            "stopped": self.stopped,
            "skipped_steps": self.skipped_steps,
            "threads": self.threads,
        }
