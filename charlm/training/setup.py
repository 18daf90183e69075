"""Set-up of a training run: each function builds one typed piece, in the order train() calls them.

The order matters for exact repeats: the model is built right after seeding, so its first weights
depend on the seed alone, and a resumed run restores the generators last.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import distributed
from ..config import (
    BY_HEART_SEQ_LEN,
    DEEP_HIDDEN,
    DEEP_LAYERS,
    DEFAULT_BATCH,
    DEFAULT_LAYERS,
    DEFAULT_MIN_LR_RATIO,
    DEFAULT_SEQ_LEN,
    DEFAULT_WEIGHT_DECAY,
    DROPOUT,
    DROPOUT_MIN_LR_RATIO,
    LARGE_VOCAB,
    MANY_PASSES,
    MANY_PASSES_LR,
    MANY_PASSES_WEIGHT_DECAY,
    PRIOR_FADE_STEPS,
    SHORT_BUDGET_S,
    SMALL_BATCH,
    ModelConfig,
    TrainConfig,
    auto_min_count,
    budget_hidden_size,
    deep_passes,
    default_lr,
    dropout_passes,
)
from ..data import (
    Corpus,
    as_sources,
    cached_scan,
    corpus_name,
    document_counts,
    find_documents,
    is_plain,
    load_corpus,
    load_documents,
    split,
    split_documents,
)
from ..device import resolve_device, resolve_precision, seed_everything, set_rng_state
from ..distributed import Dist
from ..errors import CheckpointError, CorpusError
from ..model import CharRNN, State, unigram_logits
from ..run_state import RunState
from ..streams import Batches
from ..vocab import Vocab
from .average import WeightAverage
from .events import EventSink
from .finetune import extend_vocab, grow_model
from .optim import load_optimizer, make_optimizer
from .paths import best_path_of, default_paths, new_run_path
from .resume import check_resume, check_resume_files, check_resume_model, opened
from .sizing import (
    TRAINING_SHARE,
    Passes,
    deepening_budget,
    expected_passes,
    goes_deep,
    learns_by_heart,
    measure_speed,
    short_chunks,
)


@dataclass(frozen=True)
class DevicePlan:
    """Where this process computes: its device, its place in a torchrun job, the autocast dtype."""

    device: torch.device
    dist: Dist
    precision: Literal["fp32", "bf16"]


def plan_devices(config: TrainConfig) -> DevicePlan:
    """The device, the torchrun job if there is one (each rank its own GPU), the precision."""
    dist, device = distributed.setup(resolve_device(config.device))
    return DevicePlan(device=device, dist=dist, precision=resolve_precision(config.precision, device))


def event_sink(on_event: EventSink | None, dist: Dist) -> EventSink:
    """The caller's listener on rank 0; the other ranks of a torchrun job stay silent."""
    if on_event is None or not dist.is_main:
        return lambda event: None
    return on_event


@dataclass(frozen=True)
class Origin:
    """Where a run writes, and what it starts from: the run it continues, or the model it fine-tunes."""

    name: str
    source: Path | None  # the corpus file; None for a Corpus given in memory or several documents
    best_path: Path
    resumed: ckpt.Header | None = None
    init: ckpt.Header | None = None
    note: str = ""  # for the user, when a new run does not simply take the plain name

    @property
    def last_path(self) -> Path:
        return ckpt.sibling_paths(self.best_path)[0]

    @property
    def metrics_path(self) -> Path:
        return ckpt.sibling_paths(self.best_path)[1]


Sources = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def plan_origin(
    corpus: Sources | Corpus,
    *,
    out: str | os.PathLike[str] | None,
    last: Path | None,
    saved: ckpt.Header | None,
    init_from: str | os.PathLike[str] | None,
    overwrite: bool,
) -> Origin:
    """A resumed run (`last` set) writes beside its .last file, or to --out; a new run takes the
    next free name (see paths.new_run_path)."""
    source: Path | None = None
    if isinstance(corpus, Corpus):
        name = corpus.name
    elif is_plain(sources := as_sources(corpus)):
        from ..corpora import resolve

        source, name = resolve(sources[0])
    else:
        name = corpus_name(sources)
    if last is not None:
        resumed = opened(last, saved)
        best = default_paths(name, out) if out is not None else best_path_of(last) or default_paths(name, out)
        return Origin(name, source, best, resumed=resumed)
    best, note = new_run_path(name, out, overwrite=overwrite)
    init = ckpt.read_header(init_from) if init_from is not None else None
    return Origin(name, source, best, init=init, note=note)


@dataclass(frozen=True)
class RunData:
    """The text as ids, split, and cut into the global batch's streams."""

    corpus: Corpus
    train_ids: np.ndarray  # [N_train]
    val_ids: np.ndarray  # [N_val] the tail of the text
    batches: Batches  # every process's streams: batch_size x processes
    rows: slice  # this process's rows of the global batch
    new_chars: list[str]  # characters --init-from added to the vocab
    notes: list[str] = field(default_factory=list)  # for the user: skipped files, the documents' split

    def identity(self) -> dict:
        """The corpus entry of the checkpoint headers (and of the Started event)."""
        return {**self.corpus.identity(), "train_chars": len(self.train_ids), "val_chars": len(self.val_ids)}


def load_data(
    corpus: Sources | Corpus,
    origin: Origin,
    config: TrainConfig,
    dist: Dist,
    *,
    pattern: str = "*",
    model: ModelConfig | None = None,
) -> tuple[RunData, TrainConfig]:
    """Text -> vocab (the resumed run's, the fine-tuned model's grown, or a new one) -> ids -> streams;
    and `config` with --min-count filled in (config.auto_min_count for the model to be built).

    Several files, folders (searched for `pattern`) or stdin are documents joined by data.SEPARATOR
    and split by document (data.split_documents)."""
    new_chars: list[str] = []
    notes: list[str] = []
    if isinstance(corpus, Corpus):
        data = corpus
        config = replace(config, min_count=config.min_count or 1)  # the Corpus brings its own vocab
        if origin.resumed is not None and data.vocab != origin.resumed.vocab:
            raise CheckpointError("--resume: the text's vocab differs from the checkpoint's")
    elif origin.source is None:
        docs, skipped = find_documents(as_sources(corpus), pattern)
        notes += [f"skipped: {why}" for _, why in skipped]
        config = with_min_count(config, document_counts(docs), origin, model)
        counts = document_counts(docs, min_count=config.min_count)  # type: ignore[arg-type] - filled in
        if origin.resumed is not None:
            check_resume_files(origin.resumed, [d.identity() for d in docs])
            vocab = origin.resumed.vocab
        elif origin.init is not None:
            vocab, new_chars = extend_vocab(origin.init.vocab, counts)
        else:
            vocab = Vocab.from_counts(counts, min_count=config.min_count)  # type: ignore[arg-type] - filled in
        data = load_documents(docs, vocab=vocab, name=origin.name)
    else:
        scan = cached_scan(origin.source)  # type: ignore[arg-type] - a file: resolved by plan_origin
        config = with_min_count(config, scan.counts, origin, model)
        if origin.resumed is not None:
            vocab = origin.resumed.vocab
        elif origin.init is not None:
            vocab, new_chars = extend_vocab(origin.init.vocab, scan.counts)
        else:
            vocab = scan.vocab(min_count=config.min_count)  # type: ignore[arg-type] - filled in
        data = load_corpus(origin.source, vocab=vocab, name=origin.name)  # type: ignore[arg-type]
    if origin.resumed is not None:
        check_resume(origin.resumed, data, config, dist.world)
    # an open batch size and chunk length are settled by plan_passes, once the model exists
    batch = config.batch_size or DEFAULT_BATCH
    seq_len = config.seq_len or DEFAULT_SEQ_LEN
    global_batch = batch * dist.world
    need = math.ceil(Batches.min_chars(global_batch, seq_len) / (1 - config.val_fraction)) + 2
    if len(data) < need:
        raise CorpusError(
            f"{data.path or data.name} is too short to train on: {len(data)} characters, need at least {need} for "
            f"--batch-size {global_batch}, --seq-len {seq_len} and --val-fraction "
            f"{config.val_fraction}",
            "lower --batch-size or --seq-len, or use a longer text",
        )
    if data.starts:
        train_ids, val_ids, n_val = split_documents(data, config.val_fraction, max_chars=config.max_val_chars)
        n = len(data.starts)
        held = ", ".join(f["path"] for f in data.files[n - n_val :])
        notes.append(
            f"{n} documents: {n - n_val} train, {n_val} validation ({held})"
            if n_val
            else f"1 document: validation is its last {len(val_ids):,} characters"
        )
        if len(train_ids) < Batches.min_chars(global_batch, seq_len):
            raise CorpusError(
                f"the training documents are too short: {len(train_ids)} characters, need at least "
                f"{Batches.min_chars(global_batch, seq_len)} for --batch-size {global_batch} and "
                f"--seq-len {seq_len}",
                "lower --batch-size or --seq-len, or give more text",
            )
    else:
        train_ids, val_ids = split(data.ids, config.val_fraction, max_chars=config.max_val_chars)
    run = RunData(
        corpus=data,
        train_ids=train_ids,
        val_ids=val_ids,
        batches=Batches(train_ids, global_batch, seq_len, config.rng_seed),
        rows=slice(dist.rank * batch, (dist.rank + 1) * batch),
        new_chars=new_chars,
        notes=notes,
    )
    return run, config


def with_min_count(
    config: TrainConfig, counts: dict[int, int], origin: Origin, model: ModelConfig | None
) -> TrainConfig:
    """`config` with --min-count filled in when not given: from the counts and the model a new run
    will build; 1 (fold nothing) when fine-tuning, whose vocab is the base model's grown."""
    if config.min_count is not None:
        return config
    if origin.init is not None or origin.resumed is not None:
        return replace(config, min_count=1)
    planned = replace(fill_model(model or ModelConfig(), config), vocab_size=max(1, len(counts)))
    return replace(config, min_count=auto_min_count(counts, planned))


# The unigram start and a large vocabulary (config.PRIOR_FADE_STEPS). On the Chinese fortunes (3,605 modelled
# symbols) with a48d734's batch, rate and decay on a 20-minute schedule (GRU 2x384, AVX512-BF16 EPYC; runs
# cut after 7-10 minutes, evaluations every 100 steps; proxy-screen-unigram-start-chinese-2026-12-05.json):
# with the start held in the bias the best validation was 5.662 bits/char at step 200 and then rose while
# training loss fell faster than in any other variant; with no unigram start (a random head and a zero bias,
# as a48d734 starts) 5.538 at step 300, against a48d734's own 5.534 at step 700. The log frequencies span
# about 14 nats over 3,605 symbols, and a bias that holds them leaves the weights to learn sharp departures
# from the training text's counts, which its held-out tail (a different mix of characters: counting scores
# it at 8.9 bits/char against 6.9 on the training text) does not follow. Fading the start out over the first
# 100 steps reached 5.598, a head at 0.25 x Xavier instead of zero 5.623, both together 5.594: a start from
# nothing generalises best, but only the fade keeps the first steps at what counting gives. Alphabets and
# code (under ~200 symbols, all of them frequent) keep the start as it is: the fade tied there (the 300k cut
# of the plays, 73 symbols, fp32, 5 minutes: 2.2091 and 2.2116 against 2.2115 and 2.2088 held;
# proxy-screen-fp32-floor-fade-2026-12-05.json), so it stays where it was measured to win.
@dataclass(frozen=True)
class Learner:
    """The model being trained and what updates it."""

    net: CharRNN  # the model itself: the resume checkpoint holds it
    forward: torch.nn.Module  # what a step calls: the model, or its DistributedDataParallel wrapper
    opt: torch.optim.AdamW
    average: WeightAverage | None = None  # the weights' moving average (--average)
    prior: torch.Tensor | None = None  # the unigram start's bias, faded out of the head (fade_prior)

    def fade_prior(self, step: int) -> None:
        """After optimizer step `step` (from 0): take 1/PRIOR_FADE_STEPS of the unigram start back out of
        the output bias, so that by then the frequencies live in the weights that learned them."""
        if self.prior is not None and step < PRIOR_FADE_STEPS:
            with torch.no_grad():
                self.net.head.bias.sub_(self.prior / PRIOR_FADE_STEPS)

    @property
    def scored(self) -> CharRNN:
        """What validation scores and the best checkpoint holds: the average when there is one."""
        return self.average.model if self.average is not None else self.net

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def build_learner(
    origin: Origin,
    data: RunData,
    model: ModelConfig | None,
    config: TrainConfig,
    devices: DevicePlan,
    saved_tensors: dict[str, torch.Tensor],
) -> tuple[Learner, TrainConfig]:
    """The model (the resumed run's, the fine-tuned one grown to the vocab, or a new one) and its
    optimizer; and `config` with the learning rate filled in from the model's width when not given."""
    seed_everything(config.rng_seed)
    # the training text's character counts: a new model starts from them, and a large vocabulary fades them out
    counts = train_counts(data, len(data.corpus.vocab)) if origin.init is None else None
    if origin.resumed is not None:
        net = ckpt.build_model(origin.resumed, saved_tensors)
        if model is not None:
            check_resume_model(replace(model, vocab_size=net.config.vocab_size), net.config)
    elif origin.init is not None:
        net = ckpt.build_model(origin.init)
        if len(data.corpus.vocab) > net.config.vocab_size:
            net = grow_model(net, len(data.corpus.vocab))
    else:
        net = CharRNN(replace(fill_model(model or ModelConfig(), config), vocab_size=len(data.corpus.vocab)))
        if net.config.init != "pytorch":
            net.start_at_unigram(counts)
    if config.lr is None:
        config = replace(config, lr=default_lr(net.config.hidden_size))
    if config.weight_decay is None:  # plan_passes raises it for a run that will see its text many times
        config = replace(config, weight_decay=DEFAULT_WEIGHT_DECAY)
    if config.min_lr_ratio is None:  # plan_passes raises it for a run that will learn its text by heart
        config = replace(config, min_lr_ratio=DEFAULT_MIN_LR_RATIO)
    net = net.to(devices.device).train()
    forward: torch.nn.Module = net
    if devices.dist.active:
        from torch.nn.parallel import DistributedDataParallel

        torch.manual_seed(config.rng_seed + devices.dist.rank)  # each rank its own dropout masks
        device_ids = [devices.device] if devices.device.type == "cuda" else None
        forward = DistributedDataParallel(net, device_ids=device_ids)
    average = WeightAverage(net, config.average) if config.average else None
    prior = None
    if counts is not None and net.config.init != "pytorch" and len(data.corpus.vocab) > LARGE_VOCAB:
        prior = unigram_logits(counts).to(devices.device)
    opt = make_optimizer(net, config, devices.device)
    return Learner(net=net, forward=forward, opt=opt, average=average, prior=prior), config


def train_counts(data: RunData, vocab_size: int) -> torch.Tensor:
    return torch.from_numpy(np.bincount(data.train_ids.astype(np.int64), minlength=vocab_size))


def plan_shape(
    asked_model: ModelConfig | None, config: TrainConfig, data: RunData, origin: Origin, devices: DevicePlan
) -> tuple[ModelConfig | None, Passes | None]:
    """The model a new run builds, and the passes expected at the plain shape when they chose it.

    Only a new, timed, single-process run with both --layers and --hidden open, in the budgets where
    depth was measured (sizing.goes_deep), is probed: the plain 2-layer model's speed on this device
    gives the passes, and a text seen often enough (config.deep_passes) gets the deeper, narrower model.
    The vocab (--min-count) was settled before, for the plain shape: the probe needs the output
    layer's size, and the deeper model's recurrent cost is close to 2x384's (1.6M against 1.4M
    multiply-adds per character), so it would fold about the same characters."""
    model = asked_model or ModelConfig()
    time = config.time
    if (
        origin.resumed is not None
        or origin.init is not None
        or devices.dist.active
        or model.hidden_size
        or model.num_layers
        or time is None
        or not deepening_budget(time)
    ):
        return asked_model, None
    plain = replace(fill_model(model, config), vocab_size=len(data.corpus.vocab))
    with torch.random.fork_rng(devices=[]):  # a throwaway: the run's weights still depend on the seed alone
        net = CharRNN(plain).to(devices.device)
    passes = probe_passes(net, config.batch_size or DEFAULT_BATCH, time, config, data, devices)
    return fill_model(model, config, passes.passes, vocab=len(data.corpus.vocab)), passes


def probe_passes(
    net: CharRNN, batch: int, time: float, config: TrainConfig, data: RunData, devices: DevicePlan
) -> Passes:
    """The passes `net` would make over the training text in the training share of `time`, from its
    speed measured here at `batch` streams (both one thread and all cores when --threads is open,
    as device.ThreadTuner will keep the faster)."""
    adaptive = config.threads is None
    speed = measure_speed(net, devices.device, devices.precision, batch, data.batches.seq_len, adaptive=adaptive)
    return expected_passes(speed, TRAINING_SHARE * time, len(data.train_ids))


def plan_passes(
    config: TrainConfig,
    asked: TrainConfig,
    data: RunData,
    learner: Learner,
    devices: DevicePlan,
    probed: Passes | None = None,
    dropout_open: bool = False,
) -> tuple[TrainConfig, RunData, Passes | None]:
    """`config` with the batch size (and, when not given, a learning rate) for the passes the run
    will make (sizing.py's rule), the data cut for that batch, and the expectation behind it; a new
    model whose --dropout is open (`dropout_open`) takes DROPOUT when the run will see its text
    often enough to learn it by heart (sizing.learns_by_heart), and such a run keeps its rate above
    DROPOUT_MIN_LR_RATIO when --min-lr-ratio is open; a short one trains BY_HEART_SEQ_LEN-character
    chunks when --seq-len is (sizing.short_chunks). A torchrun job, or a run without a time or
    epoch budget, takes the plain defaults. `probed`: what plan_shape measured, reused when the model
    built is the one it timed (not deepened)."""
    if config.batch_size is not None:
        return replace(config, seq_len=data.batches.seq_len), data, None  # load_data's, given or DEFAULT_SEQ_LEN
    passes = None
    vocab = len(data.corpus.vocab)
    if probed is not None and not goes_deep(probed.passes, config.time, vocab):
        passes = probed
    elif not devices.dist.active and config.time is not None:
        passes = probe_passes(learner.net, DEFAULT_BATCH, config.time, config, data, devices)
    elif not devices.dist.active and config.epochs is not None:
        passes = Passes(passes=config.epochs, chars_per_sec=0.0, train_chars=len(data.train_ids), budget_s=0.0)
    many = passes is not None and passes.many
    config = replace(config, batch_size=SMALL_BATCH if many else DEFAULT_BATCH)
    if many and asked.lr is None:
        config = replace(config, lr=config.lr * MANY_PASSES_LR)  # type: ignore[operator] - build_learner filled it in
    if many and asked.weight_decay is None:
        config = replace(config, weight_decay=MANY_PASSES_WEIGHT_DECAY)
        for group in learner.opt.param_groups:
            if group["weight_decay"]:  # the matrices' group (optim.make_optimizer)
                group["weight_decay"] = MANY_PASSES_WEIGHT_DECAY
    expected = None if passes is None else passes.passes
    layers = learner.net.config.num_layers
    by_heart = learns_by_heart(expected, vocab, layers, config.time, len(data.train_ids))
    if by_heart and asked.min_lr_ratio is None:
        config = replace(config, min_lr_ratio=DROPOUT_MIN_LR_RATIO)
    if config.seq_len is None:
        short = short_chunks(expected, vocab, layers, config.time)
        config = replace(config, seq_len=BY_HEART_SEQ_LEN if short else DEFAULT_SEQ_LEN)
    if dropout_open and by_heart:
        learner.net.set_dropout(DROPOUT)
        if learner.average is not None:  # its copy is what the best checkpoint stores
            learner.average.model.set_dropout(DROPOUT)
    batch = config.batch_size
    if batch != data.batches.batch_size // devices.dist.world or config.seq_len != data.batches.seq_len:
        data = replace(
            data,
            batches=Batches(data.train_ids, batch * devices.dist.world, config.seq_len, config.rng_seed),
            rows=slice(devices.dist.rank * batch, (devices.dist.rank + 1) * batch),
        )
    return config, data, passes


def explain_defaults(
    asked_model: ModelConfig | None,
    asked: TrainConfig,
    model: ModelConfig,
    config: TrainConfig,
    data: RunData,
    passes: Passes | None,
    shape_probe: Passes | None = None,
    prior_fades: bool = False,
) -> list[str]:
    """One line per setting the rule chose because the caller left it open (README: "How charlm
    picks its defaults"); explicit options are never second-guessed, so they are not listed.
    `shape_probe`: the passes plan_shape expected at the plain shape, when it was probed;
    `prior_fades`: the new model's unigram start fades out of its output bias (Learner.prior)."""
    lines = []
    many = passes is not None and passes.many
    open_shape = asked_model or ModelConfig()
    budget = f"a {fmt_budget(config.time)} budget" if config.time else "no time budget"
    time = config.time or 0.0
    plain = f"{DEFAULT_LAYERS}x{budget_hidden_size(config.time)}"
    vocab = data.corpus.vocab
    large = len(vocab) > LARGE_VOCAB
    if shape_probe is not None and goes_deep(shape_probe.passes, config.time, len(vocab)):
        regime = f"{'up to' if time <= SHORT_BUDGET_S else 'over'} {fmt_budget(SHORT_BUDGET_S)}"
        lines.append(
            f"--layers {model.num_layers} --hidden {model.hidden_size}: ~{shape_probe.passes:.1f} passes expected "
            f"at {plain} for {budget} (from {deep_passes(time):g} at {plain} in a run {regime}: a text seen that "
            "often has time to use a third layer)"
        )
    else:
        if not open_shape.hidden_size:
            lines.append(
                f"--hidden {model.hidden_size} for {budget} (256 units up to 6m, 384 up to 30m, else 512: a "
                "smaller model sees more text in a short run)"
            )
        if not open_shape.num_layers:
            seen = ""
            if shape_probe is not None:
                seen = (
                    f" (~{shape_probe.passes:.1f} passes expected; {DEEP_LAYERS}x{DEEP_HIDDEN} from "
                    f"{deep_passes(time):g} at {plain}"
                    + (f", for up to {LARGE_VOCAB:,} symbols: this text has {len(vocab):,})" if large else ")")
                )
            lines.append(f"--layers {model.num_layers}{seen}")
    if asked.batch_size is None:
        if passes is None:
            lines.append(f"--batch-size {config.batch_size}")
        else:
            seen = (
                f"~{passes.passes:.1f} passes over {passes.train_chars:,} training characters at a measured "
                f"{passes.chars_per_sec:,.0f} chars/s"
                if passes.chars_per_sec
                else f"{passes.passes:g} passes"
            )
            lines.append(
                f"--batch-size {config.batch_size}: {seen} "
                f"({'many: more, smaller, larger steps' if passes.many else 'few: the faster, larger batch'}; "
                f"{SMALL_BATCH} from {MANY_PASSES:g} passes)"
            )
    if asked.lr is None:
        larger = f" x {MANY_PASSES_LR:g} for many passes" if many else ""
        lines.append(
            f"--lr {config.lr:.3g} (2e-3 x 512 / {model.hidden_size}{larger}: narrower layers take larger steps)"
        )
    if asked.weight_decay is None:
        lines.append(
            f"--weight-decay {config.weight_decay:g}"
            + (" for many passes (a text seen many times is learned by heart without it)" if many else "")
        )
    layers = model.num_layers
    # where sizing.learns_by_heart starts for this model, in the words of the lines below
    train_chars = len(data.train_ids)
    from_passes = dropout_passes(layers, config.time, train_chars)
    at_layers = f"{from_passes:.3g} passes at {layers} layer{'s' if layers > 1 else ''}"
    threshold = at_layers
    if layers >= DEEP_LAYERS and time:  # the depth's threshold differs by budget (config.dropout_passes)
        threshold += f" in a run {'over' if time > SHORT_BUDGET_S else 'up to'} {fmt_budget(SHORT_BUDGET_S)}"
        if from_passes > dropout_passes(layers, config.time):  # and, over that, by the text's size
            threshold += f" on {train_chars:,} training characters"
    by_heart = passes is not None and learns_by_heart(passes.passes, len(vocab), layers, config.time, train_chars)
    if open_shape.dropout is None and model.dropout and passes is not None:  # set by plan_passes
        lines.append(
            f"--dropout {model.dropout:g}: ~{passes.passes:.1f} passes ({DROPOUT:g} from {threshold}: "
            "a text seen that often is learned by heart sooner than the budget ends)"
        )
    elif open_shape.dropout is None and large and passes is not None and passes.passes >= from_passes:
        lines.append(
            f"--dropout 0: ~{passes.passes:.1f} passes, but {len(vocab):,} symbols ({DROPOUT:g} from "
            f"{threshold} for up to {LARGE_VOCAB:,} symbols: it did not help a large vocabulary)"
        )
    if asked.min_lr_ratio is None and by_heart:
        lines.append(
            f"--min-lr-ratio {config.min_lr_ratio:g}: ~{passes.passes:.1f} passes ({DROPOUT_MIN_LR_RATIO:g} from "
            f"{threshold}, else {DEFAULT_MIN_LR_RATIO:g}: larger late steps, averaged, learn a text seen that "
            "often less by heart)"
        )
    if passes is not None and not by_heart and not large:
        # the regime's settings left plain, and where it starts: a run near the threshold can fall either side
        # of it as the measured speed moves, and the line says which side and how far
        plain_kept = []
        if open_shape.dropout is None:
            plain_kept.append((f"--dropout {model.dropout:g}", f"dropout {DROPOUT:g}"))
        if asked.min_lr_ratio is None:
            plain_kept.append((f"--min-lr-ratio {config.min_lr_ratio:g}", f"the floor {DROPOUT_MIN_LR_RATIO:g}"))
        if asked.seq_len is None and 0 < time <= SHORT_BUDGET_S:
            plain_kept.append((f"--seq-len {config.seq_len}", f"{BY_HEART_SEQ_LEN}-character chunks"))
        if plain_kept:
            options = " ".join(option for option, _ in plain_kept)
            regime = [what for _, what in plain_kept]
            takes = ", ".join(regime[:-1]) + f" and {regime[-1]}" if len(regime) > 1 else regime[0]
            lines.append(
                f"{options}: ~{passes.passes:.1f} passes ({takes} from {threshold}: a text seen fewer times is "
                "not yet learned by heart)"
            )
    if asked.seq_len is None and passes is not None and short_chunks(passes.passes, len(vocab), layers, config.time):
        lines.append(
            f"--seq-len {config.seq_len}: ~{passes.passes:.1f} passes in {budget} ({BY_HEART_SEQ_LEN} from "
            f"{at_layers} in up to {fmt_budget(SHORT_BUDGET_S)}, else {DEFAULT_SEQ_LEN}: a short run over a "
            "text seen that often learns more from twice the steps of shorter chunks)"
        )
    if prior_fades:
        lines.append(
            f"output layer: starts at the character frequencies and takes them back out of its bias over the first "
            f"{PRIOR_FADE_STEPS} steps ({len(vocab):,} symbols, over {LARGE_VOCAB:,}: a bias holding that many "
            "frequencies learns the training text by heart)"
        )
    if asked.min_count is None and vocab.folded:
        share = float(np.count_nonzero(data.corpus.ids == vocab.unk_id)) / max(1, len(data.corpus.ids))
        lines.append(
            f"--min-count {config.min_count}: the {len(vocab.folded):,} characters seen fewer times "
            f"({share:.2%} of the text) share one symbol, so the output layer ({len(vocab):,} characters) "
            "costs no more than the recurrent layers"
        )
    return lines


def fmt_budget(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:g}m" if minutes >= 1 and minutes == round(minutes) else f"{seconds:g}s"


def fill_model(model: ModelConfig, config: TrainConfig, passes: float | None = None, vocab: int = 0) -> ModelConfig:
    """`model` with what it leaves open (0) filled in: DEEP_LAYERS x DEEP_HIDDEN when both are open,
    the text has at most LARGE_VOCAB modelled symbols (`vocab`; 0: not known, taken as small) and the
    plain model would see it `passes` times, often enough (sizing.goes_deep), else 2 layers of
    budget_hidden_size. A shape half given is completed plainly: the deep rule is for the pair."""
    if model.hidden_size and model.num_layers:
        return model
    if not model.hidden_size and not model.num_layers and goes_deep(passes, config.time, vocab):
        return replace(model, hidden_size=DEEP_HIDDEN, num_layers=DEEP_LAYERS)
    return replace(
        model,
        hidden_size=model.hidden_size or budget_hidden_size(config.time),
        num_layers=model.num_layers or DEFAULT_LAYERS,
    )


def restore_state(
    learner: Learner,
    origin: Origin,
    data: RunData,
    config: TrainConfig,
    devices: DevicePlan,
    saved_tensors: dict[str, torch.Tensor],
) -> tuple[RunState, State]:
    """(counters, recurrent state) to start from: zeros for a new run; for a resumed one the saved
    counters, optimizer moments, random generators and this process's rows of the saved state."""
    hidden = learner.net.initial_state(config.batch_size, devices.device)  # each [L, B, H]
    if origin.resumed is None:
        return RunState(world=devices.dist.world), hidden
    saved = origin.resumed.state
    state = replace(RunState.from_dict(saved), world=devices.dist.world)
    load_optimizer(learner.opt, saved_tensors, saved["optim_groups"])
    if learner.average is not None:
        learner.average.load(saved_tensors)
    if devices.dist.is_main:
        rng = {k[len("rng.") :]: v for k, v in saved_tensors.items() if k.startswith("rng.")}
        set_rng_state(rng, devices.device)
    kept = [saved_tensors.get(f"hidden.{i}") for i in range(len(hidden))]  # each [L, global B, H]
    if all(h is not None and h.shape[1] == data.batches.batch_size for h in kept):
        hidden = tuple(h[:, data.rows].to(devices.device) for h in kept)  # type: ignore[index]
    return state, hidden


def run_header(net: CharRNN, data: RunData, config: TrainConfig) -> dict:
    """The header entries every checkpoint of the run shares."""
    return {
        "model": net.config.to_dict(),
        "vocab": list(data.corpus.vocab.chars),
        "folded": list(data.corpus.vocab.folded),
        "train": config.to_dict(),
        "corpus": data.identity(),
    }
