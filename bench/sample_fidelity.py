"""What sampling's fast weights cost in quality: the step model's bits/char per precision.

    python bench/sample_fidelity.py CHECKPOINT TEXT [--chars 64000]

`charlm sample` reads its weights as fp32, bf16 or int8 (the CPU default). Each precision steps the
trained model through the same text, 64 streams one character at a time exactly as sampling does,
and scores the next-character distribution it would sample from: bits/char (lower is better), and
the mean total-variation distance to fp32's distribution (0 = identical, 1 = disjoint). A precision
that loses little here writes text as good as fp32's. Writes bench/results/sample-fidelity.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from report import finish  # noqa: E402

from charlm.data import corpus_from_text  # noqa: E402
from charlm.lm import CharLM  # noqa: E402
from charlm.sample import StepModel  # noqa: E402

STREAMS = 64


@torch.inference_mode()
def score(lm: CharLM, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """ids [S, T] -> per precision: bits/char and mean total variation from fp32."""
    steps = {p: StepModel(lm.model, p) for p in ("fp32", "bf16", "int8")}
    for step in steps.values():
        step.reset(lm.model.initial_state(ids.shape[0], "cpu"))
    nats = dict.fromkeys(steps, 0.0)
    tv = dict.fromkeys(steps, 0.0)
    inputs = torch.full((ids.shape[0],), lm.vocab.start_id)
    for t in range(ids.shape[1]):
        log_probs = {p: torch.log_softmax(step(inputs), -1) for p, step in steps.items()}
        exact = log_probs["fp32"].exp()
        for p, lp in log_probs.items():
            nats[p] -= float(lp.gather(1, ids[:, t : t + 1]).sum())
            tv[p] += float(0.5 * (lp.exp() - exact).abs().sum(-1).sum())
        inputs = ids[:, t]
    n = ids.numel()
    return {p: {"bits_per_char": nats[p] / n / math.log(2), "total_variation": tv[p] / n} for p in steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--chars", type=int, default=64_000)
    args = parser.parse_args()
    lm = CharLM.load(args.checkpoint, device="cpu", precision="fp32")
    corpus = corpus_from_text(args.text.read_text(encoding="utf-8")[: args.chars], vocab=lm.vocab)
    per_stream = len(corpus.ids) // STREAMS
    ids = torch.from_numpy(corpus.ids[: per_stream * STREAMS].astype("int64")).view(STREAMS, per_stream)
    results = score(lm, ids)
    base = results["fp32"]["bits_per_char"]
    rows = [("precision", "bits/char", "vs fp32", "total variation from fp32")]
    rows += [
        (p, f"{r['bits_per_char']:.4f}", f"{r['bits_per_char'] - base:+.4f}", f"{r['total_variation']:.4f}")
        for p, r in results.items()
    ]
    c = lm.model.config
    finish(
        f"sampling weights on {args.text.name}: {c.cell} {c.num_layers}x{c.hidden_size}, {ids.numel():,} chars, "
        f"{STREAMS} streams stepped one character at a time",
        rows,
        {"checkpoint": str(args.checkpoint), "text": str(args.text), "chars": ids.numel(), "precisions": results},
        "sample-fidelity",
    )


if __name__ == "__main__":
    main()
