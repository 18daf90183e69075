"""Generating text: prime with the seed in one forward pass, then O(1) work per character.

Each step runs the recurrent cells once for the newest character with the carried state; the
prefix is never re-run. The decoding filters apply in this order: temperature, then top-k, then
top-p (nucleus), then a draw from what is left; temperature 0 means greedy argmax.
"""

from __future__ import annotations

import itertools
import math
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .adapt import Adaptation, AdaptingStreams
from .device import ThreadTuner, WeightFormat, batch_weight_format, cpu_cores, int8_matmul_exact, resolve_weight_format
from .errors import ConfigError, VocabError
from .fixed import ONE, RELU_MAX, FixedModel, split_pays, to_float
from .model import CharRNN, State
from .streams import IGNORE, model_inputs
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
        candidates = [
            "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)),
            ch.swapcase(),
            ch.lower(),
            ch.upper(),
            " " if ch.isspace() else "",
        ]
        out.append(next((c for c in candidates if c and all(x in vocab for x in c)), ""))
    return "".join(out)


def encode_seed(seed: str, vocab: Vocab) -> list[int]:
    ids = vocab.lookup(text_to_codes(seed))
    if (ids < 0).any():
        unknown = sorted(set(ch for ch in seed if ch not in vocab))
        shown = ", ".join(describe_char(c) for c in unknown[:10])
        suggestion = closest_known(seed, vocab)
        hint = f"try --seed {suggestion!r}" if suggestion else "use characters from the training text"
        raise VocabError(
            f"the seed has {len(unknown)} character{'s' if len(unknown) != 1 else ''} the model never saw: {shown}",
            hint,
        )
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


class StopRule:
    """Where one generated stream ends, besides the length cap: at the first of `stops` it writes (the
    stop string left out, or kept with include_stop) or after its `lines`-th newline (kept).

    Characters that might be the start of a stop string are held back until they cannot be, so a
    stop string left out is never half printed; `feed` returns what may be shown now.
    """

    def __init__(self, stops: Sequence[str] = (), lines: int | None = None, *, include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.stop_chars = frozenset("".join(self.stops))  # a character outside them ends no stop string
        self.lines = lines
        self.include_stop = include_stop
        self.held = ""
        self.newlines = 0
        self.stopped: str | None = None  # "stop" or "lines" once it has ended
        self.matched: str | None = None  # the stop string it ended on

    @property
    def active(self) -> bool:
        return bool(self.stops) or self.lines is not None

    def feed(self, ch: str) -> str:
        if self.stopped:
            return ""
        if ch not in self.stop_chars:  # the common case, in O(1): nothing can be held back after it
            out, self.held = self.held + ch, ""
            if ch == "\n" and self.lines is not None:
                self.newlines += 1
                if self.newlines >= self.lines:
                    self.stopped = "lines"
            return out
        self.held += ch
        for stop in self.stops:
            if self.held.endswith(stop):
                self.stopped, self.matched = "stop", stop
                out = self.held if self.include_stop else self.held[: len(self.held) - len(stop)]
                self.held = ""
                return out
        if ch == "\n" and self.lines is not None:
            self.newlines += 1
            if self.newlines >= self.lines:
                self.stopped, out, self.held = "lines", self.held, ""
                return out
        keep = max((k for stop in self.stops for k in range(1, len(stop)) if self.held.endswith(stop[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        """What is still held back when the length cap ends the stream."""
        out, self.held = self.held, ""
        return out


def stop_ending(text: str, stops: Sequence[str], lines: int | None, include_stop: bool) -> str | None:
    """`text` as shown if its last character ends it (a stop string, the `lines`-th newline), else None;
    the one-shot form of StopRule, for beam search, whose rows are whole texts."""
    for stop in stops:
        if stop and text.endswith(stop):
            return text if include_stop else text[: len(text) - len(stop)]
    if lines is not None and text.endswith("\n") and text.count("\n") >= lines:
        return text
    return None


def check_stops(stops: Sequence[str], lines: int | None) -> None:
    if isinstance(stops, str):
        raise ConfigError("stop must be a list of strings, not one string (stop=['\\n\\n'])")
    if any(not isinstance(s, str) or not s for s in stops):
        raise ConfigError("--stop must be a non-empty string")
    if lines is not None and (isinstance(lines, bool) or not isinstance(lines, int) or lines < 1):
        raise ConfigError(f"--lines must be at least 1 (got {lines!r})")


class _Linear:
    """base + x @ W.T for one step, with W kept in the step's dtype, or in int8 with one scale per row.

    int8 reads a quarter of fp32's bytes per step, and reading the weights is what bounds a single
    stream on a CPU. Inputs are int8 too (see StepModel._input), so the product is one integer matmul
    (torch._int_mm, VNNI on x86) rescaled by (row scale x input scale) as it is added to base.
    """

    def __init__(self, weight: torch.Tensor, weight_format: WeightFormat, dtype: torch.dtype) -> None:
        self.int8 = weight_format == "int8"
        weight = weight.detach().float()
        if self.int8:
            scale = weight.abs().amax(1).clamp_min(1e-12) / 127  # [N]
            self.weight = torch.round(weight / scale[:, None]).to(torch.int8).t()  # [K, N]
            self.row_scale = scale
            self.scale = scale / 127  # bounded inputs are quantised with the fixed step 1/127
        else:
            self.weight = weight.to(dtype).t()  # [K, N]

    def add_to(self, base: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """base [N] or [B, N] + x [B, K] @ W.T; x_scale [B, 1]: int8 inputs quantised with their own scale."""
        if not self.int8:
            return torch.addmm(base, x, self.weight)
        scale = self.scale if x_scale is None else self.row_scale * x_scale
        if int8_matmul_exact():
            product = torch._int_mm(x, self.weight)  # [B, N] int32
        else:  # the same integer sums, exactly, where the int8 kernel saturates (device.int8_matmul_exact)
            product = (x.double() @ self.weight.double()).float()
        return torch.addcmul(base, product, scale)


class _Layer(NamedTuple):
    """One recurrent layer's weights for a step. The input part is layer 0's per-character table, or
    its own matmul (ih, with ih_bias), or, when both are None, shares hh's matmul over [x, h]."""

    table: torch.Tensor | None
    ih: _Linear | None
    ih_bias: torch.Tensor | None  # with every bias but GRU's b_hh folded in
    hh: _Linear
    hh_bias: torch.Tensor | None  # GRU only

    @property
    def fused(self) -> bool:
        return self.table is None and self.ih is None


class StepModel:
    """One character per call through the model's own weights, for generation.

    nn.LSTM/GRU/RNN set up a whole-sequence kernel on every call, which costs ~10x the arithmetic of a
    single time step. Here a step is the cell's maths written out with as few tensor ops as possible:
    layer 0's input projection is a table (one row per character: embedding, input weights and biases
    folded), the LSTM gates are reordered so one sigmoid covers three of them, and the weights are
    read in the chosen format: fp32, bf16 (half the bytes) or int8 (a quarter; CPU only).
    The running state lives here; `reset` loads one, `state` returns it in the model's layout.
    """

    def __init__(self, model: CharRNN, weight_format: str = "fp32") -> None:
        cfg = model.config
        fmt = resolve_weight_format(weight_format, model.head.weight.device)
        self.kind, self.size, self.weight_format = cfg.cell, cfg.hidden_size, fmt
        self.dtype = torch.bfloat16 if fmt == "bf16" else torch.float32  # of the state and pointwise maths
        self.bounded = cfg.cell != "rnn-relu"  # |h| <= 1: int8 inputs can use the fixed step 1/127
        rnn, h = model.rnn, cfg.hidden_size
        order = (
            torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
            if cfg.cell == "lstm"
            else None
        )  # i, f, g, o -> i, f, o, g

        def rows(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().float()
            return t[order] if order is not None else t

        self.layers: list[_Layer] = []
        for i in range(cfg.num_layers):
            w_ih, w_hh = rows(getattr(rnn, f"weight_ih_l{i}")), rows(getattr(rnn, f"weight_hh_l{i}"))
            b_ih, b_hh = rows(getattr(rnn, f"bias_ih_l{i}")), rows(getattr(rnn, f"bias_hh_l{i}"))
            if cfg.cell != "gru":  # GRU keeps b_hh apart: its n part is gated by r
                b_ih, b_hh = b_ih + b_hh, None
            b_hh = None if b_hh is None else b_hh.to(self.dtype)
            if i == 0:  # one row per character: embedding -> input projection -> + biases
                table = torch.addmm(b_ih, model.embed.weight.detach().float(), w_ih.t()).to(self.dtype)
                self.layers.append(_Layer(table, None, None, _Linear(w_hh, fmt, self.dtype), b_hh))
            elif b_hh is None and (self.bounded or fmt != "int8"):  # one matmul reads [x, h]
                self.layers.append(
                    _Layer(
                        None,
                        None,
                        b_ih.to(self.dtype),
                        _Linear(torch.cat([w_ih, w_hh], 1), fmt, self.dtype),
                        None,
                    )
                )
            else:  # GRU (its n gate needs the two products apart) and rnn-relu in int8 (x and h scales differ)
                self.layers.append(
                    _Layer(
                        None,
                        _Linear(w_ih, fmt, self.dtype),
                        b_ih.to(self.dtype),
                        _Linear(w_hh, fmt, self.dtype),
                        b_hh,
                    )
                )
        self.head = _Linear(model.head.weight, fmt, self.dtype)
        self.head_bias = model.head.bias.detach().to(self.dtype)
        self.hs: list[torch.Tensor] = []
        self.cs: list[torch.Tensor] = []
        self.xs: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # each h as the matmuls read it

    def _input(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h as a matmul input: itself, or int8 (fixed step 1/127 when |h| <= 1, else a scale per row)."""
        if self.weight_format != "int8":
            return h, None
        if self.bounded:
            return torch.round(h * 127).to(torch.int8), None
        scale = h.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # [B, 1]
        return torch.round(h / scale).to(torch.int8), scale

    def reset(self, state: State) -> None:
        self.hs = [h.to(self.dtype) for h in state[0]]
        self.cs = [c.to(self.dtype) for c in state[1]] if self.kind == "lstm" else []
        self.xs = [self._input(h) for h in self.hs]

    @property
    def state(self) -> State:
        hs = torch.stack(self.hs).float()
        return (hs, torch.stack(self.cs).float()) if self.kind == "lstm" else (hs,)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] (the newest characters) -> logits [B, V] (float32) for the next ones.

        (No inference_mode here: every weight is a detached copy, so no graph is built anyway, and
        entering the mode costs more than some of the steps' ops.)"""
        n = self.size
        x: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for i, layer in enumerate(self.layers):
            h = self.hs[i]
            if layer.table is not None:  # layer 0: the character's row of the table
                gi = torch.embedding(layer.table, ids)
            elif layer.ih is not None:
                gi = layer.ih.add_to(layer.ih_bias, *x)
            if self.kind == "gru":
                gh = layer.hh.add_to(layer.hh_bias, *self.xs[i])
            elif layer.fused:  # both products in one matmul over [x, h]
                gates = layer.hh.add_to(layer.ih_bias, torch.cat([x[0], self.xs[i][0]], 1))
            else:
                gates = layer.hh.add_to(gi, *self.xs[i])
            if self.kind == "lstm":
                ifo, g = gates.split([3 * n, n], 1)
                i_, f, o = torch.sigmoid(ifo).chunk(3, 1)
                c = torch.addcmul(f * self.cs[i], i_, torch.tanh(g))
                h = o * torch.tanh(c)
                self.cs[i] = c
            elif self.kind == "gru":  # gates r, z, n
                gi_rz, gi_n = gi.split([2 * n, n], 1)
                gh_rz, gh_n = gh.split([2 * n, n], 1)
                r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, 1)
                new = torch.tanh(torch.addcmul(gi_n, r, gh_n))
                h = torch.addcmul(new, z, h - new)  # (1 - z) * n + z * h
            else:
                h = torch.tanh(gates) if self.kind == "rnn" else torch.relu(gates)
            self.hs[i] = h
            self.xs[i] = x = self._input(h)
        return self.head.add_to(self.head_bias, *x).float()


class FixedStep:
    """One character per call through the integer model (fixed.FixedModel): the whole step, every
    layer and the output layer, is one compiled call with no tensor ops, which is what bounds a single
    stream on a CPU (StepModel's ~15 torch ops cost more than their arithmetic). Same interface as
    StepModel; the state is kept as integers and shown as floats. Each stream's integers do not depend
    on what else is in the batch, so a generation served beside others writes what it writes alone."""

    def __init__(self, model: CharRNN) -> None:
        # 8-bit layer weights: half the bytes per character, and no measurable cost in bits/char
        # (bench/narrow.py: LSTM 2x512 2.4338 against 11 bits' 2.4337, GRU 2x256 2.2521 against 2.2522)
        self.fixed = FixedModel.from_model(model, narrow=True)
        self.can_split = self.fixed.can_split and split_pays(model.config) and cpu_cores() > 1
        self.kind = model.config.cell
        self.ints = self.fixed.initial_state(1)  # [h (, c), L, B, H] Q12
        # compiled (or loaded from numba's cache) now, not inside the first generation: the step and
        # the one-stream writer, with the argument types Sampler._write_fixed passes
        self.fixed.step(np.zeros(1, dtype=np.int64), self.ints.copy())
        vocab = self.fixed.vocab
        for threads in (1, 2) if self.can_split else (1,):  # and on two cores
            self.fixed.generate(
                self.ints.copy(),
                np.zeros(vocab, np.float32),
                np.zeros((1, vocab), np.float32),
                1,
                advance_last=True,
                threads=threads,
            )

    def reset(self, state: State) -> None:
        values = torch.stack([s.detach().float().cpu() for s in state]).numpy()
        top = RELU_MAX if self.kind == "rnn-relu" else ONE
        ints = np.rint(values * ONE)
        ints[0] = np.clip(ints[0], -top, top)
        self.ints = ints.astype(np.int64)

    @property
    def state(self) -> State:
        values = torch.from_numpy(self.ints * (1.0 / ONE)).float()
        return tuple(values.unbind(0))

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] -> float32 logits [B, V]; streams split over torch's thread count when many."""
        q = self.fixed.step(ids.cpu().numpy(), self.ints, torch.get_num_threads())
        return torch.from_numpy(to_float(q))

    def generate(
        self, logits: np.ndarray, noise: np.ndarray, count: int, *, advance_last: bool, threads: int = 1
    ) -> np.ndarray:
        """One stream writes `count` characters in one compiled call (FixedModel.generate): what
        `count` rounds of picking and calling this step would write, without Python in between; with
        `threads` 2, on two cores."""
        return self.fixed.generate(self.ints, logits, noise, count, advance_last=advance_last, threads=threads)


FIXED_MAX_STREAMS = 16  # more streams at once: the batched torch step is faster (bench/sample_speed.py)


def make_step(model: CharRNN, weight_format: str, streams: int) -> StepModel | FixedStep:
    """The per-character step for `streams` streams at a time in `weight_format` (resolved)."""
    if weight_format == "fixed" and streams <= FIXED_MAX_STREAMS:
        try:
            return FixedStep(model)
        except ConfigError:  # weights too large for the integers' bounds (FixedModel.check): torch's step
            pass
    device = model.head.weight.device
    return StepModel(model, batch_weight_format(device) if weight_format == "fixed" else weight_format)


PRIME_CHUNK = 8192
WRITE_FIRST, WRITE_MOST = 16, 512  # characters per call of the compiled writer (Sampler._write_fixed)
NOISE_FLOATS = 1 << 20  # Gumbel noise drawn ahead, in floats: a few MB whatever the batch and vocab


Picker = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> the chosen ids [B]


def new_generator(device: torch.device, rng_seed: int | None) -> torch.Generator:
    """The random stream of one generation: seeded for repeatable text, else from the OS."""
    generator = torch.Generator(device=device)
    if rng_seed is None:
        generator.seed()
    else:
        generator.manual_seed(rng_seed)
    return generator


def make_picker(
    *, temperature: float, top_k: int | None, top_p: float | None, length: int, generator: torch.Generator
) -> Picker:
    """How one generation turns logits into characters. Everything random comes from `generator`, so
    a generation served in a batch beside others (charlm serve) writes what it writes alone."""
    if temperature == 0:
        return lambda logits: logits.argmax(-1)
    if top_k is None and (top_p is None or top_p >= 1.0):
        return _gumbel(temperature, length, generator)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return draw(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), generator)

    return pick


class GumbelNoise:
    """T x Gumbel noise for one generation, many steps' worth per draw from its generator: a draw from
    softmax(logits / T) is argmax(logits + noise). The torch picker and the compiled writer
    (FixedStep.generate) take the same blocks, so they write the same text."""

    def __init__(self, temperature: float, length: int, generator: torch.Generator) -> None:
        self.temperature, self.length, self.generator = temperature, length, generator

    def block(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """[steps, *shape]: the noise of the next `steps` steps (as many as fit in NOISE_FLOATS)."""
        steps = max(1, min(self.length, NOISE_FLOATS // math.prod(shape)))
        e = torch.empty(steps, *shape, device=device).exponential_(generator=self.generator)
        return e.clamp_min_(1e-30).log_().mul_(-self.temperature)


def _gumbel(temperature: float, length: int, generator: torch.Generator) -> Picker:
    """Two tensor ops per step, with the noise for many steps drawn in one call."""
    source = GumbelNoise(temperature, length, generator)
    noise: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if not noise:
            noise.extend(reversed(source.block(logits.shape, logits.device).unbind()))
        return (logits + noise.pop()).argmax(-1)

    return pick


class Sampler:
    """Batched generation with carried state from a CharRNN and its vocab."""

    def __init__(
        self, model: CharRNN, vocab: Vocab, *, weight_format: str = "fp32", threads: int | None = None
    ) -> None:
        self.model = model.eval()
        self.threads = threads  # None: adapt the CPU thread count to the load while generating
        self.vocab = vocab
        self.device = next(model.parameters()).device
        self.weight_format = resolve_weight_format(weight_format, self.device)
        self._steps: dict[bool, StepModel | FixedStep] = {}

    def step_for(self, streams: int) -> StepModel | FixedStep:
        """The step this sampler uses for `streams` streams at a time (made once, then kept: it holds
        the running state)."""
        few = self.weight_format == "fixed" and streams <= FIXED_MAX_STREAMS
        if few not in self._steps:
            self._steps[few] = make_step(self.model, self.weight_format, streams)
        return self._steps[few]

    @property
    def step(self) -> StepModel | FixedStep:
        """The step of one stream (what `charlm serve` batches its generations through: each stream's
        result then does not depend on the batch)."""
        return self.step_for(1)

    @torch.inference_mode()
    def prime(self, seed: str, num_samples: int, *, before: Iterable[str] | None = None) -> tuple[torch.Tensor, State]:
        """Reads `before` (the text of a --seed-file, in pieces of any size), then the seed, and returns
        (logits for the next char [N, V], state). Memory grows with PRIME_CHUNK, never with the text.
        Characters of `before` the model does not know are skipped and counted in `self.skipped`
        (they cannot be fed); the seed's must all be known (encode_seed). Nothing read: the start
        symbol, as at the beginning of a text."""
        logits: torch.Tensor | None = None
        state: State | None = None
        self.skipped = 0
        for text in before or ():
            ids = self.vocab.lookup(text_to_codes(text))
            known = ids[ids >= 0].astype(np.int64)
            self.skipped += len(ids) - len(known)
            for i in range(0, len(known), PRIME_CHUNK):
                logits, state = self._read(known[i : i + PRIME_CHUNK], state)
        seed_ids = encode_seed(seed, self.vocab) if seed else []
        if seed_ids or logits is None:
            previous = np.array(seed_ids or [IGNORE], dtype=np.int64)  # [L]
            logits, state = self._read(model_inputs(previous, self.vocab.start_id), state)
        rows = tuple(t.expand(-1, num_samples, -1).contiguous() for t in state)
        return logits.expand(num_samples, -1), rows

    def _adapting(
        self, seed: str, num_samples: int, before: Iterable[str] | None, adaptation: Adaptation
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Dynamic evaluation while writing, with compress's own reader (adapt.AdaptingStreams, on a
        copy of the model): it reads the seed file and the seed one character at a time, taking a
        small gradient step every few characters, so that a prompt in a new style (names, a format)
        is continued in that style. It stops learning when it starts writing: its own text holds
        nothing new, and learning from it feeds its own choices back (measured: at compress's rate a
        sample falls into repeating one word within a few hundred characters). The samples of one
        call learn together. Steps through the whole model for each character: several times slower
        than plain sampling. Returns (logits for the first character [N, V], advance)."""
        reader = AdaptingStreams(self.model, num_samples, start_id=self.vocab.start_id, adaptation=adaptation)
        self.skipped = 0
        if seed:
            encode_seed(seed, self.vocab)  # strict, as without adapt; the seed file's unknowns are skipped
        for text in itertools.chain(before or (), [seed]):
            ids = self.vocab.lookup(text_to_codes(text))
            self.skipped += int((ids < 0).sum())
            for c in ids[ids >= 0].tolist():
                reader.step()
                reader.feed(np.full(num_samples, c, dtype=np.int64))

        reader.learning = False  # from here on it reads its own writing

        def advance(next_ids: torch.Tensor) -> torch.Tensor:
            reader.feed(next_ids.cpu().numpy())
            return reader.step()

        return reader.step(), advance

    def _read(self, ids: np.ndarray, state: State | None) -> tuple[torch.Tensor, State]:
        """The model over ids [L] from `state`: (logits after the last one [1, V], state). Only the last
        position goes through the output layer: with a large vocabulary that is most of the work."""
        model = self.model
        x = model.embed(torch.from_numpy(ids).to(self.device).unsqueeze(0))  # [1, L, E]
        hidden = None if state is None else (state if model.config.cell == "lstm" else state[0])
        out, new = model.rnn(x, hidden)  # [1, L, H]
        return model.head(out[:, -1]), (new if isinstance(new, tuple) else (new,))

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
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = False,
        before: Iterable[str] | None = None,
        adapt: Adaptation | None = None,
    ) -> Iterator[list[str]]:
        """Yields, per generated position, the new text of each of the `num_samples` samples: one
        character each, or with `stop`/`lines` what each may show by then ('' while a possible stop
        string is held back, and after it has ended). Ends at `length` or when every sample has
        stopped. `before`: text read ahead of the seed (Sampler.prime). `adapt`: the model learns
        from the text as it reads it, seed file and seed, before it writes (see _adapting)."""
        check_options(length=length, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples)
        check_stops(stop, lines)
        generator = new_generator(self.device, rng_seed)
        if adapt is None:
            logits, state = self.prime(seed, num_samples, before=before)
            step = self.step_for(num_samples)
            step.reset(state)
            advance: Callable[[torch.Tensor], torch.Tensor] = step
        else:
            logits, advance = self._adapting(seed, num_samples, before, adapt)
        pick = make_picker(temperature=temperature, top_k=top_k, top_p=top_p, length=length, generator=generator)
        chars = self.vocab.chars
        rules = [StopRule(stop, lines, include_stop=include_stop) for _ in range(num_samples)]
        self.rules = rules
        watching = rules[0].active
        plain_draw = temperature == 0 or (top_k is None and (top_p is None or top_p >= 1.0))
        if adapt is None and num_samples == 1 and plain_draw and isinstance(advance, FixedStep):
            yield from self._write_fixed(advance, logits, length, temperature, generator, rules[0])
            return
        # one stream: short probes, since such a sample is often over in a second and a 0.4 s look at
        # the slower count would cost it ~10% (bench/contention.py); 0.1 s still averages ~500 steps.
        # Many streams: each step is 64x the work, and 0.1 s is too few steps to tell the counts apart
        # (bench/run.py, 64 streams int8: 2.7x the baseline with 0.1 s probes, 4.0x with 0.4 s)
        probe_s = 0.1 if num_samples == 1 else None
        with ThreadTuner(self.device, self.threads, all_cores_first=True, probe_s=probe_s) as tuner:
            for i in range(length):
                with tuner.unit(num_samples):
                    next_ids = pick(logits)
                    picked = next_ids.tolist()
                if not watching:
                    yield [chars[j] for j in picked]
                else:
                    yield [rule.feed(chars[j]) for rule, j in zip(rules, picked, strict=True)]
                    if all(rule.stopped for rule in rules):
                        return
                if i + 1 < length:
                    with tuner.unit(0):
                        logits = advance(next_ids)
            if watching:
                yield [rule.flush() for rule in rules]

    def _write_fixed(
        self,
        step: FixedStep,
        logits: torch.Tensor,
        length: int,
        temperature: float,
        generator: torch.Generator,
        rule: StopRule,
    ) -> Iterator[list[str]]:
        """One sample through the compiled writer, in blocks that grow from WRITE_FIRST to WRITE_MOST
        characters (the first ones show at once; a stop string wastes at most a block). The same text
        as stream's loop: the same noise blocks, float32 sums and first-of-equal-maxima argmax.

        One core or two: the blocks are timed (device.ThreadTuner) and the faster kept, re-checked as
        the load changes. Two pay for a model whose weights outgrow one core's cache (each reads half)
        and lose beside a busy neighbour; the text is the same either way."""
        # two cores first: where they are offered they win on a quiet machine by 2-3x, a sample is
        # often over in a second, and a half the partner does not take is done here, so a busy
        # machine costs the probe little (bench/narrow.py: 1,888 against one core's 2,819)
        # (a step that cannot split fixes one thread, which leaves the tuner idle: no probes, no timing)
        threads = self.threads if step.can_split else 1
        with ThreadTuner(self.device, threads, all_cores_first=True, probe_s=0.1) as tuner:
            chars = self.vocab.chars
            source = None if temperature == 0 else GumbelNoise(temperature, length, generator)
            current = logits[0].float().cpu().numpy().copy()  # float32 [V], updated by each block
            noise = np.empty((0, len(current)), dtype=np.float32)
            used, done, block = 0, 0, WRITE_FIRST
            watching = rule.active
            while done < length:
                count = min(block, length - done)
                rows = noise[:0]
                if source is not None:
                    if used == len(noise):
                        noise, used = source.block((len(current),), torch.device("cpu")).numpy(), 0
                    count = min(count, len(noise) - used)
                    rows, used = noise[used : used + count], used + count
                with tuner.unit(count):
                    ids = step.generate(current, rows, count, advance_last=done + count < length, threads=tuner.threads)
                done += count
                if not watching:
                    for j in ids.tolist():
                        yield [chars[j]]
                else:
                    for j in ids.tolist():
                        yield [rule.feed(chars[j])]
                        if rule.stopped:
                            return
                block = min(2 * block, WRITE_MOST)
            if watching:
                yield [rule.flush()]

    @torch.inference_mode()
    def beam_search(
        self,
        seed: str = "",
        *,
        beam: int,
        length: int = 500,
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = False,
        before: Iterable[str] | None = None,
    ) -> tuple[str, float]:
        """The most likely continuation of at most `length` characters (ending at a stop string or
        the `lines`-th newline where it meets one) that a beam of `beam` rows finds, with its
        log-probability in nats under the weights sampling reads. The greedy continuation runs
        alongside as one more row and wins if it scores higher, so the result never scores below
        greedy; `beam=1` is greedy."""
        if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= 256:
            raise ConfigError(f"--beam must be from 1 to 256 (got {beam!r})")
        check_options(length=length, temperature=1.0, top_k=None, top_p=None, num_samples=1)
        check_stops(stop, lines)
        logits, state = self.prime(seed, 2, before=before)  # row 0 starts the beam, row 1 is greedy
        step = self.step_for(beam + 1)
        step.reset(state)
        chars, vocab_size = self.vocab.chars, logits.shape[-1]
        texts, scores = [""], [0.0]  # the beam's rows, best first
        g_text, g_score, g_active = "", 0.0, True  # the greedy row, last in the batch while active
        done: list[tuple[float, str]] = []  # (log-probability, text as shown) of every ended candidate
        for i in range(length):
            logp = F.log_softmax(logits.double(), -1)  # [rows, V]
            kept: list[tuple[int, int, str, float]] = []  # (row it extends, character, text, score)
            if texts:
                totals = (torch.tensor(scores, dtype=torch.float64)[:, None] + logp[: len(texts)]).flatten()
                best, where = totals.topk(min(2 * beam, totals.numel()))
                for score, flat in zip(best.tolist(), where.tolist(), strict=True):
                    row, ch = divmod(flat, vocab_size)
                    text = texts[row] + chars[ch]
                    ended = stop_ending(text, stop, lines, include_stop)
                    if ended is not None:
                        done.append((score, ended))
                    elif len(kept) < beam:
                        kept.append((row, ch, text, score))
            g_row = len(texts)
            if g_active:
                g_ch = int(logp[-1].argmax())
                g_score += float(logp[-1, g_ch])
                g_text += chars[g_ch]
                ended = stop_ending(g_text, stop, lines, include_stop)
                if ended is not None:
                    done.append((g_score, ended))
                    g_active = False
            bar = max((d[0] for d in done), default=-math.inf)  # scores only fall as a text grows:
            kept = [k for k in kept if k[3] > bar]  # a row at or below the best ended text cannot win
            g_active = g_active and g_score > bar
            if i + 1 == length:  # the length cap ends every row still going
                done += [(k[3], k[2]) for k in kept] + ([(g_score, g_text)] if g_active else [])
                break
            if not kept and not g_active:
                break
            rows = [k[0] for k in kept] + ([g_row] if g_active else [])
            ids = [k[1] for k in kept] + ([g_ch] if g_active else [])
            step.reset(tuple(t[:, rows] for t in step.state))
            logits = step(torch.tensor(ids, device=self.device))
            texts, scores = [k[2] for k in kept], [k[3] for k in kept]
        score, text = max(done, key=lambda d: d[0])
        return text, score
