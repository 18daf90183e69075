"""`charlm perplexity FILE --html OUT.html`: one self-contained page showing where a text surprises a model.

The page carries everything in itself (no network, no external script): the text as UTF-8, each
character's cost in centibits, the model's top-3 guesses and their probabilities, all as base64
typed arrays, so a 1 MB text makes a page of a few MB that the browser decodes in milliseconds. Only
the lines in view are turned into elements (a virtual list of fixed-height rows), so it opens at once
however long the text is. The text is always inserted with textContent, never as HTML: a model
trained on web pages scores `<script>` like any other characters.

The figures at the top and the histogram of bits/char per line are made here, in Python, as plain
HTML and SVG, so they need no script at all.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

from .files import atomic_write
from .surprise import BAND_COLORS, BANDS, UNKNOWN_COLOR, TextScore, band, band_label

UNSCORED = 0xFFFF  # centibits of a character the model does not know
HISTOGRAM_BIN_BITS = 0.25
HISTOGRAM_MAX_BITS = 12.0


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()).decode()


def page_data(score: TextScore) -> dict:
    """What the page's script reads: typed arrays as base64, little-endian."""
    bits = score.bits
    centibits = np.where(np.isnan(bits), UNSCORED, np.clip(np.round(np.nan_to_num(bits) * 100), 0, UNSCORED - 1))
    vocab_size = len(score.vocab)
    id_type = np.uint16 if vocab_size < 0xFFFF else np.uint32
    guesses = np.where(score.guesses < 0, np.iinfo(id_type).max, score.guesses).astype(id_type)
    return {
        "text": base64.b64encode(score.text.encode("utf-8", "surrogatepass")).decode(),
        "centibits": _b64(centibits.astype(np.uint16)),
        "guesses": _b64(guesses),
        "guessBytes": np.dtype(id_type).itemsize,
        "guessProbs": _b64(np.round(score.guess_probs * 255).astype(np.uint8)),
        "top": score.guesses.shape[1],
        "vocab": list(score.vocab.chars),
        "bands": list(BANDS),
        "colors": [list(c) for c in BAND_COLORS],
        "unknownColor": list(UNKNOWN_COLOR),
    }


def histogram_svg(score: TextScore, *, width: int = 640, height: int = 120) -> str:
    """Bits/char per line as bars (lines with nothing scored left out), one bar per quarter bit."""
    values = np.array([line.bpc for line in score.lines if line.chars])
    bins = int(HISTOGRAM_MAX_BITS / HISTOGRAM_BIN_BITS)
    counts, _ = np.histogram(np.clip(values, 0, HISTOGRAM_MAX_BITS - 1e-9), bins=bins, range=(0, HISTOGRAM_MAX_BITS))
    top = max(1, int(counts.max()) if len(counts) else 1)
    bar_w = width / bins
    plot_h = height - 18
    bars = []
    for i, count in enumerate(counts.tolist()):
        if not count:
            continue
        h = max(1.0, plot_h * count / top)
        lo = i * HISTOGRAM_BIN_BITS
        color = BAND_COLORS[max(1, band(lo + HISTOGRAM_BIN_BITS / 2))][0]
        bars.append(
            f'<rect x="{i * bar_w:.1f}" y="{plot_h - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" fill="{color}">'
            f"<title>{lo:g}-{lo + HISTOGRAM_BIN_BITS:g} bits/char: {count} line{'s' * (count != 1)}</title></rect>"
        )
    ticks = "".join(
        f'<text x="{b / HISTOGRAM_MAX_BITS * width:.1f}" y="{height - 4}" font-size="10">{b:g}</text>'
        for b in range(0, int(HISTOGRAM_MAX_BITS) + 1, 2)
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="bits per character of each line">{"".join(bars)}{ticks}</svg>'
    )


def render(score: TextScore, *, title: str, model: str) -> str:
    m = score.metrics
    figures = [
        ("characters scored", f"{m.chars:,}"),
        ("unknown (not scored)", f"{m.unknown:,}"),
        ("lines", f"{len(score.lines):,}"),
        ("cross-entropy", f"{m.cross_entropy:.4f} nats/char"),
        ("perplexity", f"{m.perplexity:.4f}"),
        ("bits/char", f"{m.bpc:.4f}"),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in figures)
    legend = (
        "".join(
            f'<span class="sw" style="background:{bg or "transparent"};color:{fg or "inherit"}">'
            f"{html.escape(band_label(i))}</span>"
            for i, (bg, fg) in enumerate(BAND_COLORS)
        )
        + f'<span class="sw" style="background:{UNKNOWN_COLOR[0]};color:{UNKNOWN_COLOR[1]}">unknown</span>'
    )
    data = json.dumps(page_data(score), ensure_ascii=True).replace("</", "<\\/")
    return (
        _template()
        .replace("%TITLE%", html.escape(title))
        .replace("%MODEL%", html.escape(model))
        .replace("%FIGURES%", rows)
        .replace("%LEGEND%", legend)
        .replace("%HISTOGRAM%", histogram_svg(score))
        .replace("%DATA%", data)
    )


@functools.cache
def _template() -> str:
    """The page (charlm/heatmap.html, package data) with %PLACEHOLDERS% that render() fills."""
    return resources.files("charlm").joinpath("heatmap.html").read_text(encoding="utf-8")


def write_html(score: TextScore, out: str | os.PathLike[str], *, title: str, model: str) -> Path:
    """Writes the page atomically; returns its path."""
    path = Path(out)
    atomic_write(path, render(score, title=title, model=model).encode("utf-8"))
    return path
