"""Everything charlm shows a person, on stderr; stdout is left to the product (text, JSON, tables).

On a terminal: colour and a live progress bar. Elsewhere (pipes, CI logs): plain lines, no escape
codes, one per evaluation. NO_COLOR is honoured (rich reads it).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .units import bits_per_char, perplexity

if TYPE_CHECKING:
    from .surprise import TextScore

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

_level = 1  # 0 quiet, 1 normal, 2 verbose; set once per command by the CLI
HEARTBEAT_S = 30.0  # off a terminal, a progress line at least this often


def set_verbosity(*, quiet: bool = False, verbose: bool = False) -> None:
    global _level
    _level = 0 if quiet else 2 if verbose else 1


def verbosity() -> int:
    return _level


def info(text: str) -> None:
    if _level >= 1:
        err.print(text)


def debug(text: str) -> None:
    if _level >= 2:
        err.print(f"[dim]{text}[/dim]")


def _labelled_line(label: str, colour: str, message: str) -> None:
    text = " ".join(str(message).split())
    if err.is_terminal:
        err.print(f"[bold {colour}]{label}:[/bold {colour}] {escape(text)}")
    else:
        sys.stderr.write(f"{label}: {text}\n")
        sys.stderr.flush()


def warning_line(message: str) -> None:
    """One line, always shown, even with --quiet: something the user must know but not an error."""
    _labelled_line("warning", "yellow", message)


def error_line(message: str) -> None:
    """One line, always shown, even with --quiet."""
    _labelled_line("error", "red", message)


def fmt_loss(ce: float | None) -> str:
    if ce is None or not math.isfinite(ce):
        return "-"
    return f"{ce:.4f} nats, ppl {perplexity(ce):.3f}, {bits_per_char(ce):.4f} bpc"


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class TrainView:
    """Renders train() events: a progress bar on a terminal, plain lines elsewhere."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: Any = None
        self.started: Any = None
        self.loss: float | None = None
        self.last_line = time.monotonic()

    def __call__(self, event: Any) -> None:
        from .training.events import Evaluated, Note, Started, Stepped

        if isinstance(event, Started):
            self.on_started(event)
        elif isinstance(event, Stepped):
            self.on_progress(event)
        elif isinstance(event, Evaluated):
            self.on_eval(event)
        elif isinstance(event, Note):
            self.print(f"[yellow]note:[/yellow] {escape(event.text)}")

    def print(self, text: str, *, level: int = 1) -> None:
        if _level < level:
            return
        self.last_line = time.monotonic()
        (self.bar.console if self.bar else err).print(text)

    def on_started(self, e: Any) -> None:
        self.started = e
        m, c = e.model, e.config
        what = "resuming at step " + str(e.resumed_step) if e.resumed_step is not None else "training"
        budget = (
            ", ".join(
                x
                for x in (
                    f"{c.steps} steps" if c.steps else "",
                    f"{c.epochs:g} epochs" if c.epochs else "",
                    f"{fmt_duration(c.time)}" if c.time else "",
                )
                if x
            )
            or f"until validation stops improving ({c.patience} evaluations)"
        )
        self.print(
            f"[bold]{what}[/bold] {m.cell} {m.num_layers}x{m.hidden_size} (embed {m.embed_size}, "
            f"{fmt_count(e.params)} params, vocab {m.vocab_size}) on {escape(e.corpus['name'])}: "
            f"{fmt_count(e.train_chars)} train / {fmt_count(e.val_chars)} validation chars; "
            f"{e.device} {e.precision}; batch {c.batch_size}x{c.seq_len}; budget {budget}"
        )
        for line in e.defaults:
            self.print(f"  default {escape(line)}")
        if e.new_chars:
            self.print(f"fine-tuning from {escape(str(e.init_from))}: vocab extended by {len(e.new_chars)} characters")
        self.print(f"checkpoint {escape(str(e.checkpoint))}, evaluating every {e.eval_every} steps", level=2)
        if err.is_terminal and _level >= 1:
            self.bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=err,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=1000 if c.has_budget() else None, status="")

    def on_progress(self, e: Any) -> None:
        if e.train_loss is not None:
            self.loss = e.train_loss
            if not self.bar:
                self.print(
                    f"step {e.step:>7}  train {fmt_loss(e.train_loss)}  lr {e.lr:.2e}  "
                    f"{fmt_count(e.chars_per_sec or 0)} chars/s",
                    level=2,
                )
        if not self.bar and _level == 1 and time.monotonic() - self.last_line >= HEARTBEAT_S:
            self.heartbeat(e)  # off a terminal (CI, nohup, notebooks): a sign of life
        if self.bar:
            status = (
                f"step {e.step} loss {self.loss:.3f} {fmt_count(e.chars_per_sec or 0)} chars/s"
                if self.loss is not None
                else f"step {e.step}"
            )
            if e.fraction is not None:
                self.bar.update(self.task, completed=int(1000 * e.fraction), status=status)
            else:
                self.bar.update(self.task, status=status)

    def heartbeat(self, e: Any) -> None:
        loss = f"train {bits_per_char(self.loss):.4f} bits/char" if self.loss is not None else "train -"
        left = ""
        if e.fraction:
            left = f", {fmt_duration(e.elapsed_s / e.fraction - e.elapsed_s)} left"
        self.print(
            f"step {e.step:>7}  {loss}  {fmt_count(e.chars_per_sec or 0)} chars/s  "
            f"{fmt_duration(e.elapsed_s)} elapsed{left}"
        )

    def on_eval(self, e: Any) -> None:
        mark = " [green]best[/green]" if e.best else f" (best {e.best_val:.4f}, {e.evals_since_best} without gain)"
        self.print(f"step {e.step:>7}  val {fmt_loss(e.val.cross_entropy)}{mark}  train {fmt_loss(e.train_loss)}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None


# ---------------------------------------------------------------------------------- perplexity --show


def show_surprise(score: TextScore, *, lines: int) -> None:
    """The text on stdout with each character coloured by the bits it cost (surprise.BANDS), one line
    per text line behind its number and bits/char. A text of at most `lines` lines is shown whole, in
    order; a longer one by its `lines` most surprising lines, most surprising first. Plain text, with
    the same columns, when stdout is not a terminal or NO_COLOR is set (rich drops the styles)."""
    from rich.text import Text

    from .surprise import BAND_COLORS, UNKNOWN_COLOR, band, band_label

    def style(colors: tuple[str, str]) -> str:
        return f"{colors[1]} on {colors[0]}" if colors[0] else ""

    whole = len(score.lines) <= lines
    shown = score.lines if whole else score.most_surprising(lines)
    if out.is_terminal and not out.no_color:
        legend = Text("bits per character: ")
        for i, colors in enumerate(BAND_COLORS):
            legend.append(f" {band_label(i)} ", style=style(colors) or "reverse")
            legend.append(" ")
        legend.append(" unknown ", style=style(UNKNOWN_COLOR))
        out.print(legend)
    bits = score.bits
    for line in shown:
        row = Text(f"{line.number:>6} {line.bpc:6.2f}  " if line.chars else f"{line.number:>6} {'-':>6}  ", style="dim")
        for i in range(line.start, line.start + len(line.text)):
            b = bits[i]
            row.append(score.text[i], style=style(UNKNOWN_COLOR if b != b else BAND_COLORS[band(float(b))]))
        out.print(row, overflow="ignore", crop=False)
    if not whole:
        info(
            f"the {len(shown)} most surprising of {len(score.lines):,} lines (line number, bits/char); "
            "--show-lines N shows more"
        )
