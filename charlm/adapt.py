"""A model that keeps learning from the text it reads: dynamic evaluation (Krause et al. 2018).

After every `steps` characters of each stream, one SGD step on the characters just read, from the
state they started in, pulled back towards the original weights so that it cannot drift. Names and
turns of phrase that recur in one document then cost fewer bits each time. Both `compress` (where
encoder and decoder must take exactly the same steps, so the settings are part of the archive
format) and `perplexity --adapt` read text through this one class. The updates run on a private copy
of the model: the caller's weights are never touched.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from .model import CharRNN
from .streams import StepStreams, nll_sum


@dataclass(frozen=True)
class Adaptation:
    """How the model learns while it reads. The defaults are what `compress` archives use (their
    format pins its own copy, compress.coder.ADAPTATION) and what `perplexity --adapt` uses."""

    steps: int = 16  # characters per stream between two updates
    lr: float = 0.15  # SGD step on the mean nats/char of those characters
    decay: float = 0.001  # pull towards the original weights per update
    clip: float = 1.0  # largest gradient norm an update follows


class AdaptingStreams:
    """S streams read one character per step (streams.StepStreams) by a model that learns from them."""

    def __init__(self, model: CharRNN, streams: int, *, start_id: int, adaptation: Adaptation) -> None:
        with torch.inference_mode(False):  # a copy made in inference mode could never be trained
            model = copy.deepcopy(model)
        self.streams = StepStreams(model, streams, start_id=start_id)
        self.adaptation = adaptation
        self.params = [p.requires_grad_() for p in model.parameters()]
        self.origin = [p.detach().clone() for p in self.params]
        self.block_state = self.streams.state
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []  # (inputs, targets) of the steps since the last update
        self.learning = True  # False: read on with the weights as they are

    def step(self) -> torch.Tensor:
        """fp32 logits [S, V] for the next character of every stream."""
        return self.streams.step()

    def feed(self, ids: np.ndarray) -> None:
        """The characters just read, [S] (IGNORE: unknown, or the stream has ended), become the next
        inputs; every `adaptation.steps` of them, the model learns from them."""
        if self.learning:
            self.seen.append((self.streams.inputs, ids.astype(np.int64)))
            if len(self.seen) == self.adaptation.steps:
                self._learn()
        self.streams.feed(ids)

    def _learn(self) -> None:
        """One SGD step on the last characters of every stream, from the state they started in."""
        a = self.adaptation
        inputs, targets = (np.stack(column, axis=1) for column in zip(*self.seen, strict=True))  # [S, K] each
        self.seen = []
        with torch.inference_mode(False), torch.enable_grad():  # (tensors made in inference mode are not allowed)
            x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
            start = tuple(s.clone() for s in self.block_state)  # plain tensors: autograd may not save inference ones
            logits, _ = self.streams.model(x, start)  # [S, K, V]
            loss = nll_sum(logits, y) / y.numel()
            grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if not math.isfinite(norm):
                step = 0.0
            else:  # a burst of surprises cannot throw the weights far
                step = a.lr * (a.clip / norm if norm > a.clip else 1.0)
            for p, g, p0 in zip(self.params, grads, self.origin, strict=True):
                p.add_(g, alpha=-step)
                p.add_(p0 - p, alpha=a.decay)
        self.block_state = self.streams.state
