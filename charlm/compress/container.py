"""The .clm container: the bytes around the coded segments, and every number fixed by FORMAT_VERSION.

Layout, little-endian: magic, format version u16 (3; version 1 had no FLAG_ADAPT, version 2 no
FLAG_PORTABLE and no payload checksum), model sha256, text
sha256, byte length u64, char count u64, segment count u32, threads u8, flags u8, fingerprint (8
bytes), info JSON (u16 length: model file name, charlm, torch, machine, instruction set, and from
version 3 the arithmetic, CPU, oneDNN and the payload's crc32), one u32 per segment (its length in
32-bit words), crc32 of all the above; then each segment's words in order.

The payload's crc32 tells damage from arithmetic: a payload that matches it was not damaged, so a
decoded text that fails the text checksum means the decoder's arithmetic differs from the encoder's.

An old archive decodes only if the text is cut, and the probabilities are quantised, exactly as when
it was written, so those parameters live here beside the version that records them (ARCHIVE_CUTS,
PROBABILITY_BITS, ESCAPE_WEIGHT; the adapting model's in coder.py): changing one means a new version.

Every header value is untrusted until checked: the character count sizes the decoding loop, yet a
short payload can hold a long text. Each character costs at least MIN_BITS_PER_CHAR (the escape's
share of the mass caps any symbol's probability), and the range coder packs no more than 32 bits a
word plus its final flush, so a count beyond that is refused.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArchiveError
from ..streams import Cuts

MAGIC = b"\x89CLM\r\n\x1a\n"  # PNG-style: a text-mode transfer or a 7-bit channel breaks it visibly
FORMAT_VERSION = 3  # 2: the adapting model (FLAG_ADAPT); 3: the portable integer model (FLAG_PORTABLE)
ARCHIVE_CUTS = Cuts(max_streams=64, min_chars=4096)  # segments: the streams `charlm perplexity` scores, fixed here
PROBABILITY_BITS = 24  # constriction's default coders: 32-bit words, probabilities in units of 2^-24
TOTAL = 1 << PROBABILITY_BITS
ESCAPE_WEIGHT = 1 << 8  # 2^-16 of the mass: 16 bits per unknown character, 2e-5 bits/char for the rest
MIN_BITS_PER_CHAR = -math.log2(1 - (ESCAPE_WEIGHT + 1) / TOTAL)  # 2.2e-5: the most predictable character's cost
FLAG_CRLF = 1
FLAG_ADAPT = 2
FLAG_PORTABLE = 4  # the model ran in integers (charlm.fixed): decodes on any machine; with FLAG_ADAPT its
# output layer learnt in integers (fixed.LearningHead), without it the whole float model learnt

HEAD = struct.Struct("<8sH")  # magic, format version
BODY = struct.Struct("<32s32sQQIBB8sH")  # model sha, text sha, bytes, chars, segments, threads, flags, probe, info
WORD = np.dtype("<u4")  # the coded segments' words


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

    @property
    def portable(self) -> bool:
        return bool(self.flags & FLAG_PORTABLE)

    @property
    def payload_crc32(self) -> int | None:
        """The payload's crc32 (format 3 on), None before."""
        raw = self.info.get("payload_crc32")
        try:
            return int(raw, 16) if raw is not None else None
        except ValueError:
            return None


def segment_bits(words: int) -> int:
    """The most information a segment of `words` 32-bit words can hold: the coder's state carries up to
    a word beyond those it has written, and one more word covers rounding in the decoder's tally."""
    return 32 * (words + 2)


def pack_header(
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
    """The header bytes, crc32 included, of an archive with these segments."""
    info_raw = json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode("utf-8")[:65535]
    head = (
        HEAD.pack(MAGIC, FORMAT_VERSION)
        + BODY.pack(
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
        + np.asarray(segment_words, dtype=WORD).tobytes()
    )
    return head + struct.pack("<I", zlib.crc32(head))


def read_archive_header(archive: bytes, what: str = "the archive") -> ArchiveHeader:
    """The validated header of a .clm archive (without its payload)."""
    truncated = ArchiveError(f"{what} is truncated ({len(archive)} bytes)", "the file was cut short; use another copy")
    if len(archive) < HEAD.size or archive[: len(MAGIC)] != MAGIC:
        if MAGIC.startswith(archive[: len(MAGIC)]) and archive:
            raise truncated
        raise ArchiveError(
            f"{what} is not a charlm archive (no .clm signature)", "give a file written by `charlm compress`"
        )
    _, version = HEAD.unpack_from(archive)
    if version > FORMAT_VERSION:
        raise ArchiveError(
            f"{what} uses .clm format version {version}, newer than this charlm reads ({FORMAT_VERSION})",
            "upgrade charlm: pip install -U charlm",
        )
    if version < 1:
        raise ArchiveError(f"{what} has an invalid .clm format version {version}", "use another copy")
    body_end = HEAD.size + BODY.size
    if len(archive) < body_end:
        raise truncated
    model_sha, text_sha, byte_length, chars, segments, threads, flags, probe, info_len = BODY.unpack_from(
        archive, HEAD.size
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
    words = [int(w) for w in np.frombuffer(archive[body_end + info_len : table_end], dtype=WORD)]
    plausible = (
        chars <= byte_length <= 5 * chars
        and (segments == 0) == (chars == 0)
        and segments <= min(chars, ARCHIVE_CUTS.max_streams)
        and 1 <= threads
        and chars * MIN_BITS_PER_CHAR <= sum(segment_bits(w) for w in words)
    )
    strings = isinstance(info, dict) and all(isinstance(value, str) for value in info.values())
    known_flags = FLAG_CRLF | (FLAG_ADAPT if version >= 2 else 0) | (FLAG_PORTABLE if version >= 3 else 0)
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


def payload_crc32(words: list[np.ndarray]) -> str:
    """The crc32 of the segments' words as they are stored, hex (kept in the info JSON)."""
    crc = 0
    for w in words:
        crc = zlib.crc32(np.ascontiguousarray(w, dtype=WORD).tobytes(), crc)
    return f"{crc:08x}"


def payloads(archive: bytes, header: ArchiveHeader) -> list[np.ndarray]:
    """Each segment's words, in order, from an archive whose size check_payload has accepted."""
    ends = np.cumsum([0, *header.segment_words]) * 4 + header.header_bytes
    return [np.frombuffer(archive[a:b], dtype=WORD).copy() for a, b in zip(ends[:-1], ends[1:], strict=True)]
