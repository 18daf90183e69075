"""The recurrent character model: Embedding -> nn.LSTM | nn.GRU | nn.RNN -> Linear.

State is explicit: forward(ids, state) -> (logits, state), so callers carry it across chunks
(training, scoring) and across single steps (sampling) without the model remembering anything.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from .config import MAX_PARAMS, MAX_VOCAB, Cell, Init, ModelConfig  # noqa: F401 - re-exported
from .errors import ConfigError

State = tuple[torch.Tensor, ...]  # (h, c) for LSTM, (h,) otherwise; each [num_layers, B, hidden_size]


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("ModelConfig.vocab_size is 0", "train() fills it in; set it to build a model directly")
        if config.hidden_size < 1 or config.num_layers < 1:
            raise ConfigError(
                f"ModelConfig has {config.num_layers} layers of {config.hidden_size} units (0: from the budget)",
                "train() fills them in; set hidden_size and num_layers to build a model directly",
            )
        if config.dropout is None:  # open: train() sets it from the passes (set_dropout); built directly, none
            config = replace(config, dropout=0.0)
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_size)
        kinds = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "rnn-relu": nn.RNN}
        extra = {"nonlinearity": "relu"} if c.cell == "rnn-relu" else {}
        # dropout=0: between layers the model drops with one mask per sequence itself (_recur)
        self.rnn = kinds[c.cell](c.embed_size, c.hidden_size, num_layers=c.num_layers, batch_first=True, **extra)
        # One layer of the same kind on the meta device, per input width: _layered runs self.rnn's own
        # weights through them one layer at a time. Kept off the module tree (no parameters of its own).
        self._one_layer = {
            width: kinds[c.cell](width, c.hidden_size, batch_first=True, device="meta", **extra)
            for width in {c.embed_size, c.hidden_size}
        }
        self.drop = LockedDropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation by `config.init`; the LSTM forget gate starts open (bias 1) so memory
        flows from the first step (Jozefowicz et al. 2015)."""
        init = self.config.init
        if init == "pytorch":
            return
        nn.init.normal_(self.embed.weight, std=1.0)
        gates = self.config.gates()
        h = self.config.hidden_size
        for name, p in self.rnn.named_parameters():
            if name.startswith("bias"):
                nn.init.zeros_(p)
                if self.config.cell == "lstm" and name.startswith("bias_ih"):
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

    def set_dropout(self, p: float) -> None:
        """Change the dropout of a built model (its weights do not depend on it): train() settles an
        open --dropout only once it has timed the model it built (training/setup.plan_passes)."""
        self.config = replace(self.config, dropout=p)
        self.drop.p = p

    def start_at_unigram(self, counts: torch.Tensor) -> None:
        """Make the untrained model predict the characters' frequencies: bias = log frequency, head
        weights zero. A model that starts where counting characters ends never scores worse than
        counting, even after a handful of steps; with thousands of characters the random start
        costs more than a minute of training to unlearn. `counts` [V] are training-text counts; a
        character never seen there (validation only) gets half a count."""
        with torch.no_grad():
            self.head.bias.copy_(unigram_logits(counts))
            self.head.weight.zero_()

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        c = self.config
        device = device or self.head.weight.device
        zeros = torch.zeros(c.num_layers, batch_size, c.hidden_size, device=device)
        return (zeros, zeros.clone()) if c.cell == "lstm" else (zeros,)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids [B, T] -> logits [B, T, V] and the state after the last step."""
        x = self.drop(self.embed(ids))  # [B, T, E]
        hidden = None if state is None else (state if self.config.cell == "lstm" else state[0])
        out, new = self._recur(x, hidden)  # [B, T, H]
        logits = self.head(self.drop(out))  # [B, T, V]
        return logits, (new if isinstance(new, tuple) else (new,))

    def _recur(self, x: torch.Tensor, hidden: torch.Tensor | State | None) -> tuple[torch.Tensor, object]:
        """The recurrent layers. While training: DropConnect on their hidden-to-hidden weights
        (`weight_drop`, Merity et al. 2017's weight-dropped LSTM: one mask per step on the weight
        matrices, the same for every time step and sequence, which regularises the recurrence without
        leaving the library's fused kernel), and dropout between layers. Scoring and sampling run the
        weights as they are, all layers in one fused call."""
        p = self.config.weight_drop
        layered = self.training and self.drop.p > 0 and self.config.num_layers > 1
        if not layered and not (self.training and p > 0):
            return self.rnn(x, hidden)
        weights = {
            name: F.dropout(w, p, training=True) if p > 0 and name.startswith("weight_hh") else w
            for name, w in self.rnn.named_parameters()
        }
        if layered:
            return self._layered(x, hidden, weights)
        return torch.func.functional_call(self.rnn, weights, (x, hidden))

    def _layered(
        self, x: torch.Tensor, hidden: torch.Tensor | State | None, weights: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, object]:
        """One layer at a time, so the dropout between layers can keep one mask per sequence
        (LockedDropout) where the fused multi-layer kernel draws a new mask at every step. Costs
        nothing measurable: the fused kernel runs layer after layer too."""
        finals = []
        for layer in range(self.config.num_layers):
            if layer:
                x = self.drop(x)
            one = self._one_layer[x.shape[-1]]
            own = {name.replace(f"_l{layer}", "_l0"): w for name, w in weights.items() if name.endswith(f"_l{layer}")}
            start = None if hidden is None else _layer_state(hidden, layer)
            x, final = torch.func.functional_call(one, own, (x, start))
            finals.append(final)
        if isinstance(finals[0], tuple):  # LSTM: (h, c)
            return x, tuple(torch.cat(parts) for parts in zip(*finals, strict=True))
        return x, torch.cat(finals)


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence, the same at every time step (variational dropout, Gal &
    Ghahramani 2016; AWD-LSTM's locked dropout). It regularises as well as a new mask per step, and
    drawing [B, 1, F] random numbers in place of [B, T, F] saves the ~6% of a step that dropout's
    masks cost: on the 300k cut at 3x320 with 0.1 (fp32, AVX2-capped EPYC, 5 minutes) 2.205 bits/char
    against 2.204-2.208, 729 steps against 673-676 (bench/results/proxy-screen-locked-dropout-*.json)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, F]
        if not self.training or self.p == 0:
            return x
        keep = torch.empty(x.shape[0], 1, x.shape[2], device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)


def _layer_state(hidden: torch.Tensor | State, layer: int) -> torch.Tensor | State:
    if isinstance(hidden, tuple):
        return tuple(h[layer : layer + 1] for h in hidden)
    return hidden[layer : layer + 1]


def unigram_logits(counts: torch.Tensor) -> torch.Tensor:
    """Log frequencies [V] from training-text counts; a character never seen there (validation
    only) gets half a count."""
    freq = counts.double().clamp(min=0.5)
    return (freq / freq.sum()).log().float()
