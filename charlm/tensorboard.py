"""`charlm train --tensorboard DIR`: train() events as TensorBoard scalars.

An event sink like console.TrainView, so the loop itself knows nothing about TensorBoard. The
`tensorboard` package is optional; asking for it without the package installed is a user mistake
with a one-line fix, found before training starts. Scalars are indexed by step; a resumed run
purges the events logged after its resume point, so the curves continue instead of doubling back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .units import bits_per_char, perplexity


class TensorBoardLog:
    """Writes train/val loss, bits/char and perplexity, the learning rate and the speed to `folder`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package, which is not installed",
                "pip install tensorboard (or pip install 'charlm[tensorboard]'), or leave out --tensorboard",
            ) from None
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"--tensorboard {self.folder} is a file, not a folder", "give a folder for the logs")
        self.writer_class = SummaryWriter
        self.writer: Any = None
        self.step = 0

    def __call__(self, event: Any) -> None:
        from .training.events import Evaluated, Note, Started, Stepped

        if isinstance(event, Started):
            self.on_started(event)
        elif self.writer is None:
            return
        elif isinstance(event, Stepped):
            self.step = event.step
            if event.train_loss is not None:
                self.losses("train", event.train_loss, event.step)
                self.writer.add_scalar("learning_rate", event.lr, event.step)
                if event.chars_per_sec:
                    self.writer.add_scalar("chars_per_sec", event.chars_per_sec, event.step)
        elif isinstance(event, Evaluated):
            self.losses("val", event.val.cross_entropy, event.step)
        elif isinstance(event, Note):
            self.writer.add_text("notes", event.text, self.step)

    def on_started(self, event: Any) -> None:
        self.close()
        try:
            self.writer = self.writer_class(log_dir=str(self.folder), purge_step=event.resumed_step)
        except OSError as e:
            raise ConfigError(
                f"cannot write TensorBoard logs to {self.folder} ({e.strerror})",
                "choose a writable folder with --tensorboard",
            ) from None
        self.step = event.resumed_step or 0
        setup = {
            "model": event.model.to_dict(),
            "train": event.config.to_dict(),
            "corpus": event.corpus,
            "params": event.params,
            "device": event.device,
            "precision": event.precision,
        }
        self.writer.add_text("setup", "```\n" + json.dumps(setup, indent=2, default=str) + "\n```", self.step)

    def losses(self, split: str, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            return
        self.writer.add_scalar(f"{split}/loss", loss, step)
        self.writer.add_scalar(f"{split}/bpc", bits_per_char(loss), step)
        self.writer.add_scalar(f"{split}/perplexity", perplexity(loss), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
