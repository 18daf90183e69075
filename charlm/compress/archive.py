"""Text bytes <-> a .clm archive in memory: UTF-8 and line ends, the container around the coder's
segments, the check of what was decoded, and the reports of what it cost.

Input must be UTF-8: anything else is refused with the offset of the first bad byte (xz suits binary
files better anyway). Files whose line ends are all CRLF are coded as LF plus a flag. The archive
records torch, machine and instruction set, plus a fingerprint of the first step's logits, so a
failed checksum is reported as either corruption or a platform whose arithmetic differs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import fixed
from ..errors import ArchiveError, ConfigError
from ..streams import IGNORE, Cuts
from ..units import bits_per_char
from ..version import __version__
from ..vocab import Vocab, codes_to_text, text_to_codes
from .coder import (
    OnProgress,
    decode_segments,
    encode_segments,
    exact_arithmetic,
    known_ids,
    prepare,
    require_constriction,
)
from .container import (
    ARCHIVE_CUTS,
    FLAG_ADAPT,
    FLAG_CRLF,
    FLAG_PORTABLE,
    ArchiveHeader,
    check_model,
    check_payload,
    pack_header,
    payload_crc32,
    payloads,
    read_archive_header,
)

if TYPE_CHECKING:
    from ..lm import CharLM


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
    adapted: bool  # the model learnt from the text as it coded it (see coder.CodingSteps)
    machine_bound: bool  # float arithmetic: decodes only with the same charlm, torch and kind of CPU
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


# What decides a machine-bound archive's arithmetic, in the order a mismatch is named: the kernels
# torch dispatches (its CPU capability, which ATEN_CPU_CAPABILITY caps), the BLAS and what caps its
# instruction set, oneDNN's cap (the coder turns oneDNN off, but a torch may not honour that
# everywhere), torch itself, the CPU. Thread counts are in the header and repeated by the decoder.
ARITHMETIC_KEYS = ("isa", "blas_cap", "onednn_cap", "torch", "machine", "cpu")


def platform_info(model_name: str, *, portable: bool = False) -> dict[str, str]:
    """What the archive records of where it was made: a decoder elsewhere names the difference."""
    from ..device import cpu_name

    return {
        "model": model_name,
        "charlm": __version__,
        "arithmetic": f"integer-{fixed.FORMAT}" if portable else "float",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "blas_cap": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "") or os.environ.get("OPENBLAS_CORETYPE", "") or "none",
        "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "") or os.environ.get("DNNL_MAX_CPU_ISA", "") or "none",
        "cpu": cpu_name(),
    }


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


def compress_bytes(
    data: bytes,
    lm: CharLM,
    *,
    model_sha256: str,
    threads: int = 1,
    adapt: bool = True,
    machine_bound: bool = False,
    cuts: Cuts = ARCHIVE_CUTS,
    progress: OnProgress | None = None,
    what: str = "the input",
) -> tuple[bytes, CompressReport]:
    """A .clm archive of UTF-8 `data`, and what it achieved. The model runs step by step over all
    segments at once (never the fast whole-sequence pass) so that decompression can repeat it exactly:
    in integers, any machine decodes it; with `adapt` its output layer learns from the text as it
    codes it, in integers too. `machine_bound` (with `adapt`): the whole float model learns instead,
    smaller still, but only the same charlm and torch on the same kind of CPU decode it.
    `cuts` other than ARCHIVE_CUTS (at most as many segments) are for tests and experiments: the
    archive records the segment count, so it decodes all the same."""
    require_constriction()
    if machine_bound and not adapt:
        raise ConfigError("--machine-bound is a way to --adapt", "leave out --no-adapt, or --machine-bound")
    portable = not machine_bound
    if not 1 <= cuts.max_streams <= ARCHIVE_CUTS.max_streams:
        raise ConfigError(f"cuts.max_streams must be from 1 to {ARCHIVE_CUTS.max_streams} (got {cuts.max_streams})")
    started = time.perf_counter()
    prepare(lm.model, lm.vocab)
    original = decode_utf8(data, what)
    text, flags = _fold_newlines(original, lm.vocab)
    flags |= (FLAG_ADAPT if adapt else 0) | (FLAG_PORTABLE if portable else 0)
    codes = text_to_codes(text)
    ids = known_ids(lm.vocab, codes)  # IGNORE: coded through the escape
    segments = cuts.count(len(codes))
    with exact_arithmetic(threads):
        words, nats, probe = encode_segments(
            lm.model, lm.vocab, codes, ids, segments, adapt=adapt, portable=portable, progress=progress
        )
    header = pack_header(
        model_sha256=model_sha256,
        text_sha256=hashlib.sha256(data).digest(),
        byte_length=len(data),
        char_count=len(codes),
        threads=threads,
        flags=flags,
        probe=probe,
        info={
            **platform_info(lm.path.name if lm.path else "?", portable=portable),
            "payload_crc32": payload_crc32(words),
        },
        segment_words=[len(w) for w in words],
    )
    archive = header + b"".join(w.tobytes() for w in words)
    report = CompressReport(
        original_bytes=len(data),
        original_chars=len(original),
        coded_chars=len(codes),
        compressed_bytes=len(archive),
        header_bytes=len(header),
        unknown_chars=int((ids == IGNORE).sum()),
        segments=segments,
        threads=threads,
        adapted=adapt,
        machine_bound=machine_bound,
        model_nats=nats,
        elapsed_s=time.perf_counter() - started,
        checkpoint=str(lm.path or ""),
        checkpoint_sha256=model_sha256,
    )
    return archive, report


def decompress_bytes(
    archive: bytes, lm: CharLM, *, model_sha256: str, progress: OnProgress | None = None, what: str = "the archive"
) -> bytes:
    """The original bytes of a .clm archive, verified against its checksum; ArchiveError when the
    archive is damaged, was made with another model, or on a machine whose arithmetic differs."""
    require_constriction()
    header = read_archive_header(archive, what)
    check_model(header, model_sha256, lm.path, what)
    check_payload(header, len(archive), what)
    prepare(lm.model, lm.vocab)
    words = payloads(archive, header)
    if header.payload_crc32 is not None and int(payload_crc32(words), 16) != header.payload_crc32:
        raise ArchiveError(
            f"{what} is corrupt: its payload fails its checksum",
            "the archive was damaged after it was written; use another copy",
        )
    with exact_arithmetic(header.threads):
        codes, same_arithmetic = decode_segments(
            lm.model,
            lm.vocab,
            words,
            header.char_count,
            adapt=bool(header.flags & FLAG_ADAPT),
            portable=header.portable,
            expected_fingerprint=header.fingerprint,
            progress=progress,
        )
    if codes is None:
        raise _decode_failure(header, what, same_arithmetic)
    return _verify(codes, header, what, same_arithmetic)


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
    """Why a payload did not decode to its text, as far as the archive can tell. It is called damaged
    only when nothing else can explain it: never when its payload checksum held (format 3) or when
    the machine's arithmetic differs from the one recorded."""
    intact = header.payload_crc32 is not None  # decompress_bytes has checked it by now
    here = platform_info(header.model_name, portable=header.portable)
    made = header.info
    if header.portable:
        if not same_arithmetic or made.get("arithmetic") != here["arithmetic"]:
            return ArchiveError(
                f"{what} cannot be decoded by this charlm: it was written by charlm {made.get('charlm', '?')} "
                f"({made.get('arithmetic', '?')} arithmetic), whose integer model differs from this charlm "
                f"{here['charlm']}'s ({here['arithmetic']})",
                f"decompress it with charlm {made.get('charlm', '?')}",
            )
        return ArchiveError(  # the arithmetic is the same everywhere: what is left is the file
            f"{what} is corrupt: the decoded text does not match its checksum",
            "use another copy (its payload checksum holds, so its header was altered; if this copy is good, "
            "please report a charlm bug)",
        )
    differs = [
        f"{key} {made.get(key, '?')} there, {here[key]} here"
        for key in ARITHMETIC_KEYS
        if key in made and made.get(key) != here[key]
    ]
    if not intact and not differs:  # format 1-2: no payload checksum to tell damage from arithmetic
        return ArchiveError(
            f"{what} does not decode to its checksum: it was damaged, or made on a CPU whose arithmetic "
            "differs (its format, 2, keeps no payload checksum to tell which)",
            "decompress it on the machine that made it; if that fails too, it is damaged: use another copy",
        )
    mode = "with --machine-bound" if "arithmetic" in made else "by a charlm before format 3 (float arithmetic)"
    why = "; ".join(differs) if differs else "the CPU's arithmetic differs in a way the archive does not record"
    return ArchiveError(
        f"{what} cannot be decoded here: it was compressed {mode}, whose floating-point arithmetic "
        f"is bound to the machine that wrote it ({why}; {header.threads} thread{'s' if header.threads != 1 else ''})",
        "decompress it where it was made, or with the same charlm and torch on the same kind of CPU "
        "under the same settings; archives made without --machine-bound decode anywhere",
    )
