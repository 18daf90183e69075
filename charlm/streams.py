"""How a model advances over text: the one place that cuts a text into side-by-side streams, shifts
inputs against targets, feeds the start symbol, and sums the loss.

Training (`Batches`), scoring (evaluate.py), sampling and compression all go through here, so a
change to how the start symbol is fed or how targets are shifted is made once. Recurrent state is
explicit everywhere (`model(ids, state) -> (logits, state)`); the caller carries it from one chunk
to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CorpusError

IGNORE = -100  # a target that is not scored (past a stream's end, or not a known character)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed nats over every target that is not IGNORE, in fp32 whatever the autocast: the one loss
    that training, scoring and adapting share. logits [..., V], targets [...]."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum", ignore_index=IGNORE
    )


def stream_count(chars: int, *, max_streams: int, min_chars: int) -> int:
    """How many side-by-side streams to cut `chars` characters into: at most `max_streams`, each at
    least `min_chars` long (shorter streams would make the stream-start effect visible); 0 for none."""
    if chars == 0:
        return 0
    return max(1, min(max_streams, chars // min_chars))


def stream_bounds(chars: int, streams: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) positions of `streams` equal contiguous cuts of `chars` characters, int64 [S] each."""
    lo = np.array([b * chars // streams for b in range(streams)], dtype=np.int64)
    hi = np.array([(b + 1) * chars // streams for b in range(streams)], dtype=np.int64)
    return lo, hi


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
