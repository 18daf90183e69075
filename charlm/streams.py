"""How a model advances over text: the one place that cuts a text into side-by-side streams, shifts
inputs against targets, feeds the start symbol, carries the recurrent state, and sums the loss.

Training (`Batches`), scoring (evaluate.py, `shifted_chunks`), compression (`StepStreams`) and
sampling (`model_inputs`) all go through here, so a change to how the start symbol is fed or how
targets are shifted is made once. Recurrent state is explicit everywhere (`model(ids, state) ->
(logits, state)`); the caller carries it from one chunk to the next.

The rule every reader follows: before predicting a character the model reads the one before it, or
the start symbol (a newline) where there is none it knows: the text's first character, the one after
a character outside the vocab, and a stream that has ended. IGNORE marks those places.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CorpusError

if TYPE_CHECKING:
    from .model import CharRNN, State

IGNORE = -100  # no character here: a target that is not scored, an input that reads as the start symbol


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction, ignore_index=IGNORE
    )


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed nats over every target that is not IGNORE, in fp32 whatever the autocast: the one loss
    that training, scoring and adapting share. logits [..., V], targets [...]."""
    return _cross_entropy(logits, targets, "sum")


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss per target, fp32 [N] (0 where IGNORE), for callers that sum it in float64."""
    return _cross_entropy(logits, targets, "none")


def model_inputs(previous: np.ndarray, start_id: int) -> np.ndarray:
    """What the model reads before each character, int64: the character before it, or the start
    symbol where that is IGNORE (nothing before it, or nothing the model knows)."""
    return np.where(previous == IGNORE, start_id, previous).astype(np.int64)


@dataclass(frozen=True)
class Cuts:
    """How a text is cut into side-by-side streams: as many as fit, up to `max_streams`, none shorter
    than `min_chars` (shorter streams would make the stream-start effect visible)."""

    max_streams: int
    min_chars: int

    def count(self, chars: int) -> int:
        """How many streams `chars` characters are cut into; 0 for none."""
        if chars == 0:
            return 0
        return max(1, min(self.max_streams, chars // self.min_chars))


def stream_bounds(chars: int, streams: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) positions of `streams` equal contiguous cuts of `chars` characters, int64 [S] each."""
    lo = np.array([b * chars // streams for b in range(streams)], dtype=np.int64)
    hi = np.array([(b + 1) * chars // streams for b in range(streams)], dtype=np.int64)
    return lo, hi


def shifted_chunks(
    ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, start_id: int, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y), each [B, T] int64, chunk after chunk, that score the streams [lo, hi) of `ids` side by
    side with carried state: y holds each stream's next `chunk` characters (IGNORE past its end), x the
    characters before them, the start symbol before the text's first."""
    n = len(ids)
    longest = int((hi - lo).max()) if len(lo) else 0
    for k in range(0, longest, chunk):
        width = min(chunk, longest - k)
        pos = lo[:, None] + k + np.arange(width)  # [B, T] positions of the targets
        safe = np.minimum(pos, n - 1)
        target = ids[safe].astype(np.int64)
        target[pos >= hi[:, None]] = IGNORE
        previous = ids[np.maximum(safe - 1, 0)].astype(np.int64)
        previous[pos == 0] = IGNORE
        yield model_inputs(previous, start_id), target


class StepStreams:
    """S streams advanced together one character per step, the state carried from step to step.

    The whole-sequence pass and a step-by-step pass give different floating-point bits, so a reader
    that must repeat its arithmetic exactly (the compressor's encoder and decoder) steps like this.
    """

    def __init__(self, model: CharRNN, streams: int, *, start_id: int) -> None:
        self.model = model
        self.start_id = start_id
        self.state: State = model.initial_state(streams)
        self.inputs = np.full(streams, start_id, dtype=np.int64)  # [S] what each stream reads next

    def step(self) -> torch.Tensor:
        """fp32 logits [S, V] for the next character of every stream."""
        x = torch.from_numpy(self.inputs).view(-1, 1).to(self.state[0].device)  # [S, 1]
        logits, self.state = self.model(x, self.state)
        return logits[:, 0].float()

    def feed(self, previous: np.ndarray) -> None:
        """The characters just read, [S] (IGNORE: unknown, or the stream has ended), become the next inputs."""
        self.inputs = model_inputs(previous, self.start_id)


@dataclass(frozen=True)
class Batches:
    """The training text as `batch_size` side-by-side contiguous streams cut into `seq_len` chunks.

    Chunk k of stream b is text[o + b*S + k*T : ... + T] with y the same shifted by one, so the
    recurrent state of chunk k is the right starting state for chunk k + 1 (truncated BPTT). The
    offset o in [0, T) changes each epoch (derived from the seed and the epoch number, so a resumed
    run sees the same batches without saving any generator state).
    """

    ids: np.ndarray
    batch_size: int
    seq_len: int
    rng_seed: int = 0

    def __post_init__(self) -> None:
        need = self.min_chars(self.batch_size, self.seq_len)
        if len(self.ids) < need:
            raise CorpusError(
                f"the training text is too short for one batch: {len(self.ids)} characters, need at "
                f"least {need} for --batch-size {self.batch_size} and --seq-len {self.seq_len}",
                "lower --batch-size or --seq-len, or use a longer text",
            )

    @staticmethod
    def min_chars(batch_size: int, seq_len: int) -> int:
        return (batch_size + 1) * seq_len + 1

    def offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.rng_seed, epoch]).integers(self.seq_len))

    def stream_len(self, epoch: int) -> int:
        return (len(self.ids) - self.offset(epoch) - 1) // self.batch_size

    def steps_in_epoch(self, epoch: int) -> int:
        return self.stream_len(epoch) // self.seq_len

    def get(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), each [B, T] int64, for chunk `step` of `epoch`."""
        stream = self.stream_len(epoch)
        starts = self.offset(epoch) + np.arange(self.batch_size) * stream + step * self.seq_len
        window = self.ids[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)  # [B, T+1]
        return window[:, :-1], window[:, 1:]
