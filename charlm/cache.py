"""The cache folder's bookkeeping: where it is, what it holds, and keeping it under a size cap.

Everything in the cache can be rebuilt from the user's files, so it only ever saves time; but the
encoded ids of a big corpus are as big as the corpus, and nothing else would ever delete them. So
every new entry is followed by a check of the total, which evicts the least recently used entries
first (a cache hit refreshes its entry's mtime, so mtime means "last used").

Three kinds of entry, each in its own subfolder:

    scans/<key>.json            character counts of a file, keyed by path, size and mtime
    ids/<stem>.ids + .json      a file encoded as ids (memory-mapped by training and scoring)
    corpora/<name>-<ver>.txt    a built-in corpus assembled from an installed package
    corpora/stdin-<sha>.txt     the text `charlm train -` read from stdin

Only files with these names are counted, evicted or cleared: anything else a person puts in the
folder is left alone, and symlinks are never followed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

KINDS = ("scans", "ids", "corpora")
DEFAULT_MAX_BYTES = 4 * 10**9
MAX_ENV = "CHARLM_CACHE_MAX"
STALE_TMP_S = 3600  # a temp file untouched this long was left by a writer that died

_NAMES = {
    "scans": re.compile(r"^(?P<stem>[0-9a-f]{32})\.json$"),
    "ids": re.compile(r"^(?P<stem>[0-9a-f]{32}-[0-9a-f]+-[a-z]+)\.(ids|json)$"),
    "corpora": re.compile(r"^(?P<stem>[a-z0-9][a-z0-9._-]*)\.txt$"),
}
# atomic_write's '.<name>.<host>-<pid>-XXXX.tmp' and encode_file's mkstemp 'tmpXXXX.tmp'
_TMP = re.compile(r"^(\..+|tmp[A-Za-z0-9_]+)\.tmp$")
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?b)?|b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def cache_dir() -> Path:
    """Where charlm caches: $CHARLM_CACHE_DIR, else the XDG cache folder (~/.cache/charlm)."""
    env = os.environ.get("CHARLM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "charlm"


# ------------------------------------------------------------------------------------------- the cap


def parse_size(text: str) -> int | None:
    """Bytes for '2G', '500M', '10GB', '1.5T', '4GiB' or plain '123456'; None for '0' or 'off' (no cap).

    Units are decimal (k = 1000) like every size charlm prints; 'KiB', 'MiB', 'GiB', 'TiB' are binary.
    Raises ValueError for anything else.
    """
    text = text.strip()
    if text.lower() == "off":
        return None
    match = _SIZE.match(text)
    if not match:
        raise ValueError(text)
    number, unit, suffix = match.group(1), (match.group(2) or "").lower(), (match.group(3) or "").lower()
    scale = 1024 ** " kmgt".index(unit) if suffix == "ib" else _UNITS[unit]
    return max(1, int(float(number) * scale)) if float(number) else None


def max_bytes() -> tuple[int | None, str]:
    """(cap in bytes or None for no cap, where it comes from); a malformed setting is a ConfigError."""
    raw = os.environ.get(MAX_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_BYTES, "default"
    try:
        return parse_size(raw), f"{MAX_ENV}={raw.strip()}"
    except ValueError:
        raise ConfigError(
            f"{MAX_ENV}={raw.strip()!r} is not a size",
            "give bytes or a size such as 500M, 2G or 10GB (0 or off for no cap)",
        ) from None


def format_size(size: float) -> str:
    """'812 B', '12.3 kB', '4.0 GB': decimal units, matching parse_size."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


# ------------------------------------------------------------------------------------------- entries


@dataclass
class Entry:
    """The files that live and die together (an ids entry is its .ids and its .json)."""

    kind: str
    stem: str
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    last_used: int = 0  # newest mtime of its files, ns
    partial: bool = False  # a temp file of an unfinished write


def _entries(root: Path) -> list[Entry]:
    """Every entry charlm made under root, read without following symlinks; vanished files are skipped."""
    found: dict[tuple[str, str], Entry] = {}
    for kind in KINDS:
        if (root / kind).is_symlink():
            continue  # never follow a link out of the cache
        try:
            with os.scandir(root / kind) as listing:
                items = list(listing)
        except OSError:
            continue  # absent, unreadable, or not a folder
        for item in items:
            name = _NAMES[kind].match(item.name)
            tmp = None if name else _TMP.match(item.name)
            if not (name or tmp):
                continue
            try:
                if not item.is_file(follow_symlinks=False):
                    continue
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            stem = name.group("stem") if name else item.name
            entry = found.setdefault((kind, stem), Entry(kind, stem, partial=name is None))
            entry.files.append(Path(item.path))
            entry.bytes += st.st_size
            entry.last_used = max(entry.last_used, st.st_mtime_ns)
    return list(found.values())


def _remove(entry: Entry) -> int:
    """Bytes freed by deleting the entry's files (a file that will not go is skipped)."""
    freed = 0
    for path in entry.files:
        try:
            size = path.stat(follow_symlinks=False).st_size
            path.unlink()
            freed += size
        except OSError:
            pass
    return freed


def _stale(entry: Entry) -> bool:
    return entry.last_used < (time.time() - STALE_TMP_S) * 1e9


def used(*paths: Path) -> None:
    """Mark a cache hit, so that eviction takes the least recently used entries first."""
    now = time.time_ns()  # finer than the kernel's file clock, so back-to-back uses keep their order
    for path in paths:
        try:
            os.utime(path, ns=(now, now))
        except OSError:
            pass  # a read-only cache still serves hits


def added(path: Path, *, keep: Iterable[Path] = ()) -> None:
    """Call after writing a new entry (any of its files): evicts least recently used entries until the
    cache fits under the cap again.

    The new entry, and any cached file in `keep` (say, the built-in corpus being encoded), are never
    evicted; so an entry bigger than the cap on its own is still written and used (a run must work),
    and everything older goes. Temp files of writes in progress are not touched. Errors are ignored:
    eviction is housekeeping, not part of the run.
    """
    cap, _ = max_bytes()
    if cap is None:
        return
    root = cache_dir()
    entries = _entries(root)
    total = sum(e.bytes for e in entries)
    if total <= cap:
        return
    protected = {os.path.abspath(p) for p in (path, *keep)}
    for entry in sorted(entries, key=lambda e: (e.last_used, e.kind, e.stem)):
        if total <= cap:
            break
        if any(os.path.abspath(f) in protected for f in entry.files) or (entry.partial and not _stale(entry)):
            continue
        total -= _remove(entry)


# -------------------------------------------------------------------------------------- report, clear


@dataclass(frozen=True)
class Usage:
    entries: int
    bytes: int


@dataclass(frozen=True)
class Report:
    """What `charlm cache` shows: the folder, each kind's entries and bytes, the total and the cap."""

    folder: Path
    kinds: dict[str, Usage]
    max_bytes: int | None
    max_source: str

    @property
    def entries(self) -> int:
        return sum(u.entries for u in self.kinds.values())

    @property
    def bytes(self) -> int:
        return sum(u.bytes for u in self.kinds.values())

    def to_dict(self) -> dict:
        return {
            "folder": str(self.folder),
            "entries": self.entries,
            "bytes": self.bytes,
            "kinds": {k: {"entries": u.entries, "bytes": u.bytes} for k, u in self.kinds.items()},
            "max_bytes": self.max_bytes,
            "max_source": self.max_source,
        }


def report() -> Report:
    """The cache's contents by kind; bytes include temp files of writes in progress, entries do not."""
    cap, source = max_bytes()
    root = cache_dir()
    entries = _entries(root)
    kinds = {
        kind: Usage(
            sum(1 for e in entries if e.kind == kind and not e.partial), sum(e.bytes for e in entries if e.kind == kind)
        )
        for kind in KINDS
    }
    return Report(root, kinds, cap, source)


def clear() -> Usage:
    """Delete every entry charlm made (and temp files left by dead writers); the folder itself stays.

    Returns what was freed. A run using the cache at the same moment keeps its open files (POSIX) and
    rebuilds anything else it needs.
    """
    entries = [e for e in _entries(cache_dir()) if not e.partial or _stale(e)]
    freed = [_remove(e) for e in entries]
    return Usage(sum(1 for e in entries if not e.partial), sum(freed))
