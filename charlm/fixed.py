"""The model in integer arithmetic: the same bits on every machine, and one fused step per character.

Why. Floating-point results depend on the order of additions, so a matrix product gives other last
bits on AVX2 than on AVX-512 or AMX, with one thread than with two, on ARM and on a GPU. A compressed
archive must be decoded by the very same arithmetic that wrote it, so its model runs here in integers,
whose sums are exact in any order.

The format (fixed: `compress`'s portable archives depend on every number here; a change needs a new
archive format version):
- weights: int16 holding 11-bit values (|q| <= 1023), one float scale per output row, q = rint(w / s);
- activations (the hidden state, the LSTM cell): Q12, value x 4096 (|h| <= 1 for tanh and sigmoid
  cells; ReLU layers clamp at 8);
- each product row is summed exactly (in int32, which `FixedModel.check` proves wide enough for the
  model's weights), rescaled by an integer multiplier rint(s x 2^28) and a rounding shift, plus a Q12
  bias;
- sigmoid and tanh are tables over Q12 inputs in [-8, 8), each entry the correctly rounded value, so
  no libm is consulted at run time;
- logits are Q10 (value x 1024); the coder turns them into integer frequencies (`frequencies`) with a
  table of exp.
Building the integers from a checkpoint uses only exactly rounded operations on single numbers
(divide, multiply, rint): IEEE 754 makes them the same everywhere.

Two implementations compute the same integers: a numba kernel (one compiled call per character and
stream: what a single stream wants) and numpy with torch's float64 matrix products, which are exact
for these integers (every partial sum is an integer far below 2^53, so the order of additions and the
thread count cannot matter): what many streams at once want, and the path without numba. Tests hold
them equal.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

ACT_BITS = 12  # activations are Q12
ONE = 1 << ACT_BITS
HALF = 1 << (ACT_BITS - 1)
WEIGHT_MAX = 1023  # 11-bit weights in int16
MUL_BITS = 28  # fraction bits of the rescaling multipliers
LOGIT_BITS = 10  # logits are Q10
TABLE_MIN = -(1 << 15)  # sigmoid/tanh tables cover Q12 inputs [-8, 8)
TABLE_SIZE = 1 << 16
RELU_MAX = (1 << 15) - 1  # a ReLU activation is clamped at 8 (Q12)
EXP_BITS = 24  # exp table entries are exp(-d / 1024) x 2^24
EXP_RANGE = 24 << LOGIT_BITS  # logits more than 24 nats below the best get the smallest weight
FORMAT = 1  # of the integer model; recorded in archives


def _rounded_table(fn: Any, exact: Any, xs: np.ndarray, scale: int) -> np.ndarray:
    """rint(fn(x) * scale) for every x, correctly rounded: float64 gives it except within 1e-6 of a
    half, where `exact` (decimal arithmetic, the same on every machine) decides."""
    v = fn(xs.astype(np.float64)) * scale
    out = np.rint(v).astype(np.int64)
    near = np.flatnonzero(np.abs(v - np.floor(v) - 0.5) < 1e-6)
    for i in near:
        with localcontext() as ctx:
            ctx.prec = 40
            out[i] = int((exact(Decimal(int(xs[i]))) * scale).to_integral_value())
    return out


@functools.cache
def tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmoid, tanh, exp) tables, int64. Index u of the first two is a Q12 input TABLE_MIN + u."""
    u = np.arange(TABLE_MIN, TABLE_MIN + TABLE_SIZE, dtype=np.int64)
    sig = _rounded_table(lambda x: 1 / (1 + np.exp(-x / ONE)), lambda d: 1 / (1 + (-d / ONE).exp()), u, ONE)
    tanh = _rounded_table(lambda x: np.tanh(x / ONE), lambda d: _dtanh(d / ONE), u, ONE)
    d = np.arange(EXP_RANGE + 1, dtype=np.int64)
    exp = _rounded_table(
        lambda x: np.exp(-x / (1 << LOGIT_BITS)), lambda x: (-x / (1 << LOGIT_BITS)).exp(), d, 1 << EXP_BITS
    )
    exp = np.maximum(exp, 1)  # every character keeps a weight: a coder cannot code probability 0
    for t in (sig, tanh, exp):
        t.setflags(write=False)
    return sig, tanh, exp


def _dtanh(x: Decimal) -> Decimal:
    e = (2 * x).exp()
    return (e - 1) / (e + 1)


def _quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int16 q [N, K], float64 scale [N]) with w ~ q * scale per row; all-zero rows get scale 1."""
    w = np.asarray(w, dtype=np.float64)
    top = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    scale = np.where(top > 0, top / WEIGHT_MAX, 1.0)
    q = np.clip(np.rint(w / scale[:, None]), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int16)
    return q, scale


def _multiplier(scale: np.ndarray, out_bits: int) -> np.ndarray:
    """rint(scale x 2^(MUL_BITS + out_bits - ACT_BITS)): an accumulator of Q12 inputs times this,
    shifted right by MUL_BITS, is the output in Q(out_bits)."""
    return np.rint(scale * float(2 ** (MUL_BITS + out_bits - ACT_BITS))).astype(np.int64)


def _q(x: np.ndarray, bits: int) -> np.ndarray:
    return np.rint(np.asarray(x, dtype=np.float64) * float(1 << bits)).astype(np.int64)


@dataclass(frozen=True)
class FixedModel:
    """A CharRNN as integers (see the module docstring). Layer 0's input part is a table (one row of
    Q12 pre-activations per character: embedding, input weights and biases folded, exactly)."""

    cell: str  # lstm, gru, rnn, rnn-relu
    layers: int
    hidden: int
    vocab: int
    table0: np.ndarray  # [V, G*H] int64: layer 0's input pre-activations (+ biases but GRU's b_hh)
    w_ih: np.ndarray  # [L-1, G*H, H] int16: input weights of layers 1..
    m_ih: np.ndarray  # [L-1, G*H] int64 multipliers
    b_ih: np.ndarray  # [L-1, G*H] int64 Q12 (+ b_hh but for GRU)
    w_hh: np.ndarray  # [L, G*H, H] int16
    m_hh: np.ndarray  # [L, G*H] int64
    b_hh: np.ndarray  # [L, G*H] int64 Q12 (GRU's b_hh; zero otherwise)
    w_out: np.ndarray  # [V, H] int16
    m_out: np.ndarray  # [V] int64
    b_out: np.ndarray  # [V] int64 Q10
    s_out: np.ndarray  # [V] float64: the output rows' scales (what a learning head's steps are sized by)

    @classmethod
    def from_model(cls, model: Any) -> FixedModel:
        """The integers of a CharRNN (any device, any dtype: read as float32, as checkpoints store)."""
        cfg = model.config
        rnn = model.rnn
        g, h = cfg.gates(), cfg.hidden_size

        def get(name: str) -> np.ndarray:
            return getattr(rnn, name).detach().float().cpu().numpy().astype(np.float64)

        gru = cfg.cell == "gru"
        w_ih, m_ih, b_ih, w_hh, m_hh, b_hh = [], [], [], [], [], []
        table0 = np.zeros((cfg.vocab_size, g * h), dtype=np.int64)
        for i in range(cfg.num_layers):
            bi, bh = _q(get(f"bias_ih_l{i}"), ACT_BITS), _q(get(f"bias_hh_l{i}"), ACT_BITS)
            if not gru:
                bi, bh = bi + bh, np.zeros_like(bh)
            wi, si = _quantize_rows(get(f"weight_ih_l{i}"))
            if i == 0:
                emb = model.embed.weight.detach().float().cpu().numpy().astype(np.float64)
                qe, se = _quantize_rows(emb)
                acc = qe.astype(np.float64) @ wi.astype(np.float64).T  # [V, G*H] exact integers
                table0 = np.rint(((acc * si[None, :]) * se[:, None]) * float(ONE)).astype(np.int64) + bi
            else:
                w_ih.append(wi)
                m_ih.append(_multiplier(si, ACT_BITS))
                b_ih.append(bi)
            wh, sh = _quantize_rows(get(f"weight_hh_l{i}"))
            w_hh.append(wh)
            m_hh.append(_multiplier(sh, ACT_BITS))
            b_hh.append(bh)
        wo, so = _quantize_rows(model.head.weight.detach().float().cpu().numpy())
        bo = _q(model.head.bias.detach().float().cpu().numpy(), LOGIT_BITS)

        def stack(xs: list[np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            return np.stack(xs).astype(dtype) if xs else np.zeros(shape, dtype=dtype)

        fixed = cls(
            cell=cfg.cell,
            layers=cfg.num_layers,
            hidden=h,
            vocab=cfg.vocab_size,
            table0=np.ascontiguousarray(table0),
            w_ih=stack(w_ih, (0, g * h, h), np.int16),
            m_ih=stack(m_ih, (0, g * h), np.int64),
            b_ih=stack(b_ih, (0, g * h), np.int64),
            w_hh=stack(w_hh, (0, g * h, h), np.int16),
            m_hh=stack(m_hh, (0, g * h), np.int64),
            b_hh=stack(b_hh, (0, g * h), np.int64),
            w_out=wo,
            m_out=_multiplier(so, LOGIT_BITS),
            s_out=so,
            b_out=bo,
        )
        fixed.check()
        return fixed

    def check(self) -> None:
        """Refuses a model whose row sums could leave int32 (the kernel's accumulator) or whose
        rescaling could leave int64. Rows of 512 bounded inputs always fit; wider layers and ReLU
        layers fit unless their weights are unusually large."""
        amax = RELU_MAX if self.cell == "rnn-relu" else ONE
        for w, m in ((self.w_ih, self.m_ih), (self.w_hh, self.m_hh), (self.w_out[None], self.m_out[None])):
            if not w.size:
                continue
            worst = int(np.abs(w.astype(np.int64)).sum(axis=-1).max()) * amax
            if worst >= 1 << 31 or worst * max(1, int(np.abs(m).max())) >= 1 << 62:
                raise ConfigError(
                    "this model's weights are too large for the portable integer arithmetic",
                    "compress it with --machine-bound",
                )

    @property
    def state_layers(self) -> int:
        return 2 if self.cell == "lstm" else 1

    def initial_state(self, streams: int) -> np.ndarray:
        """[state_layers (h, and c for LSTM), L, S, H] int64 zeros."""
        return np.zeros((self.state_layers, self.layers, streams, self.hidden), dtype=np.int64)

    def step(self, ids: np.ndarray, state: np.ndarray, threads: int = 1) -> np.ndarray:
        """ids [S] (what each stream reads), state (updated in place) -> Q10 logits [S, V] int64.

        With `threads` > 1 and several streams, the streams are split between that many threads (the
        kernel releases the GIL); every stream's integers are the same either way."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.vocab), dtype=np.int64)
        compiled = _kernel()
        if compiled is None or len(ids) >= BLAS_STREAMS:
            _numpy_step(self, ids, state, out, None if compiled is None else compiled.rows)
            return out
        kernel = compiled.step
        args = (*self.arrays(), *tables()[:2])
        kind = _CELLS[self.cell]
        parts = min(threads, len(ids) // MIN_STREAMS_PER_THREAD)
        if parts <= 1:
            kernel(kind, ids, state, *args, out)
            return out
        cuts = [len(ids) * i // parts for i in range(parts + 1)]
        list(
            _pool(parts).map(
                lambda ab: kernel(kind, ids[ab[0] : ab[1]], state[:, :, ab[0] : ab[1]], *args, out[ab[0] : ab[1]]),
                zip(cuts[:-1], cuts[1:], strict=True),
            )
        )
        return out

    def generate(
        self, state: np.ndarray, logits: np.ndarray, noise: np.ndarray, count: int, *, advance_last: bool
    ) -> np.ndarray:
        """One stream (state [.., 1, H], updated in place) writes `count` characters from float32
        `logits` [V] (updated in place to the logits after the last one read): each is
        argmax(logits + noise[t]), or argmax(logits) when `noise` has no rows. The compiled loop when
        numba is here; else the same integers and floats a step at a time."""
        chosen = np.empty(count, dtype=np.int64)
        greedy = len(noise) == 0
        if not greedy and len(noise) < count:
            raise ValueError(f"{count} characters need {count} rows of noise, not {len(noise)}")
        compiled = _kernel()
        if compiled is not None:
            weights = (*self.arrays(), *tables()[:2])
            compiled.generate(_CELLS[self.cell], state, weights, logits, noise, chosen, advance_last)
            return chosen
        for t in range(count):
            scores = logits if greedy else logits + noise[t]
            chosen[t] = int(np.argmax(scores))  # the first of equal maxima
            if t + 1 < count or advance_last:
                logits[:] = to_float(self.step(chosen[t : t + 1], state)[0])
        return chosen

    @functools.cached_property
    def float64(self) -> dict[str, list[torch.Tensor]]:
        """The weights transposed as float64, for the exact matrix products (made on first use)."""

        def t(w: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float64))

        return {"ih": [t(w) for w in self.w_ih], "hh": [t(w) for w in self.w_hh], "out": [t(self.w_out)]}

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.table0,
            self.w_ih,
            self.m_ih,
            self.b_ih,
            self.w_hh,
            self.m_hh,
            self.b_hh,
            self.w_out,
            self.m_out,
            self.b_out,
        )


_CELLS = {"gru": 0, "lstm": 1, "rnn": 2, "rnn-relu": 3}
MIN_STREAMS_PER_THREAD = 4  # fewer: handing work to another thread costs more than it saves
# From this many streams the products run as float64 matrix products in torch's BLAS (exact for these
# integers, and reading each weight once for all streams) rather than one compiled pass per stream:
# measured on a 2-core Xeon (GRU 2x256), 12 streams 1.1 ms a step either way, 48 streams 3.6 ms
# against 4.3 ms.
BLAS_STREAMS = 12


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="charlm-fixed")


# ---- the pointwise maths, written once: numpy runs it as is, numba compiles it into the kernel ----

try:  # register_jitable: plain Python when called from Python, compiled inline into the kernel
    from numba import njit as _njit
    from numba.extending import register_jitable as _jitable
except ImportError:  # numpy and torch compute the same integers
    _njit = None

    def _jitable(fn: Any) -> Any:
        return fn


@_jitable
def _rescale(acc: Any, m: Any, b: Any) -> Any:
    return ((acc * m + (1 << (MUL_BITS - 1))) >> MUL_BITS) + b


@_jitable
def _lookup(table: Any, x: Any) -> Any:
    return table[np.minimum(np.maximum(x, TABLE_MIN), TABLE_MIN + TABLE_SIZE - 1) - TABLE_MIN]


@_jitable
def _mul(a: Any, b: Any) -> Any:
    """Q12 x Q12 -> Q12, rounding half up."""
    return (a * b + HALF) >> ACT_BITS


@_jitable
def _cell(kind: int, gi: Any, gh: Any, h: Any, c: Any, sig: Any, tanh: Any, n: int) -> tuple[Any, Any]:
    """One cell update from input and recurrent pre-activations (Q12); returns (h, c)."""
    if kind == 0:  # GRU, gates r, z, n; gh holds b_hh: n's part is gated by r
        r = _lookup(sig, gi[:n] + gh[:n])
        z = _lookup(sig, gi[n : 2 * n] + gh[n : 2 * n])
        new = _lookup(tanh, gi[2 * n :] + _mul(r, gh[2 * n :]))
        return new + _mul(z, h - new), c
    pre = gi + gh
    if kind == 1:  # LSTM, gates i, f, g, o
        i = _lookup(sig, pre[:n])
        f = _lookup(sig, pre[n : 2 * n])
        g = _lookup(tanh, pre[2 * n : 3 * n])
        o = _lookup(sig, pre[3 * n :])
        c = np.minimum(np.maximum(_mul(f, c) + _mul(i, g), -(1 << 30)), 1 << 30)
        return _mul(o, _lookup(tanh, c)), c
    if kind == 2:
        return _lookup(tanh, pre), c
    return np.minimum(np.maximum(pre, 0), RELU_MAX), c


def _numpy_step(m: FixedModel, ids: np.ndarray, state: np.ndarray, out: np.ndarray, rows: Any = None) -> None:
    """The kernel's integers through BLAS products (float64, exact for these integers); the cell's
    pointwise maths compiled (`rows`: the kernel's own cell, stream by stream) or in numpy."""
    sig, tanh, _ = tables()
    kind, n = _CELLS[m.cell], m.hidden
    x = None
    for layer in range(m.layers):
        h = state[0, layer]
        if layer == 0:
            gi = m.table0[ids]
        else:
            gi = _rescale(_exact_matmul(x, m.float64["ih"][layer - 1]), m.m_ih[layer - 1], m.b_ih[layer - 1])
        acc_h = _exact_matmul(h, m.float64["hh"][layer])
        if rows is not None:  # the rescaling and the cell compiled, stream by stream
            rows(kind, np.ascontiguousarray(gi), acc_h, m.m_hh[layer], m.b_hh[layer], state, layer, sig, tanh)
        else:  # gates along the first axis, streams along the second: _cell slices gates as the kernel does
            gh = _rescale(acc_h, m.m_hh[layer], m.b_hh[layer])
            new_h, new_c = _cell(kind, gi.T, gh.T, h.T, state[1, layer].T if kind == 1 else h.T, sig, tanh, n)
            state[0, layer] = new_h.T
            if kind == 1:
                state[1, layer] = new_c.T
        x = state[0, layer]
    out[:] = _rescale(_exact_matmul(x, m.float64["out"][0]), m.m_out, m.b_out)


def _exact_matmul(x: np.ndarray, w_t: torch.Tensor) -> np.ndarray:
    """x [S, K] @ w_t [K, N] (float64 copies of the integer weights) as int64; exact (every partial sum
    is an integer below 2^53) whatever order and threads BLAS adds in."""
    return (torch.from_numpy(x.astype(np.float64)) @ w_t).numpy().astype(np.int64)


# ---- the numba kernel ----


def kernel_available() -> bool:
    """Whether the compiled step is here (numba installed and not switched off)."""
    return _kernel() is not None


@functools.cache
def _kernel() -> Compiled | None:
    """The compiled step, or None without numba (or with CHARLM_NO_NUMBA=1, for tests). Compiled once
    per machine: numba keeps the machine code in its cache (beside this file, or NUMBA_CACHE_DIR)."""
    if os.environ.get("CHARLM_NO_NUMBA") or _njit is None:
        return None
    jit = functools.partial(_njit, cache=True, nogil=True, boundscheck=False)
    return Compiled(step=jit(_step), rows=jit(_rows), generate=jit(_generate))


@dataclass(frozen=True)
class Compiled:
    step: Any  # the whole step of each stream
    rows: Any  # the cell's pointwise maths over the streams of one layer (beside BLAS products)
    generate: Any  # one stream writing many characters: step, draw, step (FixedModel.generate)


def _step(kind, ids, state, table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, w_out, m_out, b_out, sig, tanh, out):  # noqa: ANN001, ANN202
    """Every stream through every layer and the output layer (compiled by _kernel)."""
    weights = (table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, w_out, m_out, b_out, sig, tanh)
    acc_i = np.empty(w_hh.shape[1], dtype=np.int64)
    acc_h = np.empty(w_hh.shape[1], dtype=np.int64)
    acc_o = np.empty(w_out.shape[0], dtype=np.int64)
    for s in range(state.shape[2]):
        _advance(kind, ids[s], state, s, weights, acc_i, acc_h, acc_o)
        out[s, :] = acc_o


@_jitable
def _advance(kind, token, state, s, weights, acc_i, acc_h, acc_o):  # noqa: ANN001, ANN202
    """Stream `s` reads `token`: its state moves on and acc_o holds its next Q10 logits. The cell's
    maths of _cell, written element by element, without the temporary arrays numpy's form makes.
    `weights`: FixedModel.arrays() and the sigmoid and tanh tables, as one tuple."""
    table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, w_out, m_out, b_out, sig, tanh = weights
    layers, n = state.shape[1], state.shape[3]
    gi = acc_i  # rescaled in place
    for layer in range(layers):
        h = state[0, layer, s]
        c = state[1, layer, s] if kind == 1 else h
        if layer == 0:
            gi = table0[token]
        else:
            _matvec(w_ih[layer - 1], state[0, layer - 1, s], acc_i)
            mi, bi = m_ih[layer - 1], b_ih[layer - 1]
            for k in range(len(acc_i)):
                acc_i[k] = _rescale(acc_i[k], mi[k], bi[k])
            gi = acc_i
        _matvec(w_hh[layer], h, acc_h)
        mh, bh = m_hh[layer], b_hh[layer]
        for k in range(len(acc_h)):
            acc_h[k] = _rescale(acc_h[k], mh[k], bh[k])
        gh = acc_h
        for j in range(n):
            if kind == 0:  # GRU: r, z, n; n's recurrent part gated by r
                r = _lookup(sig, gi[j] + gh[j])
                new = _lookup(tanh, gi[2 * n + j] + _mul(r, gh[2 * n + j]))
                h[j] = new + _mul(_lookup(sig, gi[n + j] + gh[n + j]), h[j] - new)
            elif kind == 1:  # LSTM: i, f, g, o
                i_g = _lookup(sig, gi[j] + gh[j])
                f_g = _lookup(sig, gi[n + j] + gh[n + j])
                g_g = _lookup(tanh, gi[2 * n + j] + gh[2 * n + j])
                cj = min(max(_mul(f_g, c[j]) + _mul(i_g, g_g), -(1 << 30)), 1 << 30)
                c[j] = cj
                h[j] = _mul(_lookup(sig, gi[3 * n + j] + gh[3 * n + j]), _lookup(tanh, cj))
            elif kind == 2:
                h[j] = _lookup(tanh, gi[j] + gh[j])
            else:
                h[j] = min(max(gi[j] + gh[j], 0), RELU_MAX)
    _matvec(w_out, state[0, layers - 1, s], acc_o)
    for v in range(len(acc_o)):
        acc_o[v] = _rescale(acc_o[v], m_out[v], b_out[v])


def _generate(kind, state, weights, logits, noise, chosen, advance_last):  # noqa: ANN001, ANN202
    """One stream writes len(chosen) characters: each is argmax(logits + noise[t]) in float32 (the
    Gumbel draw of sample._gumbel, bit for bit; noise of no rows: argmax(logits), the greedy choice),
    then read, turning the next Q10 logits into float32 in `logits` as to_float does. The last one is
    read only with `advance_last`. No Python between characters: that is most of a step's cost.
    `weights` as _advance takes them."""
    acc_i = np.empty(weights[4].shape[1], dtype=np.int64)
    acc_h = np.empty(weights[4].shape[1], dtype=np.int64)
    acc_o = np.empty(weights[7].shape[0], dtype=np.int64)
    greedy = noise.shape[0] == 0
    scale = 1.0 / (1 << LOGIT_BITS)
    for t in range(len(chosen)):
        best, top = 0, np.float32(-np.inf)
        for v in range(len(logits)):
            x = logits[v] if greedy else np.float32(logits[v] + noise[t, v])
            if x > top:  # the first of equal maxima, as torch.argmax
                best, top = v, x
        chosen[t] = best
        if t + 1 < len(chosen) or advance_last:
            _advance(kind, best, state, 0, weights, acc_i, acc_h, acc_o)
            for v in range(len(logits)):
                logits[v] = np.float32(acc_o[v] * scale)


def _rows(kind, gi, acc_h, m_hh, b_hh, state, layer, sig, tanh):  # noqa: ANN001, ANN202
    """The cell of one layer for every stream, from input pre-activations and recurrent sums computed
    elsewhere (compiled)."""
    n = state.shape[3]
    for s in range(state.shape[2]):
        h = state[0, layer, s]
        c = state[1, layer, s] if kind == 1 else h
        new_h, new_c = _cell(kind, gi[s], _rescale(acc_h[s], m_hh, b_hh), h, c, sig, tanh, n)
        state[0, layer, s, :] = new_h
        if kind == 1:
            state[1, layer, s, :] = new_c


@_jitable
def _matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[j] = sum_k w[j, k] x[k], exactly: int16 x int16 products summed in int32 (FixedModel.check
    proves no row's sum can leave int32), the pattern compilers turn into multiply-add-pairs."""
    rows, k_all = w.shape
    x16 = x.astype(np.int16)
    for j in range(rows):
        r = w[j]
        a = np.int32(0)
        for k in range(k_all):
            a = np.int32(a + np.int32(r[k]) * np.int32(x16[k]))
        out[j] = a


# ---- an output layer that learns from the text it codes, in integers ----


@dataclass(frozen=True)
class HeadAdaptation:
    """How the output layer learns while coding (portable archives; part of their format: a change
    needs a new archive format version). Every `steps` characters of each stream, one SGD step on the
    mean cross-entropy of what was just coded, taken on the output layer alone: its gradient is a
    product of integers (the coded probabilities' errors and the last hidden states), so the step is
    exact on every machine. Measured on held-out plays (16 streams of 3,000 characters, the 5-minute
    GRU 2x256, in floats): static 2.252 bits/char, the output layer learning at 0.5 2.045, the whole
    model learning (the float --machine-bound mode) 1.971. Tuned in integers on 100,000 held-out
    characters (payload bits/char): lr 0.5 2.114, 1.0 2.105, 2.0 2.106; max_step 4 / 8 / 32 at lr 1.0
    2.123 / 2.105 / 2.160 (the cap on one update is part of what works); decay_shift 10 / 12 / 14
    2.105 / 2.102 / 2.101."""

    steps: int = 16
    lr: float = 1.0
    decay_shift: int = 12  # pulled back 2^-12 (0.02%) of the way to the original weights per update
    max_step: int = 8  # largest change of one weight per update, in units of its row's step


FRACTION = 16  # fraction bits of the learning weights' master copy
STEP_BITS = 16  # fraction bits of the step multipliers
GRADIENT_SHIFT = 20  # the summed gradient is shifted down this much before it is scaled


class LearningHead:
    """The output layer of `model` (a private copy) learning from coded characters: `record` each
    step's hidden states, integer frequencies and targets; every `adaptation.steps` records it learns."""

    def __init__(self, model: FixedModel, streams: int, free: int, adaptation: HeadAdaptation) -> None:
        amax = RELU_MAX if model.cell == "rnn-relu" else ONE
        if WEIGHT_MAX * model.hidden * amax >= 1 << 31:
            raise ConfigError(
                f"a portable archive's learning output layer handles up to {(1 << 31) // (WEIGHT_MAX * amax)} "
                f"hidden units with this cell (the model has {model.hidden})",
                "compress with --no-adapt, or with --machine-bound",
            )
        self.model = dataclasses.replace(model, w_out=model.w_out.copy(), b_out=model.b_out.copy())
        self.adaptation, self.free = adaptation, free
        self.w0 = model.w_out.astype(np.int64) << FRACTION
        self.b0 = model.b_out.astype(np.int64) << FRACTION
        self.w, self.b = self.w0.copy(), self.b0.copy()
        n = max(1, streams) * adaptation.steps  # (no streams: an empty text, nothing is ever learnt)
        # weight units per unit of (summed error x hidden >> GRADIENT_SHIFT), then bias units per error
        per_w = adaptation.lr * 2.0 ** (FRACTION + STEP_BITS + GRADIENT_SHIFT) / (ONE * free * n * model.s_out)
        self.mul_w = np.rint(per_w).astype(np.int64)
        self.mul_b = int(np.rint(adaptation.lr * 2.0 ** (LOGIT_BITS + FRACTION + STEP_BITS) / (n * free)))
        self.limit = adaptation.max_step << FRACTION
        self.hidden: list[np.ndarray] = []
        self.errors: list[np.ndarray] = []

    def record(self, hidden: np.ndarray, weights: np.ndarray, targets: np.ndarray) -> None:
        """hidden [S, H] (the last layer's, read by the output layer), weights [S, V] (the coded
        frequencies, summing to `free`), targets [S] (IGNORE: nothing coded by the model)."""
        errors = weights.astype(np.int64)
        known = np.flatnonzero(targets >= 0)
        errors[known, targets[known]] -= self.free
        errors[targets < 0] = 0
        self.hidden.append(hidden.astype(np.int64))
        self.errors.append(errors)
        if len(self.hidden) == self.adaptation.steps:
            self._learn()

    def _learn(self) -> None:
        h, e = np.concatenate(self.hidden), np.concatenate(self.errors)  # [N, H], [N, V]
        self.hidden, self.errors = [], []
        grad = (torch.from_numpy(e.T.astype(np.float64)) @ torch.from_numpy(h.astype(np.float64))).numpy()
        grad = grad.astype(np.int64) >> GRADIENT_SHIFT  # exact: |sums| < 2^47
        half = 1 << (STEP_BITS - 1)
        step_w = np.clip((grad * self.mul_w[:, None] + half) >> STEP_BITS, -self.limit, self.limit)
        step_b = np.clip((e.sum(axis=0) * self.mul_b + half) >> STEP_BITS, -self.limit, self.limit)
        pull = self.adaptation.decay_shift
        self.w += ((self.w0 - self.w) >> pull) - step_w
        self.b += ((self.b0 - self.b) >> pull) - step_b
        unit = 1 << (FRACTION - 1)
        self.model.w_out[:] = np.clip((self.w + unit) >> FRACTION, -WEIGHT_MAX, WEIGHT_MAX)
        self.model.b_out[:] = (self.b + unit) >> FRACTION
        if "float64" in vars(self.model):  # the BLAS path's copy of the output weights
            self.model.float64["out"][0] = torch.from_numpy(np.ascontiguousarray(self.model.w_out.T, np.float64))


# ---- probabilities for the coder ----


def frequencies(logits: np.ndarray, free: int) -> np.ndarray:
    """Q10 logits [S, V] -> integer weights [S, V] int64 summing to exactly `free` per row, each from
    the exp table: w_i proportional to exp(l_i - max), floor-divided, the remainder to the first most
    likely character. Integers only: the same on every machine."""
    _, _, exp = tables()
    d = np.minimum(logits.max(axis=1, keepdims=True) - logits, EXP_RANGE)
    e = exp[d]  # [S, V] each in [1, 2^24]
    total = e.sum(axis=1, keepdims=True)
    w = (e * free) // total  # e * free < 2^48
    w[np.arange(len(w)), logits.argmax(axis=1)] += free - w.sum(axis=1)
    return w


def to_float(logits: np.ndarray) -> np.ndarray:
    """Q10 logits as float32 (for sampling and the reports' cross-entropy)."""
    return (logits * (1.0 / (1 << LOGIT_BITS))).astype(np.float32)
