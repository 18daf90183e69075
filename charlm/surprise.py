"""Where a text surprises a model: the bits each character cost, per line and for the whole text.

A character model's most useful output besides writing is *where* it is surprised: the odd line in a
log, the typo or OCR error in a page, the passage in another hand. Scoring is the exact streamed
scoring of evaluate.py with per-character figures recorded; this module maps them back onto the
text (unknown characters included, as unscored) and groups them by line. Every grouping is a sum of
the same per-character figures, so the lines' characters-weighted cross-entropy is the text's.

The colour scale is fixed, so pictures of different texts and models compare: BANDS below, in bits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .device import ThreadTuner
from .evaluate import Metrics, PerChar, score, score_adapting, scoring_cuts
from .model import CharRNN
from .units import bits_per_char
from .vocab import Vocab, text_to_codes

# Upper bounds (bits) of the colour bands every view uses: a character the model expected costs well
# under a bit; 12 bits is about 1 in 4,000, a character it all but ruled out.
BANDS = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
SCALE_MAX_BITS = BANDS[-1]
# (background, text) colour of each band, shared by the terminal view and the HTML page; band 0 is
# left uncoloured so that what the model expected reads as plain text.
BAND_COLORS = (
    ("", ""),
    ("#2f3d1f", "#e8e8e8"),
    ("#5b5a16", "#f0f0f0"),
    ("#b8860b", "#000000"),
    ("#e07b00", "#000000"),
    ("#e04a00", "#000000"),
    ("#c00000", "#ffffff"),
    ("#ff1744", "#ffffff"),
)
UNKNOWN_COLOR = ("#6a1b9a", "#ffffff")  # not in the model's vocabulary: not scored


def band_label(i: int) -> str:
    """'<1', '1-2', ... '>=12' bits."""
    if i == 0:
        return f"<{BANDS[0]:g}"
    if i == len(BANDS):
        return f">={BANDS[-1]:g}"
    return f"{BANDS[i - 1]:g}-{BANDS[i]:g}"


TOP_GUESSES = 3
MIN_RANKED_CHARS = 8  # shorter lines are not ranked among the most surprising


def band(bits: float) -> int:
    """0 .. len(BANDS): the colour band of a character that cost `bits` (the last band is >= 12)."""
    for i, upper in enumerate(BANDS):
        if bits < upper:
            return i
    return len(BANDS)


@dataclass(frozen=True)
class Line:
    """One line of the text: its number (from 1), where it is, and what its characters cost. A
    line's characters are its text and the newline that ends it (the model predicts that too)."""

    number: int
    start: int  # offset of its first character in the text
    end: int  # offset after its newline (or after the text's last character)
    chars: int  # characters scored (unknown ones are not)
    nats: float  # their summed cost
    text: str  # without the newline

    @property
    def cross_entropy(self) -> float:
        return self.nats / self.chars if self.chars else 0.0

    @property
    def bpc(self) -> float:
        return bits_per_char(self.cross_entropy)

    def to_dict(self, max_text: int = 200) -> dict:
        text = self.text if len(self.text) <= max_text else self.text[: max_text - 1] + "\u2026"
        return {
            "line": self.number,
            "chars": self.chars,
            "cross_entropy": self.cross_entropy,
            "bpc": self.bpc,
            "text": text,
        }


@dataclass(frozen=True)
class TextScore:
    """A text with what each of its characters cost the model (NaN: unknown to the model, not scored)
    and the model's likeliest guesses there (-1 where unscored)."""

    text: str
    nats: np.ndarray  # float64 [len(text)]
    guesses: np.ndarray  # int64 [len(text), TOP_GUESSES] vocab ids, likeliest first
    guess_probs: np.ndarray  # float32 [len(text), TOP_GUESSES]
    vocab: Vocab
    metrics: Metrics

    @property
    def bits(self) -> np.ndarray:
        return self.nats / math.log(2)  # units.bits_per_char, elementwise

    @cached_property
    def lines(self) -> list[Line]:
        ends = np.flatnonzero(text_to_codes(self.text) == 10) + 1
        bounds = [0, *ends.tolist()]
        if bounds[-1] < len(self.text):
            bounds.append(len(self.text))
        scored = ~np.isnan(self.nats)
        out = []
        for number, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False), start=1):
            ok = scored[a:b]
            out.append(
                Line(
                    number=number,
                    start=a,
                    end=b,
                    chars=int(ok.sum()),
                    nats=math.fsum(self.nats[a:b][ok].tolist()),
                    text=self.text[a:b].removesuffix("\n"),
                )
            )
        return out

    def most_surprising(self, n: int | None = None, *, min_chars: int = MIN_RANKED_CHARS) -> list[Line]:
        """The lines with the most bits/char first, at most n. Lines with fewer than `min_chars`
        scored characters are left out: a blank line's one newline says little about the text."""
        ranked = sorted(
            (line for line in self.lines if line.chars >= max(1, min_chars)), key=lambda line: (-line.bpc, line.number)
        )
        return ranked if n is None else ranked[:n]


def score_text(
    model: CharRNN,
    vocab: Vocab,
    text: str,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    precision: str = "fp32",
    tuner: ThreadTuner | None = None,
    adapt: bool = False,
) -> TextScore:
    """Per-character figures for `text` (line ends "\\r\\n" read as "\\n", as everywhere in charlm);
    `adapt` scores with dynamic evaluation (evaluate.score_adapting)."""
    began = time.perf_counter()
    text = text.replace("\r\n", "\n")
    codes = text_to_codes(text)
    ids = vocab.lookup(codes)
    known = ids >= 0
    kept = ids[known]
    per_char = PerChar.empty(len(kept), TOP_GUESSES)
    if adapt:
        score_adapting(
            model, kept, start_id=vocab.start_id, batch_size=batch_size, fold=vocab.fold_penalty, per_char=per_char
        )
    else:
        score(
            model,
            kept,
            start_id=vocab.start_id,
            batch_size=batch_size,
            device=device,
            precision=precision,
            fold=vocab.fold_penalty,
            tuner=tuner,
            per_char=per_char,
        )
    nats = np.full(len(text), np.nan)
    nats[known] = per_char.nats
    guesses = np.full((len(text), TOP_GUESSES), -1, dtype=np.int64)
    guesses[known] = per_char.guesses
    guess_probs = np.zeros((len(text), TOP_GUESSES), dtype=np.float32)
    guess_probs[known] = per_char.guess_probs
    unknown = sorted(set(codes[~known].tolist()))
    metrics = Metrics(
        chars=len(kept),
        cross_entropy=math.fsum(per_char.nats.tolist()) / max(1, len(kept)),
        unknown=int((~known).sum()),
        unknown_chars=[chr(c) for c in unknown],
        elapsed_s=time.perf_counter() - began,
        streams=scoring_cuts(batch_size).count(len(kept)),
    )
    return TextScore(text=text, nats=nats, guesses=guesses, guess_probs=guess_probs, vocab=vocab, metrics=metrics)
