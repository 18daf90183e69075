"""Text files -> ids.

Files are read in fixed-size chunks, so a corpus of any size needs bounded memory: one streaming pass
counts the characters (building the vocab), a second writes the ids to a cache file that later runs
memory-map at once. Everything that can be wrong with a file is found here and reported as one line.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from . import cache
from .cache import cache_dir  # re-exported: data.cache_dir came first
from .errors import ConfigError, CorpusError, VocabError
from .files import atomic_write
from .vocab import Unknown, Vocab, describe_char, text_to_codes

CHUNK_BYTES = 1 << 24
SEPARATOR = "\x1e"  # U+001E RECORD SEPARATOR: joins documents; the model learns it as a character
STDIN = "-"  # a source that means the standard input
CACHE_VERSION = 1
ARCHIVE_MAGIC = b"\x89CLM\r\n\x1a\n"  # compress.MAGIC: the first bytes of every .clm archive
MAX_SAFETENSORS_HEADER = 64 << 20  # checkpoint.MAX_HEADER_BYTES
Reader = Literal["train", "model"]  # who wants the text: training, or a command that takes --checkpoint


def charlm_file_kind(path: Path) -> Literal["checkpoint", "safetensors", "archive"] | None:
    """What a file is when its first bytes say it is one of charlm's binary files, else None.

    A safetensors file starts with its header's length (8 bytes, little-endian) and then the JSON
    header; charlm's checkpoints carry `"format": "charlm"` in its `__metadata__`. Sniffed here
    rather than with checkpoint.read_header, which reports every non-checkpoint as a damaged one.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if head.startswith(ARCHIVE_MAGIC):
                return "archive"
            if len(head) < 9 or head[8:] != b"{":
                return None
            (length,) = struct.unpack("<Q", head[:8])
            if length < 2 or length > MAX_SAFETENSORS_HEADER or 8 + length > os.fstat(f.fileno()).st_size:
                return None
            raw = head[8:] + f.read(length - 1)
    except OSError:
        return None  # the caller's own checks say what is wrong with an unreadable file
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return "checkpoint" if isinstance(meta, dict) and meta.get("format") == "charlm" else "safetensors"


def refuse_charlm_file(path: Path, *, reader: Reader = "train") -> None:
    """A CorpusError when a checkpoint or an archive is given where a text file is expected.

    Without it, `charlm perplexity model.safetensors` loads a model and then calls the checkpoint
    broken text; the hint says where the file belongs for the command that reads it (`reader`).
    """
    kind = charlm_file_kind(path)
    if kind == "checkpoint":
        hint = (
            f"pass it as --checkpoint {path}"
            if reader == "model"
            else f"to fine-tune it, charlm train CORPUS --init-from {path}; to continue its run, "
            "charlm train CORPUS --resume"
        )
        raise CorpusError(f"{path} is a charlm checkpoint, not a text file", hint)
    if kind == "archive":
        raise CorpusError(f"{path} is a charlm archive (.clm), not a text file", f"run charlm decompress {path} first")
    if kind == "safetensors":
        raise CorpusError(f"{path} is a safetensors file, not a text file", "give a UTF-8 text file")


def check_text_file(path: Path, *, reader: Reader = "train") -> int:
    """Size in bytes of a readable, non-empty regular file, or a CorpusError saying what is wrong.

    `reader` only shapes the hint for a checkpoint given in place of the text (see refuse_charlm_file).
    """
    if not path.exists():
        raise CorpusError(f"{path}: no such file", "check the path")
    if path.is_dir():
        raise CorpusError(f"{path} is a directory, not a text file", "give the path of a text file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror})", "check the file's permissions") from None
    if size == 0:
        raise CorpusError(f"{path} is empty", "give a file with some text in it")
    refuse_charlm_file(path, reader=reader)
    return size


def text_files(paths: list[Path], pattern: str = "*") -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to score among `paths`: files as given, folders searched recursively for names
    matching `pattern` (hidden files and folders left out), in order, each once. Returns (files that
    look like text, [(path, why it is skipped)]): a missing, binary or charlm file is reported, so
    one bad file in a folder does not stop the others."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for given in paths:
        if given.is_dir():
            candidates = sorted(
                p
                for p in given.rglob(pattern)
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(given).parts)
            )
        else:
            candidates = [given]
        for path in candidates:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                check_text_file(path, reader="model")
            except CorpusError as e:
                skipped.append((path, e.message))
                continue
            found.append(path)
    return found, skipped


def _cut_short(path: Path, *, start: int, count: int) -> CorpusError:
    """A UTF-8 file that ends inside a character was cut at a byte count (head -c, a broken copy):
    converting it from latin1 would be the wrong fix, dropping the partial character is the right one."""
    s = "" if count == 1 else "s"
    return CorpusError(
        f"{path} ends in the middle of a UTF-8 character at byte offset {start} (it was probably cut short, "
        "e.g. by head -c)",
        f"remove the last {count} byte{s} (truncate -s -{count} {path}) or re-export it whole",
    )


def iter_text(path: Path, *, chunk_bytes: int | None = None) -> Iterator[tuple[bytes, str]]:
    """(raw bytes, decoded text) chunks of a UTF-8 file with CRLF folded to LF and a leading BOM dropped.

    Raises CorpusError with the byte offset for NUL bytes or invalid UTF-8, and when the file
    changes size while it is read (it was truncated or replaced under us). A file that decodes as
    UTF-8 up to an incomplete last character is told it was cut short; one whose only non-ASCII
    bytes are that tail (latin1 'café' ends in a lone 0xe9) keeps the advice to convert it.
    """
    size = check_text_file(path)
    with open(path, "rb") as f:
        offset = yield from iter_text_stream(f, path, chunk_bytes=chunk_bytes)
    if offset != size:
        raise CorpusError(f"{path} changed size while it was read", "wait until it is fully written, then retry")


def iter_text_stream(
    f: BinaryIO, name: str | os.PathLike[str], *, chunk_bytes: int | None = None
) -> Generator[tuple[bytes, str], None, int]:
    """iter_text's decoding for any binary stream (stdin too); returns the bytes read."""
    path = name
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    held_cr = False
    first = True
    seen_utf8 = False  # a multi-byte character decoded: the file is UTF-8, so a broken tail means cut short
    while True:
        try:
            raw = f.read(chunk_bytes)
        except OSError as e:
            raise CorpusError(f"{path}: read failed ({e.strerror})", "check the disk and try again") from None
        final = not raw
        nul = raw.find(b"\0")
        if nul >= 0:
            raise CorpusError(
                f"{path} is not a text file: NUL byte at byte offset {offset + nul}",
                "give a UTF-8 text file",
            )
        buffered = len(decoder.getstate()[0])
        try:
            text = decoder.decode(raw, final=final)
        except UnicodeDecodeError as e:
            if final and seen_utf8 and e.end == len(e.object) and e.reason == "unexpected end of data":
                raise _cut_short(path, start=offset - buffered + e.start, count=e.end - e.start) from None
            raise CorpusError(
                f"{path} is not valid UTF-8: bad byte at byte offset {offset - buffered + e.start}",
                "convert it to UTF-8 (for example: iconv -f latin1 -t utf-8)",
            ) from None
        offset += len(raw)
        seen_utf8 = seen_utf8 or not text.isascii()
        if first and text:
            text = text.removeprefix("\ufeff")
            first = False
        if held_cr:
            text = "\r" + text
        held_cr = text.endswith("\r") and not final
        if held_cr:
            text = text[:-1]
        text = text.replace("\r\n", "\n")
        if text or raw:
            yield raw, text
        if final:
            return offset


def read_text(path: str | os.PathLike[str]) -> str:
    """A whole (small) text file, checked and normalised exactly as corpora are."""
    text = "".join(t for _, t in iter_text(Path(path)))
    if not text:
        raise CorpusError(f"{path} has no characters (only a byte-order mark)", "give a file with text in it")
    return text


@dataclass
class Scan:
    """What one pass over a file learns: identity, size and character counts."""

    sha256: str
    chars: int
    counts: dict[int, int]

    def vocab(self, *, min_count: int = 1) -> Vocab:
        return Vocab.from_counts(self.counts, min_count=min_count)


def scan_file(path: Path) -> Scan:
    digest = hashlib.sha256()
    counts = np.zeros(0x110000, dtype=np.int64)
    chars = 0
    for raw, text in iter_text(path):
        digest.update(raw)
        codes = text_to_codes(text)
        chars += codes.size
        found = np.bincount(codes)  # as long as the largest code point in the chunk
        counts[: found.size] += found
    if chars == 0:
        raise CorpusError(f"{path} has no characters (only a byte-order mark)", "give a file with text in it")
    return Scan(digest.hexdigest(), chars, {int(c): int(counts[c]) for c in np.nonzero(counts)[0]})


@dataclass
class Corpus:
    """A text as ids, with the identity that checkpoints record."""

    name: str
    ids: np.ndarray  # [N] smallest unsigned dtype; a read-only memmap for files
    vocab: Vocab
    sha256: str
    path: Path | None = None
    unknown: int = 0  # characters dropped because the vocab lacks them
    unknown_chars: list[str] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)  # several documents: [{"path", "sha256", "chars"}]
    starts: list[int] = field(default_factory=list)  # several documents: where each begins in `ids`

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def identity(self) -> dict:
        whole = {"name": self.name, "sha256": self.sha256, "chars": len(self)}
        return {**whole, "files": self.files} if self.files else whole


def _atomic_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data).encode(), durable=False)


def _stat_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{CACHE_VERSION}"
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def cached_scan(path: Path) -> Scan:
    """scan_file, remembered by path, size and mtime so a second run skips the pass."""
    cache.max_bytes()  # a malformed CHARLM_CACHE_MAX stops every run, not only those that write
    folder = cache_dir() / "scans"
    entry = folder / f"{_stat_key(path)}.json"
    try:
        data = json.loads(entry.read_text())
        cache.used(entry)
        return Scan(data["sha256"], data["chars"], {int(k): v for k, v in data["counts"].items()})
    except (OSError, ValueError, KeyError):
        pass
    scan = scan_file(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_json(entry, {"sha256": scan.sha256, "chars": scan.chars, "counts": scan.counts})
        cache.added(entry, keep=[path])
    except OSError:
        pass  # a read-only cache only costs speed
    return scan


def _encode_to(path: Path, vocab: Vocab, unknown: Unknown, out) -> tuple[int, dict[int, int]]:
    """Streams ids into the open binary file `out`; returns (ids written, unknown code point counts)."""
    written = 0
    missing: dict[int, int] = {}
    for _, text in iter_text(path):
        codes = text_to_codes(text)
        ids = vocab.lookup(codes)
        bad = ids < 0
        if bad.any():
            uniq, cnt = np.unique(codes[bad], return_counts=True)
            for c, n in zip(uniq.tolist(), cnt.tolist(), strict=True):
                missing[c] = missing.get(c, 0) + n
            if unknown == "error":
                raise vocab.unknown_error(sorted(missing), what=str(path))
            ids = ids[~bad]
        out.write(ids.astype(vocab.dtype).tobytes())
        written += ids.size
    return written, missing


def encode_file(path: Path, vocab: Vocab, *, sha256: str, unknown: Unknown = "error") -> tuple[np.ndarray, dict]:
    """The file's ids as a read-only memmap from the cache (written on first use) and unknown stats."""
    folder = cache_dir() / "ids"
    stem = f"{sha256[:32]}-{vocab.fingerprint}-{unknown}"
    meta_path, ids_path = folder / f"{stem}.json", folder / f"{stem}.ids"
    meta = None
    try:
        meta = json.loads(meta_path.read_text())
        if ids_path.stat().st_size != meta["count"] * vocab.dtype.itemsize:
            meta = None
    except (OSError, ValueError, KeyError):
        meta = None
    if meta is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        except OSError:
            folder = Path(tempfile.mkdtemp(prefix="charlm-"))  # unwritable cache: a private temp copy
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            meta_path, ids_path = folder / f"{stem}.json", folder / f"{stem}.ids"
        try:
            with os.fdopen(fd, "wb") as out:
                count, missing = _encode_to(path, vocab, unknown, out)
            os.replace(tmp, ids_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"count": count, "missing": {str(k): v for k, v in missing.items()}}
        _atomic_json(meta_path, meta)
        if folder == cache_dir() / "ids":  # not the private temp copy
            cache.added(ids_path, keep=[meta_path, path])
    else:
        cache.used(meta_path, ids_path)
    count = meta["count"]
    ids = np.memmap(ids_path, dtype=vocab.dtype, mode="r", shape=(count,)) if count else np.zeros(0, vocab.dtype)
    return ids, {int(k): v for k, v in meta["missing"].items()}


def load_corpus(
    source: str | os.PathLike[str],
    *,
    vocab: Vocab | None = None,
    unknown: Unknown = "error",
    min_count: int = 1,
    name: str | None = None,
) -> Corpus:
    """A file (or built-in corpus name) as ids; builds the vocab from it unless one is given."""
    from .corpora import resolve

    path, resolved_name = resolve(source)
    name = name or resolved_name
    check_text_file(path, reader="train" if vocab is None else "model")  # a given vocab: a model scores it
    scan = cached_scan(path)
    if vocab is None:
        vocab = scan.vocab(min_count=min_count)
    ids, missing = encode_file(path, vocab, sha256=scan.sha256, unknown=unknown)
    if len(ids) == 0:
        raise VocabError(
            f"every character of {path} is unknown to the model ({len(missing)} distinct, e.g. "
            f"{', '.join(describe_char(chr(c)) for c in sorted(missing)[:5])})",
            "score text written in the script the model was trained on",
        )
    return Corpus(
        name=name,
        ids=ids,
        vocab=vocab,
        sha256=scan.sha256,
        path=path,
        unknown=sum(missing.values()),
        unknown_chars=[chr(c) for c in sorted(missing)],
    )


def corpus_from_text(
    text: str, *, name: str = "text", vocab: Vocab | None = None, unknown: Unknown = "error"
) -> Corpus:
    """An in-memory corpus, for the Python API and tests."""
    text = text.replace("\r\n", "\n")
    if not text:
        raise CorpusError("the text is empty", "give some text")
    vocab = vocab or Vocab.from_text(text)
    codes = text_to_codes(text)
    ids = vocab.lookup(codes)
    bad = ids < 0
    missing = sorted(set(codes[bad].tolist()))
    if bad.any() and unknown == "error":
        raise vocab.unknown_error(missing)
    kept = ids[~bad].astype(vocab.dtype)
    if kept.size == 0:
        raise VocabError("every character of the text is unknown to the model", "give text in the model's script")
    return Corpus(
        name=name,
        ids=kept,
        vocab=vocab,
        sha256=hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        unknown=int(bad.sum()),
        unknown_chars=[chr(c) for c in missing],
    )


def split(ids: np.ndarray, val_fraction: float, *, max_chars: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous split: validation is the tail, so it is text the model never trained on nearby.
    It is `val_fraction` of the text but at most `max_chars`; the rest of a big corpus trains."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    n_val = max(2, int(round(len(ids) * val_fraction)))
    if max_chars is not None:
        n_val = max(2, min(n_val, max_chars))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


# ------------------------------------------------------------------------------------ several documents


@dataclass
class Document:
    """One text file of a corpus given as several files, folders or stdin."""

    path: Path  # where it is read from (stdin: its copy in the cache)
    shown: str  # the path as the checkpoint records it ("-" for stdin)
    scan: Scan

    def identity(self) -> dict:
        """Its entry in the checkpoint's corpus `files`."""
        return {"path": self.shown, "sha256": self.scan.sha256, "chars": self.scan.chars}


def as_sources(corpus: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The sources of a corpus argument: one path or name, or a sequence of them."""
    if isinstance(corpus, (str, os.PathLike)):
        return [os.fspath(corpus)]
    sources = [os.fspath(s) for s in corpus]
    if not sources:
        raise CorpusError("no corpus given", "give a text file, a folder or - for stdin")
    return sources


def is_plain(sources: list[str]) -> bool:
    """One file or built-in corpus name: trained on exactly as before several documents existed."""
    return len(sources) == 1 and sources[0] != STDIN and not Path(sources[0]).is_dir()


def corpus_name(sources: list[str]) -> str:
    """The run's name: a folder's name, "stdin" for -, else the first source's stem (or corpus name)."""
    from .corpora import resolve

    first = sources[0]
    if first == STDIN:
        return "stdin"
    if Path(first).is_dir():
        return Path(first).resolve().name or "corpus"
    return resolve(first)[1]


def stdin_file() -> Path:
    """The standard input, read whole and kept in the cache (corpora/stdin-<sha256>.txt)."""
    stream = sys.stdin
    if stream is None or stream.isatty():
        raise CorpusError("- reads the corpus from stdin, but nothing is piped in", "cat notes.txt | charlm train -")
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8", "surrogateescape")
    if not raw:
        raise CorpusError("stdin is empty", "pipe some text in: cat notes.txt | charlm train -")
    path = cache_dir() / "corpora" / f"stdin-{hashlib.sha256(raw).hexdigest()[:32]}.txt"
    if path.exists():
        cache.used(path)
        return path
    atomic_write(path, raw, durable=False)
    cache.added(path)
    return path


def find_documents(sources: list[str], pattern: str = "*") -> tuple[list[Document], list[tuple[str, str]]]:
    """The documents of `sources`, in order, each once: files and built-in corpora as given (any fault
    stops the run), folders searched recursively for `pattern` (hidden files skipped), `-` for stdin.
    A file found in a folder that is not text is skipped and returned as (path, why), so one stray
    binary does not stop the run."""
    from .corpora import resolve

    docs: list[Document] = []
    skipped: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for source in sources:
        if source == STDIN:
            path = stdin_file()
            if path.resolve() not in seen:
                seen.add(path.resolve())
                docs.append(Document(path, STDIN, cached_scan(path)))
            continue
        if not Path(source).is_dir():
            path, _ = resolve(source)
            check_text_file(path)
            if path.resolve() not in seen:
                seen.add(path.resolve())
                docs.append(Document(path, os.path.normpath(source), cached_scan(path)))
            continue
        found, bad = text_files([Path(source)], pattern)
        skipped += [(os.path.normpath(p), why) for p, why in bad]
        for path in found:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                docs.append(Document(path, os.path.normpath(path), cached_scan(path)))
            except CorpusError as e:
                skipped.append((os.path.normpath(path), e.message))
    if not docs:
        why = f" ({len(skipped)} skipped: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise CorpusError(f"no text file to train on in {', '.join(sources)}{why}", "check the paths and --glob")
    return docs, skipped


def document_counts(docs: list[Document], *, min_count: int = 1) -> dict[int, int]:
    """Character counts over every document, with the separator between them (always kept in the vocab)."""
    counts: dict[int, int] = {}
    for doc in docs:
        for c, n in doc.scan.counts.items():
            counts[c] = counts.get(c, 0) + n
    if len(docs) > 1:
        sep = ord(SEPARATOR)
        counts[sep] = max(counts.get(sep, 0) + len(docs) - 1, min_count)
    return counts


def load_documents(docs: list[Document], *, vocab: Vocab, name: str) -> Corpus:
    """The documents as one corpus: each one's ids (cached as for one file), joined by SEPARATOR.
    Its sha256 is that of the list of files (`sha256  path` lines, as sha256sum prints them)."""
    parts: list[np.ndarray] = []
    starts: list[int] = []
    at = 0
    sep = vocab.lookup(text_to_codes(SEPARATOR)).astype(vocab.dtype)
    for i, doc in enumerate(docs):
        if i:
            parts.append(sep)
            at += 1
        ids, _ = encode_file(doc.path, vocab, sha256=doc.scan.sha256, unknown="error")
        starts.append(at)
        parts.append(np.asarray(ids))
        at += len(ids)
    manifest = "".join(f"{d.scan.sha256}  {d.shown}\n" for d in docs)
    return Corpus(
        name=name,
        ids=np.concatenate(parts),
        vocab=vocab,
        sha256=hashlib.sha256(manifest.encode("utf-8", "surrogateescape")).hexdigest(),
        files=[d.identity() for d in docs],
        starts=starts,
    )


def split_documents(
    corpus: Corpus, val_fraction: float, *, max_chars: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, validation ids, validation documents): validation is the last whole documents, as
    many as come closest to `val_fraction` of the text without passing `max_chars`; at least one
    document trains. When the last document alone is longer than `max_chars`, validation is its first
    `max_chars` characters and the rest of it is left out, so no document is in both."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    n, total = len(corpus.starts), len(corpus)
    if n < 2:
        train, val = split(corpus.ids, val_fraction, max_chars=max_chars)
        return train, val, 0
    target = total * val_fraction
    best = 1
    for k in range(1, n):
        size = total - corpus.starts[n - k]
        if max_chars is not None and size > max_chars:
            break
        if abs(size - target) < abs(total - corpus.starts[n - best] - target):
            best = k
    start = corpus.starts[n - best]
    train, val = corpus.ids[: start - 1], corpus.ids[start:]  # the separator before validation is in neither
    if max_chars is not None and len(val) > max_chars:
        val = val[:max_chars]
    return train, val, best
