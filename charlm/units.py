"""The two faces of a cross-entropy, defined once: every figure charlm prints or stores uses these."""

from __future__ import annotations

import math

_MAX_EXP = 700.0  # e^700 is near float's limit; a diverged loss still prints as a (huge) number


def perplexity(nats_per_char: float) -> float:
    """e^CE: as unsure as a uniform choice among this many characters."""
    return math.exp(min(nats_per_char, _MAX_EXP))


def bits_per_char(nats_per_char: float) -> float:
    """CE / ln 2: what an ideal entropy coder driven by the model spends per character."""
    return nats_per_char / math.log(2)
