"""Where a run's files go: <name>.safetensors (best), <name>.last.safetensors (resume), <name>.metrics.jsonl.

A trained model is never replaced unasked, so a new run on a taken name writes <name>-2, -3, ...;
--resume continues the newest run of the name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import checkpoint as ckpt
from ..errors import ConfigError


def default_paths(name: str, out: str | os.PathLike[str] | None) -> Path:
    """The best checkpoint's path as named: --out, else checkpoints/<corpus name>.safetensors."""
    best = Path(out) if out is not None else Path("checkpoints") / f"{name}.safetensors"
    return best if best.suffix == ".safetensors" else best.with_name(best.name + ".safetensors")


def run_files(best: Path) -> tuple[Path, Path, Path]:
    """(best checkpoint, resume checkpoint, metrics log) of one run."""
    return (best, *ckpt.sibling_paths(best))


def taken(best: Path) -> bool:
    """Whether a run already keeps any of its files at this name."""
    return any(p.exists() for p in run_files(best))


def numbered_runs(best: Path) -> list[Path]:
    """The best-checkpoint paths of <stem>.safetensors and <stem>-N.safetensors, for every run of
    that name that left a file, oldest name first."""
    stem = best.name.removesuffix(".safetensors")
    pattern = re.compile(rf"^{re.escape(stem)}(?:-(\d+))?\.(?:last\.safetensors|safetensors|metrics\.jsonl)$")
    numbers = set()
    if best.parent.is_dir():
        for p in best.parent.iterdir():
            match = pattern.match(p.name)
            if match:
                numbers.add(int(match.group(1) or 1))
    return [best if n == 1 else best.with_name(f"{stem}-{n}.safetensors") for n in sorted(numbers)]


def new_run_path(name: str, out: str | os.PathLike[str] | None, *, overwrite: bool) -> tuple[Path, str]:
    """Where a new run writes, and a note for the user when that is not the plain name.

    A trained model is never replaced unasked: with the default name the new run takes the next
    free one (corpus-2, corpus-3, ...; `sample` and `perplexity` pick the newest); a path given
    with --out that already holds a run is refused. overwrite=True replaces either.
    """
    best = default_paths(name, out)
    if overwrite or not taken(best):
        return best, (f"replacing the run at {best} (--overwrite)" if taken(best) else "")
    if out is not None:
        raise ConfigError(
            f"{best} already holds a trained model",
            "pass --overwrite to replace it, --resume to continue it, or choose another --out",
        )
    stem = best.name.removesuffix(".safetensors")
    n = max(2, len(numbered_runs(best)) + 1)
    while taken(best.with_name(f"{stem}-{n}.safetensors")):
        n += 1
    fresh = best.with_name(f"{stem}-{n}.safetensors")
    return fresh, f"{best} holds an earlier model, kept; this run writes {fresh} (--overwrite replaces instead)"


def resume_path(name: str, out: str | os.PathLike[str] | None, resume: bool | str | os.PathLike[str]) -> Path:
    """The .last checkpoint --resume continues: the path given, else that of the newest run of the name."""
    if resume is not True:
        return Path(resume)  # type: ignore[arg-type]
    best = default_paths(name, out)
    runs = [ckpt.sibling_paths(p)[0] for p in numbered_runs(best)] if out is None else []
    runs = [p for p in runs if p.exists()]
    return max(runs, key=lambda p: p.stat().st_mtime_ns) if runs else ckpt.sibling_paths(best)[0]


def best_path_of(last: Path) -> Path | None:
    """The best checkpoint that belongs to a resume checkpoint, by name."""
    if not last.name.endswith(".last.safetensors"):
        return None
    return last.with_name(last.name.removesuffix(".last.safetensors") + ".safetensors")


def check_writable(folder: Path) -> None:
    """Refuse before training, not at the first save minutes later, a folder that cannot hold checkpoints."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(
            f"cannot write checkpoints to {folder}/: {blocker} is a file, not a folder",
            "choose another place with --out",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".charlm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write checkpoints to {folder}/ ({e.strerror})", "choose a writable place with --out"
        ) from None
