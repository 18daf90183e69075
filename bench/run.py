"""charlm's benchmark suite: one command, one table, one JSON file.

    python bench/run.py            # full suite (about 10 minutes on 2 cores)
    python bench/run.py --quick    # fewer repeats, 100 MB corpus only

Every speed figure is the median of several timed runs after a warm-up, and every charlm figure
is set against a baseline measured in the same process (a minimal hand-written PyTorch loop), so
the ratios hold even when the machine is busy. Results go to bench/results/<date>-<host>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from report import finish, machine  # noqa: E402

from charlm.data import corpus_from_text  # noqa: E402
from charlm.device import configure_cpu  # noqa: E402
from charlm.evaluate import evaluate  # noqa: E402
from charlm.model import CharRNN, ModelConfig  # noqa: E402
from charlm.sample import Sampler  # noqa: E402
from charlm.trainer import Stepped, TrainConfig, train  # noqa: E402

V, E, H, LAYERS, B, T = 96, 64, 512, 2, 64, 128


def median_rate(fn: Callable[[], float], repeats: int) -> float:
    """fn returns a rate; the median of `repeats` calls after one warm-up call."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def autocast(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def text(chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "a",
        "is",
        "that",
        "it",
        "was",
        "for",
        "on",
        "are",
        "as",
        "with",
        "his",
        "they",
        "at",
        "be",
        "this",
        "from",
        "have",
        "or",
        "by",
        "one",
        "had",
        "not",
        "but",
        "what",
    ]
    out = " ".join(rng.choice(words, size=chars // 3))
    return (out + "\n")[:chars]


# ----------------------------------------------------------------------------------------------- peaks


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0, trials: int = 3) -> float:
    """The best of a few timed bursts of square matmuls: what this machine can do at all."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def train_flops_per_char(cell: str) -> float:
    """Matmul FLOPs per character for forward + backward (backward = 2x forward)."""
    gates = {"lstm": 4, "gru": 3}[cell]
    macs = gates * H * (E + H) + (LAYERS - 1) * gates * H * (H + H) + H * V
    return 3 * 2 * macs


# -------------------------------------------------------------------------------------------- training


class Baseline(nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](E, H, LAYERS, batch_first=True)
        self.head = nn.Linear(H, V)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        out, state = self.rnn(self.embed(x), state)
        return self.head(out), state


def baseline_train_rate(cell: str, precision: str, steps: int) -> float:
    """The textbook loop: embedding -> nn.LSTM -> linear, AdamW, clip, carried detached state."""
    torch.manual_seed(0)
    model = Baseline(cell)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids = torch.randint(0, V, (B, T + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    state = None

    def one() -> None:
        nonlocal state
        with autocast(precision):
            logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()

    def rate() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            one()
        return steps * B * T / (time.perf_counter() - start)

    one()
    return rate()


def charlm_train_rate(cell: str, precision: str, steps: int, corpus: object) -> float:
    """charlm's own train(): steps after the first two are timed from its progress events."""
    stamps: dict[int, float] = {}

    def listen(event: object) -> None:
        if isinstance(event, Stepped):
            stamps[event.step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        train(
            corpus,
            model=ModelConfig(cell=cell, hidden_size=H, num_layers=LAYERS, embed_size=E),  # type: ignore[arg-type]
            config=TrainConfig(
                steps=steps + 2,
                batch_size=B,
                seq_len=T,
                eval_every=10_000,
                precision=precision,
                device="cpu",
                warmup=1,
                log_every=steps + 2,
            ),
            out=Path(folder) / "b.safetensors",
            on_event=listen,
        )
    return steps * B * T / (stamps[steps + 2] - stamps[2])


# ------------------------------------------------------------------------------------------ evaluation


def baseline_eval_rate(ids: np.ndarray, precision: str) -> float:
    """A plain batched forward loop over B streams with carried state, no_grad."""
    model = Baseline("lstm").eval()
    streams = 64
    n = len(ids) // streams * streams
    data = torch.from_numpy(ids[:n].astype(np.int64)).view(streams, -1)
    start = time.perf_counter()
    with torch.no_grad(), autocast(precision):
        state, total = None, torch.zeros(())
        for k in range(0, data.shape[1] - 1, 256):
            x, y = data[:, k : k + 256], data[:, k + 1 : k + 257]
            x = x[:, : y.shape[1]]
            logits, state = model(x, state)
            total += F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), reduction="sum")
    return n / (time.perf_counter() - start)


def charlm_eval_rate(ids: np.ndarray, precision: str) -> float:
    model = CharRNN(ModelConfig(vocab_size=V, cell="lstm", hidden_size=H, num_layers=LAYERS, embed_size=E))
    return evaluate(model, ids, start_id=0, batch_size=64, precision=precision).chars_per_sec


# -------------------------------------------------------------------------------------------- sampling


def baseline_sample_rate(streams: int, length: int) -> float:
    """Feeding one character at a time through nn.LSTM, multinomial draw each step."""
    model = Baseline("lstm").eval()
    x = torch.zeros(streams, 1, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        state = None
        for _ in range(length):
            logits, state = model(x, state)
            x = torch.multinomial(F.softmax(logits[:, -1], -1), 1)
    return streams * length / (time.perf_counter() - start)


def charlm_sample_rate(
    streams: int, length: int, precision: str = "fp32", cell: str = "lstm", hidden: int = H
) -> float:
    from charlm.vocab import Vocab

    model = CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden_size=hidden, num_layers=LAYERS, embed_size=E))
    sampler = Sampler(model, Vocab([chr(32 + i) for i in range(V)]), weight_format=precision)
    sampler.step_for(streams)  # the step is made (weights packed, compiled code loaded) before timing
    start = time.perf_counter()
    for _ in sampler.stream("a", length=length, num_samples=streams, rng_seed=0):
        pass
    return streams * length / (time.perf_counter() - start)


# -------------------------------------------------------------------------------------------- coding


CODING_CHARS = 100_000  # cut as archives cut it (compress.ARCHIVE_CUTS): 24 segments of ~4,200 characters


CODING_MODES = {  # name: (adapt, portable), label
    "float": ((False, False), "float static (format 2 --no-adapt)"),
    "float-adapt": ((True, False), "float learning (format 2 default; now --machine-bound)"),
    "portable": ((False, True), "portable static (--no-adapt)"),
    "portable-adapt": ((True, True), "portable, output layer learning (default)"),
}


def coding_rates(mode: str) -> tuple[float, float]:
    """(encode, decode) chars/s of the default model (GRU 2x256, V=96) over generated text, one
    thread, in one of CODING_MODES."""
    from charlm.compress.coder import decode_segments, encode_segments, exact_arithmetic, known_ids
    from charlm.compress.container import ARCHIVE_CUTS
    from charlm.vocab import Vocab, text_to_codes

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=V, cell="gru", hidden_size=256, num_layers=LAYERS, embed_size=E)).eval()
    vocab = Vocab([chr(32 + i) for i in range(V - 1)] + ["\n"])
    codes = text_to_codes(text(CODING_CHARS, seed=3))
    ids = known_ids(vocab, codes)
    segments = ARCHIVE_CUTS.count(len(codes))
    (adapt, portable), _ = CODING_MODES[mode]
    options = dict(adapt=adapt, portable=portable)
    with exact_arithmetic(1):
        start = time.perf_counter()
        words, _, probe = encode_segments(model, vocab, codes, ids, segments, **options)
        encode = len(codes) / (time.perf_counter() - start)
        start = time.perf_counter()
        decoded, _ = decode_segments(model, vocab, words, len(codes), expected_fingerprint=probe, **options)
        decode = len(codes) / (time.perf_counter() - start)
    assert decoded is not None and np.array_equal(decoded, codes)
    return encode, decode


# ---------------------------------------------------------------------------------------- corpus, CLI


def write_corpus(path: Path, megabytes: int) -> None:
    block = text(1 << 20, seed=1).encode()
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)


def encode_and_train_rss(path: Path) -> dict:
    """In a fresh process: encode the file (first run, cache empty), then train 3 steps; peak RSS."""
    code = (
        "import time,resource,sys; t=time.perf_counter();"
        "from charlm.data import load_corpus; c=load_corpus(sys.argv[1]); enc=time.perf_counter()-t;"
        "from charlm.trainer import train, TrainConfig; from charlm.model import ModelConfig;"
        "r=train(sys.argv[1], model=ModelConfig(hidden_size=128, embed_size=32), config=TrainConfig(steps=3,"
        " eval_every=10**6, device='cpu', val_fraction=0.0001), out=sys.argv[2]);"
        "print(enc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "CHARLM_CACHE_DIR": folder}
        done = subprocess.run(
            [sys.executable, "-c", code, str(path), f"{folder}/m.safetensors"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    seconds, rss_kb = done.stdout.split()
    size = path.stat().st_size
    return {
        "bytes": size,
        "encode_s": float(seconds),
        "encode_mb_per_s": size / 1e6 / float(seconds),
        "peak_rss_mb": int(rss_kb) / 1024,
    }


def command_seconds(args: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(args, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; skip the 1 GB corpus")
    parser.add_argument("--only", default="", help="comma-separated sections: peak,train,eval,sample,coding,corpus,cli")
    parser.add_argument(
        "--name",
        default=f"{dt.date.today().isoformat()}-{socket.gethostname()}",
        help="results file name (bench/results/NAME.json)",
    )
    args = parser.parse_args()
    configure_cpu()
    repeats = 2 if args.quick else 3
    steps = 4 if args.quick else 8
    sections = (
        set(args.only.split(",")) if args.only else {"peak", "train", "eval", "sample", "coding", "corpus", "cli"}
    )
    results: dict = {
        "machine": machine(),
        "config": {"vocab": V, "embed": E, "hidden": H, "layers": LAYERS, "batch": B, "seq_len": T},
    }
    rows: list[tuple[str, str, str, str]] = []

    if "peak" in sections or "train" in sections:
        peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
        results["matmul_peak_gflops"] = {k: v / 1e9 for k, v in peaks.items()}
        rows.append(
            (
                "matmul peak",
                "fp32 / bf16",
                f"{peaks['fp32'] / 1e9:.0f} / {peaks['bf16'] / 1e9:.0f} GFLOP/s",
                f"bf16 {peaks['bf16'] / peaks['fp32']:.2f}x",
            )
        )

    if "train" in sections:
        corpus = corpus_from_text(text(3_000_000), name="bench")
        results["train"] = {}
        base_fp32 = {}
        for cell in ("lstm", "gru"):
            for precision in ("fp32", "bf16"):
                base = median_rate(lambda: baseline_train_rate(cell, precision, steps), repeats)  # noqa: B023
                ours = median_rate(lambda: charlm_train_rate(cell, precision, steps, corpus), repeats)  # noqa: B023
                if precision == "fp32":
                    base_fp32[cell] = base
                flops = ours * train_flops_per_char(cell)
                peak_frac = flops / peaks[precision]
                results["train"][f"{cell}-{precision}"] = {
                    "charlm_chars_per_sec": ours,
                    "baseline_chars_per_sec": base,
                    "ratio": ours / base,
                    "vs_fp32_baseline": ours / base_fp32[cell],
                    "gflops": flops / 1e9,
                    "peak_fraction": peak_frac,
                }
                rows.append(
                    (
                        f"train {cell} 2x512",
                        precision,
                        f"{ours:,.0f} chars/s",
                        f"{ours / base:.2f}x baseline ({base:,.0f}); {ours / base_fp32[cell]:.2f}x fp32 "
                        f"baseline; {peak_frac:.0%} of peak",
                    )
                )

    if "eval" in sections:
        ids = np.frombuffer(text(1_000_000).encode(), dtype=np.uint8) % V
        results["eval"] = {}
        base_fp32 = 0.0
        for precision in ("fp32", "bf16"):
            base = median_rate(lambda: baseline_eval_rate(ids, precision), repeats)  # noqa: B023
            ours = median_rate(lambda: charlm_eval_rate(ids, precision), repeats)  # noqa: B023
            base_fp32 = base_fp32 or base
            results["eval"][precision] = {
                "charlm_chars_per_sec": ours,
                "baseline_chars_per_sec": base,
                "ratio": ours / base,
                "vs_fp32_baseline": ours / base_fp32,
            }
            rows.append(
                (
                    "perplexity 1 MB, LSTM 2x512",
                    precision,
                    f"{ours:,.0f} chars/s",
                    f"{ours / base:.2f}x baseline ({base:,.0f}); {ours / base_fp32:.2f}x fp32 baseline",
                )
            )

    if "sample" in sections:
        # "int8" is the per-character step charlm sampled with before the integer model (and still uses
        # for more than 16 streams), "fixed" the compiled integer step that `auto` now picks on a CPU
        results["sample"] = {}
        for (cell, hidden), streams, length in (
            (("gru", 256), 1, 3000),
            (("lstm", H), 1, 3000),
            (("lstm", H), 64, 120),
        ):
            model_name = f"{cell.upper()} 2x{hidden}"
            base = median_rate(lambda: baseline_sample_rate(streams, length // 3), repeats)  # noqa: B023
            for name in ("fp32", "bf16", "int8", "fixed"):
                if name == "fixed" and streams > 16:
                    continue  # (more streams than FIXED_MAX_STREAMS run the torch step)
                ours = median_rate(lambda: charlm_sample_rate(streams, length, name, cell, hidden), repeats)  # noqa: B023
                results["sample"][f"{cell}-{hidden}-{streams}-{name}"] = {
                    "charlm_chars_per_sec": ours,
                    "baseline_chars_per_sec": base,
                    "ratio": ours / base,
                }
                rows.append(
                    (
                        f"sample {model_name}, {streams} stream{'s' if streams > 1 else ''}",
                        name,
                        f"{ours:,.0f} chars/s",
                        f"{ours / base:.1f}x LSTM 2x512 baseline ({base:,.0f})",
                    )
                )

    if "coding" in sections:
        results["coding"] = {}
        for mode in CODING_MODES:
            encode, decode = coding_rates(mode)
            results["coding"][mode] = {"encode_chars_per_sec": encode, "decode_chars_per_sec": decode}
        before = results["coding"]["float-adapt"]
        for mode, (_, label) in CODING_MODES.items():
            r = results["coding"][mode]
            rows.append(
                (
                    f"compress GRU 2x256, {CODING_CHARS:,} chars",
                    label,
                    f"{r['encode_chars_per_sec']:,.0f} / {r['decode_chars_per_sec']:,.0f} chars/s",
                    f"encode / decode; {r['encode_chars_per_sec'] / before['encode_chars_per_sec']:.2f}x / "
                    f"{r['decode_chars_per_sec'] / before['decode_chars_per_sec']:.2f}x format 2's default",
                )
            )

    if "corpus" in sections:
        results["corpus"] = {}
        with tempfile.TemporaryDirectory() as folder:
            for megabytes in (100,) if args.quick else (100, 1000):
                path = Path(folder) / f"c{megabytes}.txt"
                write_corpus(path, megabytes)
                figures = encode_and_train_rss(path)
                path.unlink()
                results["corpus"][f"{megabytes}MB"] = figures
                rows.append(
                    (
                        f"corpus {megabytes} MB: encode + train 3 steps",
                        "",
                        f"{figures['encode_mb_per_s']:.0f} MB/s",
                        f"peak RSS {figures['peak_rss_mb']:.0f} MB",
                    )
                )

    if "cli" in sections:
        charlm_cmd = [sys.executable, "-m", "charlm"]
        results["cli"] = {"help_s": command_seconds([*charlm_cmd, "--help"])}
        rows.append(("charlm --help", "", f"{results['cli']['help_s']:.3f} s", "wall time, median of 5"))

    finish(
        f"charlm benchmarks on {results['machine']['cpu']} ({results['machine']['threads']} threads), "
        f"torch {torch.__version__}",
        rows,
        results,
        args.name,
    )


if __name__ == "__main__":
    main()
