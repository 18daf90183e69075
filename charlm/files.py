"""All-or-nothing file writes, shared by checkpoints, archives, pictures and caches.

The bytes go to a temporary file in the target's own folder, are flushed to disk, and the file is
renamed over the target: a crash or kill at any moment leaves either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], object], *,
                 durable: bool = True) -> None:
    """Write `data` (bytes, or a function that writes to the open file) to `path` atomically.

    durable=False skips the fsyncs, for caches that can be rebuilt. Raises OSError; the caller
    turns it into a message that fits what it was writing.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private by accident
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        try:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # not every filesystem lets a directory be fsynced
    for stale in folder.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by writers killed mid-write
        stale.unlink(missing_ok=True)
