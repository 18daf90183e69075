"""All-or-nothing file writes, shared by checkpoints, archives, pictures and caches.

The bytes go to a temporary file in the target's own folder, are flushed to disk, and the file is
renamed over the target: a crash or kill at any moment leaves either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(
    path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], object], *, durable: bool = True
) -> None:
    """Write `data` (bytes, or a function that writes to the open file) to `path` atomically.

    durable=False skips the fsyncs, for caches that can be rebuilt. Raises OSError; the caller
    turns it into a message that fits what it was writing.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.{_writer()}-", suffix=".tmp")
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
    for stale in folder.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _killed_mid_write(stale.name[len(path.name) + 2 :]):
            stale.unlink(missing_ok=True)


def _writer() -> str:
    """This host and process, as temp file names carry them: several processes (torchrun ranks) may
    write the same cache file at once, and only a writer that is gone leaves its temp file for good."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def _killed_mid_write(owner: str) -> bool:
    """Whether a temp file named '<host>-<pid>-...' was left by a process of this host that no longer runs."""
    host, _, rest = owner.partition("-")
    pid = rest.partition("-")[0]
    if host != _writer().partition("-")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False
