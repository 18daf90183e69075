"""Exact cross-entropy of a text under a model, in nats per character.

The text is cut into B contiguous streams scored side by side with carried state; every character
is scored exactly once and the nats are summed before dividing by the count (never a mean of batch
means). Character 0 of each stream after the first is scored from a fresh state with only its
predecessor as input: that is the whole "stream-start effect", B - 1 characters with less context.
The first character of the text is predicted from the start symbol (a newline), like `sample ''`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .adapt import Adaptation, AdaptingStreams
from .device import ThreadTuner, autocast
from .distributed import Dist
from .model import CharRNN
from .streams import IGNORE, Cuts, nll, nll_sum, shifted_chunks, stream_bounds
from .units import bits_per_char, perplexity

MIN_STREAM_CHARS = 4096  # streams shorter than this would make the stream-start effect visible
CHUNK = 256


@dataclass(frozen=True)
class Metrics:
    """A score with its three faces: nats/char, perplexity = e^CE and bits/char = CE / ln 2."""

    chars: int
    cross_entropy: float
    unknown: int = 0
    unknown_chars: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    streams: int = 1

    @property
    def perplexity(self) -> float:
        return perplexity(self.cross_entropy)

    @property
    def bpc(self) -> float:
        return bits_per_char(self.cross_entropy)

    @property
    def chars_per_sec(self) -> float:
        return self.chars / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(perplexity=self.perplexity, bpc=self.bpc, chars_per_sec=self.chars_per_sec)
        return d


@dataclass
class PerChar:
    """What `score` records per character when asked: the nats it cost (the fold penalty included)
    and the model's `top` likeliest guesses for it, indexed like the scored ids. For the views that
    show *where* a text surprises a model (surprise.py)."""

    nats: np.ndarray  # float64 [N]
    guesses: np.ndarray  # int64 [N, top] vocab ids, likeliest first
    guess_probs: np.ndarray  # float32 [N, top]

    @classmethod
    def empty(cls, chars: int, top: int = 3) -> PerChar:
        return cls(np.zeros(chars, np.float64), np.zeros((chars, top), np.int64), np.zeros((chars, top), np.float32))

    def record(self, pos: np.ndarray, target: np.ndarray, nats: torch.Tensor, logits: torch.Tensor) -> None:
        """One chunk: pos and target [B, T] (IGNORE past a stream's end), nats [B, T], logits [B, T, V]."""
        scored = target != IGNORE
        at = pos[scored]
        mask = torch.from_numpy(scored).to(logits.device)
        self.nats[at] = nats[mask].cpu().numpy()
        top = self.guesses.shape[1]
        if top:
            probs, ids = torch.softmax(logits[mask].float(), dim=-1).topk(min(top, logits.shape[-1]), dim=-1)
            self.guess_probs[at, : probs.shape[1]] = probs.cpu().numpy()
            self.guesses[at, : ids.shape[1]] = ids.cpu().numpy()


def _untimed(size: float) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def scoring_cuts(batch_size: int) -> Cuts:
    """The streams a text is scored in: at most `batch_size`, each long."""
    return Cuts(max_streams=batch_size, min_chars=MIN_STREAM_CHARS)


@torch.inference_mode()
def score(
    model: CharRNN,
    ids: np.ndarray,
    *,
    start_id: int,
    batch_size: int = 64,
    device: torch.device | None = None,
    precision: str = "fp32",
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    fold: tuple[int, float] | None = None,
    tuner: ThreadTuner | None = None,
    per_char: PerChar | None = None,
) -> tuple[torch.Tensor, int]:
    """(summed nats as a float64 tensor, characters scored) over the streams of this shard.

    shard (rank, world) keeps streams rank, rank + world, ...: the same streams a single process
    scores, so summing the shards gives the single-process figure. `tuner` times each chunk so the
    thread count follows the machine's load (see device.ThreadTuner). `per_char` (one process) also
    records each character's nats and the model's top guesses; the sum is then the float64 sum of
    those per-character figures, so that any grouping of them (lines, files) adds up to it.
    """
    device = device or next(model.parameters()).device
    lo, hi = stream_bounds(len(ids), scoring_cuts(batch_size).count(len(ids)))
    lo, hi = lo[shard[0] :: shard[1]], hi[shard[0] :: shard[1]]  # [B] this shard's streams
    total = torch.zeros((), dtype=torch.float64, device=device)
    if len(lo) == 0:
        return total, 0
    was_training = model.training
    model.eval()
    state = model.initial_state(len(lo), device)
    timed = tuner.unit if tuner is not None else _untimed
    try:
        for k, (source, target) in enumerate(shifted_chunks(ids, lo, hi, start_id=start_id, chunk=chunk)):
            x = torch.from_numpy(source).to(device, non_blocking=True)  # [B, T]
            y = torch.from_numpy(target).to(device, non_blocking=True)  # [B, T]
            with timed(source.size):
                with autocast(device, precision):
                    logits, state = model(x, state)  # [B, T, V]
                if per_char is None:
                    total += nll_sum(logits, y).double()
                    if fold is not None:  # each folded character: P(unknown symbol) spread over all of them
                        total += (y == fold[0]).sum() * fold[1]
                else:
                    nats = nll(logits, y).view(y.shape).double()  # [B, T], 0 past a stream's end
                    if fold is not None:
                        nats += (y == fold[0]) * fold[1]
                    total += nats.sum()
                    pos = lo[:, None] + k * chunk + np.arange(source.shape[1])  # [B, T] positions in ids
                    per_char.record(pos, target, nats, logits)
            if progress is not None:
                progress(int((target != IGNORE).sum()))
    finally:
        model.train(was_training)
    return total, int((hi - lo).sum())


@torch.inference_mode()
def score_adapting(
    model: CharRNN,
    ids: np.ndarray,
    *,
    start_id: int,
    batch_size: int = 64,
    fold: tuple[int, float] | None = None,
    adaptation: Adaptation | None = None,
    progress: Callable[[int], None] | None = None,
    per_char: PerChar | None = None,
) -> tuple[torch.Tensor, int]:
    """`score` with dynamic evaluation: the model reads the streams one character at a time and
    learns from each stretch it has scored (adapt.AdaptingStreams; the default Adaptation is the one
    archives use), so a name or a phrase that recurs costs less the second time. Every stream starts
    from the start symbol, as an archive's segments do. The caller's model is not changed."""
    n = len(ids)
    lo, hi = stream_bounds(n, scoring_cuts(batch_size).count(n))
    total = torch.zeros((), dtype=torch.float64)
    if n == 0:
        return total, 0
    reader = AdaptingStreams(model, len(lo), start_id=start_id, adaptation=adaptation or Adaptation())
    for k in range(int((hi - lo).max())):
        pos = lo + k  # [S] the character each stream reads now
        target = np.where(
            pos < hi, ids[np.minimum(pos, n - 1)].astype(np.int64), IGNORE
        )  # (uint8 ids: -100 would wrap)
        logits = reader.step()  # [S, V]
        y = torch.from_numpy(target).to(logits.device)
        nats = nll(logits, y).double()  # [S], 0 where a stream has ended
        if fold is not None:
            nats += (y == fold[0]) * fold[1]
        total += nats.sum().cpu()
        if per_char is not None:
            per_char.record(pos[:, None], target[:, None], nats[:, None], logits[:, None])
        reader.feed(target)
        if progress is not None:
            progress(int((target != IGNORE).sum()))
    return total, n


def evaluate(
    model: CharRNN,
    ids: np.ndarray,
    *,
    start_id: int,
    batch_size: int = 64,
    device: torch.device | None = None,
    precision: str = "fp32",
    unknown: int = 0,
    unknown_chars: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    dist: Dist | None = None,
    fold: tuple[int, float] | None = None,
    tuner: ThreadTuner | None = None,
    adapt: bool = False,
) -> Metrics:
    """Metrics for the whole of `ids`; under torchrun each rank scores its share of the streams and
    the summed nats are reduced exactly. `adapt`: dynamic evaluation (score_adapting), one process."""
    dist = dist or Dist()
    started = time.perf_counter()
    if adapt:
        nats, _ = score_adapting(model, ids, start_id=start_id, batch_size=batch_size, fold=fold, progress=progress)
    else:
        nats, _ = score(
            model,
            ids,
            start_id=start_id,
            batch_size=batch_size,
            device=device,
            precision=precision,
            progress=progress,
            shard=(dist.rank, dist.world),
            fold=fold,
            tuner=tuner,
        )
    count = len(ids)
    return Metrics(
        chars=count,
        cross_entropy=float(dist.sum(nats).item()) / count,
        unknown=unknown,
        unknown_chars=list(unknown_chars or []),
        elapsed_s=time.perf_counter() - started,
        streams=scoring_cuts(batch_size).count(count),
    )
