"""What every benchmark script ends with: the machine it ran on, a plain aligned table on stdout and
a JSON file."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def finish(title: str, rows: Sequence[Sequence[object]], results: dict, name: str) -> Path:
    """Prints `title` and the rows as aligned columns, stores them in `results` and writes
    bench/results/<name>.json."""
    cells = [[str(c) for c in row] for row in rows]
    width = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    print(title)
    for row in cells:
        print("  ".join(c.ljust(width[i]) for i, c in enumerate(row)).rstrip())
    results["table"] = cells
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote bench/results/{out.name}")
    return out


NPROC = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError, StopIteration):
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    with contextlib.suppress(OSError, StopIteration):
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return platform.processor() or platform.machine()


def cpu_tag(name: str) -> str:
    """'AMD EPYC 9R14 96-Core Processor' -> 'amd-epyc-9r14'; 'Intel(R) Xeon(R) Platinum 8488C' ->
    'intel-xeon-platinum'."""
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*|\d+-Core|Processor", " ", name)
    words = [w.lower() for w in re.findall(r"[A-Za-z0-9]+", name)][:3]
    return "-".join(words) or platform.machine()


def machine() -> dict:
    """Which computer a figure was measured on: the CPU and the kernels torch dispatches there
    (AMX, AVX512-BF16 or AVX2 change every speed), and how busy it was at the start."""
    import torch

    from charlm.device import cpu_has_fast_bf16

    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "nproc": NPROC,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(flags & {"amx_bf16", "amx_tile"}),
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512f": "avx512f" in flags,
        "hypervisor": "hypervisor" in flags,
        "fast_bf16": cpu_has_fast_bf16(),
        "python": platform.python_version(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "loadavg_at_start": os.getloadavg(),
    }
