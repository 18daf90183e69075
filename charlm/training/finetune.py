"""--init-from on a text with characters the model never saw: grow the vocab, keep the old ids."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..model import CharRNN
from ..vocab import Vocab


def extend_vocab(old: Vocab, counts: dict[int, int]) -> tuple[Vocab, list[str]]:
    """The old vocab with the new text's unseen characters appended: old ids keep their meaning."""
    new = sorted(chr(c) for c in counts if chr(c) not in old)
    return Vocab(list(old.chars) + new, old.folded), new


def grow_model(model: CharRNN, vocab_size: int) -> CharRNN:
    """A copy of `model` for a larger vocab. New embedding rows are the mean old embedding (an
    'average character'); new output rows start with the mean weight and the lowest old bias, so
    new characters begin as rare rather than random."""
    old = model.config.vocab_size
    grown = CharRNN(replace(model.config, vocab_size=vocab_size))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for key, fill in (("embed.weight", None), ("head.weight", None), ("head.bias", "min")):
            t = sd[key]  # [V, E], [V, H] or [V]
            extra = t.new_empty((vocab_size - old, *t.shape[1:]))
            extra[:] = t.min() if fill == "min" else t.mean(0)
            sd[key] = torch.cat([t, extra])
    grown.load_state_dict(sd)
    return grown
