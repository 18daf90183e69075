"""The coding pass: a model and its vocab turn the segments of a text into range-coded words and back.

Exactness. The decoder must see bit-identical probabilities to the encoder, and floating point gives
different bits for a whole-sequence pass and a step-by-step pass, for other batch shapes, thread
counts and CPUs. So both directions run one computation, `CodingSteps`, in which the model advances
all S segments together one character per step. Portable archives (format 3's default) run the model
in integers (charlm.fixed): nothing there depends on the machine. Machine-bound ones run it in fp32 on
the CPU under the thread count the archive records (`exact_arithmetic`); each step's softmax is
turned into integer weights that sum to exactly 2^PROBABILITY_BITS with integer-exact arithmetic
(`quantize`), so the model step and its softmax are the only floating-point work that has to agree.
Either way constriction codes with exactly those integers (one range coder per segment).

Characters the model does not know are coded as an escape symbol (index V, probability 2^-16)
followed by their UTF-8 bytes at 8 bits each; the model then reads the start symbol in their place.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..adapt import Adaptation, AdaptingStreams
from ..device import cpu_settings
from ..errors import CharlmError, ConfigError
from ..fixed import FixedModel, HeadAdaptation, LearningHead, frequencies, to_float
from ..model import CharRNN
from ..streams import IGNORE, StepStreams, model_inputs, nll, stream_bounds
from ..vocab import Vocab
from .container import ESCAPE_WEIGHT, PROBABILITY_BITS, TOTAL, WORD, segment_bits

MAX_VOCAB = 1 << 20  # every symbol needs weight >= 1 out of 2^24 with room to spare
ENCODE_BLOCK = 256  # steps per block: the encoder hands its coders, the decoder stores, a block at a time
# The adapting model (FLAG_ADAPT): part of the format, like the container's numbers; a change needs
# a new FORMAT_VERSION.
ADAPTATION = Adaptation(steps=16, lr=0.15, decay=0.001, clip=1.0)
ADAPT_STEPS = ADAPTATION.steps
HEAD_ADAPTATION = HeadAdaptation(steps=16, lr=1.0, decay_shift=12, max_step=8)  # portable archives' (format 3)

OnProgress = Callable[[int, int], None]  # (characters done, characters in all)


def require_constriction() -> Any:
    """The range coder's package, or a user error that says how to install it."""
    try:
        import constriction
    except ImportError:
        raise CharlmError(
            "charlm compress needs the constriction package", "install it with: pip install 'charlm[compress]'"
        ) from None
    return constriction


@functools.cache
def symbol_models() -> tuple[Any, Any]:
    """(the categorical family every character is coded with, the uniform model of escaped bytes)."""
    model = require_constriction().stream.model
    return model.Categorical(perfect=False), model.Uniform(256)


def quantize(probs: np.ndarray) -> np.ndarray:
    """fp32 probabilities [S, V] -> integer weights [S, V + 1] (float64, last = escape) summing to
    TOTAL - (V + 1); constriction adds 1 to each, so it codes with exactly these integers.

    Only exactly rounded operations touch the floats (one multiply, floor); the sums are of integers
    below 2^53, exact in any order, so the result cannot depend on numpy's build or the CPU.
    """
    rows, size = probs.shape
    free = TOTAL - (size + 1) - ESCAPE_WEIGHT
    weights = np.empty((rows, size + 1), dtype=np.float64)
    np.floor(probs.astype(np.float64) * free, out=weights[:, :size])
    weights[:, size] = ESCAPE_WEIGHT
    missing = free - weights[:, :size].sum(axis=1)  # small, either sign: softmax sums to 1 within fp32
    weights[np.arange(rows), probs.argmax(axis=1)] += missing
    return weights


def known_ids(vocab: Vocab, codes: np.ndarray) -> np.ndarray:
    """Vocab ids (int64, as torch's gather wants before 2.8) of the code points; IGNORE for any character
    that is not itself a vocab entry (unknown, or sharing a symbol with others), so that every id decodes
    back to exactly its character."""
    ids = vocab.lookup(codes).astype(np.int64)
    ids[(ids < 0) | (vocab.codes[np.maximum(ids, 0)] != codes)] = IGNORE
    return ids


def fingerprint(raw: bytes) -> bytes:
    """8 bytes that change with any bit of the first step's logits: a check of the platform's arithmetic
    (or, portable, of the integer model) that does not depend on the payload."""
    return hashlib.sha256(raw).digest()[:8]


@contextmanager
def exact_arithmetic(threads: int) -> Iterator[None]:
    """torch's thread count, denormal mode and kernels pinned for the coding pass; every one of them is
    the caller's again afterwards."""
    if not 1 <= threads <= 255:
        raise ConfigError(f"--threads must be from 1 to 255 (got {threads})")
    onednn_before = torch.backends.mkldnn.enabled
    with cpu_settings(threads):
        torch.backends.mkldnn.enabled = False  # torch's own kernels: one fewer library choosing code paths, 2x faster
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.backends.mkldnn.enabled = onednn_before


def prepare(model: CharRNN, vocab: Vocab) -> None:
    """Refuses a vocab too large to code; puts the model on the CPU in fp32, as coding runs."""
    if len(vocab) > MAX_VOCAB:
        raise ConfigError(
            f"the model's vocab of {len(vocab):,} characters is too large to code (at most {MAX_VOCAB:,})"
        )
    model.float().to("cpu").eval()


class CodingSteps:
    """The one computation encoder and decoder share: S segments advance one character per step.

    Portable (the default since format 3): the model in integers (fixed.FixedModel), whose every
    number is the same on any machine and thread count, and integer frequencies from its Q10 logits
    (fixed.frequencies); with `adapt`, its output layer learns from the coded text in integers
    (fixed.LearningHead, HEAD_ADAPTATION). Otherwise the float model, machine-bound: same batch
    shape, same step size, fp32, same threads on both sides, so the same inputs give the same bits on
    the same kind of CPU;
    with `adapt`, it also learns from the text it codes (adapt.AdaptingStreams, with the archive
    format's fixed ADAPTATION): both sides know the coded characters by the time they learn. Input
    after an unknown character, and after a segment has ended, is the start symbol.
    """

    def __init__(
        self, model: CharRNN, vocab: Vocab, segments: int, *, adapt: bool = False, portable: bool = False
    ) -> None:
        self.fixed = FixedModel.from_model(model) if portable else None
        self.free = TOTAL - (len(vocab) + 1) - ESCAPE_WEIGHT
        self.start_id = vocab.start_id
        self.learner: LearningHead | None = None
        if self.fixed is not None:
            if adapt:
                self.learner = LearningHead(self.fixed, segments, self.free, HEAD_ADAPTATION)
                self.fixed = self.learner.model
            self.state = self.fixed.initial_state(segments)
            self.inputs = np.full(segments, vocab.start_id, dtype=np.int64)
            self.coded: tuple[np.ndarray, np.ndarray] | None = None  # (hidden, frequencies) of the last step
        else:
            self.streams: StepStreams | AdaptingStreams = (
                AdaptingStreams(model, segments, start_id=vocab.start_id, adaptation=ADAPTATION)
                if adapt
                else StepStreams(model, segments, start_id=vocab.start_id)
            )

    def step(self) -> tuple[np.ndarray, torch.Tensor, bytes]:
        """(integer weights [S, V + 1], fp32 logits [S, V], the bytes a fingerprint is taken of) for the
        next character of every segment."""
        if self.fixed is not None:
            q = self.fixed.step(self.inputs, self.state, torch.get_num_threads())
            freq = frequencies(q, self.free)
            if self.learner is not None:
                self.coded = (self.state[0, -1].copy(), freq)
            weights = np.empty((q.shape[0], q.shape[1] + 1), dtype=np.float64)
            weights[:, :-1] = freq
            weights[:, -1] = ESCAPE_WEIGHT
            return weights, torch.from_numpy(to_float(q)), q[:1].astype("<i8").tobytes()
        logits = self.streams.step()
        return quantize(torch.softmax(logits, dim=-1).numpy()), logits, logits[0].contiguous().numpy().tobytes()

    def feed(self, ids: np.ndarray) -> None:
        """The characters just coded, [S] (IGNORE: unknown, or the segment has ended), become the next inputs."""
        if self.fixed is not None:
            if self.learner is not None and self.coded is not None:
                self.learner.record(*self.coded, ids)
            self.inputs = model_inputs(ids, self.start_id)
        else:
            self.streams.feed(ids)


def _model_nats(logits: torch.Tensor, target: np.ndarray) -> float:
    """Summed -ln p of the known targets under the unquantised fp32 softmax: what an ideal coder would pay."""
    rows = np.flatnonzero(target != IGNORE)
    if not len(rows):
        return 0.0
    return float(nll(logits[torch.from_numpy(rows)], torch.from_numpy(target[rows])).double().sum())


def _encode_row(encoder: Any, symbols: np.ndarray, weights: np.ndarray, escapes: list[bytes]) -> None:
    """Symbols of one segment in order; each escape symbol is followed by its character's UTF-8 bytes."""
    family, byte_model = symbol_models()
    start = 0
    escape = weights.shape[1] - 1
    for i, raw in zip(np.flatnonzero(symbols == escape), escapes, strict=True):
        encoder.encode(symbols[start : i + 1], family, weights[start : i + 1])
        encoder.encode(np.frombuffer(raw, dtype=np.uint8).astype(np.int32), byte_model)
        start = i + 1
    if start < len(symbols):
        encoder.encode(symbols[start:], family, weights[start:])


def encode_segments(
    model: CharRNN,
    vocab: Vocab,
    codes: np.ndarray,
    ids: np.ndarray,
    segments: int,
    *,
    adapt: bool,
    portable: bool,
    progress: OnProgress | None = None,
) -> tuple[list[np.ndarray], float, bytes]:
    """(each segment's 32-bit words, summed model nats over known characters, fingerprint) for the
    code points `codes` and their `known_ids`, cut into `segments` equal streams.

    The model steps one character at a time; the symbols and weights of ENCODE_BLOCK steps are then
    handed to each segment's coder in one call, in the order the decoder will ask for them.
    """
    constriction = require_constriction()
    n, escape = len(codes), len(vocab)
    lo, hi = stream_bounds(n, segments)
    encoders = [constriction.stream.queue.RangeEncoder() for _ in range(segments)]
    stepper = CodingSteps(model, vocab, segments, adapt=adapt, portable=portable)
    steps = int((hi - lo).max()) if segments else 0
    nats, probe = 0.0, bytes(8)
    for block in range(0, steps, ENCODE_BLOCK):
        width = min(ENCODE_BLOCK, steps - block)
        pos = lo[None, :] + block + np.arange(width)[:, None]  # [K, S] positions coded by each step
        active = pos < hi[None, :]
        target = np.where(active, ids[np.minimum(pos, n - 1)], IGNORE)  # [K, S]; IGNORE unknown or past the end
        weights = np.empty((width, segments, escape + 1), dtype=np.float64)
        logits = torch.empty(width, segments, escape)  # the block's, scored in one call
        for k in range(width):
            weights[k], logits[k], raw = stepper.step()
            probe = fingerprint(raw) if block + k == 0 else probe
            stepper.feed(target[k])
        nats += _model_nats(logits.view(-1, escape), target.reshape(-1))
        symbols = np.where(target != IGNORE, target, escape).astype(np.int32)
        for row, encoder in enumerate(encoders):
            mask = active[:, row]
            escapes = [chr(int(codes[p])).encode("utf-8") for p in pos[mask & (target[:, row] == IGNORE), row]]
            _encode_row(encoder, symbols[mask, row], weights[mask, row], escapes)
        if progress is not None:
            progress(int((np.minimum(lo + block + width, hi) - lo).sum()), n)
    return [np.ascontiguousarray(e.get_compressed(), dtype=WORD) for e in encoders], nats, probe


def _decode_escape(decoder: Any, byte_model: Any) -> int:
    """The code point after an escape symbol, from its UTF-8 bytes; -1 when they are not UTF-8."""
    lead = int(decoder.decode(byte_model))
    length = (
        1
        if lead < 0x80
        else 2
        if 0xC2 <= lead < 0xE0
        else 3
        if 0xE0 <= lead < 0xF0
        else 4
        if 0xF0 <= lead < 0xF5
        else 0
    )
    if not length:
        return -1
    rest = bytes(int(b) for b in decoder.decode(byte_model, length - 1)) if length > 1 else b""
    try:
        return ord((bytes([lead]) + rest).decode("utf-8"))
    except UnicodeDecodeError:
        return -1


def decode_segments(
    model: CharRNN,
    vocab: Vocab,
    payloads: list[np.ndarray],
    char_count: int,
    *,
    adapt: bool,
    portable: bool,
    expected_fingerprint: bytes,
    progress: OnProgress | None = None,
) -> tuple[np.ndarray | None, bool]:
    """(decoded code points or None when the payload cannot be what an encoder wrote, whether step 0
    matched the fingerprint).

    The mirror of `encode_segments`: the same steps, but each character must be decoded before the
    next step can be computed, so the coders are asked one symbol at a time. Each segment's spent bits
    are tallied, and decoding stops as soon as they exceed what its words hold; what is decoded is kept
    in blocks that grow with the decoding, never with the header's claim.
    """
    constriction = require_constriction()
    family, byte_model = symbol_models()
    decoders = [constriction.stream.queue.RangeDecoder(words) for words in payloads]
    vocab_codes = vocab.codes
    n, segments, escape = char_count, len(payloads), len(vocab)
    lo, hi = stream_bounds(n, segments)
    budget = np.array([segment_bits(len(words)) for words in payloads], dtype=np.float64)
    spent = np.zeros(segments)  # sum of -log2 p over each segment's decoded symbols
    blocks: list[np.ndarray] = []  # [ENCODE_BLOCK, S] code points: memory follows the decoding, not the header
    stepper = CodingSteps(model, vocab, segments, adapt=adapt, portable=portable)
    steps = int((hi - lo).max()) if segments else 0
    same_arithmetic = True
    for k in range(steps):
        if k % ENCODE_BLOCK == 0:
            blocks.append(np.zeros((ENCODE_BLOCK, segments), dtype=np.uint32))
        weights, _, raw = stepper.step()
        same_arithmetic = fingerprint(raw) == expected_fingerprint if k == 0 else same_arithmetic
        rows = np.flatnonzero(lo + k < hi)
        symbols = np.empty(len(rows), dtype=np.int64)
        codes = blocks[-1][k % ENCODE_BLOCK]
        for i, row in enumerate(rows.tolist()):
            try:
                symbol = int(decoders[row].decode(family, weights[row : row + 1])[0])
                code = vocab_codes[symbol] if symbol < escape else _decode_escape(decoders[row], byte_model)
            except AssertionError:  # constriction's way of saying no encoder could have written these words
                return None, same_arithmetic
            if code < 0:  # no UTF-8 after an escape
                return None, same_arithmetic
            symbols[i], codes[row] = symbol, code
        # each segment's bits so far, checked once a step: reading past the real data shows within a symbol
        spent[rows] += PROBABILITY_BITS - np.log2(weights[rows, symbols] + 1)  # constriction codes with weight + 1
        if (spent[rows] > budget[rows]).any():
            return None, same_arithmetic
        coded = np.full(segments, IGNORE, dtype=np.int64)
        coded[rows] = np.where(symbols < escape, symbols, IGNORE)
        stepper.feed(coded)
        if progress is not None and (k % ENCODE_BLOCK == ENCODE_BLOCK - 1 or k == steps - 1):
            progress(int((np.minimum(lo + k + 1, hi) - lo).sum()), n)
    by_step = np.concatenate(blocks or [np.zeros((0, segments), dtype=np.uint32)])[:steps]  # [steps, S]
    return by_step.T[np.arange(steps) < (hi - lo)[:, None]], same_arithmetic  # segment after segment
