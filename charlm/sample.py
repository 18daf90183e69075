"""Generating text: prime with the seed in one forward pass, then O(1) work per character.

Each step runs the recurrent cells once for the newest character with the carried state; the
prefix is never re-run. The decoding filters apply in this order: temperature, then top-k, then
top-p (nucleus), then a draw from what is left; temperature 0 means greedy argmax.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .errors import ConfigError, VocabError
from .model import CharRNN, State
from .vocab import Vocab, describe_char, text_to_codes


def check_options(*, length: int, temperature: float, top_k: int | None, top_p: float | None, num_samples: int) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"--length must be at least 1 (got {length!r})")
    if not isinstance(temperature, (int, float)) or not temperature >= 0 or temperature == float("inf"):
        raise ConfigError(f"--temperature must be 0 (greedy) or more (got {temperature!r})")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"--top-k must be at least 1 (got {top_k!r})")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ConfigError(f"--top-p must be in (0, 1] (got {top_p!r})")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= 4096:
        raise ConfigError(f"--num-samples must be from 1 to 4096 (got {num_samples!r})")


def closest_known(text: str, vocab: Vocab) -> str:
    """The seed with each unknown character replaced by a known look-alike (accents dropped,
    case swapped, any space for a space) or removed."""
    out = []
    for ch in text:
        if ch in vocab:
            out.append(ch)
            continue
        candidates = ["".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)),
                      ch.swapcase(), ch.lower(), ch.upper(), " " if ch.isspace() else ""]
        out.append(next((c for c in candidates if c and all(x in vocab for x in c)), ""))
    return "".join(out)


def encode_seed(seed: str, vocab: Vocab) -> list[int]:
    ids = vocab.lookup(text_to_codes(seed))
    if (ids < 0).any():
        unknown = sorted(set(ch for ch in seed if ch not in vocab))
        shown = ", ".join(describe_char(c) for c in unknown[:10])
        suggestion = closest_known(seed, vocab)
        hint = f"try --seed {suggestion!r}" if suggestion else "use characters from the training text"
        raise VocabError(f"the seed has {len(unknown)} character{'s' if len(unknown) != 1 else ''} "
                         f"the model never saw: {shown}", hint)
    return ids.tolist()


def filter_logits(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits [B, V] -> probabilities [B, V] after temperature, top-k and top-p, in that order."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely chars
        drop = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of probs [B, V], by inverse CDF: one uniform number and a binary search
    per row, a few microseconds where torch.multinomial costs ~60 at batch 1."""
    cdf = probs.cumsum(-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)  # [B]


class StepModel:
    """One character per call through the model's own weights, for generation.

    nn.LSTM/GRU/RNN on the CPU set up a oneDNN primitive on every call, which costs ~10x the
    arithmetic for a single time step; the one-step cell ops (torch.lstm_cell and friends) run the
    same maths on the same weights without that set-up. `dtype` bfloat16 halves the weight bytes
    read per step, which is what bounds single-stream speed.
    """

    def __init__(self, model: CharRNN, dtype: torch.dtype = torch.float32) -> None:
        cfg = model.config
        self.lstm = cfg.model == "lstm"
        self.cell = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell,
                     "rnn-relu": torch.rnn_relu_cell}[cfg.model]
        self.dtype = dtype
        rnn = model.rnn
        names = ("weight_ih_l{}", "weight_hh_l{}", "bias_ih_l{}", "bias_hh_l{}")
        self.layers = [tuple(getattr(rnn, n.format(i)).detach().to(dtype) for n in names)
                       for i in range(cfg.num_layers)]
        self.embed = model.embed.weight.detach().to(dtype)
        self.head_weight = model.head.weight.detach().to(dtype)
        self.head_bias = model.head.bias.detach().to(dtype)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """ids [B] -> logits [B, V] (float32) and the new state."""
        x = self.embed[ids]  # [B, E]
        hs, cs = [], []
        for i, weights in enumerate(self.layers):
            if self.lstm:
                h, c = self.cell(x, (state[0][i].to(self.dtype), state[1][i].to(self.dtype)), *weights)
                cs.append(c)
            else:
                h = self.cell(x, state[0][i].to(self.dtype), *weights)
            hs.append(h)
            x = h  # [B, H]
        logits = F.linear(x, self.head_weight, self.head_bias).float()  # [B, V]
        return logits, ((torch.stack(hs), torch.stack(cs)) if self.lstm else (torch.stack(hs),))


class Sampler:
    """Batched generation with carried state from a CharRNN and its vocab."""

    def __init__(self, model: CharRNN, vocab: Vocab, *, dtype: torch.dtype = torch.float32) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.device = next(model.parameters()).device
        self.step = StepModel(self.model, dtype)

    @torch.inference_mode()
    def prime(self, seed: str, num_samples: int) -> tuple[torch.Tensor, State]:
        """One batched forward pass over the whole seed -> (logits for the next char [N, V], state)."""
        ids = encode_seed(seed, self.vocab) if seed else [self.vocab.start_id]
        x = torch.tensor(ids, device=self.device).unsqueeze(0).expand(num_samples, -1)  # [N, L]
        logits, state = self.model(x, None)
        return logits[:, -1], state

    @torch.inference_mode()
    def stream(
        self,
        seed: str = "",
        *,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_samples: int = 1,
        rng_seed: int | None = None,
    ) -> Iterator[list[str]]:
        """Yields, per generated position, one character for each of the `num_samples` samples."""
        check_options(length=length, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples)
        generator = torch.Generator(device=self.device)
        if rng_seed is None:
            generator.seed()
        else:
            generator.manual_seed(rng_seed)
        logits, state = self.prime(seed, num_samples)
        chars = self.vocab.chars
        yield from self._generate(logits, state, chars, length, temperature, top_k, top_p, generator)

    def _generate(self, logits: torch.Tensor, state: State, chars: tuple[str, ...], length: int,
                  temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator) -> Iterator[list[str]]:
        for i in range(length):
            if temperature == 0:
                next_ids = logits.argmax(-1)
            else:
                probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                next_ids = draw(probs, generator)
            yield [chars[j] for j in next_ids.tolist()]
            if i + 1 < length:
                logits, state = self.step(next_ids, state)
