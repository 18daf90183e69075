"""Lossless text compression: the model's next-character probabilities drive a range coder.

A model that predicts text well is a compressor: coding a character that had probability p costs
-log2 p bits, so an archive holds about the model's cross-entropy in bits per character. The range
coder is `constriction`'s (pip install 'charlm[compress]'); this module supplies the probabilities,
the segments and the container.

Exactness. The decoder must see bit-identical probabilities to the encoder, and floating point gives
different bits for a whole-sequence pass and a step-by-step pass, for other batch shapes, thread
counts and CPUs. So both directions run one computation, `Stepper`: the text is cut into S segments
(at most 64, each at least 4096 characters, the same streams `charlm perplexity` scores) and the
model advances all S together one character per step, fp32 on the CPU, under the thread count the
archive records (default 1). Each step's softmax is turned into integer weights that sum to exactly
2^24 with integer-exact arithmetic, and constriction codes with exactly those integers (one range
coder per segment), so the model step and its softmax are the only floating-point work that has to
agree.

The model can keep learning from the text as it codes it (`adapt`, the default; FLAG_ADAPT in the
archive): every ADAPT_STEPS characters, encoder and decoder both take the same SGD step on what they
have just coded (see Stepper). It costs no side information, only time: on held-out Shakespeare it
turns a 2.03 bits/char model into a 1.85 bits/char coder, at about 40% of the static speed.

Which machines decode what: the same checkpoint (its sha256 is checked), a charlm that reads the
format version, and the same torch build on the same CPU family (torch picks kernels by instruction
set, e.g. AVX2 or AVX512, and their last bits differ). The archive records torch, machine and
instruction set, plus a fingerprint of the first step's logits, so a failed checksum is reported as
either corruption or a platform whose arithmetic differs.

Characters the model does not know are coded as an escape symbol (index V, probability 2^-16)
followed by their UTF-8 bytes at 8 bits each; the model then reads a newline in their place. Files
whose line ends are all CRLF are coded as LF plus a flag. Input must be UTF-8: anything else is
refused with the offset of the first bad byte (xz suits binary files better anyway).

Container, little-endian: magic, format version u16 (2; version 1 had no FLAG_ADAPT), model
sha256, text sha256, byte length u64, char count u64, segment count u32, threads u8, flags u8,
fingerprint (8 bytes), info JSON (u16 length: model file name, charlm, torch, machine, instruction
set), one u32 per segment (its length in 32-bit words), crc32 of all the above; then each segment's
words in order.

Every header value is untrusted until checked: the character count sizes the decoding loop, yet a
short payload can hold a long text. Each character costs at least MIN_BITS_PER_CHAR (the escape's
share of the mass caps any symbol's probability), and the range coder packs no more than 32 bits a
word plus its final flush, so a count beyond that is refused; the decoder also tallies the bits each
segment has consumed and stops as soon as that exceeds what the segment's words hold, and it keeps
what it has decoded in blocks that grow with the decoding, never with the header's claim.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import lzma
import math
import os
import platform
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ArchiveError, CharlmError, CheckpointError, ConfigError
from .files import atomic_write
from .units import bits_per_char
from .vocab import Vocab, codes_to_text, text_to_codes

if TYPE_CHECKING:
    import torch

    from .lm import CharLM
    from .model import CharRNN

MAGIC = b"\x89CLM\r\n\x1a\n"  # PNG-style: a text-mode transfer or a 7-bit channel breaks it visibly
FORMAT_VERSION = 2  # 2: the adapting model (FLAG_ADAPT)
PRECISION = 24  # constriction's default coders: 32-bit words, probabilities in units of 2^-24
TOTAL = 1 << PRECISION
ESCAPE_WEIGHT = 1 << 8  # 2^-16 of the mass: 16 bits per unknown character, 2e-5 bits/char for the rest
MAX_VOCAB = 1 << 20  # every symbol needs weight >= 1 out of 2^24 with room to spare
MIN_BITS_PER_CHAR = -math.log2(1 - (ESCAPE_WEIGHT + 1) / TOTAL)  # 2.2e-5: the most predictable character's cost
MAX_SEGMENTS = 64
MIN_SEGMENT_CHARS = 4096
ENCODE_BLOCK = 256  # steps per block: the encoder hands its coders, the decoder stores, a block at a time
FLAG_CRLF = 1
FLAG_ADAPT = 2
ADAPT_STEPS = 16  # characters per segment between two updates of an adapting model
ADAPT_LR = 0.15  # SGD step on the mean nats/char of those characters
ADAPT_DECAY = 0.001  # pull towards the checkpoint's weights per update
ADAPT_CLIP = 1.0  # largest gradient norm an update follows
SUFFIX = ".clm"
STDIO = "-"

_HEAD = struct.Struct("<8sH")  # magic, format version
_BODY = struct.Struct("<32s32sQQIBB8sH")  # model sha, text sha, bytes, chars, segments, threads, flags, probe, info
_WORD = np.dtype("<u4")


@dataclass(frozen=True)
class ArchiveHeader:
    """Everything before the payload of a .clm archive, validated."""

    model_sha256: str
    text_sha256: str
    byte_length: int
    char_count: int
    threads: int
    flags: int
    fingerprint: bytes
    info: dict
    segment_words: tuple[int, ...]
    header_bytes: int

    @property
    def model_name(self) -> str:
        name = self.info.get("model", "?")
        return name if name.isprintable() else ascii(name)  # the archive's text, shown in one-line messages

    @property
    def payload_bytes(self) -> int:
        return 4 * sum(self.segment_words)


@dataclass(frozen=True)
class CompressReport:
    """What compressing a text cost and gained; bits/char both achieved and predicted by the model."""

    original_bytes: int
    original_chars: int
    coded_chars: int  # characters the model stepped through (CRLF files are coded as LF)
    compressed_bytes: int
    header_bytes: int
    unknown_chars: int
    segments: int
    threads: int
    adapted: bool  # the model learnt from the text as it coded it (see Stepper)
    model_nats: float  # summed -ln p over the characters the model knows, fp32 softmax, same segments
    elapsed_s: float
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    input: str = ""
    output: str = ""
    baselines: dict[str, int] | None = None

    @property
    def payload_bytes(self) -> int:
        return self.compressed_bytes - self.header_bytes

    @property
    def bits_per_char(self) -> float:
        return 8 * self.compressed_bytes / self.original_chars if self.original_chars else 0.0

    @property
    def payload_bits_per_char(self) -> float:
        return 8 * self.payload_bytes / self.original_chars if self.original_chars else 0.0

    @property
    def model_cross_entropy(self) -> float:
        """nats/char over the known characters: the bound the payload approaches."""
        known = self.coded_chars - self.unknown_chars
        return self.model_nats / known if known else 0.0

    @property
    def model_bits_per_char(self) -> float:
        return bits_per_char(self.model_cross_entropy)

    @property
    def chars_per_sec(self) -> float:
        return self.original_chars / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("baselines")
        d.update(
            payload_bytes=self.payload_bytes,
            bits_per_char=self.bits_per_char,
            payload_bits_per_char=self.payload_bits_per_char,
            model_cross_entropy=self.model_cross_entropy,
            model_bits_per_char=self.model_bits_per_char,
            chars_per_sec=self.chars_per_sec,
            ratio=self.original_bytes / self.compressed_bytes,
        )
        if self.baselines is not None:
            d["baselines"] = {
                name: {
                    "bytes": size,
                    "ratio": self.original_bytes / size if size else 0.0,
                    "bits_per_char": 8 * size / self.original_chars if self.original_chars else 0.0,
                }
                for name, size in self.baselines.items()
            }
            d["saving_vs_best_baseline"] = 1 - self.compressed_bytes / min(self.baselines.values())
        return d


@dataclass(frozen=True)
class DecompressReport:
    original_bytes: int
    original_chars: int
    compressed_bytes: int
    elapsed_s: float
    checkpoint: str = ""
    input: str = ""
    output: str = ""

    @property
    def chars_per_sec(self) -> float:
        return self.original_chars / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), chars_per_sec=self.chars_per_sec)


Progress = Callable[[int, int], None]  # (characters done, characters in all)


# --------------------------------------------------------------------------------------- the coding pass


def _constriction() -> Any:
    try:
        import constriction
    except ImportError:
        raise CharlmError(
            "charlm compress needs the constriction package", "install it with: pip install 'charlm[compress]'"
        ) from None
    return constriction


@functools.cache
def _models() -> tuple[Any, Any]:
    """(the categorical family every character is coded with, the uniform model of escaped bytes)."""
    model = _constriction().stream.model
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


def segment_bounds(chars: int, segments: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) positions of each segment: equal cuts, as `evaluate.score` cuts its streams."""
    lo = np.array([b * chars // segments for b in range(segments)], dtype=np.int64)
    hi = np.array([(b + 1) * chars // segments for b in range(segments)], dtype=np.int64)
    return lo, hi


def segment_count(chars: int, *, max_segments: int = MAX_SEGMENTS, min_segment_chars: int = MIN_SEGMENT_CHARS) -> int:
    if chars == 0:
        return 0
    return max(1, min(max_segments, chars // min_segment_chars))


class Stepper:
    """The one computation encoder and decoder share: S segments advance one character per step.

    Same batch shape, same step size, fp32, same threads on both sides, so the same inputs give the
    same bits. Input after an unknown character, and after a segment has ended, is the start id.

    With `adapt`, the model also keeps learning from the text it codes (dynamic evaluation, Krause
    et al. 2018): after every ADAPT_STEPS steps, one gradient step on the characters just coded,
    which both sides know by then, pulled back towards the checkpoint's weights so it cannot drift.
    Names and turns of phrase that recur in one document then cost fewer bits each time. The update
    runs on a private copy of the model, so the caller's weights are untouched.
    """

    def __init__(self, model: CharRNN, vocab: Vocab, segments: int, *, adapt: bool = False) -> None:
        import copy

        import torch

        with torch.inference_mode(False):  # a copy made in inference mode could never be trained
            self.model = copy.deepcopy(model) if adapt else model
        self.start_id = vocab.start_id
        self.state = model.initial_state(segments, "cpu")
        self.inputs = np.full(segments, self.start_id, dtype=np.int64)
        self.adapt = adapt
        if adapt:
            self.params = [p.requires_grad_() for p in self.model.parameters()]
            self.origin = [p.detach().clone() for p in self.params]
            self.block_state = self.state
            self.seen: list[tuple[np.ndarray, np.ndarray]] = []  # (inputs, targets) of the steps since the last update

    def step(self) -> tuple[np.ndarray, torch.Tensor]:
        """(integer weights [S, V + 1], fp32 logits [S, V]) for the next character of every segment."""
        import torch

        x = torch.from_numpy(self.inputs).view(-1, 1)  # [S, 1]
        logits, self.state = self.model(x, self.state)
        logits = logits[:, 0].float()  # [S, V]
        return quantize(torch.softmax(logits, dim=-1).numpy()), logits

    def feed(self, ids: np.ndarray) -> None:
        """The characters just coded become the next inputs; -1 (unknown or finished) reads as the start id."""
        if self.adapt:
            self.seen.append((self.inputs, ids.astype(np.int64)))
            if len(self.seen) == ADAPT_STEPS:
                self._learn()
        self.inputs = np.where(ids >= 0, ids, self.start_id).astype(np.int64)

    def _learn(self) -> None:
        """One SGD step on the last ADAPT_STEPS characters of every segment, from the state they started in."""
        import torch
        import torch.nn.functional as F

        inputs, targets = (np.stack(column, axis=1) for column in zip(*self.seen, strict=True))  # [S, K] each
        self.seen = []
        with torch.inference_mode(False), torch.enable_grad():  # (tensors made in inference mode are not allowed)
            x, y = torch.from_numpy(inputs), torch.from_numpy(targets)  # y -1: not a known character
            start = tuple(s.clone() for s in self.block_state)  # plain tensors: autograd may not save inference ones
            logits, _ = self.model(x, start)
            loss = (
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1, reduction="sum")
                / y.numel()
            )
            grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if not math.isfinite(norm):
                step = 0.0
            else:  # a burst of surprises cannot throw the weights far
                step = ADAPT_LR * (ADAPT_CLIP / norm if norm > ADAPT_CLIP else 1.0)
            for p, g, p0 in zip(self.params, grads, self.origin, strict=True):
                p.add_(g, alpha=-step)
                p.add_(p0 - p, alpha=ADAPT_DECAY)
        self.block_state = self.state


def fingerprint(logits: torch.Tensor) -> bytes:
    """8 bytes that change with any bit of the first step's logits: a check of the platform's arithmetic
    that does not depend on the payload."""
    return hashlib.sha256(logits[0].contiguous().numpy().tobytes()).digest()[:8]


@contextmanager
def exact_arithmetic(threads: int) -> Iterator[None]:
    """torch's thread count, denormal mode and kernels pinned for the coding pass, restored afterwards."""
    import torch

    if not 1 <= threads <= 255:
        raise ConfigError(f"--threads must be from 1 to 255 (got {threads})")
    threads_before, onednn_before = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.backends.mkldnn.enabled = False  # torch's own kernels: one fewer library choosing code paths, 2x faster
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.mkldnn.enabled = onednn_before


def _platform_info(model_name: str) -> dict[str, str]:
    import torch

    from .version import __version__

    return {
        "model": model_name,
        "charlm": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def _check_model(lm: CharLM) -> None:
    if len(lm.vocab) > MAX_VOCAB:
        raise ConfigError(
            f"the model's vocab of {len(lm.vocab):,} characters is too large to code (at most {MAX_VOCAB:,})"
        )
    lm.model.float().to("cpu").eval()


# ------------------------------------------------------------------------------------------------ encode


def _fold_newlines(text: str, vocab: Vocab) -> tuple[str, int]:
    """CRLF text is coded as LF (the model never saw CR) when the fold is exactly reversible."""
    crlf = text.count("\r\n")
    if crlf and crlf == text.count("\n") == text.count("\r") and "\r" not in vocab:
        return text.replace("\r\n", "\n"), FLAG_CRLF
    return text, 0


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArchiveError(
            f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} is invalid)",
            "charlm compress codes UTF-8 text only; use xz for other files",
        ) from None


def _encode_row(encoder: Any, symbols: np.ndarray, weights: np.ndarray, escapes: list[bytes]) -> None:
    """Symbols of one segment in order; each escape symbol is followed by its character's UTF-8 bytes."""
    family, byte_model = _models()
    start = 0
    escape = weights.shape[1] - 1
    for i, raw in zip(np.flatnonzero(symbols == escape), escapes, strict=True):
        encoder.encode(symbols[start : i + 1], family, weights[start : i + 1])
        encoder.encode(np.frombuffer(raw, dtype=np.uint8).astype(np.int32), byte_model)
        start = i + 1
    if start < len(symbols):
        encoder.encode(symbols[start:], family, weights[start:])


def compress_bytes(
    data: bytes,
    lm: CharLM,
    *,
    model_sha256: str,
    threads: int = 1,
    adapt: bool = True,
    max_segments: int = MAX_SEGMENTS,
    min_segment_chars: int = MIN_SEGMENT_CHARS,
    progress: Progress | None = None,
    what: str = "the input",
) -> tuple[bytes, CompressReport]:
    """A .clm archive of UTF-8 `data`, and what it achieved. The model runs step by step over all
    segments at once (never the fast whole-sequence pass) so that decompression can repeat it exactly."""
    _constriction()
    if not 1 <= max_segments <= MAX_SEGMENTS:
        raise ConfigError(f"max_segments must be from 1 to {MAX_SEGMENTS} (got {max_segments})")
    started = time.perf_counter()
    _check_model(lm)
    original = decode_utf8(data, what)
    text, flags = _fold_newlines(original, lm.vocab)
    flags |= FLAG_ADAPT if adapt else 0
    codes = text_to_codes(text)
    ids = known_ids(lm.vocab, codes)  # -1: coded through the escape
    segments = segment_count(len(codes), max_segments=max_segments, min_segment_chars=min_segment_chars)
    with exact_arithmetic(threads):
        payloads, nats, probe = _encode_segments(lm, codes, ids, segments, progress, adapt=adapt)
    header = _pack_header(
        model_sha256=model_sha256,
        text_sha256=hashlib.sha256(data).digest(),
        byte_length=len(data),
        char_count=len(codes),
        threads=threads,
        flags=flags,
        probe=probe,
        info=_platform_info(lm.path.name if lm.path else "?"),
        segment_words=[len(p) for p in payloads],
    )
    archive = header + b"".join(p.tobytes() for p in payloads)
    report = CompressReport(
        original_bytes=len(data),
        original_chars=len(original),
        coded_chars=len(codes),
        compressed_bytes=len(archive),
        header_bytes=len(header),
        unknown_chars=int((ids < 0).sum()),
        segments=segments,
        threads=threads,
        adapted=adapt,
        model_nats=nats,
        elapsed_s=time.perf_counter() - started,
        checkpoint=str(lm.path or ""),
        checkpoint_sha256=model_sha256,
    )
    return archive, report


def _encode_segments(
    lm: CharLM, codes: np.ndarray, ids: np.ndarray, segments: int, progress: Progress | None, *, adapt: bool
) -> tuple[list[np.ndarray], float, bytes]:
    """(each segment's 32-bit words, summed model nats over known characters, fingerprint).

    The model steps one character at a time; the symbols and weights of ENCODE_BLOCK steps are then
    handed to each segment's coder in one call, in the order the decoder will ask for them.
    """
    constriction = _constriction()
    n, escape = len(codes), len(lm.vocab)
    lo, hi = segment_bounds(n, segments)
    encoders = [constriction.stream.queue.RangeEncoder() for _ in range(segments)]
    stepper = Stepper(lm.model, lm.vocab, segments, adapt=adapt)
    steps = int((hi - lo).max()) if segments else 0
    nats, probe = 0.0, bytes(8)
    for block in range(0, steps, ENCODE_BLOCK):
        width = min(ENCODE_BLOCK, steps - block)
        pos = lo[None, :] + block + np.arange(width)[:, None]  # [K, S] positions coded by each step
        active = pos < hi[None, :]
        target = np.where(active, ids[np.minimum(pos, n - 1)], -1)  # [K, S]; -1 unknown or past the end
        weights = np.empty((width, segments, escape + 1), dtype=np.float64)
        for k in range(width):
            weights[k], logits = stepper.step()
            probe = fingerprint(logits) if block + k == 0 else probe
            nats += _model_nats(logits, target[k])
            stepper.feed(target[k])
        symbols = np.where(target >= 0, target, escape).astype(np.int32)
        for row, encoder in enumerate(encoders):
            mask = active[:, row]
            escapes = [chr(int(codes[p])).encode("utf-8") for p in pos[mask & (target[:, row] < 0), row]]
            _encode_row(encoder, symbols[mask, row], weights[mask, row], escapes)
        if progress is not None:
            progress(int((np.minimum(lo + block + width, hi) - lo).sum()), n)
    return [np.ascontiguousarray(e.get_compressed(), dtype=_WORD) for e in encoders], nats, probe


def known_ids(vocab: Vocab, codes: np.ndarray) -> np.ndarray:
    """Vocab ids (int64, as torch's gather wants before 2.8) of the code points; -1 for any character that
    is not itself a vocab entry (unknown, or sharing a symbol with others), so that every id decodes back
    to exactly its character."""
    ids = vocab.lookup(codes).astype(np.int64)
    ids[(ids >= 0) & (vocab.codes[np.maximum(ids, 0)] != codes)] = -1
    return ids


def _model_nats(logits: torch.Tensor, target: np.ndarray) -> float:
    """Summed -ln p of the known targets under the unquantised fp32 softmax: what an ideal coder would pay."""
    import torch

    rows = np.flatnonzero(target >= 0)
    if not len(rows):
        return 0.0
    log_probs = torch.log_softmax(logits[torch.from_numpy(rows)], dim=-1)
    return -float(log_probs.gather(1, torch.from_numpy(target[rows])[:, None]).double().sum())


# ------------------------------------------------------------------------------------------------ decode


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


def decompress_bytes(
    archive: bytes, lm: CharLM, *, model_sha256: str, progress: Progress | None = None, what: str = "the archive"
) -> bytes:
    """The original bytes of a .clm archive, verified against its checksum; ArchiveError when the
    archive is damaged, was made with another model, or on a machine whose arithmetic differs."""
    _constriction()
    header = read_header(archive, what)
    check_model(header, model_sha256, lm.path, what)
    check_payload(header, len(archive), what)
    _check_model(lm)
    ends = np.cumsum([0, *header.segment_words]) * 4 + header.header_bytes
    payloads = [np.frombuffer(archive[a:b], dtype=_WORD).copy() for a, b in zip(ends[:-1], ends[1:], strict=True)]
    with exact_arithmetic(header.threads):
        codes, same_arithmetic = _decode_segments(lm, payloads, header, progress)
    if codes is None:
        raise _decode_failure(header, what, same_arithmetic)
    return _verify(codes, header, what, same_arithmetic)


def _decode_segments(
    lm: CharLM, payloads: list[np.ndarray], header: ArchiveHeader, progress: Progress | None
) -> tuple[np.ndarray | None, bool]:
    """(decoded code points or None when the payload cannot be what an encoder wrote, whether step 0
    matched the fingerprint).

    The mirror of `_encode_segments`: the same steps, but each character must be decoded before the
    next step can be computed, so the coders are asked one symbol at a time.
    """
    constriction = _constriction()
    family, byte_model = _models()
    decoders = [constriction.stream.queue.RangeDecoder(words) for words in payloads]
    vocab_codes = lm.vocab.codes
    n, segments, escape = header.char_count, len(payloads), len(lm.vocab)
    lo, hi = segment_bounds(n, segments)
    budget = [segment_bits(len(words)) for words in payloads]
    spent = [0.0] * segments  # sum of -log2 p over each segment's decoded symbols
    blocks: list[np.ndarray] = []  # [ENCODE_BLOCK, S] code points: memory follows the decoding, not the header
    stepper = Stepper(lm.model, lm.vocab, segments, adapt=bool(header.flags & FLAG_ADAPT))
    steps = int((hi - lo).max()) if segments else 0
    same_arithmetic = True
    for k in range(steps):
        if k % ENCODE_BLOCK == 0:
            blocks.append(np.zeros((ENCODE_BLOCK, segments), dtype=np.uint32))
        weights, logits = stepper.step()
        same_arithmetic = fingerprint(logits) == header.fingerprint if k == 0 else same_arithmetic
        coded = np.full(segments, -1, dtype=np.int64)
        for row in np.flatnonzero(lo + k < hi):
            try:
                symbol = int(decoders[row].decode(family, weights[row : row + 1])[0])
                code = vocab_codes[symbol] if symbol < escape else _decode_escape(decoders[row], byte_model)
            except AssertionError:  # constriction's way of saying no encoder could have written these words
                return None, same_arithmetic
            spent[row] += PRECISION - math.log2(weights[row, symbol] + 1)  # constriction codes with weight + 1
            if code < 0 or spent[row] > budget[row]:  # no UTF-8 after an escape, or reading past the real data
                return None, same_arithmetic
            coded[row] = symbol if symbol < escape else -1
            blocks[-1][k % ENCODE_BLOCK, row] = code
        stepper.feed(coded)
        if progress is not None and (k % ENCODE_BLOCK == ENCODE_BLOCK - 1 or k == steps - 1):
            progress(int((np.minimum(lo + k + 1, hi) - lo).sum()), n)
    by_step = np.concatenate(blocks or [np.zeros((0, segments), dtype=np.uint32)])[:steps]  # [steps, S]
    return by_step.T[np.arange(steps) < (hi - lo)[:, None]], same_arithmetic  # segment after segment


def segment_bits(words: int) -> int:
    """The most information a segment of `words` 32-bit words can hold: the coder's state carries up to
    a word beyond those it has written, and one more word covers rounding in the decoder's tally."""
    return 32 * (words + 2)


def _verify(codes: np.ndarray, header: ArchiveHeader, what: str, same_arithmetic: bool) -> bytes:
    try:
        text = codes_to_text(codes)
        if header.flags & FLAG_CRLF:
            text = text.replace("\n", "\r\n")
        data = text.encode("utf-8")
    except UnicodeError:  # a surrogate decoded from a damaged payload
        raise _decode_failure(header, what, same_arithmetic) from None
    if len(data) != header.byte_length or hashlib.sha256(data).hexdigest() != header.text_sha256:
        raise _decode_failure(header, what, same_arithmetic)
    return data


def _decode_failure(header: ArchiveHeader, what: str, same_arithmetic: bool) -> ArchiveError:
    if same_arithmetic:
        return ArchiveError(
            f"{what} is corrupt: the decoded text does not match its checksum",
            "the archive was damaged after it was written; use another copy",
        )
    here = _platform_info(header.model_name)
    made = ", ".join(f"{k} {header.info.get(k, '?')}" for k in ("charlm", "torch", "machine", "isa"))
    now = ", ".join(f"{k} {here[k]}" for k in ("charlm", "torch", "machine", "isa"))
    return ArchiveError(
        f"{what} cannot be decoded here: it was compressed on a machine whose arithmetic differs "
        f"({made}; this one: {now})",
        "decompress it with the same charlm and torch on the same kind of CPU",
    )


# --------------------------------------------------------------------------------------------- container


def _pack_header(
    *,
    model_sha256: str,
    text_sha256: bytes,
    byte_length: int,
    char_count: int,
    threads: int,
    flags: int,
    probe: bytes,
    info: dict,
    segment_words: list[int],
) -> bytes:
    info_raw = json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode("utf-8")[:65535]
    head = (
        _HEAD.pack(MAGIC, FORMAT_VERSION)
        + _BODY.pack(
            bytes.fromhex(model_sha256),
            text_sha256,
            byte_length,
            char_count,
            len(segment_words),
            threads,
            flags,
            probe,
            len(info_raw),
        )
        + info_raw
        + np.asarray(segment_words, dtype=_WORD).tobytes()
    )
    return head + struct.pack("<I", zlib.crc32(head))


def read_header(archive: bytes, what: str = "the archive") -> ArchiveHeader:
    """The validated header of a .clm archive (without its payload)."""
    truncated = ArchiveError(f"{what} is truncated ({len(archive)} bytes)", "the file was cut short; use another copy")
    if len(archive) < _HEAD.size or archive[: len(MAGIC)] != MAGIC:
        if MAGIC.startswith(archive[: len(MAGIC)]) and archive:
            raise truncated
        raise ArchiveError(
            f"{what} is not a charlm archive (no .clm signature)", "give a file written by `charlm compress`"
        )
    _, version = _HEAD.unpack_from(archive)
    if version > FORMAT_VERSION:
        raise ArchiveError(
            f"{what} uses .clm format version {version}, newer than this charlm reads ({FORMAT_VERSION})",
            "upgrade charlm: pip install -U charlm",
        )
    if version < 1:
        raise ArchiveError(f"{what} has an invalid .clm format version {version}", "use another copy")
    body_end = _HEAD.size + _BODY.size
    if len(archive) < body_end:
        raise truncated
    model_sha, text_sha, byte_length, chars, segments, threads, flags, probe, info_len = _BODY.unpack_from(
        archive, _HEAD.size
    )
    table_end = body_end + info_len + 4 * segments
    if len(archive) < table_end + 4:
        raise truncated
    (crc,) = struct.unpack_from("<I", archive, table_end)
    if zlib.crc32(archive[:table_end]) != crc:
        raise ArchiveError(f"{what} is corrupt: its header fails its checksum", "use another copy")
    try:
        info = json.loads(archive[body_end : body_end + info_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        info = None
    words = [int(w) for w in np.frombuffer(archive[body_end + info_len : table_end], dtype=_WORD)]
    plausible = (
        chars <= byte_length <= 5 * chars
        and (segments == 0) == (chars == 0)
        and segments <= min(chars, MAX_SEGMENTS)
        and 1 <= threads
        and chars * MIN_BITS_PER_CHAR <= sum(segment_bits(w) for w in words)
    )
    strings = isinstance(info, dict) and all(isinstance(value, str) for value in info.values())
    known_flags = FLAG_CRLF | (FLAG_ADAPT if version >= 2 else 0)
    if not strings or not plausible or flags & ~known_flags:
        raise ArchiveError(f"{what} is corrupt: its header is inconsistent", "use another copy")
    return ArchiveHeader(
        model_sha256=model_sha.hex(),
        text_sha256=text_sha.hex(),
        byte_length=byte_length,
        char_count=chars,
        threads=threads,
        flags=flags,
        fingerprint=probe,
        info=info,
        segment_words=tuple(words),
        header_bytes=table_end + 4,
    )


def check_payload(header: ArchiveHeader, size: int, what: str) -> None:
    expected = header.header_bytes + header.payload_bytes
    if size < expected:
        raise ArchiveError(
            f"{what} is truncated ({size} bytes, its header promises {expected})",
            "the file was cut short; use another copy",
        )
    if size > expected:
        raise ArchiveError(f"{what} is corrupt: {size - expected} unexpected bytes after its end", "use another copy")


def check_model(header: ArchiveHeader, model_sha256: str, path: Path | None, what: str) -> None:
    if model_sha256 != header.model_sha256:
        raise ArchiveError(
            f"{what} was compressed with the model {header.model_name} (sha256 "
            f"{header.model_sha256[:16]}...), not {path} (sha256 {model_sha256[:16]}...)",
            f"pass --checkpoint with the {header.model_name} it was compressed with",
        )


# ----------------------------------------------------------------------------------------------- files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})", "check the file's permissions") from None
    return digest.hexdigest()


def load_model(checkpoint: str | os.PathLike[str] | None) -> tuple[CharLM, str]:
    """(model on the CPU in fp32, sha256 of its checkpoint file)."""
    from . import checkpoint as ckpt
    from .lm import CharLM

    path = Path(checkpoint) if checkpoint is not None else ckpt.newest_checkpoint()
    lm = CharLM.load(path, device="cpu", precision="fp32", threads=1)
    return lm, file_sha256(path)


def _read_input(source: str | os.PathLike[str]) -> bytes:
    if str(source) == STDIO:
        return sys.stdin.buffer.read()
    path = Path(source)
    if not path.exists():
        raise ArchiveError(f"{path}: no such file", "check the path")
    if path.is_dir():
        raise ArchiveError(f"{path} is a directory, not a file", "give the path of a file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ArchiveError(f"{path}: cannot read ({e.strerror})", "check the file's permissions") from None


def output_path(source: str | os.PathLike[str], out: str | os.PathLike[str] | None, *, compressing: bool) -> str:
    """-o as given; else FILE.clm when compressing, FILE without .clm when decompressing, stdout for stdin."""
    if out is not None:
        return str(out)
    if str(source) == STDIO:
        return STDIO
    if compressing:
        return str(source) + SUFFIX
    if not str(source).endswith(SUFFIX) or len(Path(source).name) <= len(SUFFIX):
        raise ConfigError(
            f"{source} does not end in {SUFFIX}, so the output name cannot be guessed", "give one with -o"
        )
    return str(source)[: -len(SUFFIX)]


def check_output(out: str, *, force: bool) -> None:
    """Before any work: refuse to overwrite, or to write binary onto a terminal."""
    if out == STDIO:
        if sys.stdout.isatty():
            raise ConfigError("refusing to write binary data to a terminal", "redirect stdout or give -o FILE")
        return
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory", "give a file name with -o")
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists", "pass --force to overwrite it, or choose another -o")


def write_output(out: str, data: bytes) -> None:
    """All or nothing: a temp file in the same folder, fsync, then rename over the target."""
    if out == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(out)
    try:
        atomic_write(path, data)
    except OSError as e:
        raise ConfigError(
            f"cannot write {path} ({e.strerror}); nothing was written", "free some disk space or choose another -o"
        ) from None


def baseline_sizes(data: bytes) -> dict[str, int]:
    """What the standard library's general-purpose compressors make of the same bytes."""
    return {
        "zlib-9": len(zlib.compress(data, 9)),
        "bz2-9": len(bz2.compress(data, 9)),
        "lzma-9": len(lzma.compress(data, preset=9)),
    }


def compress_file(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    threads: int = 1,
    adapt: bool = True,
    force: bool = False,
    baselines: bool = False,
    progress: Progress | None = None,
) -> CompressReport:
    """Compresses a UTF-8 file (or stdin, '-') into a .clm archive written atomically."""
    _constriction()  # before any slow work
    target = output_path(source, out, compressing=True)
    check_output(target, force=force)
    data = _read_input(source)
    lm, sha = load_model(checkpoint)
    what = _name(source)
    archive, report = compress_bytes(
        data, lm, model_sha256=sha, threads=threads, adapt=adapt, progress=progress, what=what
    )
    write_output(target, archive)
    return replace(
        report, input=what, output=_name(target, "stdout"), baselines=baseline_sizes(data) if baselines else None
    )


def _name(path: str | os.PathLike[str], stdio: str = "stdin") -> str:
    """A path as messages and reports show it: '-' is stdin, or stdout for an output."""
    return stdio if str(path) == STDIO else str(path)


def archive_checkpoint(header: ArchiveHeader, checkpoint: str | os.PathLike[str] | None, what: str) -> Path:
    """The checkpoint to decode with: the one given; else the one in ./checkpoints whose sha256 is the
    one the archive records (checkpoints/<the recorded name> first, then newest first: a retrained
    model may have taken the name); else the recorded name or the newest, which check_model refuses
    with a message naming the model that is needed."""
    from . import checkpoint as ckpt

    if checkpoint is not None:
        return Path(checkpoint)
    named = Path("checkpoints") / Path(header.model_name).name
    folder = Path("checkpoints")
    others = (
        sorted(
            (p for p in folder.glob("*.safetensors") if not p.name.endswith(".last.safetensors") and p != named),
            key=lambda p: p.stat().st_mtime_ns,
            reverse=True,
        )
        if folder.is_dir()
        else []
    )
    for candidate in ([named] if named.is_file() else []) + others:
        try:
            if file_sha256(candidate) == header.model_sha256:
                return candidate
        except CheckpointError:
            continue
    if named.is_file():
        return named
    try:
        return ckpt.newest_checkpoint()
    except CheckpointError:
        raise ArchiveError(
            f"{what} needs the model {header.model_name} (sha256 {header.model_sha256[:16]}...) "
            "and there is no checkpoint in checkpoints/",
            "pass --checkpoint PATH",
        ) from None


def decompress_file(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> DecompressReport:
    """Restores the original file of a .clm archive; nothing is written unless it verifies."""
    _constriction()
    target = output_path(source, out, compressing=False)
    check_output(target, force=force)
    archive = _read_input(source)
    what = _name(source)
    header = read_header(archive, what)
    lm, sha = load_model(archive_checkpoint(header, checkpoint, what))
    started = time.perf_counter()
    data = decompress_bytes(archive, lm, model_sha256=sha, progress=progress, what=what)
    elapsed = time.perf_counter() - started
    write_output(target, data)
    return DecompressReport(
        original_bytes=len(data),
        original_chars=len(data.decode("utf-8")),
        compressed_bytes=len(archive),
        elapsed_s=elapsed,
        checkpoint=str(lm.path),
        input=what,
        output=_name(target, "stdout"),
    )
