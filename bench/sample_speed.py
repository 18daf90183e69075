"""Sampling speed of this tree against another (an earlier commit's worktree), in one run.

    git worktree add --detach /tmp/before <commit>
    python bench/sample_speed.py --checkpoint m.safetensors --compare-with /tmp/before

`charlm sample --json` runs alternately from each tree (old, new, old, new, ...) so that a change in
the machine's load falls on both; each figure is the median of --repeats runs of the command's own
chars/s (generation only, not start-up). Rows: one stream, 64 streams, and, for this tree only, the
steering options that cost something per character (`--stop` that never matches, `--lines`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from contention import matmul_neighbour  # noqa: E402
from report import finish, machine  # noqa: E402


def chars_per_sec(code: Path, checkpoint: Path, args: list[str]) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "charlm", "sample", "-c", str(checkpoint), "--json", "-q", "--rng-seed", "1", *args],
        cwd=code,  # `python -m` puts the working folder first on sys.path: this tree's charlm
        env={**os.environ, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out)["chars_per_sec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--compare-with", type=Path, required=True, help="the other source tree")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-busy", action="store_true", help="skip the runs beside a CPU-bound neighbour")
    parser.add_argument("--name", help="results file name [default: sample-speed-<date>]")
    args = parser.parse_args()
    checkpoint = args.checkpoint.resolve()
    trees = {"before": args.compare_with.resolve(), "now": ROOT}
    cases = {
        "1 stream, 3,000 chars": (["-n", "3000"], True),
        "64 streams, 500 chars": (["-n", "500", "--num-samples", "64"], True),
        "1 stream, --stop that never matches": (["-n", "3000", "--stop", "\x07never\x07"], False),
        "1 stream, --lines 100000": (["-n", "3000", "--lines", "100000"], False),
    }
    results: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "runs": {}}
    rows = [["case", "before chars/s", "now chars/s", "now / before"]]

    def measure(label: str) -> None:
        for case, (extra, both) in cases.items():
            times: dict[str, list[float]] = {"before": [], "now": []}
            for _ in range(args.repeats):
                for tree in ("before", "now") if both else ("now",):
                    times[tree].append(chars_per_sec(trees[tree], checkpoint, extra))
            med = {k: statistics.median(v) for k, v in times.items() if v}
            results["runs"][case + label] = {"runs": times, "median": med}
            if both:
                ratio = f"{med['now'] / med['before']:.2f}x"
                rows.append([case + label, f"{med['before']:,.0f}", f"{med['now']:,.0f}", ratio])
            else:
                base = results["runs"]["1 stream, 3,000 chars" + label]["median"]["now"]
                rows.append([case + label, "-", f"{med['now']:,.0f}", f"{med['now'] / base:.2f}x of plain now"])

    measure("")
    if not args.no_busy:
        with matmul_neighbour():
            measure(", busy")
    title = f"charlm sample speed, {checkpoint.name}, before = {trees['before']}, on {results['machine']['cpu']}"
    finish(title, rows, results, args.name or f"sample-speed-{dt.date.today()}")


if __name__ == "__main__":
    main()
