"""The recurrent character model: Embedding -> nn.LSTM | nn.GRU | nn.RNN -> Linear.

State is explicit: forward(ids, state) -> (logits, state), so callers carry it across chunks
(training, scoring) and across single steps (sampling) without the model remembering anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError

Cell = Literal["lstm", "gru", "rnn", "rnn-relu"]
Init = Literal["orthogonal", "xavier", "he", "pytorch"]
State = tuple[torch.Tensor, ...]  # (h, c) for LSTM, (h,) otherwise; each [num_layers, B, hidden_size]

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


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("ModelConfig.vocab_size is 0", "train() fills it in; set it to build a model directly")
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_size)
        kinds = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "rnn-relu": nn.RNN}
        extra = {"nonlinearity": "relu"} if c.model == "rnn-relu" else {}
        self.rnn = kinds[c.model](
            c.embed_size,
            c.hidden_size,
            num_layers=c.num_layers,
            dropout=c.dropout if c.num_layers > 1 else 0.0,
            batch_first=True,
            **extra,
        )
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation by `config.init`; the LSTM forget gate starts open (bias 1) so memory
        flows from the first step (Jozefowicz et al. 2015)."""
        init = self.config.init
        if init == "pytorch":
            return
        nn.init.normal_(self.embed.weight, std=1.0)
        gates = {"lstm": 4, "gru": 3}.get(self.config.model, 1)
        h = self.config.hidden_size
        for name, p in self.rnn.named_parameters():
            if name.startswith("bias"):
                nn.init.zeros_(p)
                if self.config.model == "lstm" and name.startswith("bias_ih"):
                    p.data[h : 2 * h] = 1.0  # gate order i, f, g, o
                continue
            for block in p.data.split(h, dim=0)[:gates]:  # one square-ish block per gate
                if init == "orthogonal" and name.startswith("weight_hh"):
                    nn.init.orthogonal_(block)
                elif init == "he":
                    nn.init.kaiming_normal_(block, nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(block)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        c = self.config
        device = device or self.head.weight.device
        zeros = torch.zeros(c.num_layers, batch_size, c.hidden_size, device=device)
        return (zeros, zeros.clone()) if c.model == "lstm" else (zeros,)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids [B, T] -> logits [B, T, V] and the state after the last step."""
        x = self.drop(self.embed(ids))  # [B, T, E]
        hidden = None if state is None else (state if self.config.model == "lstm" else state[0])
        out, new = self.rnn(x, hidden)  # [B, T, H]
        logits = self.head(self.drop(out))  # [B, T, V]
        return logits, (new if isinstance(new, tuple) else (new,))


def detach(state: State) -> State:
    """Cut the graph between chunks: truncated backprop through time."""
    return tuple(s.detach() for s in state)


def uniform_entropy(vocab_size: int) -> float:
    return math.log(vocab_size)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed nats over every target that is not -100 (padding), in fp32 whatever the autocast."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum",
                           ignore_index=-100)
