"""atomic_write: all or nothing, and it never removes another live writer's temp file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from charlm.files import _writer, atomic_write


def test_temp_files_of_live_writers_survive_and_those_of_killed_writers_go(tmp_path: Path) -> None:
    target = tmp_path / "ids.bin"
    host = _writer().partition("-")[0]
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    live = tmp_path / f".ids.bin.{host}-{os.getpid()}-abc123.tmp"  # another thread or rank still writing
    dead = tmp_path / f".ids.bin.{host}-{gone}-def456.tmp"
    foreign = tmp_path / f".ids.bin.00000000-{gone}-ghi789.tmp"  # another host's writer, on a shared folder
    for p in (live, dead, foreign):
        p.write_bytes(b"partial")
    atomic_write(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, foreign.name])
