"""What a model is, as plain data: validated on creation, stored in every checkpoint.

Kept apart from model.py so that reading a checkpoint header (`charlm info`) needs no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from .errors import CheckpointError, ConfigError

Cell = Literal["lstm", "gru", "rnn", "rnn-relu"]
Init = Literal["orthogonal", "xavier", "he", "pytorch"]

MAX_PARAMS = 2_000_000_000
MAX_VOCAB = 0x110000


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    vocab_size: int = 0  # 0: filled in from the training text by train()
    model: Cell = "lstm"
    hidden_size: int = 512
    num_layers: int = 2
    embed_size: int = 64
    dropout: float = 0.0
    init: Init = "orthogonal"

    def __post_init__(self) -> None:
        _check_int("vocab size", self.vocab_size, 0, MAX_VOCAB)
        _check_choice("--model", self.model, Cell)
        _check_choice("--init", self.init, Init)
        _check_int("--hidden", self.hidden_size, 1, 65536)
        _check_int("--layers", self.num_layers, 1, 64)
        _check_int("--embed", self.embed_size, 1, 65536)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.num_params() > MAX_PARAMS:
            raise ConfigError(f"the model would have {self.num_params():,} parameters", "choose a smaller model")

    def num_params(self) -> int:
        gates = {"lstm": 4, "gru": 3}.get(self.model, 1)
        h, e, v = self.hidden_size, self.embed_size, self.vocab_size
        rnn = sum(gates * h * ((e if i == 0 else h) + h + 2) for i in range(self.num_layers))
        return v * e + rnn + h * v + v

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> ModelConfig:
        """Validated rebuild from untrusted JSON (a checkpoint header)."""
        if not isinstance(data, dict):
            raise CheckpointError("the checkpoint's model config is not an object")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise CheckpointError(f"the checkpoint's model config has unknown keys {sorted(unknown)}",
                                  "it was written by a newer charlm: upgrade charlm")
        try:
            return cls(**data)
        except ConfigError as e:
            raise CheckpointError(f"the checkpoint's model config is invalid ({e.message})") from None
        except TypeError as e:
            raise CheckpointError(f"the checkpoint's model config is incomplete ({e})") from None


def _check_int(what: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what} must be a whole number from {low} to {high} (got {value!r})")


def _check_choice(what: str, value: object, choices: object) -> None:
    if value not in get_args(choices):
        raise ConfigError(f"{what} must be one of {', '.join(get_args(choices))} (got {value!r})")
