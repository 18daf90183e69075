"""Files around the archive: input from a path or stdin, output atomically to a path or stdout, the
checkpoint found by the sha256 the archive records, and what general-purpose compressors achieve."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import checkpoint as ckpt
from ..errors import ArchiveError, CheckpointError, ConfigError
from ..files import atomic_write
from .archive import CompressReport, DecompressReport, compress_bytes, decompress_bytes
from .coder import OnProgress, require_constriction
from .container import ArchiveHeader, read_archive_header

if TYPE_CHECKING:
    from ..lm import CharLM

SUFFIX = ".clm"
STDIO = "-"


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
    from ..lm import CharLM

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
    machine_bound: bool = False,
    force: bool = False,
    baselines: bool = False,
    progress: OnProgress | None = None,
) -> CompressReport:
    """Compresses a UTF-8 file (or stdin, '-') into a .clm archive written atomically."""
    require_constriction()  # before any slow work
    target = output_path(source, out, compressing=True)
    check_output(target, force=force)
    data = _read_input(source)
    lm, sha = load_model(checkpoint)
    what = _name(source)
    archive, report = compress_bytes(
        data,
        lm,
        model_sha256=sha,
        threads=threads,
        adapt=adapt,
        machine_bound=machine_bound,
        progress=progress,
        what=what,
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
    progress: OnProgress | None = None,
) -> DecompressReport:
    """Restores the original file of a .clm archive; nothing is written unless it verifies."""
    require_constriction()
    target = output_path(source, out, compressing=False)
    check_output(target, force=force)
    archive = _read_input(source)
    what = _name(source)
    header = read_archive_header(archive, what)
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
