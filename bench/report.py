"""What every benchmark script ends with: a plain aligned table on stdout and a JSON file."""

from __future__ import annotations

import json
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
