"""Learning curves from a run's metrics log: in the terminal (uniplot) or as an image (matplotlib).

train() appends one JSON object per line to `checkpoints/<name>.metrics.jsonl`, so a curve can be
drawn while the run is still going, or long after, without loading torch or the weights. Every line
has `event` ("train" every --log-every steps, "eval" after each validation), `step`, `epoch`,
`chars` (training characters seen so far), `elapsed_s` and `lr`; train lines add the mean training
loss since the previous line and the speed, eval lines the exact validation loss (and the latest
training loss once there is one). Losses come as nats/char (`*_loss`), perplexity (`*_ppl`) and
bits/char (`*_bpc`). A resumed run drops the lines after its resume point and goes on appending.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import CheckpointError, ConfigError
from .files import atomic_write

COMMON_KEYS = ("event", "step", "epoch", "chars", "elapsed_s", "lr")
TRAIN_KEYS = (*COMMON_KEYS, "train_loss", "train_ppl", "train_bpc", "chars_per_sec")
EVAL_KEYS = (*COMMON_KEYS, "val_loss", "val_ppl", "val_bpc")  # + train_loss/_ppl/_bpc once one is known
IMAGE_FORMATS = ("png", "svg", "pdf")

Points = list[tuple[float, float]]  # (characters seen, value)


@dataclass(frozen=True)
class Curves:
    """The series a plot draws, read from one metrics log."""

    source: Path
    train_bpc: Points
    val_bpc: Points
    lr: Points

    @property
    def name(self) -> str:
        return self.source.name.removesuffix(".metrics.jsonl")

    @property
    def best_val_bpc(self) -> float | None:
        return min((bpc for _, bpc in self.val_bpc), default=None)


def find_metrics(target: str | os.PathLike[str] | None = None) -> Path:
    """The metrics log for a checkpoint, a .last resume file, a metrics log or a folder of
    checkpoints (its newest); by default the newest checkpoint in ./checkpoints."""
    from . import checkpoint as ckpt

    path = Path(target) if target is not None else Path("checkpoints")
    if path.is_dir() or target is None:
        try:
            path = ckpt.newest_checkpoint(path)
        except CheckpointError as e:  # the same finding, with the fix that fits this command
            raise CheckpointError(
                e.message, "train one first (charlm train FILE) or give a checkpoint or .metrics.jsonl path"
            ) from None
    if path.name.endswith(".safetensors"):
        best = path.with_name(path.name.removesuffix(".last.safetensors").removesuffix(".safetensors") + ".safetensors")
        metrics = ckpt.sibling_paths(best)[1]
        if not metrics.is_file():
            raise CheckpointError(
                f"no metrics log for {path} (looked for {metrics})",
                "it is written by `charlm train`; give the .metrics.jsonl path if it was moved",
            )
        return metrics
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such metrics log", "give a checkpoint or its .metrics.jsonl file (both are in ./checkpoints)"
        )
    return path


def read_curves(target: str | os.PathLike[str] | None = None) -> Curves:
    """Reads the log found by find_metrics. Lines that do not parse are skipped: the last one may
    be half-written by a run that is still training."""
    import json

    path = find_metrics(target)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})", "check the file's permissions") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in ("train", "eval"):
            records.append(record)
    if not records:
        if any(line.strip() for line in lines):
            raise CheckpointError(
                f"{path} is not a metrics log written by `charlm train`", "give a checkpoint or its .metrics.jsonl file"
            )
        raise CheckpointError(
            f"{path} has no metrics yet", "plot again once the run has logged a step (every --log-every steps)"
        )
    return Curves(
        source=path,
        train_bpc=_series(records, "train", "train_bpc"),
        val_bpc=_series(records, "eval", "val_bpc"),
        lr=_series(records, "train", "lr"),
    )


def _series(records: list[dict], event: str, key: str) -> Points:
    points = []
    for record in records:
        x, y = record.get("chars"), record.get(key)
        if record["event"] == event and _finite(x) and _finite(y):
            points.append((float(x), float(y)))
    return points


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------- terminal


def _chars_unit(points: Points) -> tuple[float, str]:
    """A divisor and suffix so the x axis reads 2.5M rather than 2,500,000."""
    largest = max((x for x, _ in points), default=0.0)
    for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if largest >= 10 * size:
            return size, suffix
    return 1.0, ""


def terminal_plot(
    curves: Curves, *, width: int | None = None, height: int = 12, color: bool = False, learning_rate: bool = True
) -> str:
    """Text drawing of bits/char (train and validation) against characters seen, with the
    learning rate below when asked. Without colour the series differ by their marks (+ and x)."""
    import uniplot

    width = width or max(30, min(100, shutil.get_terminal_size().columns - 12))
    style = {
        "width": width,
        "color": color,
        "character_set": "braille" if color else "ascii",
        "x_gridlines": [],
        "y_gridlines": [],
    }
    named = [
        (label, points) for label, points in (("train", curves.train_bpc), ("validation", curves.val_bpc)) if points
    ]
    size, suffix = _chars_unit(curves.train_bpc + curves.val_bpc)
    best = curves.best_val_bpc
    title = f"{curves.name}: bits/char" + (f" (best validation {best:.4f})" if best is not None else "")
    parts = [
        uniplot.plot_to_string(
            [[y for _, y in p] for _, p in named],
            [[x / size for x, _ in p] for _, p in named],
            legend_labels=[label for label, _ in named],
            lines=True,
            height=height,
            title=title,
            x_unit=f"{suffix} chars",
            **style,
        )
    ]
    if learning_rate and curves.lr:
        top = max(y for _, y in curves.lr)
        parts.append(
            uniplot.plot_to_string(
                [y for _, y in curves.lr],
                [x / size for x, _ in curves.lr],
                lines=True,
                height=max(3, height // 3),
                title="learning rate",
                y_min=0,
                y_max=top * 1.1 or 1.0,
                x_unit=f"{suffix} chars",
                **style,
            )
        )
    return "\n".join(parts)


def show_training_curve(metrics: Path, stream: IO[str], *, color: bool) -> bool:
    """The small curve printed after `charlm train` on a terminal; False when there is nothing to draw."""
    try:
        curves = read_curves(metrics)
    except CheckpointError:
        return False
    if not curves.train_bpc and not curves.val_bpc:
        return False
    stream.write(terminal_plot(curves, height=8, color=color, learning_rate=False) + "\n")
    stream.flush()
    return True


# ---------------------------------------------------------------------------------------------- image


def write_image(curves: Curves, path: str | os.PathLike[str]) -> Path:
    """Bits/char over characters seen (learning rate beneath), written atomically: an interrupted
    write leaves any earlier picture intact. The format follows the suffix (png, svg or pdf)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in IMAGE_FORMATS:
        raise ConfigError(
            f"-o {path}: cannot tell the image format from the name",
            f"end it in {', '.join('.' + f for f in IMAGE_FORMATS)}",
        )
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise ConfigError(
            "writing an image needs matplotlib, which is not installed",
            "pip install 'charlm[plot]' (or pip install matplotlib), or leave out -o to plot in the terminal",
        ) from None

    figure = Figure(figsize=(8, 6), layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if curves.train_bpc:
        loss_axes.plot(*zip(*curves.train_bpc, strict=True), label="train", linewidth=1, alpha=0.8)
    if curves.val_bpc:
        loss_axes.plot(*zip(*curves.val_bpc, strict=True), label="validation", marker="o", markersize=3)
    best = curves.best_val_bpc
    loss_axes.set_title(curves.name + (f"  (best validation {best:.4f} bits/char)" if best is not None else ""))
    loss_axes.set_ylabel("bits/char")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if curves.lr:
        lr_axes.plot(*zip(*curves.lr, strict=True), color="tab:gray", linewidth=1)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("characters seen")
    lr_axes.xaxis.set_major_formatter(EngFormatter())
    lr_axes.grid(alpha=0.3)
    _write_atomically(path, lambda stream: figure.savefig(stream, format=fmt, dpi=120))
    return path


def _write_atomically(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    try:
        atomic_write(path, fill)
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror})", "choose another -o path") from None
