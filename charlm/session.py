"""A conversation with a model: what you type and what it writes, one text read by one carried state.

`charlm chat` is a thin loop over `Session`: each turn the model reads your text from where the last
turn left it (your text is never re-read, so a turn costs what its own characters cost, however long
the conversation) and continues it, up to a length or a stop string. A stopped or interrupted turn
leaves the state at the last character that was both written and read, so the next turn goes on from
exactly the text the transcript holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from .lm import CharLM
from .model import State
from .sample import StopRule, check_options, check_stops, make_picker, make_step, new_generator
from .streams import IGNORE, model_inputs
from .vocab import text_to_codes


class Session:
    """Turns of a conversation with `lm`; the settings are attributes a caller may change between turns."""

    def __init__(
        self,
        lm: CharLM,
        *,
        length: int = 300,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = True,
        rng_seed: int | None = None,
    ) -> None:
        self.lm = lm
        self.length, self.temperature, self.top_k, self.top_p = length, temperature, top_k, top_p
        self.stop, self.lines, self.include_stop = list(stop), lines, include_stop
        self.check()
        self.generator = new_generator(lm.device, rng_seed)
        self.step = make_step(lm.model, lm.weight_format, 1)  # its own: lm.sample() may run between turns
        self.reset()

    def check(self) -> None:
        check_options(
            length=self.length, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, num_samples=1
        )
        check_stops(self.stop, self.lines)

    def reset(self) -> None:
        """Forget the conversation: the next turn starts as at the beginning of a text."""
        self.state: State | None = None
        self.logits: torch.Tensor | None = None  # [1, V] for the next character
        self.parts: list[str] = []

    @property
    def transcript(self) -> str:
        """Everything the model has read and written, in order."""
        return "".join(self.parts)

    @torch.inference_mode()
    def say(self, text: str) -> int:
        """The model reads `text`; returns how many of its characters it skipped as unknown to it."""
        ids = self.lm.vocab.lookup(text_to_codes(text))
        known = ids[ids >= 0].astype(np.int64)
        if len(known):
            self.logits, self.state = self.lm.sampler._read(known, self.state)
            self.parts.append("".join(ch for ch, i in zip(text, ids.tolist(), strict=True) if i >= 0))
        return len(ids) - len(known)

    @torch.inference_mode()
    def reply(self) -> Iterator[str]:
        """The model's continuation, piece by piece as it is written (held back where a stop string
        might be starting), until `length` characters, a stop string or `lines` newlines."""
        self.check()
        if self.logits is None:  # nothing read yet: the start of a text
            start = model_inputs(np.array([IGNORE], dtype=np.int64), self.lm.vocab.start_id)
            self.logits, self.state = self.lm.sampler._read(start, None)
        pick = make_picker(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            length=self.length,
            generator=self.generator,
        )
        rule = StopRule(self.stop, self.lines, include_stop=self.include_stop)
        chars = self.lm.vocab.chars
        self.step.reset(self.state)
        for _ in range(self.length):
            ids = pick(self.logits)
            logits = self.step(ids)  # read what it wrote before it counts as written (Ctrl-C safe)
            ch = chars[int(ids[0])]
            self.logits, self.state = logits, self.step.state
            self.parts.append(ch)
            piece = rule.feed(ch)
            if piece:
                yield piece
            if rule.stopped:
                return
        tail = rule.flush()
        if tail:
            yield tail

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the transcript (all or nothing); returns the path."""
        path = Path(path)
        atomic_write(path, self.transcript.encode("utf-8"))
        return path
