"""What dropout costs a training step: one mask per sequence (charlm's) against a new mask per step.

    python bench/dropout_cost.py                       # GRU 3x320, batch 32 x 128, dropout 0.1: ~3 min
    python bench/dropout_cost.py --layers 2 --hidden 256 --batch 64 --no-busy
    python bench/dropout_cost.py --precision bf16      # as charlm trains on a CPU with fast bf16

Times one training step (forward, backward, AdamW) of the same model three ways, alternating step
by step in one process so that the machine's drift falls on all three alike:
- per-step masks: the fused nn.GRU/nn.LSTM's own dropout between layers and nn.functional.dropout
  on the embeddings and the last layer's output, a new mask for every character (charlm before
  locked dropout, and PyTorch's word_language_model);
- locked: charlm's CharRNN as it trains, one mask per sequence for the whole chunk;
- none: --dropout 0, the floor.
Medians over --rounds rounds, quiet and then beside a 2-thread matmul neighbour (--no-busy skips
it). Writes bench/results/<name>.json with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from contention import matmul_neighbour  # noqa: E402
from report import cpu_tag, finish, machine  # noqa: E402

from charlm.device import autocast  # noqa: E402
from charlm.model import CharRNN, ModelConfig  # noqa: E402


def per_step_forward(model: CharRNN, ids: torch.Tensor, p: float) -> torch.Tensor:
    """The model's weights with a new dropout mask at every step, as the fused kernel draws them."""
    x = F.dropout(model.embed(ids), p, training=True)
    model.rnn.dropout = p
    try:
        out, _ = model.rnn(x)
    finally:
        model.rnn.dropout = 0.0
    return model.head(F.dropout(out, p, training=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="gru", choices=["gru", "lstm", "rnn"])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, as charlm")
    parser.add_argument("--rounds", type=int, default=40, help="timed steps of each way, after 3 untimed")
    parser.add_argument("--no-busy", action="store_true", help="skip the runs beside a CPU-bound neighbour")
    parser.add_argument("--name", default=None, help="results file name [default: <date>-<cpu>-dropout-cost]")
    args = parser.parse_args()

    vocab = 65
    ids = torch.randint(vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    ways = {}
    for way in ("per-step masks", "locked", "none"):
        torch.manual_seed(0)
        p = 0.0 if way == "none" else args.dropout
        config = ModelConfig(vocab, args.cell, args.hidden, args.layers, dropout=p)  # type: ignore[arg-type]
        model = CharRNN(config).train()
        forward = (lambda m, x: per_step_forward(m, x, args.dropout)) if way == "per-step masks" else None
        ways[way] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True), forward)

    def step(way: str) -> float:
        model, opt, forward = ways[way]
        began = time.perf_counter()
        with autocast(torch.device("cpu"), args.precision):
            logits = forward(model, ids[:, :-1]) if forward else model(ids[:, :-1])[0]
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - began

    def measure() -> dict[str, float]:
        times: dict[str, list[float]] = {way: [] for way in ways}
        for r in range(3 + args.rounds):
            for way in ways:
                spent = step(way)
                if r >= 3:
                    times[way].append(spent)
        return {way: statistics.median(ts) for way, ts in times.items()}

    shape = (
        f"{args.cell.upper()} {args.layers}x{args.hidden}, batch {args.batch} x {args.seq}, dropout {args.dropout:g}, "
        f"{args.precision}"
    )
    results: dict = {"machine": machine(), "shape": shape, "threads": torch.get_num_threads(), "runs": {}}
    rows: list[list[object]] = [["load", "way", "ms/step", "chars/s", "vs per-step masks"]]
    loads = [("quiet", contextlib.nullcontext)]
    loads += [] if args.no_busy else [("beside a 2-thread matmul", matmul_neighbour)]
    for load, neighbour in loads:
        with neighbour():
            medians = measure()
        results["runs"][load] = {
            way: {"ms_per_step": 1000 * s, "speed_vs_per_step": medians["per-step masks"] / s}
            for way, s in medians.items()
        }
        for way, s in medians.items():
            chars = args.batch * args.seq / s
            rows.append([load, way, f"{1000 * s:.1f}", f"{chars:,.0f}", f"{medians['per-step masks'] / s:.3f}x"])
    name = args.name or f"{dt.date.today():%Y-%m-%d}-{cpu_tag(results['machine'].get('cpu', ''))}-dropout-cost"
    finish(
        f"one training step, {shape}, {torch.get_num_threads()} threads ({results['machine'].get('cpu')})",
        rows,
        results,
        name,
    )


if __name__ == "__main__":
    main()
