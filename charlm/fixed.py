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

Two implementations compute the same integers: a numba kernel whose products are hand-written LLVM
vector code (`_dot_rows`: multiply-add-pairs over packed int16 weights), four streams at a time, and,
without numba, numpy with torch's float64 matrix products, which are exact for these integers (every
partial sum is an integer far below 2^53, so the order of additions and the thread count cannot
matter). The kernel is the faster at every stream count measured (1 to 256; GRU 2x256 on a 2-core
Xeon, one thread: 27-35 us a step for one stream, about 18 us per stream for 64, where the float64
products took 36 us per stream).
Tests hold them equal.

Sampling, which need not match an archive, reads 8-bit layer weights (`from_model(narrow=True)`:
half the bytes per character, no measurable cost in bits/char), and a model whose int8 weights pass
1 MB may write one stream on two cores (`generate(threads=2)`: each core takes halves of every
layer's units, so each reads half the weights from its own cache).
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
NARROW = 127  # 8-bit weights in int8: sampling's step (half the bytes read per character)
MUL_BITS = 28  # fraction bits of the rescaling multipliers
LOGIT_BITS = 10  # logits are Q10
TABLE_MIN = -(1 << 15)  # sigmoid/tanh tables cover Q12 inputs [-8, 8)
TABLE_SIZE = 1 << 16
RELU_MAX = (1 << 15) - 1  # a ReLU activation is clamped at 8 (Q12)
EXP_BITS = 24  # exp table entries are exp(-d / 1024) x 2^24
EXP_RANGE = 24 << LOGIT_BITS  # logits more than 24 nats below the best get the smallest weight
FORMAT = 1  # of the integer model; recorded in archives


SPLIT_FROM_BYTES = 1 << 20  # int8 layer weights past this: one stream may take two cores


def split_pays(config: Any) -> bool:
    """Whether a model's layer matrices in int8 pass SPLIT_FROM_BYTES, half of a 2 MB L2: then one
    core streams them from L3 for every character and two cores, each reading half, can be twice as
    fast and more (LSTM 2x512, 3.1 MB: 3,223 -> 10,435 chars/s). Below, they sit in one core's cache
    and a second core only adds waiting (GRU 2x256, 0.6 MB: 33,191 -> 27,730; bench/narrow.py)."""
    h = config.hidden_size
    return config.gates() * h * h * (2 * config.num_layers - 1) > SPLIT_FROM_BYTES


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


def _quantize_rows(w: np.ndarray, top_q: int = WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """(q [N, K], float64 scale [N]) with w ~ q * scale per row and |q| <= top_q: int16, or int8 for
    NARROW weights; all-zero rows get scale 1."""
    w = np.asarray(w, dtype=np.float64)
    top = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    scale = np.where(top > 0, top / top_q, 1.0)
    q = np.clip(np.rint(w / scale[:, None]), -top_q, top_q).astype(np.int8 if top_q <= NARROW else np.int16)
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
    w_ih: np.ndarray  # [L-1, G*H, H] int16 (int8 when narrow): input weights of layers 1..
    m_ih: np.ndarray  # [L-1, G*H] int64 multipliers
    b_ih: np.ndarray  # [L-1, G*H] int64 Q12 (+ b_hh but for GRU)
    w_hh: np.ndarray  # [L, G*H, H] int16 (int8 when narrow)
    m_hh: np.ndarray  # [L, G*H] int64
    b_hh: np.ndarray  # [L, G*H] int64 Q12 (GRU's b_hh; zero otherwise)
    w_out: np.ndarray  # [V, H] int16
    m_out: np.ndarray  # [V] int64
    b_out: np.ndarray  # [V] int64 Q10
    s_out: np.ndarray  # [V] float64: the output rows' scales (what a learning head's steps are sized by)

    @classmethod
    def from_model(cls, model: Any, *, narrow: bool = False) -> FixedModel:
        """The integers of a CharRNN (any device, any dtype: read as float32, as checkpoints store).

        `narrow`: the layers' weight matrices in 8 bits (int8, |q| <= 127) instead of 11, half the bytes
        a step reads (sample.FixedStep: no measurable cost in bits/char, bench/narrow.py). Not an archive format:
        `compress` always uses the 11-bit weights. Layer 0's input table and the output layer keep 11
        bits (they are a small share of the bytes)."""
        top_q = NARROW if narrow else WEIGHT_MAX
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
            wi, si = _quantize_rows(get(f"weight_ih_l{i}"), WEIGHT_MAX if i == 0 else top_q)
            if i == 0:
                emb = model.embed.weight.detach().float().cpu().numpy().astype(np.float64)
                qe, se = _quantize_rows(emb)
                acc = qe.astype(np.float64) @ wi.astype(np.float64).T  # [V, G*H] exact integers
                table0 = np.rint(((acc * si[None, :]) * se[:, None]) * float(ONE)).astype(np.int64) + bi
            else:
                w_ih.append(wi)
                m_ih.append(_multiplier(si, ACT_BITS))
                b_ih.append(bi)
            wh, sh = _quantize_rows(get(f"weight_hh_l{i}"), top_q)
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
            w_ih=stack(w_ih, (0, g * h, h), np.int8 if narrow else np.int16),
            m_ih=stack(m_ih, (0, g * h), np.int64),
            b_ih=stack(b_ih, (0, g * h), np.int64),
            w_hh=stack(w_hh, (0, g * h, h), np.int8 if narrow else np.int16),
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
        if compiled is None:
            _numpy_step(self, ids, state, out)
            return out
        kernel = compiled.step
        args = self.kernel_arrays
        kind = _CELLS[self.cell]
        parts = max(1, min(threads, len(ids) // MIN_STREAMS_PER_THREAD))
        # whole groups to each thread; the calling thread takes the last share instead of waiting
        width = -(-len(ids) // (GROUP * parts)) * GROUP
        cuts = [min(len(ids), i * width) for i in range(parts + 1)]
        shares = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]  # 13 streams, 3 threads: 8, 5, 0
        pool = _pool(len(shares) - 1) if len(shares) > 1 else None
        others = [pool.submit(kernel, kind, ids, state, a, b, *args, out) for a, b in shares[:-1]] if pool else []
        kernel(kind, ids, state, *shares[-1], *args, out)
        for job in others:
            job.result()
        return out

    @property
    def can_split(self) -> bool:
        """Whether one stream's step can run on two cores (generate with threads=2): the kernel is
        here and each half of a layer's units is whole blocks of LANES rows."""
        return _kernel() is not None and self.hidden % (2 * LANES) == 0

    def generate(
        self,
        state: np.ndarray,
        logits: np.ndarray,
        noise: np.ndarray,
        count: int,
        *,
        advance_last: bool,
        threads: int = 1,
    ) -> np.ndarray:
        """One stream (state [.., 1, H], updated in place) writes `count` characters from float32
        `logits` [V] (updated in place to the logits after the last one read): each is
        argmax(logits + noise[t]), or argmax(logits) when `noise` has no rows. The compiled loop when
        numba is here; else the same integers and floats a step at a time.

        `threads` 2 (and can_split): each layer's units in two halves, which this thread and a partner
        take as they come (the same integers). It pays when the weights outgrow one core's cache
        (each core then reads half) and only while the partner gets a core: sample.FixedStep measures."""
        chosen = np.empty(count, dtype=np.int64)
        greedy = len(noise) == 0
        if not greedy and len(noise) < count:
            raise ValueError(f"{count} characters need {count} rows of noise, not {len(noise)}")
        compiled = _kernel()
        if compiled is not None and threads > 1 and self.can_split and count > 0:
            kind, weights = _CELLS[self.cell], self.kernel_arrays
            sync = np.zeros(SYNC_SIZE, dtype=np.int64)
            shared = np.zeros((2, -(-self.hidden // DEPTH) * DEPTH), dtype=np.int16)
            # not waited for: it ends when the lead publishes -1, and a partner that starts late finds
            # every half taken (waiting for it would cost a time slice on a busy machine)
            _pool(1, "charlm-partner").submit(compiled.write_partner, kind, state, weights, sync, shared)
            try:
                compiled.write_lead(kind, state, weights, logits, noise, chosen, advance_last, sync, shared)
            finally:
                sync[GO] = -1
            return chosen
        if compiled is not None:
            weights = self.kernel_arrays
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

    @functools.cached_property
    def kernel_arrays(self) -> tuple[np.ndarray, ...]:
        """What the compiled kernel reads (made on first use): the weights in its packed layout
        (`_pack`), the multipliers and biases, and the sigmoid and tanh tables as int16 (4x smaller
        than the int64 tables, so they and the weights share the core's cache)."""
        sig, tanh, _ = tables()
        return (
            self.table0,
            _pack_all(self.w_ih),
            self.m_ih,
            self.b_ih,
            _pack_all(self.w_hh),
            self.m_hh,
            self.b_hh,
            _pack(self.w_out),
            self.m_out,
            self.b_out,
            sig.astype(np.int16),
            tanh.astype(np.int16),
        )

    def output_changed(self) -> None:
        """w_out and b_out were changed in place (a learning head): bring the derived copies along."""
        if "float64" in vars(self):
            self.float64["out"][0] = torch.from_numpy(np.ascontiguousarray(self.w_out.T, np.float64))
        if "kernel_arrays" in vars(self):
            self.kernel_arrays[7][:] = _pack(self.w_out)


_CELLS = {"gru": 0, "lstm": 1, "rnn": 2, "rnn-relu": 3}
MIN_STREAMS_PER_THREAD = 4  # fewer: handing work to another thread costs more than it saves


@functools.cache
def _pool(threads: int, name: str = "charlm-fixed") -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix=name)


# ---- the pointwise maths, written once: numpy runs it as is, numba compiles it into the kernel ----

try:  # register_jitable: plain Python when called from Python, compiled inline into the kernel
    from numba import njit as _njit
    from numba.extending import register_jitable as _jitable

    # a per-unit function called in the kernel's inner loop: numba's call costs more than its maths
    _inline = _jitable(inline="always")
except ImportError:  # numpy and torch compute the same integers
    _njit = None

    def _jitable(fn: Any) -> Any:
        return fn

    _inline = _jitable


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


def _numpy_step(m: FixedModel, ids: np.ndarray, state: np.ndarray, out: np.ndarray) -> None:
    """The kernel's integers without numba: BLAS products (float64, exact for these integers) and the
    cell's pointwise maths in numpy, all streams at once."""
    sig, tanh, _ = tables()
    kind, n = _CELLS[m.cell], m.hidden
    x = None
    for layer in range(m.layers):
        h = state[0, layer]
        if layer == 0:
            gi = m.table0[ids]
        else:
            gi = _rescale(_exact_matmul(x, m.float64["ih"][layer - 1]), m.m_ih[layer - 1], m.b_ih[layer - 1])
        gh = _rescale(_exact_matmul(h, m.float64["hh"][layer]), m.m_hh[layer], m.b_hh[layer])
        # gates along the first axis, streams along the second: _cell slices gates as the kernel does
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
    return Compiled(
        step=jit(_step),
        generate=jit(_generate),
        frequencies=jit(_frequencies),
        write_lead=jit(_write_lead),
        write_partner=jit(_write_partner),
    )


@dataclass(frozen=True)
class Compiled:
    step: Any  # the whole step of each stream
    frequencies: Any  # the coder's integer frequencies from Q10 logits
    generate: Any  # one stream writing many characters: step, draw, step (FixedModel.generate)
    write_lead: Any  # the same on two cores: this thread's part (FixedModel.generate with threads=2)
    write_partner: Any  # and the partner thread's


def _step(kind, ids, state, lo, hi, table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, w_out, m_out, b_out, sig, tanh, out):  # noqa: ANN001, ANN202
    """Streams lo..hi-1 through every layer and the output layer, GROUP streams at a time (compiled by
    _kernel). The whole state comes in, not a slice of it, so it keeps the one contiguous layout numba
    compiles for."""
    weights = (table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, w_out, m_out, b_out, sig, tanh)
    scratch = _scratch(hi - lo, state, m_hh, m_out)
    vocab = out.shape[1]
    for s0 in range(lo, hi, GROUP):
        g = min(GROUP, hi - s0)
        _advance(kind, ids[s0 : s0 + g], state, s0, weights, scratch)
        for u in range(g):
            out[s0 + u, :] = scratch[2][u, :vocab]


@_jitable
def _scratch(streams, state, m_hh, m_out):  # noqa: ANN001, ANN202
    """The sums of a group's products (rows padded to whole blocks) and its int16 inputs: one row for
    a single stream, GROUP for more."""
    gates, vocab, n = m_hh.shape[1], m_out.shape[0], state.shape[3]
    group = 1 if streams == 1 else GROUP
    acc_i = np.zeros((group, -(-gates // LANES) * LANES), dtype=np.int64)
    acc_h = np.zeros((group, -(-gates // LANES) * LANES), dtype=np.int64)
    acc_o = np.zeros((group, -(-vocab // LANES) * LANES), dtype=np.int64)
    x16 = np.zeros((group, -(-n // DEPTH) * DEPTH), dtype=np.int16)
    return acc_i, acc_h, acc_o, x16


@_jitable
def _products(w, x16, acc, g):  # noqa: ANN001, ANN202
    """The first g rows of acc = the products of w with the first g rows of x16."""
    if g == 1:
        _dot_rows(w, x16[0], acc[0])
    else:
        _dot_rows_group(w, x16, acc)  # rows past g: left over from an earlier group, never read


@_jitable
def _advance(kind, tokens, state, s0, weights, scratch):  # noqa: ANN001, ANN202
    """Streams s0, s0 + 1, ... (at most GROUP) read `tokens`: their states move on and scratch[2] holds
    their next Q10 logits, one row each. The cell's maths of _cell, written element by element, without
    the temporary arrays numpy's form makes; each weight is read once for the whole group.
    `weights`: FixedModel.kernel_arrays; `scratch`: from _scratch."""
    table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, w_out, m_out, b_out, sig, tanh = weights
    acc_i, acc_h, acc_o, x16 = scratch
    layers, n = state.shape[1], state.shape[3]
    gates, g = m_hh.shape[1], len(tokens)
    for layer in range(layers):
        if layer > 0:
            for u in range(g):
                _as_int16(state[0, layer - 1, s0 + u], x16[u])
            _products(w_ih[layer - 1], x16, acc_i, g)
            mi, bi = m_ih[layer - 1], b_ih[layer - 1]
            for u in range(g):
                for k in range(gates):
                    acc_i[u, k] = _rescale(acc_i[u, k], mi[k], bi[k])
        for u in range(g):
            _as_int16(state[0, layer, s0 + u], x16[u])
        _products(w_hh[layer], x16, acc_h, g)
        mh, bh = m_hh[layer], b_hh[layer]
        for u in range(g):
            h = state[0, layer, s0 + u]
            c = state[1, layer, s0 + u] if kind == 1 else h
            gi = table0[tokens[u]] if layer == 0 else acc_i[u]
            gh = acc_h[u]
            for k in range(gates):
                gh[k] = _rescale(gh[k], mh[k], bh[k])
            for j in range(n):
                _unit(kind, gi, gh, h, c, j, n, sig, tanh)
    for u in range(g):
        _as_int16(state[0, layers - 1, s0 + u], x16[u])
    _products(w_out, x16, acc_o, g)
    for u in range(g):
        for v in range(m_out.shape[0]):
            acc_o[u, v] = _rescale(acc_o[u, v], m_out[v], b_out[v])


@_inline
def _unit(kind, gi, gh, h, c, j, n, sig, tanh):  # noqa: ANN001, ANN202
    """Unit j's new h[j] (and c[j] for LSTM) from its gates' rescaled pre-activations: _cell's maths
    for one unit, without the temporary arrays numpy's form makes."""
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


@_jitable
def _as_int16(h, x16):  # noqa: ANN001, ANN202
    """A Q12 state (|h| <= 2^15: ReLU layers clamp there) into the kernel's int16 input, its padding
    left at zero."""
    for k in range(len(h)):
        x16[k] = h[k]
    return x16


@_jitable
def _draw(logits, noise, t):  # noqa: ANN001, ANN202
    """argmax(logits + noise[t]) in float32, or argmax(logits) when `noise` has no rows (greedy): the
    first of equal maxima, as torch.argmax."""
    best, top = 0, np.float32(-np.inf)
    for v in range(len(logits)):
        x = logits[v] if noise.shape[0] == 0 else np.float32(logits[v] + noise[t, v])
        if x > top:
            best, top = v, x
    return best


def _generate(kind, state, weights, logits, noise, chosen, advance_last):  # noqa: ANN001, ANN202
    """One stream writes len(chosen) characters: each is argmax(logits + noise[t]) in float32 (the
    Gumbel draw of sample._gumbel, bit for bit; noise of no rows: argmax(logits), the greedy choice),
    then read, turning the next Q10 logits into float32 in `logits` as to_float does. The last one is
    read only with `advance_last`. No Python between characters: that is most of a step's cost.
    `weights` as _advance takes them."""
    scratch = _scratch(1, state, weights[5], weights[8])
    acc_o, token = scratch[2][0], np.zeros(1, dtype=np.int64)
    scale = 1.0 / (1 << LOGIT_BITS)
    for t in range(len(chosen)):
        best = _draw(logits, noise, t)
        chosen[t] = best
        if t + 1 < len(chosen) or advance_last:
            token[0] = best
            _advance(kind, token, state, 0, weights, scratch)
            for v in range(len(logits)):
                logits[v] = np.float32(acc_o[v] * scale)


# ---- one stream on two cores: each layer's units in two halves, either core may take either ----

GO, TOKEN, CLAIMED, DONE = 0, 8, 16, 32  # slots of the sync array, a cache line apart (+ 8 x half)
SYNC_SIZE = 48


@_jitable
def _half(kind, q, layer, token, state, weights, shared, acc_i, acc_h):  # noqa: ANN001, ANN202
    """Half q of a layer's units for one stream: their rows' products of every gate, rescaled, and
    their cell updates. Inputs are read from `shared` (the layer's inputs as int16, written before
    the phase began), so the other half updating its units in place meanwhile cannot change them."""
    table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, _, _, _, sig, tanh = weights
    n, depth = state.shape[3], shared.shape[1]
    half = n // 2
    j0 = q * half
    for gate in range(m_hh.shape[1] // n):
        r0 = gate * n + j0
        r1 = r0 + half
        if layer > 0:
            mi, bi = m_ih[layer - 1], b_ih[layer - 1]
            _dot_rows(w_ih[layer - 1][r0 * depth : r1 * depth], shared[0], acc_i[r0:r1])
            for k in range(r0, r1):
                acc_i[k] = _rescale(acc_i[k], mi[k], bi[k])
        mh, bh = m_hh[layer], b_hh[layer]
        _dot_rows(w_hh[layer][r0 * depth : r1 * depth], shared[1], acc_h[r0:r1])
        for k in range(r0, r1):
            acc_h[k] = _rescale(acc_h[k], mh[k], bh[k])
    h = state[0, layer, 0]
    c = state[1, layer, 0] if kind == 1 else h
    gi = table0[token] if layer == 0 else acc_i
    for j in range(j0, j0 + half):
        _unit(kind, gi, acc_h, h, c, j, n, sig, tanh)


@_jitable
def _take_halves(kind, first, k, layer, token, state, weights, shared, acc_i, acc_h, sync):  # noqa: ANN001, ANN202
    """Phase k: claim and compute whichever halves are still free, `first` before the other. A half
    the other thread has not claimed yet is done here, so a partner that is descheduled (a busy
    machine) costs waiting only for a half it already started."""
    for u in range(2):
        q = first ^ u
        if _claim(sync, CLAIMED + 8 * q, k):
            _half(kind, q, layer, token, state, weights, shared, acc_i, acc_h)
            _store_release(sync, DONE + 8 * q, k)


def _write_lead(kind, state, weights, logits, noise, chosen, advance_last, sync, shared):  # noqa: ANN001, ANN202
    """_generate for one stream with a partner thread (_write_partner) taking halves of each layer:
    the same choices and integers. Each layer is a phase: this thread writes the layer's inputs into
    `shared`, publishes the phase, takes halves, and waits until both are done; then the output
    layer and the draw are its own. Ends by publishing -1, which releases the partner."""
    table0, w_ih, m_ih, b_ih, w_hh, m_hh, b_hh, w_out, m_out, b_out, sig, tanh = weights
    layers = state.shape[1]
    acc_i, acc_h, acc_o, x16 = _scratch(1, state, m_hh, m_out)
    acc_i, acc_h, acc_o, x16 = acc_i[0], acc_h[0], acc_o[0], x16[0]
    scale = 1.0 / (1 << LOGIT_BITS)
    k = 0
    for t in range(len(chosen)):
        best = _draw(logits, noise, t)
        chosen[t] = best
        if t + 1 == len(chosen) and not advance_last:
            break
        sync[TOKEN] = best  # published by the release store of the phase
        for layer in range(layers):
            if layer > 0:
                _as_int16(state[0, layer - 1, 0], shared[0])
            _as_int16(state[0, layer, 0], shared[1])
            k += 1
            _store_release(sync, GO, k)
            _take_halves(kind, 0, k, layer, best, state, weights, shared, acc_i, acc_h, sync)
            for q in range(2):
                while _load_acquire(sync, DONE + 8 * q) < k:
                    pass
        _as_int16(state[0, layers - 1, 0], x16)
        _dot_rows(w_out, x16, acc_o)
        for v in range(len(logits)):
            logits[v] = np.float32(_rescale(acc_o[v], m_out[v], b_out[v]) * scale)
    _store_release(sync, GO, -1)


def _write_partner(kind, state, weights, sync, shared):  # noqa: ANN001, ANN202
    """The other thread of _write_lead: takes the halves of each phase it sees, its own half first,
    until the lead publishes -1. A phase it sees late is already taken and costs nothing."""
    m_hh, m_out = weights[5], weights[8]
    layers = state.shape[1]
    acc_i, acc_h, _, _ = _scratch(1, state, m_hh, m_out)
    acc_i, acc_h = acc_i[0], acc_h[0]
    seen = 0
    while True:
        k = _load_acquire(sync, GO)
        if k < 0:
            return
        if k != seen:
            seen = k
            token = sync[TOKEN]
            _take_halves(kind, 1, k, (k - 1) % layers, token, state, weights, shared, acc_i, acc_h, sync)


# ---- the products: int16 (or int8) weights packed for multiply-add-pairs ----

LANES = 16  # rows per block: 16 int32 sums fill one 512-bit register (two 256-bit ones)
DEPTH = 8  # inputs padded to this multiple: four pairs of inputs per turn of the loop
SUMS = 4  # independent sums per block, so the adds do not wait on one another
GROUP = 4  # streams stepped together by _step, each weight read once for all of them


def _pack(w: np.ndarray) -> np.ndarray:
    """[N, K] int16 or int8 -> flat [blocks, K/2, LANES, 2] of the same type, rows and inputs padded with zeros to
    multiples of LANES and DEPTH. The two weights of each row for inputs 2p and 2p+1 sit side by side,
    and the LANES rows of a block one after the other, so one vector load meets one broadcast pair of
    inputs: what multiply-add-pairs instructions (x86 pmaddwd/vpdpwssd, ARM smlal) consume."""
    n, k = w.shape
    rows, depth = -(-n // LANES) * LANES, -(-k // DEPTH) * DEPTH
    padded = np.zeros((rows, depth), dtype=w.dtype)
    padded[:n, :k] = w
    blocks = padded.reshape(rows // LANES, LANES, depth // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks).reshape(-1)


def _pack_all(ws: np.ndarray) -> np.ndarray:
    """[L, N, K] -> [L, packed size]."""
    if not len(ws):
        return np.zeros((0, len(_pack(np.zeros(ws.shape[1:], dtype=ws.dtype)))), dtype=ws.dtype)
    return np.stack([_pack(w) for w in ws])


def _dot_rows_numpy(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """What `_dot_rows` computes, in numpy (its reference in the tests)."""
    blocks = len(out) // LANES
    packed = w.reshape(blocks, len(x) // 2, LANES, 2).astype(np.int64)
    pairs = x.reshape(-1, 2).astype(np.int64)
    out[:] = np.einsum("bplt,pt->bl", packed, pairs).reshape(-1)


if _njit is not None:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    def _signature(w: Any, x: Any, out: Any, dims: int) -> Any:
        """void(w, x, out) for contiguous arrays: w int16 or int8 1-D, x int16 and out int64 `dims`-D;
        else None (numba then reports the call as not matching)."""
        for a, ndim, dtypes in (
            (w, 1, (_types.int16, _types.int8)),
            (x, dims, (_types.int16,)),
            (out, dims, (_types.int64,)),
        ):
            if not isinstance(a, _types.Array) or a.ndim != ndim or a.layout != "C" or a.dtype not in dtypes:
                return None
        return _types.void(w, x, out)

    class _Vectors:
        """The arrays of a product kernel's call, the LLVM vector types, and the one operation both
        product kernels are made of."""

        def __init__(self, context: Any, builder: Any, signature: Any, args: Any) -> None:
            self.builder = builder
            self.w, self.x, self.out = (
                context.make_array(t)(context, builder, v) for t, v in zip(signature.args, args, strict=True)
            )
            self.i16, self.i32, self.i64 = _ir.IntType(16), _ir.IntType(32), _ir.IntType(64)
            self.const = functools.partial(_ir.Constant, self.i64)
            self.weight_bytes = signature.args[0].dtype.bitwidth // 8  # 2, or 1 for narrow weights
            # one pair of inputs' weights, LANES rows
            self.pair_rows = _ir.VectorType(_ir.IntType(8 * self.weight_bytes), 2 * LANES)
            self.pair_inputs = _ir.VectorType(self.i16, 2 * LANES)
            self.wide = _ir.VectorType(self.i32, 2 * LANES)
            self.sums = _ir.VectorType(self.i32, LANES)
            self.evens = _ir.Constant(self.sums, [2 * i for i in range(LANES)])
            self.odds = _ir.Constant(self.sums, [2 * i + 1 for i in range(LANES)])
            self.splat = _ir.Constant(self.sums, [0] * LANES)

        def madd(self, weights: Any, pair: Any) -> Any:
            """LANES int32 sums w[r, 2p] x[2p] + w[r, 2p+1] x[2p+1]: `weights` one pair_rows vector,
            `pair` the two int16 inputs read as one int32. LLVM matches this shape to pmaddwd."""
            b = self.builder
            xs = b.insert_element(_ir.Constant(self.sums, None), pair, _ir.Constant(self.i32, 0))
            xs = b.bitcast(b.shuffle_vector(xs, _ir.Constant(self.sums, None), self.splat), self.pair_inputs)
            prod = b.mul(b.sext(weights, self.wide), b.sext(xs, self.wide))
            return b.add(b.shuffle_vector(prod, prod, self.evens), b.shuffle_vector(prod, prod, self.odds))

        def store_sums(self, sums: Any, at: Any) -> None:
            """LANES int32 sums widened into int64 memory at `at`."""
            wide = _ir.VectorType(self.i64, LANES)
            self.builder.store(self.builder.sext(sums, wide), self.builder.bitcast(at, wide.as_pointer()), align=8)

    @_intrinsic
    def _dot_rows(typingctx, w, x, out):  # noqa: ANN001, ANN202
        """out[r] = sum_k W[r, k] x[k] exactly, for `w` packed by _pack (int16, or int8 for narrow
        weights: LLVM widens them as it loads), `x` int16 (length a
        multiple of DEPTH), `out` int64 (length a multiple of LANES), all contiguous. Written as LLVM
        vector code, not a numba loop: numba's loops sum one row at a time, each ending in a
        horizontal add, where this keeps LANES rows' sums in one register and SUMS registers in flight.
        The maths is portable IR (widen, multiply, add neighbouring pairs) that LLVM turns into the
        machine's own instructions: vpdpwssd with AVX512-VNNI, vpmaddwd with AVX2, smlal on ARM.
        Sums are int32, which FixedModel.check proves wide enough for any row; integer sums are exact
        in any order, so every machine gets the same integers."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            v = _Vectors(context, builder, signature, args)
            wa, xa, oa, const = v.w, v.x, v.out, v.const
            pairs = builder.udiv(builder.extract_value(xa.shape, 0), const(2))
            w_ptr = builder.bitcast(wa.data, v.pair_rows.as_pointer())
            x_ptr = builder.bitcast(xa.data, v.i32.as_pointer())  # a pair of int16 inputs as one int32
            slots = [_cgutils.alloca_once(builder, v.sums) for _ in range(SUMS)]
            with _cgutils.for_range(builder, builder.udiv(builder.extract_value(oa.shape, 0), const(LANES))) as block:
                for slot in slots:
                    builder.store(_ir.Constant(v.sums, None), slot)
                first = builder.mul(block.index, pairs)
                with _cgutils.for_range(builder, builder.udiv(pairs, const(SUMS))) as turn:
                    for u, slot in enumerate(slots):
                        p = builder.add(builder.mul(turn.index, const(SUMS)), const(u))
                        wv = builder.load(builder.gep(w_ptr, [builder.add(first, p)]), align=v.weight_bytes)
                        both = v.madd(wv, builder.load(builder.gep(x_ptr, [p]), align=2))
                        builder.store(builder.add(builder.load(slot), both), slot)
                total = builder.load(slots[0])
                for slot in slots[1:]:
                    total = builder.add(total, builder.load(slot))
                v.store_sums(total, builder.gep(oa.data, [builder.mul(block.index, const(LANES))]))
            return context.get_dummy_value()

        return _signature(w, x, out, 1), codegen

    @_intrinsic
    def _dot_rows_group(typingctx, w, xs, outs):  # noqa: ANN001, ANN202
        """_dot_rows for GROUP inputs at once: xs [GROUP, K] int16, outs [GROUP, rows] int64. Each
        weight vector is loaded once and meets every input of the group, so the group costs about
        what one input costs in memory traffic (the weights are what a step reads most)."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            v = _Vectors(context, builder, signature, args)
            wa, xa, oa, const = v.w, v.x, v.out, v.const
            depth = builder.extract_value(xa.shape, 1)
            rows = builder.extract_value(oa.shape, 1)
            pairs = builder.udiv(depth, const(2))
            w_ptr = builder.bitcast(wa.data, v.pair_rows.as_pointer())
            x_ptrs = [
                builder.bitcast(builder.gep(xa.data, [builder.mul(const(u), depth)]), v.i32.as_pointer())
                for u in range(GROUP)
            ]
            out_ptrs = [builder.gep(oa.data, [builder.mul(const(u), rows)]) for u in range(GROUP)]
            # two sums per input (even and odd turns), so 2 x GROUP multiply-adds are in flight
            slots = [[_cgutils.alloca_once(builder, v.sums) for _ in range(2)] for _ in range(GROUP)]
            with _cgutils.for_range(builder, builder.udiv(rows, const(LANES))) as block:
                for pair_slots in slots:
                    for slot in pair_slots:
                        builder.store(_ir.Constant(v.sums, None), slot)
                first = builder.mul(block.index, pairs)
                with _cgutils.for_range(builder, builder.udiv(pairs, const(2))) as turn:
                    for half in range(2):
                        p = builder.add(builder.mul(turn.index, const(2)), const(half))
                        wv = builder.load(builder.gep(w_ptr, [builder.add(first, p)]), align=v.weight_bytes)
                        for x_ptr, pair_slots in zip(x_ptrs, slots, strict=True):
                            both = v.madd(wv, builder.load(builder.gep(x_ptr, [p]), align=2))
                            builder.store(builder.add(builder.load(pair_slots[half]), both), pair_slots[half])
                sums = [builder.add(builder.load(a), builder.load(b)) for a, b in slots]
                for out_ptr, total in zip(out_ptrs, sums, strict=True):
                    v.store_sums(total, builder.gep(out_ptr, [builder.mul(block.index, const(LANES))]))
            return context.get_dummy_value()

        return _signature(w, xs, outs, 2), codegen

    def _slot(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.gep(array.data, [args[1]])

    def _sync_array(a: Any) -> bool:
        return isinstance(a, _types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == _types.int64

    @_intrinsic
    def _load_acquire(typingctx, a, i):  # noqa: ANN001, ANN202
        """a[i], read atomically with acquire order: what the other thread wrote before its release
        store of a[i] is visible after this load."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.load_atomic(_slot(context, builder, signature, args), "acquire", 8)

        return (_types.int64(a, _types.intp) if _sync_array(a) else None), codegen

    @_intrinsic
    def _store_release(typingctx, a, i, v):  # noqa: ANN001, ANN202
        """a[i] = v, atomically with release order (publishes every write before it)."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            builder.store_atomic(args[2], _slot(context, builder, signature, args), "release", 8)
            return context.get_dummy_value()

        return (_types.void(a, _types.intp, _types.int64) if _sync_array(a) else None), codegen

    @_intrinsic
    def _claim(typingctx, a, i, k):  # noqa: ANN001, ANN202
        """Whether this thread moved a[i] from k - 1 to k (compare-and-swap): one of the threads that
        try wins, and none wins once it holds k."""

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            k = args[2]
            old = builder.sub(k, _ir.Constant(k.type, 1))
            pair = builder.cmpxchg(_slot(context, builder, signature, args), old, k, "seq_cst", "seq_cst")
            return builder.extract_value(pair, 1)

        return (_types.boolean(a, _types.intp, _types.int64) if _sync_array(a) else None), codegen

else:
    _dot_rows = _dot_rows_numpy


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
        self.model.output_changed()


# ---- probabilities for the coder ----


def frequencies(logits: np.ndarray, free: int) -> np.ndarray:
    """Q10 logits [S, V] -> integer weights [S, V] int64 summing to exactly `free` per row, each from
    the exp table: w_i proportional to exp(l_i - max), floor-divided, the remainder to the first most
    likely character. Integers only: the same on every machine (compiled or numpy, the same integers)."""
    _, _, exp = tables()
    compiled = _kernel()
    if compiled is not None:
        out = np.empty(logits.shape, dtype=np.int64)
        compiled.frequencies(np.ascontiguousarray(logits, dtype=np.int64), free, exp, out)
        return out
    d = np.minimum(logits.max(axis=1, keepdims=True) - logits, EXP_RANGE)
    e = exp[d]  # [S, V] each in [1, 2^24]
    total = e.sum(axis=1, keepdims=True)
    w = (e * free) // total  # e * free < 2^48
    w[np.arange(len(w)), logits.argmax(axis=1)] += free - w.sum(axis=1)
    return w


def _frequencies(logits, free, exp, out):  # noqa: ANN001, ANN202
    """frequencies' integers row by row (compiled by _kernel)."""
    for s in range(logits.shape[0]):
        row, w = logits[s], out[s]
        best = 0
        for v in range(len(row)):
            if row[v] > row[best]:
                best = v
        total = 0
        for v in range(len(row)):
            w[v] = exp[min(row[best] - row[v], EXP_RANGE)]
            total += w[v]
        given, inverse = 0, 1.0 / total
        for v in range(len(row)):
            # floor(w * free / total) without an integer division (tens of cycles each): the float
            # quotient of these exact integers (below 2^53) is off by at most one, which is corrected
            num = w[v] * free
            q = np.int64(num * inverse)
            q -= q * total > num
            q += (q + 1) * total <= num
            w[v] = q
            given += q
        w[best] += free - given


def to_float(logits: np.ndarray) -> np.ndarray:
    """Q10 logits as float32 (for sampling and the reports' cross-entropy)."""
    return (logits * (1.0 / (1 << LOGIT_BITS))).astype(np.float32)
