"""The `charlm` command: a thin skin over the Python API.

Each command parses options, makes one API call and renders the result. torch is imported inside
the commands that need it, so `charlm --help` and `charlm info` start fast. User mistakes print
one line and exit 2; bugs print one line plus the path of a log holding the traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .config import (
    BY_HEART_SEQ_LEN,
    DEEP_DROPOUT_PASSES,
    DEEP_HIDDEN,
    DEEP_LAYERS,
    DEEP_PASSES,
    DEEP_PASSES_SHORT,
    DEFAULT_BATCH,
    DEFAULT_LAYERS,
    DEFAULT_MIN_LR_RATIO,
    DEFAULT_SEQ_LEN,
    DEFAULT_WEIGHT_DECAY,
    DROPOUT,
    DROPOUT_MIN_LR_RATIO,
    DROPOUT_PASSES,
    LARGE_VOCAB,
    LONG_DEEP_DROPOUT_CHARS,
    LONG_DEEP_DROPOUT_PASSES,
    MANY_PASSES,
    MANY_PASSES_LR,
    MANY_PASSES_WEIGHT_DECAY,
    SHORT_BUDGET_S,
    SMALL_BATCH,
    Cell,
    Init,
    ModelConfig,
    Schedule,
    TrainConfig,
    TrainPrecision,
    budget_hidden_size,
    choices,
    default,
    parse_duration,
)
from .console import error_line, info, set_verbosity, warning_line
from .version import __version__

if TYPE_CHECKING:
    from rich.text import Text

    from .evaluate import Metrics
    from .lm import CharLM

# The regime of dropout, the rate floor and short chunks (training/sizing.learns_by_heart), for their help;
# short chunks apply only up to SHORT_BUDGET_S, where three layers always take it from DEEP_DROPOUT_PASSES
SYMBOLS = f"of up to {LARGE_VOCAB:,} distinct symbols"
BY_HEART_SHORT = f"{DROPOUT_PASSES:g} times or more ({DEEP_DROPOUT_PASSES:g} at {DEEP_LAYERS} layers), {SYMBOLS}"
BY_HEART = (
    f"{DROPOUT_PASSES:g} times or more ({DEEP_DROPOUT_PASSES:g} at {DEEP_LAYERS} layers, {LONG_DEEP_DROPOUT_PASSES:g} "
    f"in a --time over {SHORT_BUDGET_S // 60}m, more past {LONG_DEEP_DROPOUT_CHARS // 1_000_000}M training "
    f"characters), {SYMBOLS}"
)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True}


def _verbosity(f: Callable) -> Callable:
    f = click.option("-q", "--quiet", is_flag=True, help="Show only errors on stderr.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Show more detail on stderr.")(f)
    return f


def _checkpoint_option(f: Callable) -> Callable:
    return click.option(
        "--checkpoint",
        "-c",
        type=click.Path(dir_okay=True, path_type=Path),
        default=None,
        help="Checkpoint to use.  [default: the newest in ./checkpoints]",
    )(f)


def _device_option(f: Callable) -> Callable:
    return click.option("--device", default="auto", help="auto picks cuda > mps > cpu; or cpu, cuda, cuda:N, mps.")(f)


def _threads_option(f: Callable) -> Callable:
    return click.option(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch; fixing it makes results repeat exactly.  [default: adapt: one "
        "thread or all cores, whichever runs faster under the machine's current load]",
    )(f)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="charlm")
def cli() -> None:
    """Character-level language models: train on any text, sample from them, score text.

    \b
      charlm train corpus.txt          learn a model (checkpoints/corpus.safetensors)
      charlm sample --seed "Once"      continue a text with the newest checkpoint
      charlm perplexity other.txt      score a file: cross-entropy, perplexity, bits/char
    """


# ------------------------------------------------------------------------------------------------ train


M, T = ModelConfig, TrainConfig


@cli.command(context_settings=CONTEXT, short_help="Train a model on text files, folders or stdin.")
@click.argument("corpus", nargs=-1, required=True)
@click.option(
    "--glob",
    "pattern",
    default="*",
    show_default=True,
    help="Which files to train on in a folder given as CORPUS (searched recursively; hidden ones skipped).",
)
@click.option(
    "--model",
    "cell",
    type=click.Choice(choices(Cell)),
    default=default(M, "cell"),
    help="Recurrent cell: LSTM, GRU, or Elman RNN with tanh (rnn) or ReLU (rnn-relu).",
)
@click.option(
    "--layers",
    type=int,
    default=None,
    help=f"Stacked recurrent layers.  [default: {DEFAULT_LAYERS}; {DEEP_LAYERS} (with --hidden {DEEP_HIDDEN}) "
    f"for a --time up to 30m whose plain model will see its text often: {DEEP_PASSES_SHORT:g} times or more at "
    f"2x256 up to 6m, {DEEP_PASSES:g} at 2x384 over 6m, for up to {LARGE_VOCAB:,} distinct symbols]",
)
@click.option(
    "--hidden",
    type=int,
    default=None,
    help="Hidden units per layer.  [default: from the budget: "
    f"{budget_hidden_size(360)} for --time up to 6m, {budget_hidden_size(1800)} up to 30m, else "
    f"{budget_hidden_size(None)}]",
)
@click.option("--embed", type=int, default=default(M, "embed_size"), help="Character embedding size.")
@click.option(
    "--dropout",
    type=float,
    default=default(M, "dropout"),
    help="Dropout on embeddings, between layers and before the output, one mask per sequence (locked).  "
    "[default: 0, or "
    f"{DROPOUT:g} when the run will see its text {BY_HEART}]",
)
@click.option(
    "--weight-drop",
    type=float,
    default=default(M, "weight_drop"),
    help="DropConnect on the recurrent weights while training (one mask per step; keeps the fused kernel).",
)
@click.option(
    "--init",
    type=click.Choice(choices(Init)),
    default=default(M, "init"),
    help="Weight initialisation (orthogonal = orthogonal recurrent, Xavier input weights).",
)
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help=f"Characters per chunk: the truncated-BPTT length.  [default: {DEFAULT_SEQ_LEN}, or {BY_HEART_SEQ_LEN} when "
    f"a run of up to {SHORT_BUDGET_S // 60} minutes will see its text {BY_HEART_SHORT}]",
)
@click.option(
    "--batch-size",
    type=int,
    default=default(T, "batch_size"),
    help=f"Parallel text streams per step.  [default: {DEFAULT_BATCH}, or {SMALL_BATCH} when the run will see its text "
    f"{MANY_PASSES:g} times or more]",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help=f"Peak learning rate (AdamW).  [default: 2e-3 x 512 / --hidden, x {MANY_PASSES_LR:g} when the run will see "
    f"its text {MANY_PASSES:g} times or more]",
)
@click.option(
    "--weight-decay",
    type=float,
    default=None,
    help=f"AdamW weight decay on weight matrices.  [default: {DEFAULT_WEIGHT_DECAY:g}, or {MANY_PASSES_WEIGHT_DECAY:g} "
    f"when the run will see its text {MANY_PASSES:g} times or more]",
)
@click.option("--clip", type=float, default=default(T, "clip"), help="Clip the global gradient norm to this (0 = off).")
@click.option(
    "--average",
    type=float,
    default=default(T, "average"),
    help="Validate and save the moving average of the weights with this decay per step (0 = the last weights).",
)
@click.option(
    "--schedule",
    type=click.Choice(choices(Schedule)),
    default=default(T, "schedule"),
    help="Learning-rate decay after warmup; auto = cosine to the budget when there is one, else reduce-on-plateau.",
)
@click.option("--warmup", type=int, default=default(T, "warmup"), help="Linear warmup steps.")
@click.option(
    "--min-lr-ratio",
    type=float,
    default=None,
    help=f"Floor of every decay, as a fraction of --lr.  [default: {DEFAULT_MIN_LR_RATIO:g}, or "
    f"{DROPOUT_MIN_LR_RATIO:g} when the run will see its text {BY_HEART}]",
)
@click.option("--lr-decay", type=float, default=default(T, "lr_decay"), help="Exponential schedule: factor per epoch.")
@click.option("--steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--epochs", type=float, default=None, help="Stop after this many passes over the text.")
@click.option(
    "--time",
    "time_budget",
    default=None,
    help="Stop after this long, e.g. 90s, 5m, 2h: the whole run, "
    "final validation and checkpoints included (start-up aside).",
)
@click.option(
    "--patience",
    type=int,
    default=default(T, "patience"),
    help="Stop when validation has not improved for this many evaluations (0 = never).",
)
@click.option(
    "--eval-every",
    type=int,
    default=default(T, "eval_every"),
    help="Steps between validations (0 = auto: validation costs about 3% of the time).",
)
@click.option(
    "--val-fraction", type=float, default=default(T, "val_fraction"), help="Tail of the text held out for validation."
)
@click.option(
    "--max-val-chars",
    type=int,
    default=default(T, "max_val_chars"),
    help="Cap on the held-out tail, so a big corpus spends its budget training; the rest trains.",
)
@click.option(
    "--min-count",
    type=int,
    default=default(T, "min_count"),
    help="Characters seen fewer times share one "
    "unknown symbol (for vocabularies of thousands); scores spread its probability evenly over them.  "
    "[default: auto: fold the rarest until the output layer costs no more than the recurrent layers, "
    "at most 2% of the text; nothing for English text or code]",
)
@click.option(
    "--save-every",
    default="5m",
    help="Longest time between resume checkpoints (they are also written at every evaluation and on Ctrl-C).",
)
@click.option(
    "--rng-seed",
    type=int,
    default=default(T, "rng_seed"),
    help="Random seed: the same seed, CPU and --threads give the same model.",
)
@_device_option
@click.option(
    "--precision",
    type=click.Choice(choices(TrainPrecision)),
    default=default(T, "precision"),
    help="auto = bf16 autocast where the hardware is fast at it (CUDA, AMX/AVX512-BF16 CPUs).",
)
@_threads_option
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Best checkpoint path.  [default: checkpoints/<corpus name>.safetensors, or <name>-2, -3, ... "
    "when an earlier run has that name]",
)
@click.option("--overwrite", is_flag=True, help="Replace the run already at the checkpoint path instead of keeping it.")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    help="Continue the interrupted run (the newest .last.safetensors of the corpus name, or PATH).",
)
@click.option(
    "--init-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Fine-tune: start from this checkpoint's weights (its vocab is extended if needed).",
)
@click.option(
    "--tensorboard",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Also log losses, bits/char and the learning rate for TensorBoard to DIR (needs the tensorboard package).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results on stdout.")
@_verbosity
def train(
    corpus: tuple[str, ...],
    pattern: str,
    cell: str,
    layers: int | None,
    hidden: int | None,
    embed: int,
    dropout: float,
    weight_drop: float,
    init: str,
    time_budget: str | None,
    save_every: str,
    resume: str | None,
    init_from: Path | None,
    out: Path | None,
    overwrite: bool,
    tensorboard: Path | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
    **options: Any,
) -> int:
    """Train a model on CORPUS: a UTF-8 text file, or a built-in corpus name (shakespeare, python-stdlib).

    Several files, folders and - (stdin) are documents joined by U+001E (RECORD SEPARATOR), which the
    model learns; validation is the last whole documents, and --resume refuses a changed set of files.

    Reports cross-entropy (nats/char), perplexity (e^CE) and bits/char (CE / ln 2) on the held-out tail.
    Ctrl-C (or SIGTERM) stops at the next step, writes the resume checkpoint and exits 130 (143).
    """
    from . import distributed

    rank0 = distributed.from_environment().is_main  # under torchrun only rank 0 talks
    set_verbosity(quiet=quiet or not rank0, verbose=verbose)
    from .console import TrainView, fmt_loss
    from .trainer import train as run

    if resume is not None and init_from is not None:
        raise click.UsageError(
            "--resume and --init-from do not go together: resume continues a run, --init-from starts a new one"
        )
    model_values = {
        "cell": cell,
        "num_layers": layers or 0,
        "hidden_size": hidden or 0,
        "embed_size": embed,
        "dropout": dropout,
        "weight_drop": weight_drop,
        "init": init,
    }
    train_values = dict(
        options,
        time=parse_duration(time_budget) if time_budget else None,
        save_every=parse_duration(save_every, "--save-every"),
    )
    # Only the options typed go to the library, which puts them on top of the defaults, or with
    # --resume on top of the interrupted run's settings (an option left alone keeps the run's value).
    flag_of = {"layers": "num_layers", "hidden": "hidden_size", "embed": "embed_size", "time_budget": "time"}
    ctx = click.get_current_context()
    typed = {
        flag_of.get(name, name)
        for name in ctx.params
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }
    view = TrainView()
    sinks: list[Any] = [view]  # each takes every event and has close()
    if tensorboard is not None:
        from .tensorboard import TensorBoardLog

        sinks.append(TensorBoardLog(tensorboard))

    def on_event(event: Any) -> None:
        for sink in sinks:
            sink(event)

    try:
        result = run(
            corpus[0] if len(corpus) == 1 else list(corpus),
            model={k: v for k, v in model_values.items() if k in typed},
            config={k: v for k, v in train_values.items() if k in typed},
            out=out,
            resume=False if resume is None else Path(resume) if resume else True,
            init_from=init_from,
            overwrite=overwrite,
            on_event=on_event,
            glob=pattern,
        )
    finally:
        for sink in sinks:
            sink.close()
    if as_json and rank0:
        click.echo(json.dumps(result.to_dict()))
    why = {
        "steps": "step budget reached",
        "epochs": "epoch budget reached",
        "time": "time budget reached",
        "patience": "validation stopped improving",
        "interrupted": "interrupted; resume with --resume",
    }
    info(
        f"done: {why.get(result.stopped, result.stopped)} after {result.steps} steps ({result.epochs:.2f} epochs, "
        f"{result.elapsed_s:.0f}s, {result.chars_per_sec:,.0f} chars/s)"
    )
    info(f"best validation (step {result.best_step}): {fmt_loss(result.val_loss)}")
    info(f"checkpoint: {result.checkpoint}  (resume file: {result.last_checkpoint})")
    from .console import err, verbosity

    if err.is_terminal and verbosity() >= 1 and not result.exit_code:
        from .plot import show_training_curve

        show_training_curve(result.metrics_log, sys.stderr, color=not err.no_color)
    return result.exit_code


# ----------------------------------------------------------------------------------------------- sample


@cli.command(context_settings=CONTEXT, short_help="Generate text that continues a seed.")
@_checkpoint_option
@click.option(
    "--seed",
    "-s",
    default="",
    help="Text to continue. Empty: start as at the beginning of a text (the model is primed with a newline).",
)
@click.option("--length", "-n", type=int, default=500, help="Characters to generate after the seed.")
@click.option(
    "--temperature",
    "-t",
    type=float,
    default=1.0,
    help="Below 1 is safer, above 1 wilder; 0 = always the most likely character.",
)
@click.option("--top-k", type=int, default=None, help="Draw only from the K most likely characters.")
@click.option(
    "--top-p",
    type=float,
    default=None,
    help="Draw only from the smallest set of characters whose "
    "probability reaches P (nucleus). Order: temperature, then top-k, then top-p.",
)
@click.option(
    "--seed-file",
    type=str,
    default=None,
    help="Let the model read this file (or - for stdin) before --seed, streamed, however long; "
    "characters it does not know are skipped and counted.",
)
@click.option(
    "--stop",
    multiple=True,
    help="End a sample when it writes this string (left out; see --include-stop). Repeatable; each "
    "sample stops on its own.  [default: none: --length ends it]",
)
@click.option("--include-stop", is_flag=True, help="Keep the stop string that ended a sample at its end.")
@click.option(
    "--adapt",
    is_flag=True,
    help="Let the model learn from the seed (and --seed-file) as it reads them, as `compress` does, "
    "before it writes: a prompt in a new style is continued in that style. Slower.",
)
@click.option("--lines", type=int, default=None, help="End a sample after this many newlines.")
@click.option(
    "--beam",
    type=int,
    default=None,
    help="Write the most likely continuation a beam of N finds instead of a random one (1 = greedy); "
    "--json adds its log-probability.",
)
@click.option("--num-samples", type=int, default=1, help="Samples generated together as one batch.")
@click.option("--separator", default="-" * 40, help="Line printed between samples when --num-samples > 1.")
@click.option("--rng-seed", type=int, default=None, help="Random seed for reproducible samples.  [default: random]")
@_device_option
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "int8", "fixed"]),
    default="auto",
    show_default=True,
    help="How each character is computed: fixed (the model in integers, one compiled call per "
    "character; auto on a CPU with numba, up to 16 samples at once) is fastest on a CPU, int8 next on an "
    "x86 CPU, bf16 on a GPU (auto there); fp32 gives the model's exact probabilities.",
)
@_threads_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"samples": [...], "checkpoint": ..., "chars_per_sec": ...} instead of text.',
)
@_verbosity
def sample(
    checkpoint: Path | None,
    seed: str,
    length: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed_file: str | None,
    stop: tuple[str, ...],
    include_stop: bool,
    adapt: bool,
    lines: int | None,
    beam: int | None,
    num_samples: int,
    separator: str,
    rng_seed: int | None,
    device: str,
    precision: str,
    threads: int | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Generate text that continues --seed, streamed to stdout as it is written."""
    set_verbosity(quiet=quiet, verbose=verbose)
    from .errors import ConfigError, CorpusError
    from .lm import CharLM
    from .sample import check_options, check_stops, encode_seed

    check_options(length=length, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples)
    check_stops(stop, lines)
    if beam is not None and num_samples != 1:
        raise ConfigError("--beam writes one continuation, the most likely", "leave out --num-samples")
    if beam is not None and adapt:
        raise ConfigError("--adapt and --beam do not go together", "leave out one of them")
    if seed_file is not None and seed_file != "-" and not Path(seed_file).is_file():
        raise CorpusError(f"--seed-file {seed_file}: no such file", "give a text file, or - to read stdin")
    lm = CharLM.load(checkpoint, device=device, sample_precision=precision, threads=threads)
    encode_seed(seed, lm.vocab)
    info(f"checkpoint: {lm.path}")
    if beam is None and not adapt:  # the step is ready before the clock starts: numba compiles it once per machine
        prepared = time.perf_counter()
        lm.sampler.step_for(num_samples)
        spent = time.perf_counter() - prepared
        if spent > 2:
            info(f"compiled the integer step for this CPU in {spent:.0f}s (once: numba keeps it)")
    began = time.perf_counter()
    options = {"stop": stop, "lines": lines, "include_stop": include_stop, "seed_file": seed_file}
    if beam is not None:
        text, logp = lm.beam_search(seed, beam=beam, length=length, **options)
        _report_skipped(lm, seed_file)
        if as_json:
            out = {
                "samples": [text],
                "log_probability": logp,
                "bits": -logp / math.log(2),
                "checkpoint": str(lm.path),
                "beam": beam,
            }
            click.echo(json.dumps(out, ensure_ascii=False))
        else:
            click.echo(text)
        info(f"beam {beam}: {len(text) - len(seed):,} characters, log-probability {logp:.3f} nats")
        return
    chunks = lm.stream_batch(
        seed,
        length=length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        rng_seed=rng_seed,
        adapt=adapt,
        **options,
    )
    if as_json:
        columns = list(chunks)
        elapsed = time.perf_counter() - began
        _report_skipped(lm, seed_file)
        samples = [seed + "".join(col[i] for col in columns) for i in range(num_samples)]
        written = sum(len(s) - len(seed) for s in samples)
        out = {"samples": samples, "checkpoint": str(lm.path), "chars_per_sec": written / elapsed}
        if stop or lines is not None:
            out["stopped"] = [rule.stopped or "length" for rule in lm.sampler.rules]
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    stdout = sys.stdout
    stdout.write(seed)
    rest: list[list[str]] = [[] for _ in range(num_samples - 1)]
    last_flush = time.perf_counter()
    written, reported = 0, False
    for pieces in chunks:
        if not reported:  # the seed file has been read by now
            _report_skipped(lm, seed_file)
            reported = True
        written += sum(len(p) for p in pieces)
        stdout.write(pieces[0])
        for i, piece in enumerate(pieces[1:]):
            rest[i].append(piece)
        now = time.perf_counter()
        if "\n" in pieces[0] or now - last_flush > 0.03:
            stdout.flush()
            last_flush = now
    elapsed = time.perf_counter() - began
    for chars in rest:
        stdout.write(f"\n{separator}\n{seed}{''.join(chars)}")
    stdout.write("\n")
    stdout.flush()
    info(f"{written:,} characters in {elapsed:.2f}s ({written / elapsed:,.0f} chars/s)")


def _report_skipped(lm: CharLM, seed_file: str | None) -> None:
    if seed_file is not None and lm.skipped:
        info(f"--seed-file: skipped {lm.skipped:,} characters the model does not know")


# ------------------------------------------------------------------------------------------- perplexity


@cli.command(context_settings=CONTEXT, short_help="Score files: cross-entropy, perplexity, bits/char, and where.")
@click.argument("files", nargs=-1, required=True)
@_checkpoint_option
@click.option(
    "--batch-size",
    type=int,
    default=64,
    help="Parallel streams the text is cut into (each at "
    "least 4096 chars); the B-1 stream starts are scored with less context.",
)
@click.option(
    "--unknown",
    type=click.Choice(["skip", "error"]),
    default="skip",
    help="Characters the model never saw: skip (drop and count them) or error.",
)
@click.option(
    "--glob",
    "pattern",
    default="*",
    show_default=True,
    help="Which files to score in a folder given as FILE (searched recursively; hidden ones skipped).",
)
@click.option(
    "--show",
    is_flag=True,
    help="Print the text with each character coloured by the bits it cost (0 to 12+ bits, legend "
    "first); a long text by its most surprising lines.",
)
@click.option(
    "--show-lines",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="With --show: a text with more lines shows only this many, the most surprising first.",
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a self-contained page: the text as a heat map with the model's top guesses on hover.",
)
@click.option(
    "--per-line",
    is_flag=True,
    help="JSON Lines on stdout, one object per line of the text: line, chars, cross_entropy, bpc, text.",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=None,
    help="With --per-line: only the N most surprising lines, most surprising first.",
)
@click.option(
    "--adapt",
    is_flag=True,
    help="Dynamic evaluation: the model keeps learning from the text as it scores it, as `compress` "
    "does, so recurring names and phrases cost less. Slower; the static figure is the default.",
)
@_device_option
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    help="auto = bf16 autocast where the hardware is fast at it, as in training, so the validation "
    "figure of `train` is reproduced; fp32 for the exact float32 score.",
)
@_threads_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_verbosity
def perplexity(
    files: tuple[str, ...],
    checkpoint: Path | None,
    batch_size: int,
    unknown: str,
    pattern: str,
    show: bool,
    show_lines: int,
    html_out: Path | None,
    per_line: bool,
    top: int | None,
    adapt: bool,
    device: str,
    precision: str,
    threads: int | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Score FILES: cross-entropy (nats/char), perplexity and bits/char under a model.

    One file: its figures, and with --show, --html or --per-line where in it the model was surprised
    (anomaly detection: the odd lines come out on top). Several files or folders: a table of every
    file, most surprising first, and the total; unreadable or binary files are listed as skipped.
    """
    set_verbosity(quiet=quiet, verbose=verbose)
    from .corpora import resolve
    from .data import check_text_file, text_files
    from .errors import CharlmError, ConfigError
    from .lm import CharLM

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
    if top is not None and not per_line:
        raise click.UsageError("--top goes with --per-line")
    views = [flag for flag, on in (("--show", show), ("--html", html_out), ("--per-line", per_line)) if on]
    if len(files) == 1 and not Path(files[0]).is_dir():
        path, _ = resolve(files[0])
        check_text_file(path, reader="model")  # before the model loads: FILE may be a checkpoint given by mistake
        if html_out is not None:
            _check_html_out(html_out, path)
        lm = CharLM.load(checkpoint, device=device, precision=precision, threads=threads)
        info(f"checkpoint: {lm.path}")
        if views:
            _surprise_views(
                lm,
                path,
                batch_size,
                show=show,
                show_lines=show_lines,
                html_out=html_out,
                per_line=per_line,
                top=top,
                as_json=as_json,
                adapt=adapt,
            )
            return
        m = lm.perplexity(path, batch_size=batch_size, unknown=unknown, adapt=adapt)  # type: ignore[arg-type]
        if as_json:
            click.echo(json.dumps(_file_figures(m, lm.path, adapt=adapt), ensure_ascii=False))
            return
        _print_file_figures(path, m)
        return
    if views:
        raise click.UsageError(f"{' and '.join(views)} show one text: give one FILE")
    found, skipped = text_files([Path(f) for f in files], pattern)
    if not found:
        raise ConfigError(
            f"no text file to score in {', '.join(files)}"
            + (f" ({len(skipped)} skipped: {skipped[0][1]})" if skipped else ""),
            "check the paths and --glob",
        )
    lm = CharLM.load(checkpoint, device=device, precision=precision, threads=threads)
    info(f"checkpoint: {lm.path}")
    scored: list[tuple[Path, Metrics]] = []
    for path in found:
        try:
            m = lm.perplexity(path, batch_size=batch_size, unknown=unknown, adapt=adapt)  # type: ignore[arg-type]
            scored.append((path, m))
        except CharlmError as e:  # a file that cannot be scored is reported, not fatal
            skipped.append((path, e.message))
    _print_many(scored, skipped, lm.path, as_json=as_json, adapt=adapt)


def _file_figures(m: Metrics, checkpoint: Path | None, *, adapt: bool = False) -> dict:
    """The single-file --json object (its keys are a promise: scripts read them; "adapted" only with --adapt)."""
    return {
        "chars": m.chars,
        "unknown": m.unknown,
        "unknown_chars": m.unknown_chars,
        "cross_entropy": m.cross_entropy,
        "perplexity": m.perplexity,
        "bpc": m.bpc,
        "chars_per_sec": m.chars_per_sec,
        "checkpoint": str(checkpoint),
        "streams": m.streams,
        **({"adapted": True} if adapt else {}),
    }


def _print_file_figures(path: Path, m: Metrics) -> None:
    from rich.table import Table

    from .console import out
    from .vocab import describe_char

    table = Table(title=f"{path}", show_header=False, title_justify="left")
    table.add_row("characters scored", f"{m.chars:,}")
    shown = ", ".join(describe_char(c) for c in m.unknown_chars[:8]) + (" ..." if len(m.unknown_chars) > 8 else "")
    table.add_row("unknown (skipped)", f"{m.unknown:,}" + (f"  ({shown})" if m.unknown else ""))
    table.add_row("cross-entropy", f"{m.cross_entropy:.4f} nats/char")
    table.add_row("perplexity", f"{m.perplexity:.4f}")
    table.add_row("bits/char", f"{m.bpc:.4f}")
    table.add_row("speed", f"{m.chars_per_sec:,.0f} chars/s ({m.streams} streams)")
    out.print(table)


def _check_html_out(out: Path, text: Path) -> None:
    """Refuse, before any work, a page that would overwrite the text or land in a missing folder."""
    from .errors import ConfigError

    if out.exists() and out.resolve() == text.resolve():
        raise ConfigError(f"--html {out} is the text being scored", "choose another file name for the page")
    if not out.parent.is_dir():
        raise ConfigError(f"--html {out}: the folder {out.parent} does not exist", "create it or choose another place")


def _surprise_views(
    lm: CharLM,
    path: Path,
    batch_size: int,
    *,
    show: bool,
    show_lines: int,
    html_out: Path | None,
    per_line: bool,
    top: int | None,
    as_json: bool,
    adapt: bool,
) -> None:
    """--show, --html and --per-line: one scoring, each view from the same per-character figures."""
    scored = lm.score(path, batch_size=batch_size, adapt=adapt)
    m = scored.metrics
    info(f"{path}: {m.chars:,} characters, {m.bpc:.4f} bits/char, {len(scored.lines):,} lines")
    if html_out is not None:
        from .heatmap import write_html

        write_html(scored, html_out, title=path.name, model=str(lm.path))
        info(f"wrote {html_out}")
    if per_line:
        lines = scored.most_surprising(top) if top is not None else scored.lines
        for line in lines:
            click.echo(json.dumps(line.to_dict(), ensure_ascii=False))
    elif show:
        from .console import show_surprise

        show_surprise(scored, lines=show_lines)
    elif as_json:
        click.echo(json.dumps(_file_figures(m, lm.path, adapt=adapt), ensure_ascii=False))


def _print_many(
    scored: list[tuple[Path, Metrics]],
    skipped: list[tuple[Path, str]],
    checkpoint: Path | None,
    *,
    as_json: bool,
    adapt: bool,
) -> None:
    """Many files: each one's figures, most surprising first, the skipped ones with why, and the total
    (nats summed over every file, divided by all their characters)."""
    import math

    from .units import bits_per_char
    from .units import perplexity as ppl

    ranked = sorted(scored, key=lambda item: -item[1].cross_entropy)
    chars = sum(m.chars for _, m in scored)
    ce = math.fsum(m.cross_entropy * m.chars for _, m in scored) / chars if chars else 0.0
    total = {
        "files": len(scored),
        "chars": chars,
        "unknown": sum(m.unknown for _, m in scored),
        "cross_entropy": ce,
        "perplexity": ppl(ce),
        "bpc": bits_per_char(ce),
    }
    if as_json:
        files = [
            {
                "file": str(p),
                "chars": m.chars,
                "unknown": m.unknown,
                "cross_entropy": m.cross_entropy,
                "perplexity": m.perplexity,
                "bpc": m.bpc,
            }
            for p, m in ranked
        ]
        click.echo(
            json.dumps(
                {
                    "files": files,
                    "skipped": [{"file": str(p), "reason": r} for p, r in skipped],
                    "total": total,
                    "checkpoint": str(checkpoint),
                    **({"adapted": True} if adapt else {}),
                },
                ensure_ascii=False,
            )
        )
        return
    from rich.table import Table

    from .console import out

    title = "most surprising first" + (" (adapted: the model learnt from each file as it scored it)" if adapt else "")
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("file", "left"),
        ("characters", "right"),
        ("unknown", "right"),
        ("bits/char", "right"),
        ("perplexity", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p, m in ranked:
        table.add_row(str(p), f"{m.chars:,}", f"{m.unknown:,}", f"{m.bpc:.4f}", f"{m.perplexity:.3f}")
    table.add_section()
    table.add_row(
        f"total ({len(scored)} files)",
        f"{chars:,}",
        f"{total['unknown']:,}",
        f"{total['bpc']:.4f}",
        f"{total['perplexity']:.3f}",
    )
    out.print(table)
    for p, reason in skipped:
        info(f"skipped {p}: {reason}")


# ------------------------------------------------------------------------------------------------- info


def _one_checkpoint(argument: Path | None, option: Path | None, name: str) -> Path | None:
    """The checkpoint given as the argument or as --checkpoint (every model-reading command takes the
    option; these also take it positionally), refusing two different ones."""
    if argument is not None and option is not None and argument.resolve() != option.resolve():
        raise click.UsageError(
            f"{name} and --checkpoint name different files ({argument} and {option}): give one of them"
        )
    return argument if argument is not None else option


def _char_group(ch: str) -> str:
    """What `charlm info` counts a character as: letters and marks by script, which their Unicode name
    begins with (LATIN, CJK, HIRAGANA ...), everything else by kind."""
    category = unicodedata.category(ch)
    if category[0] in "LM":
        words = unicodedata.name(ch, "").split()
        words = words[1:] if words[:1] in (["FULLWIDTH"], ["HALFWIDTH"]) else words
        if words[:1] == ["COMBINING"]:
            return "combining marks"
        if not words or words[0] == "MODIFIER":
            return "other letters"
        return words[0] if words[0] == "CJK" else words[0].capitalize()
    if ch.isspace():
        return "whitespace"
    if category == "Nd":
        return "digits"
    return {"N": "other numbers", "P": "punctuation", "S": "symbols"}.get(category[0], "other")


def _vocab_cell(chars: tuple[str, ...]) -> Text:
    """The whole vocabulary for `charlm info`: counts per script or kind, then every character (a
    5,000-character Chinese vocabulary is mostly not ASCII, so a preview of the first few says little).

    Combining marks stand on a dotted circle so they do not merge with their neighbour; whitespace and
    other invisible characters are spelled out. The cell folds long lines, so any size stays readable.
    """
    from collections import Counter

    from rich.text import Text

    from .vocab import describe_char

    groups = sorted(Counter(_char_group(c) for c in chars).items(), key=lambda g: (-g[1], g[0]))
    summary = ", ".join(f"{n:,} {group}" for group, n in groups)
    visible = "".join(
        ("\u25cc" + c) if unicodedata.category(c)[0] == "M" else c for c in chars if c.isprintable() and not c.isspace()
    )
    invisible = ", ".join(describe_char(c) for c in chars if not c.isprintable() or c.isspace())
    return Text(
        f"{len(chars):,} characters: {summary}\n{visible}" + (f"\n+ {invisible}" if invisible else ""), overflow="fold"
    )


@cli.command(context_settings=CONTEXT, short_help="Describe a checkpoint: model, vocab, training, figures.")
@click.argument("checkpoint_arg", metavar="[CHECKPOINT]", required=False, type=click.Path(path_type=Path))
@_checkpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoint's header as JSON.")
@_verbosity
def info_cmd(checkpoint_arg: Path | None, checkpoint: Path | None, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Describe a checkpoint (CHECKPOINT or --checkpoint): model, vocab, corpus, training progress and figures."""
    set_verbosity(quiet=quiet, verbose=verbose)
    from . import checkpoint as ckpt
    from .console import fmt_count, out

    checkpoint = _one_checkpoint(checkpoint_arg, checkpoint, "CHECKPOINT")
    header = ckpt.read_header(checkpoint if checkpoint is not None else ckpt.newest_checkpoint())
    if as_json:
        click.echo(json.dumps(header.to_json(), ensure_ascii=False))
        return
    from rich.table import Table

    m, s, met, corpus = header.model, header.state, header.metrics, header.corpus
    table = Table(title=str(header.path), show_header=False, title_justify="left")
    drops = f"dropout {m.dropout:g}" + (f", weight drop {m.weight_drop:g}" if m.weight_drop else "")
    table.add_row("model", f"{m.cell} {m.num_layers}x{m.hidden_size}, embed {m.embed_size}, {drops}, init {m.init}")
    table.add_row("parameters", f"{m.num_params():,}")
    table.add_row("vocab", _vocab_cell(header.vocab.chars))
    if corpus:
        table.add_row(
            "corpus",
            f"{corpus.get('name')} ({fmt_count(corpus.get('chars', 0))} chars, "
            + (f"{len(corpus['files'])} files, " if isinstance(corpus.get("files"), list) else "")
            + f"sha256 {str(corpus.get('sha256', ''))[:12]}...)",
        )
    if s:
        table.add_row(
            "training",
            f"step {s.get('step')}, {s.get('chars', 0):,} chars seen, "
            f"{s.get('elapsed', 0):.0f}s, best at step {s.get('best_step')}",
        )
    t = header.train
    if t:
        average = t.get("average") or 0
        table.add_row(
            "settings",
            f"batch {t.get('batch_size')}x{t.get('seq_len')}, lr {t.get('lr')}, min-count {t.get('min_count')}, "
            + (f"weights averaged (--average {average:g})" if average else "last weights (no average)"),
        )
    if "best_val_loss" in met:
        v = met["best_val_loss"]
        table.add_row(
            "best validation",
            f"{v:.4f} nats/char, perplexity {met['best_val_ppl']:.3f}, {met['best_val_bpc']:.4f} bits/char",
        )
    table.add_row("kind", "resume checkpoint (.last)" if header.kind == "last" else "best weights")
    table.add_row(
        "file",
        f"{header.file_size / 1e6:.1f} MB, format version {header.format_version}, "
        f"charlm {header.charlm_version}, {header.created}",
    )
    out.print(table)


# ------------------------------------------------------------------------------------------------- plot


@cli.command(context_settings=CONTEXT, short_help="Draw learning curves: bits/char vs characters seen.")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the picture to this .png, .svg or .pdf file (needs matplotlib: pip install "
    "'charlm[plot]').  [default: draw it in the terminal]",
)
@_checkpoint_option
@_verbosity
def plot(source: Path | None, out: Path | None, checkpoint: Path | None, quiet: bool, verbose: bool) -> None:
    """Draw a run's learning curves: bits/char against characters seen, and the learning rate.

    SOURCE (or --checkpoint) is a checkpoint, its .metrics.jsonl log, or a folder of checkpoints (its
    newest is used).  [default: the newest checkpoint in ./checkpoints]
    """
    set_verbosity(quiet=quiet, verbose=verbose)
    from .console import out as stdout
    from .plot import read_curves, terminal_plot, write_image

    curves = read_curves(_one_checkpoint(source, checkpoint, "SOURCE"))
    if out is None:
        click.echo(terminal_plot(curves, color=stdout.is_terminal and not stdout.no_color))
    else:
        info(f"wrote {write_image(curves, out)}")
    info(f"from {curves.source} ({len(curves.train_bpc)} train and {len(curves.val_bpc)} validation points)")


# ------------------------------------------------------------------------------------ compress, decompress


def _force_option(f: Callable) -> Callable:
    return click.option("--force", "-f", is_flag=True, help="Overwrite the output file if it exists.")(f)


@cli.command(context_settings=CONTEXT, short_help="Compress a UTF-8 text file with a model (FILE.clm).")
@click.argument("file")
@click.option("--out", "-o", default=None, help="Archive to write ('-' = stdout).  [default: FILE.clm]")
@_checkpoint_option
@click.option(
    "--threads",
    type=int,
    default=1,
    help="Threads while coding. Archives decode the same with any count; with --machine-bound it is "
    "recorded in the archive so that decompression repeats the very same arithmetic.",
)
@click.option(
    "--adapt/--no-adapt",
    default=True,
    show_default=True,
    help="Let the model's output layer keep learning from the file as it codes it, in integers: names "
    "and phrases that recur cost fewer bits, and the archive still decodes on any machine.",
)
@click.option(
    "--machine-bound",
    is_flag=True,
    help="Let the whole model learn, in floating point: smaller still, but the archive then decodes only "
    "with the same charlm and torch on the same kind of CPU (and the same --threads).",
)
@_force_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print sizes, bits/char achieved and the model's "
    "cross-entropy, and what zlib, bz2 and lzma make of the same file, as one JSON object.",
)
@_verbosity
def compress(
    file: str,
    out: str | None,
    checkpoint: Path | None,
    threads: int,
    adapt: bool,
    machine_bound: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Compress FILE ('-' = stdin): the model's next-character probabilities drive a range coder, so the
    archive holds about its cross-entropy in bits per character.

    Decompressing needs the same checkpoint; any machine will do (with --machine-bound: the same
    charlm and torch on the same kind of CPU).
    """
    set_verbosity(quiet=quiet, verbose=verbose)
    from .compress import STDIO, compress_file, output_path
    from .data import refuse_charlm_file

    if as_json and output_path(file, out, compressing=True) == STDIO:
        raise click.UsageError("--json and the archive cannot both go to stdout: give -o FILE")
    if file != STDIO:
        refuse_charlm_file(Path(file), reader="model")  # a checkpoint given as FILE: say so before any work
    r = compress_file(
        file,
        out,
        checkpoint=checkpoint,
        threads=threads,
        adapt=adapt,
        machine_bound=machine_bound,
        force=force,
        baselines=as_json,
    )
    if as_json:
        click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
    info(
        f"{r.input} -> {r.output}: {r.original_bytes:,} -> {r.compressed_bytes:,} bytes, "
        f"{r.bits_per_char:.3f} bits/char (model cross-entropy {r.model_bits_per_char:.3f}), "
        f"{r.chars_per_sec:,.0f} chars/s"
    )


@cli.command(context_settings=CONTEXT, short_help="Restore a file made by `charlm compress`.")
@click.argument("file")
@click.option("--out", "-o", default=None, help="File to write ('-' = stdout).  [default: FILE without .clm]")
@click.option(
    "--checkpoint",
    "-c",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PATH",
    help="The checkpoint FILE was compressed with.  [default: checkpoints/<the name FILE records>, "
    "else the newest in ./checkpoints]",
)
@_force_option
@_verbosity
def decompress(file: str, out: str | None, checkpoint: Path | None, force: bool, quiet: bool, verbose: bool) -> None:
    """Restore the original of FILE ('-' = stdin), checked against the checksum the archive carries.

    Nothing is written unless the whole file decodes and verifies.
    """
    set_verbosity(quiet=quiet, verbose=verbose)
    from .compress import decompress_file

    r = decompress_file(file, out, checkpoint=checkpoint, force=force)
    info(
        f"{r.input} -> {r.output}: {r.original_bytes:,} bytes, {r.chars_per_sec:,.0f} chars/s "
        f"(checkpoint {r.checkpoint})"
    )


# ------------------------------------------------------------------------------------------------ cache


@cli.command("cache", context_settings=CONTEXT, short_help="Show what the cache holds and its size, or empty it.")
@click.option("--clear", is_flag=True, help="Delete everything charlm has cached (it is rebuilt when needed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_verbosity
def cache_cmd(clear: bool, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Show the cache folder, what it holds (file scans, encoded ids, built-in corpora), its size and its cap.

    The cache only saves time, so deleting it is always safe. Least recently used entries are evicted
    above the cap: CHARLM_CACHE_MAX=2G (or 500M, 10GB, plain bytes; 0 or off = no cap), default 4 GB.
    """
    set_verbosity(quiet=quiet, verbose=verbose)
    from .cache import KINDS, cache_dir, format_size, report
    from .cache import clear as clear_cache

    freed = None
    if clear:
        freed = clear_cache()
        info(f"cleared {cache_dir()}: {freed.entries:,} entries, {format_size(freed.bytes)} freed")
        if not as_json:
            return
    r = report()
    if as_json:
        data = r.to_dict()
        if freed is not None:
            data["freed"] = {"entries": freed.entries, "bytes": freed.bytes}
        click.echo(json.dumps(data))
        return
    from rich.table import Table

    from .console import out

    holds = {
        "scans": "character counts per text file",
        "ids": "text files encoded as ids",
        "corpora": "built-in corpora assembled from packages",
    }
    table = Table(title=str(r.folder), title_justify="left")
    table.add_column("kind")
    table.add_column("entries", justify="right")
    table.add_column("size", justify="right")
    table.add_column("holds")
    for kind in KINDS:
        table.add_row(
            kind,
            f"{r.kinds[kind].entries:,}",
            format_size(r.kinds[kind].bytes),
            holds[kind],
            end_section=kind == KINDS[-1],
        )
    table.add_row("total", f"{r.entries:,}", format_size(r.bytes), "")
    cap = format_size(r.max_bytes) if r.max_bytes is not None else "none"
    where = "default; set CHARLM_CACHE_MAX to change" if r.max_source == "default" else r.max_source
    table.add_row("cap", "", cap, where)
    out.print(table)


# ----------------------------------------------------------------------------------------------- corpus


@cli.command("corpus", context_settings=CONTEXT, short_help="List the built-in corpora, or write one out as text.")
@click.argument("name", required=False)
@click.option(
    "--out",
    "-o",
    "out_path",
    default=None,
    metavar="FILE",
    help="Write the text to FILE ('-' = stdout).  [default: stdout]",
)
@_force_option
@click.option("--json", "as_json", is_flag=True, help="List the corpora as one JSON object instead of a table.")
@_verbosity
def corpus_cmd(name: str | None, out_path: str | None, force: bool, as_json: bool, quiet: bool, verbose: bool) -> None:
    """List the built-in corpora (with their size once assembled), or write corpus NAME as a plain UTF-8
    text file, to read it or to train on a copy of it.

    \b
      charlm corpus                                      the built-in corpora
      charlm corpus shakespeare -o data/shakespeare.txt  the plays as one text file
    """
    set_verbosity(quiet=quiet, verbose=verbose)
    from .corpora import BUILTIN, assembled_path, builtin_path
    from .errors import ConfigError, CorpusError
    from .files import atomic_write

    if name is None:
        listing = {
            n: {
                "description": d,
                "path": str(p) if (p := assembled_path(n)).exists() else None,
                "bytes": p.stat().st_size if p.exists() else None,
            }
            for n, (d, _) in BUILTIN.items()
        }
        if as_json:
            click.echo(json.dumps({"corpora": listing}))
            return
        from rich.markup import escape
        from rich.table import Table

        from .console import out

        table = Table(title="built-in corpora (charlm corpus NAME -o FILE writes one out)", title_justify="left")
        for column in ("name", "size", "description"):
            table.add_column(column)
        for n, entry in listing.items():
            table.add_row(
                n,
                "not assembled yet" if entry["bytes"] is None else f"{entry['bytes'] / 1e6:.1f} MB",
                escape(str(entry["description"])),
            )  # not markup: "charlm[demo]"
        out.print(table)
        return
    if name not in BUILTIN:
        raise CorpusError(f"{name}: no built-in corpus of that name", f"known corpora: {', '.join(BUILTIN)}")
    target = None if out_path in (None, "-") else Path(out_path)
    if target is not None and target.is_dir():
        raise ConfigError(f"{target} is a directory", "give a file name with -o")
    if target is not None and target.exists() and not force:
        raise ConfigError(f"{target} already exists", "pass --force to overwrite it, or choose another -o")
    source = builtin_path(name)
    with open(source, "rb") as text:
        if target is None:
            sys.stdout.flush()
            shutil.copyfileobj(text, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        try:
            atomic_write(target, lambda f: shutil.copyfileobj(text, f))
        except OSError as e:
            raise ConfigError(
                f"cannot write {target} ({e.strerror}); nothing was written",
                "free some disk space or choose another -o",
            ) from None
    info(f"wrote {target}: {source.stat().st_size:,} bytes of {name}")


# ------------------------------------------------------------------------------------------------- chat

CHAT_HELP = """commands:
  /temp T      temperature (0 = always the likeliest character)
  /length N    characters per reply
  /stop TEXT   also end replies at TEXT (/stop with nothing clears the stop strings)
  /reset       forget the conversation
  /save FILE   write the conversation so far to FILE
  /help        this list
  /quit        leave (or Ctrl-D)
a line is read with a newline after it; end it with \\ to have the model go on with the same line.
Ctrl-C stops a reply; Ctrl-D leaves."""


@cli.command(context_settings=CONTEXT, short_help="Take turns with a model; it goes on from the whole conversation.")
@_checkpoint_option
@click.option("--seed", "-s", default="", help="Text the model reads before the first turn.")
@click.option("--length", "-n", type=int, default=300, help="Characters per reply (at most).")
@click.option("--temperature", "-t", type=float, default=0.8, help="Below 1 is safer, above 1 wilder; 0 = greedy.")
@click.option("--top-k", type=int, default=None, help="Draw only from the K most likely characters.")
@click.option("--top-p", type=float, default=None, help="Draw only from the nucleus of probability P.")
@click.option(
    "--stop", multiple=True, help="End a reply when it writes this string (kept). Repeatable.  [default: none]"
)
@click.option("--lines", type=int, default=None, help="End a reply after this many newlines.")
@click.option("--rng-seed", type=int, default=None, help="Random seed: the same turns give the same replies.")
@_device_option
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "int8"]),
    default="auto",
    help="Weights read per generated character, as for `sample --precision`.",
)
@_threads_option
@_verbosity
def chat(
    checkpoint: Path | None,
    seed: str,
    length: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop: tuple[str, ...],
    lines: int | None,
    rng_seed: int | None,
    device: str,
    precision: str,
    threads: int | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Take turns with a model: you type, it continues, you type again and it goes on from the whole
    conversation so far (its state is kept, nothing is re-read). Type /help for the commands."""
    set_verbosity(quiet=quiet, verbose=verbose)
    from .errors import CharlmError
    from .lm import CharLM
    from .session import Session
    from .training.stop import graceful_stop

    try:
        import readline  # noqa: F401 - line editing and history (arrow keys) for input(), where there is one
    except ImportError:
        pass
    lm = CharLM.load(checkpoint, device=device, sample_precision=precision, threads=threads)
    session = Session(
        lm, length=length, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop, lines=lines, rng_seed=rng_seed
    )
    info(
        f"chat with {lm.path} ({lm.model.config.cell} {lm.model.config.num_layers}x{lm.model.config.hidden_size}); "
        "/help for commands, Ctrl-D to leave"
    )
    if seed:
        session.say(seed)
    out = sys.stdout
    while True:
        try:
            line = input("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if line.startswith("/"):
            word, _, arg = line[1:].partition(" ")
            try:
                reply = _chat_command(session, word, arg.strip())
            except CharlmError as e:
                reply = f"error: {e}"
            if reply is None:
                return
            click.echo(reply, err=True)
            continue
        text = line[:-1] if line.endswith("\\") else line + "\n"
        written = ""
        try:  # Ctrl-C while it writes ends the turn at the next character, not the chat
            with graceful_stop((signal.SIGINT,)) as stop:
                skipped = session.say(text)
                if skipped:
                    info(f"({skipped} character{'s' * (skipped != 1)} the model does not know left out)")
                for piece in session.reply():
                    out.write(piece)
                    out.flush()
                    written += piece
                    if stop.is_set():
                        break
            stopped = stop.is_set()
        except KeyboardInterrupt:  # a second Ctrl-C: at once
            stopped = True
        if stopped:
            written += "\n"
            out.write("\n")
            info("(stopped)")
        if written and not written.endswith("\n"):
            out.write("\n")
        out.flush()


def _chat_command(session: Any, word: str, arg: str) -> str | None:
    """One /command of `charlm chat`: what to tell the user, or None to leave."""
    from .errors import ConfigError

    def number(kind: type, name: str) -> Any:
        try:
            return kind(arg)
        except ValueError:
            raise ConfigError(f"/{name} needs a number (got {arg!r})") from None

    if word in ("quit", "exit"):
        return None
    if word == "help":
        return CHAT_HELP
    if word == "reset":
        session.reset()
        return "(the conversation is forgotten)"

    def checked(attribute: str, value: object) -> None:  # a value the session refuses leaves the old one
        old = getattr(session, attribute)
        setattr(session, attribute, value)
        try:
            session.check()
        except ConfigError:
            setattr(session, attribute, old)
            raise

    if word in ("temp", "temperature"):
        checked("temperature", number(float, "temp"))
        return f"(temperature {session.temperature:g})"
    if word == "length":
        checked("length", number(int, "length"))
        return f"(replies of at most {session.length} characters)"
    if word == "stop":
        session.stop = [arg.encode().decode("unicode_escape")] if arg else []
        return f"(replies end at {session.stop[0]!r})" if arg else "(no stop strings)"
    if word == "save":
        if not arg:
            raise ConfigError("/save needs a file name")
        return f"(saved {len(session.transcript):,} characters to {session.save(arg)})"
    raise ConfigError(f"unknown command /{word}", "/help lists the commands")


# ------------------------------------------------------------------------------------------------ serve


@cli.command(context_settings=CONTEXT, short_help="A web playground and JSON API for your models.")
@click.option(
    "--checkpoint",
    "-c",
    "checkpoints",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A checkpoint or a folder of them to offer; repeatable.  [default: every checkpoint in ./checkpoints]",
)
@click.option(
    "--host",
    default="127.0.0.1",
    help="Address to listen on; 127.0.0.1 keeps it to this machine, 0.0.0.0 opens it to the network.",
)
@click.option("--port", type=int, default=8000, help="Port to listen on; 0 picks a free one.")
@_device_option
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "int8"]),
    default="auto",
    help="Weights read per generated character, as for `sample --precision`.",
)
@click.option("--max-length", type=int, default=2000, help="Most characters one generation may write.")
@click.option("--max-generations", type=int, default=32, help="Generations running at once; more are told 429.")
@click.option("--max-score-chars", type=int, default=100_000, help="Longest text /api/score accepts.")
@click.option("--max-body", type=int, default=1 << 20, help="Largest request body, in bytes.")
@click.option("--timeout", type=float, default=120.0, help="Seconds a generation may run (it then ends early).")
@_verbosity
def serve(
    checkpoints: tuple[Path, ...],
    host: str,
    port: int,
    device: str,
    precision: str,
    max_length: int,
    max_generations: int,
    max_score_chars: int,
    max_body: int,
    timeout: float,
    quiet: bool,
    verbose: bool,
) -> None:
    """Serve a page to write with, score text and watch training runs, and the JSON API it uses.

    \b
    Prints the URL on stdout; Ctrl-C stops it. The API is in the README ("Web playground and API").
    Needs the web extra: pip install 'charlm[serve]'.
    """
    set_verbosity(quiet=quiet, verbose=verbose)
    from .errors import ConfigError
    from .serve.run import require_extra
    from .serve.run import serve as run_server

    require_extra()
    from .serve.app import Limits

    for name, value in (
        ("--max-length", max_length),
        ("--max-generations", max_generations),
        ("--max-score-chars", max_score_chars),
        ("--max-body", max_body),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1 (got {value})")
    if not timeout > 0:
        raise ConfigError(f"--timeout must be more than 0 seconds (got {timeout})")
    limits = Limits(
        max_length=max_length,
        max_body=max_body,
        max_score_chars=max_score_chars,
        max_generations=max_generations,
        timeout_s=timeout,
    )

    def ready(url: str) -> None:
        click.echo(url)
        info(f"charlm serve: open {url} in a browser; Ctrl-C stops the server")

    run_server(
        list(checkpoints) or [Path("checkpoints")],
        host=host,
        port=port,
        device=device,
        precision=precision,
        limits=limits,
        warn=warning_line,
        on_ready=ready,
    )


# --------------------------------------------------------------------------------------------- runner


def _report_bug(exc: BaseException) -> None:
    log = Path(tempfile.gettempdir()) / f"charlm-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text(f"charlm {__version__}\nargv: {sys.argv}\n\n" + "".join(traceback.format_exception(exc)))
        where = f"traceback saved to {log}"
    except OSError:
        where = "the traceback could not be saved"
    error_line(
        f"internal error ({type(exc).__name__}: {str(exc)[:200]}); this is a bug in charlm, {where} - please report it"
    )


class _Terminated(BaseException):
    """SIGTERM outside a training loop (which handles it itself): unwind, then exit 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the click group and turns every failure into one line and an exit code
    (2 for a user mistake, 130 after Ctrl-C, 143 after SIGTERM, 1 for a bug)."""
    from .errors import CharlmError

    # Before torch loads (commands import it lazily): OpenMP worker threads spin ~1000 times, not
    # libgomp's default 300,000, before sleeping at a barrier. Beside a CPU-bound neighbour the long
    # spin steals the core the other thread needs and each per-time-step barrier of the recurrent
    # kernels costs a scheduler tick; measured on 2 cores, scoring with 2 threads beside a matmul loop
    # ran at 20.3k chars/s instead of 1.3k, and quiet at 40.7k instead of 37.2k (bench/contention.py).
    # Not for `sample`: one stream runs thousands of tiny parallel ops a second, and a thread that
    # sleeps between them costs a wake-up each time (quiet int8 sampling lost a third); sampling's
    # thread tuner alone keeps it fair under load.
    args = sys.argv[1:] if argv is None else argv
    if args[:1] not in (["sample"], ["serve"], ["chat"]):  # serve steps generations one character at a time too
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    code = 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        result = cli.main(args=argv, prog_name="charlm", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Abort:  # click's form of Ctrl-C (KeyboardInterrupt) and of EOF at a prompt
        error_line("interrupted")
        code = 130
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error_line(f"{e.format_message()}{where}")
        code = 2
    except CharlmError as e:
        error_line(str(e))
        code = e.exit_code
    except KeyboardInterrupt:
        error_line("interrupted")
        code = 130
    except _Terminated:
        error_line("terminated")
        code = 143
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # stdout's reader left (e.g. `| head`): exit quietly
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except Exception as e:  # a bug: short message, traceback in a file
        _report_bug(e)
        code = 1
    if main_thread:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code)
