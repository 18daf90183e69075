"""What sampling's 8-bit layer weights cost in bits/char, and what they and a second core buy in speed.

    python bench/narrow.py CHECKPOINT [TEXT]     # TEXT: held-out text [default: bench/compress.py's]

`charlm sample` runs one stream through the integer model (charlm.fixed) with its layer weights in
8 bits, and, for a model whose int8 layer weights pass 1 MB (fixed.split_pays: an LSTM 2x512 has
3.1 MB, a GRU 2x384 1.3 MB), may split each layer's units between two cores. This reports, on TEXT:
- bits/char of the float model, the 11-bit integer model (what archives use) and the 8-bit one,
  scored over 64 streams of the text from a zero state;
- one stream's chars/s writing 3,000 characters (Gumbel draws, the compiled writer, blocks of 512
  as `charlm sample` writes them) with 11-bit and 8-bit weights, on one core and on two; the median
  of --repeats rounds, the cases alternating within each round; then the same beside a 2-thread
  matmul (--no-busy skips it).
Writes bench/results/<name>.json with the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from contention import matmul_neighbour  # noqa: E402
from report import finish, machine  # noqa: E402

from charlm import fixed  # noqa: E402
from charlm.cache import cache_dir  # noqa: E402
from charlm.lm import CharLM  # noqa: E402

STREAMS = 64
WRITE = 3000
BLOCK = 512


def bits_per_char(model: torch.nn.Module, vocab: object, text: str) -> dict[str, float]:
    ids = vocab.encode(text, unknown="skip").astype(np.int64)
    length = len(ids) // STREAMS
    rows = ids[: STREAMS * length].reshape(STREAMS, length)
    out: dict[str, float] = {}
    with torch.inference_mode():
        logits, _ = model(torch.from_numpy(rows[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), torch.from_numpy(rows[:, 1:]).flatten())
    out["float"] = float(loss) / math.log(2)
    for label, narrow in (("11-bit", False), ("8-bit", True)):
        m = fixed.FixedModel.from_model(model, narrow=narrow)
        state, total = m.initial_state(STREAMS), 0.0
        for t in range(length - 1):
            q = torch.from_numpy(fixed.to_float(m.step(rows[:, t], state))).double()
            total -= float(torch.log_softmax(q, -1).gather(1, torch.from_numpy(rows[:, t + 1 : t + 2])).sum())
        out[label] = total / (STREAMS * (length - 1)) / math.log(2)
    return out


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, object]:
    lm = CharLM.load(checkpoint, device="cpu", precision="fp32", threads=1)
    return lm.model.float().eval(), lm.vocab


def write_speed(m: fixed.FixedModel, threads: int) -> float:
    noise = np.random.default_rng(1).gumbel(size=(WRITE, m.vocab)).astype(np.float32)
    state, logits = m.initial_state(1), np.zeros(m.vocab, np.float32)
    m.generate(state, logits, noise, 64, advance_last=True, threads=threads)  # compiled, caches warm
    began = time.perf_counter()
    for at in range(0, WRITE, BLOCK):
        count = min(BLOCK, WRITE - at)
        m.generate(state, logits, noise[at : at + count], count, advance_last=True, threads=threads)
    return WRITE / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", nargs="?", type=Path, help="held-out UTF-8 text [default: bench/compress.py's]")
    parser.add_argument("--chars", type=int, default=100_000, help="score the text's first N characters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-busy", action="store_true", help="skip the runs beside a CPU-bound neighbour")
    parser.add_argument("--name", help="results file name [default: narrow-<date>]")
    args = parser.parse_args()
    text_path = args.text or cache_dir() / "bench-compress" / "shakespeare-heldout.txt"
    if not text_path.exists():
        sys.exit(f"error: {text_path} does not exist; run bench/compress.py once, or name a text")
    text = text_path.read_text(encoding="utf-8")[: args.chars]
    results: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "runs": {}}
    model, vocab = load_model(args.checkpoint)
    bits = bits_per_char(model, vocab, text)
    results["bits_per_char"] = bits
    cfg = model.config
    name = f"{cfg.cell.upper()} {cfg.num_layers}x{cfg.hidden_size}"
    rows = [["case", "bits/char", "vs float", "1 core chars/s", "2 cores chars/s"]]
    rows.append(["float", f"{bits['float']:.4f}", "-", "-", "-"])
    models = {label: fixed.FixedModel.from_model(model, narrow=label == "8-bit") for label in ("11-bit", "8-bit")}

    def measure(suffix: str) -> None:
        speeds: dict[tuple[str, int], list[float]] = {(label, t): [] for label in models for t in (1, 2)}
        for _ in range(args.repeats):
            for label, t in speeds:
                speeds[label, t].append(write_speed(models[label], t))
        for label in models:
            one, two = (statistics.median(speeds[label, t]) for t in (1, 2))
            results["runs"][label + suffix] = {"1": speeds[label, 1], "2": speeds[label, 2], "median": [one, two]}
            cost = f"{bits[label] / bits['float'] - 1:+.2%}"
            rows.append([label + suffix, f"{bits[label]:.4f}", cost, f"{one:,.0f}", f"{two:,.0f}"])

    measure("")
    if not args.no_busy:
        with matmul_neighbour():
            measure(", busy")
    where = f"{len(text):,} held-out chars, on {results['machine']['cpu']}"
    title = f"sampling's integer step, {name} ({args.checkpoint.name}), {where}"
    finish(title, rows, results, args.name or f"narrow-{dt.date.today()}")


if __name__ == "__main__":
    main()
