"""checkpoints/<name>.metrics.jsonl, and the loss figures it and the checkpoint headers record."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..files import atomic_write
from ..units import bits_per_char, perplexity

if TYPE_CHECKING:
    from ..evaluate import Metrics
    from ..run_state import RunState


class MetricsLog:
    """One JSON object per line, appended and flushed, so a killed run keeps its curve."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():  # drop lines from work after the resume point: it is being redone
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
                except ValueError:
                    continue
            atomic_write(path, "".join(kept).encode("utf-8"))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def loss_record(prefix: str, loss: float) -> dict:
    """A loss in all three units: nats, perplexity and bits/char."""
    return {f"{prefix}_loss": loss, f"{prefix}_ppl": perplexity(loss), f"{prefix}_bpc": bits_per_char(loss)}


def metrics_summary(state: RunState, val: Metrics | None) -> dict:
    """The header's "metrics" entry: where the run stands, for `charlm info`."""
    out = {"step": state.step, "best_step": state.best_step, "train_loss": state.train_loss}
    if math.isfinite(state.best_val):
        out.update(loss_record("best_val", state.best_val))
    if val is not None:
        out.update(loss_record("val", val.cross_entropy))
    return out
