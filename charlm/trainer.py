"""The training loop: AdamW, clipping, a learning-rate schedule, exact validation, checkpoints.

train() never prints: it reports typed events to a callback (console.py renders them), writes the
checkpoints and the metrics log, and returns a TrainResult. Everything it needs to continue a run
bit for bit (weights, optimizer moments, data position, recurrent state, RNG) goes into the
`.last` checkpoint, so a resumed CPU run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed
from .config import (  # noqa: F401 - TrainConfig and parse_duration are re-exported
    RESUME_FIXED,
    ModelConfig,
    TrainConfig,
    budget_hidden_size,
    default_lr,
    parse_duration,
)
from .data import Corpus, cached_scan, load_corpus, split
from .device import (
    ThreadTuner,
    autocast,
    configure_cpu,
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .errors import CheckpointError, ConfigError, CorpusError, TrainingError
from .evaluate import Metrics, evaluate
from .files import atomic_write
from .model import CharRNN, State
from .streams import Batches, nll_sum
from .units import bits_per_char, perplexity
from .vocab import Vocab

MAX_BAD_STEPS = 10  # consecutive non-finite steps before training gives up


def default_model(config: TrainConfig) -> ModelConfig:
    """The architecture for a run when none is given: ModelConfig's defaults, sized by the budget."""
    return fill_model(ModelConfig(), config)


def fill_model(model: ModelConfig, config: TrainConfig) -> ModelConfig:
    """`model` with a hidden size of 0 ("from the budget") filled in."""
    if model.hidden_size:
        return model
    return replace(model, hidden_size=budget_hidden_size(config.time))


def default_paths(name: str, out: str | os.PathLike[str] | None) -> Path:
    """The best checkpoint's path as named: --out, else checkpoints/<corpus name>.safetensors."""
    best = Path(out) if out is not None else Path("checkpoints") / f"{name}.safetensors"
    return best if best.suffix == ".safetensors" else best.with_name(best.name + ".safetensors")


def run_files(best: Path) -> tuple[Path, Path, Path]:
    """(best checkpoint, resume checkpoint, metrics log) of one run."""
    return (best, *ckpt.sibling_paths(best))


def taken(best: Path) -> bool:
    """Whether a run already keeps any of its files at this name."""
    return any(p.exists() for p in run_files(best))


def numbered_runs(best: Path) -> list[Path]:
    """The best-checkpoint paths of <stem>.safetensors and <stem>-N.safetensors, for every run of
    that name that left a file, oldest name first."""
    stem = best.name.removesuffix(".safetensors")
    pattern = re.compile(rf"^{re.escape(stem)}(?:-(\d+))?\.(?:last\.safetensors|safetensors|metrics\.jsonl)$")
    numbers = set()
    if best.parent.is_dir():
        for p in best.parent.iterdir():
            match = pattern.match(p.name)
            if match:
                numbers.add(int(match.group(1) or 1))
    return [best if n == 1 else best.with_name(f"{stem}-{n}.safetensors") for n in sorted(numbers)]


def new_run_path(name: str, out: str | os.PathLike[str] | None, *, overwrite: bool) -> tuple[Path, str]:
    """Where a new run writes, and a note for the user when that is not the plain name.

    A trained model is never replaced unasked: with the default name the new run takes the next
    free one (corpus-2, corpus-3, ...; `sample` and `perplexity` pick the newest); a path given
    with --out that already holds a run is refused. overwrite=True replaces either.
    """
    best = default_paths(name, out)
    if overwrite or not taken(best):
        return best, (f"replacing the run at {best} (--overwrite)" if taken(best) else "")
    if out is not None:
        raise ConfigError(
            f"{best} already holds a trained model",
            "pass --overwrite to replace it, --resume to continue it, or choose another --out",
        )
    stem = best.name.removesuffix(".safetensors")
    n = max(2, len(numbered_runs(best)) + 1)
    while taken(best.with_name(f"{stem}-{n}.safetensors")):
        n += 1
    fresh = best.with_name(f"{stem}-{n}.safetensors")
    return fresh, f"{best} holds an earlier model, kept; this run writes {fresh} (--overwrite replaces instead)"


def resume_path(name: str, out: str | os.PathLike[str] | None, resume: bool | str | os.PathLike[str]) -> Path:
    """The .last checkpoint --resume continues: the path given, else that of the newest run of the name."""
    if resume is not True:
        return Path(resume)  # type: ignore[arg-type]
    best = default_paths(name, out)
    runs = [ckpt.sibling_paths(p)[0] for p in numbered_runs(best)] if out is None else []
    runs = [p for p in runs if p.exists()]
    return max(runs, key=lambda p: p.stat().st_mtime_ns) if runs else ckpt.sibling_paths(best)[0]


def best_path_of(last: Path) -> Path | None:
    """The best checkpoint that belongs to a resume checkpoint, by name."""
    if not last.name.endswith(".last.safetensors"):
        return None
    return last.with_name(last.name.removesuffix(".last.safetensors") + ".safetensors")


MODEL_FLAGS = {
    "cell": "--model",
    "hidden_size": "--hidden",
    "num_layers": "--layers",
    "embed_size": "--embed",
    "dropout": "--dropout",
    "init": "--init",
}


def resume_settings(
    corpus: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool | str | os.PathLike[str] = True,
    train_changes: dict | None = None,
    model_changes: dict | None = None,
) -> tuple[TrainConfig, ModelConfig | None, Path]:
    """The interrupted run's settings with the given changes on top: (config, model or None, .last path).

    The CLI passes only what the user typed, so an option left alone keeps the run's value;
    `train(..., resume=path)` then refuses changes that would break exact resume, naming each.
    """
    from .corpora import resolve

    last = resume_path(resolve(corpus)[1] if out is None else "", out, resume)
    if not last.exists():
        return TrainConfig(**(train_changes or {})), None, last  # train() says there is nothing to resume
    header = ckpt.read_header(last)
    config = replace(TrainConfig.from_dict(header.train), **(train_changes or {}))
    model = replace(header.model, **model_changes) if model_changes else None
    return config, model, last


# ----------------------------------------------------------------------------------------------- events


@dataclass
class Started:
    model: ModelConfig
    config: TrainConfig
    params: int
    device: str
    precision: str
    corpus: dict
    train_chars: int
    val_chars: int
    eval_every: int
    checkpoint: Path
    resumed_step: int | None = None
    init_from: str | None = None
    new_chars: list[str] = field(default_factory=list)


@dataclass
class Progress:
    step: int
    epoch: float
    chars: int
    elapsed_s: float
    fraction: float | None  # of the budget, when there is one
    lr: float
    train_loss: float | None = None  # set every log_every steps
    chars_per_sec: float | None = None


@dataclass
class Evaluated:
    step: int
    val: Metrics
    train_loss: float | None
    best: bool
    best_val: float
    evals_since_best: int


@dataclass
class Note:
    """Something the user should know that is not an error (a skipped step, a replaced file)."""

    text: str


@dataclass
class TrainResult:
    checkpoint: Path
    last_checkpoint: Path
    metrics_log: Path
    steps: int
    epochs: float
    params: int
    train_loss: float | None
    val_loss: float
    best_step: int
    chars_per_sec: float
    elapsed_s: float
    stopped: str
    skipped_steps: int = 0
    signal: int | None = None  # the signal that interrupted the run (SIGINT, SIGTERM)
    threads: int | None = None  # CPU threads in use at the end (the tuner's last choice)

    @property
    def exit_code(self) -> int:
        """What a shell expects after the run: 0, or 128 + the signal that stopped it (130, 143)."""
        return 128 + self.signal if self.signal else 0

    @property
    def val_perplexity(self) -> float:
        return perplexity(self.val_loss)

    @property
    def val_bpc(self) -> float:
        return bits_per_char(self.val_loss)

    def to_dict(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "last_checkpoint": str(self.last_checkpoint),
            "metrics_log": str(self.metrics_log),
            "steps": self.steps,
            "epochs": round(self.epochs, 4),
            "params": self.params,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_perplexity": self.val_perplexity,
            "val_bpc": self.val_bpc,
            "best_step": self.best_step,
            "chars_per_sec": self.chars_per_sec,
            "elapsed_s": self.elapsed_s,
            "stopped": self.stopped,
            "skipped_steps": self.skipped_steps,
            "threads": self.threads,
        }


Event = Started | Progress | Evaluated | Note


# ------------------------------------------------------------------------------------------- helpers


def learning_rate(
    config: TrainConfig, *, step: int, fraction: float | None, epoch: float, plateau_scale: float
) -> float:
    """The rate for `step`: linear warmup, then the chosen decay (nanoGPT's get_lr, generalised)."""
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    schedule = config.effective_schedule()
    if schedule == "cosine":
        f = min(1.0, max(0.0, fraction or 0.0))
        decay = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * f))
    elif schedule == "exponential":
        decay = max(config.min_lr_ratio, config.lr_decay**epoch)
    elif schedule == "plateau":
        decay = plateau_scale
    else:
        decay = 1.0
    return config.lr * warm * decay


def auto_eval_every(val_chars: int, config: TrainConfig) -> int:
    """Steps between evaluations so that scoring the validation split costs ~10% of training
    (a forward pass costs about a third of forward + backward per character)."""
    if config.eval_every:
        return config.eval_every
    return max(100, math.ceil(val_chars / (0.3 * config.batch_size * config.seq_len)))


def make_optimizer(model: CharRNN, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; the fused kernel where the device has one (one launch
    for all parameters, and it can skip a step on a non-finite gradient without a host sync)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), fused=fused, foreach=None if fused else True)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit the model ({e})") from None


def extend_vocab(old: Vocab, counts: dict[int, int]) -> tuple[Vocab, list[str]]:
    """The old vocab with the new text's unseen characters appended: old ids keep their meaning."""
    new = sorted(chr(c) for c in counts if chr(c) not in old)
    return Vocab(list(old.chars) + new, old.folded), new


def grow_model(model: CharRNN, vocab_size: int) -> CharRNN:
    """A copy of `model` for a larger vocab. New embedding rows are the mean old embedding (an
    'average character'); new output rows start with the mean weight and the lowest old bias, so
    new characters begin as rare rather than random."""
    old = model.config.vocab_size
    grown = CharRNN(replace(model.config, vocab_size=vocab_size))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for key, fill in (("embed.weight", None), ("head.weight", None), ("head.bias", "min")):
            t = sd[key]
            extra = t.new_empty((vocab_size - old, *t.shape[1:]))
            extra[:] = t.min() if fill == "min" else t.mean(0)
            sd[key] = torch.cat([t, extra])
    grown.load_state_dict(sd)
    return grown


class StopRequest:
    """Set by the first Ctrl-C (SIGINT) or SIGTERM: the loop stops at the next step boundary, writes
    its resume checkpoint, and the CLI exits 128 + the signal's number (130, 143)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def is_set(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def _graceful_stop() -> Iterator[StopRequest]:
    """First Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary; a second one
    interrupts at once. Outside the main thread nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _MetricsLog:
    """checkpoints/<name>.metrics.jsonl: one JSON object per line, appended and flushed."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():  # drop lines from work after the resume point: it is being redone
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
                except ValueError:
                    continue
            atomic_write(path, "".join(kept).encode("utf-8"))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _loss_record(prefix: str, loss: float) -> dict:
    return {f"{prefix}_loss": loss, f"{prefix}_ppl": perplexity(loss), f"{prefix}_bpc": bits_per_char(loss)}


# ---------------------------------------------------------------------------------------------- train


def train(
    corpus: str | os.PathLike[str] | Corpus,
    *,
    model: ModelConfig | None = None,
    config: TrainConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool | str | os.PathLike[str] = False,
    init_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> TrainResult:
    """Train a character model on `corpus` (a file path, a built-in corpus name or a Corpus).

    `model` gives the architecture (its vocab_size is filled in from the text); `resume` continues
    the `.last` checkpoint beside `out` (or the path given); `init_from` starts from another
    checkpoint's weights, extending its vocab with the new text's characters. A new run never
    replaces an earlier model unless `overwrite` (see new_run_path). Under torchrun each process
    trains `config.batch_size` of the streams (global batch = processes x batch size).

    `model=None` and `config=None` mean the defaults of ModelConfig and TrainConfig (the same as
    `charlm train`'s): a GRU 2x256 for budgets up to 6 minutes, 2x384 up to 30, else 2x512.
    """
    run = _Run(
        corpus,
        model=model,
        config=config or TrainConfig(),
        out=out,
        resume=resume,
        init_from=init_from,
        overwrite=overwrite,
        on_event=on_event,
    )
    try:
        return run.loop()
    finally:
        distributed.teardown(run.dist)


class _Run:
    """One training session: set-up in __init__, then loop(); state lives in `self.st` so that a
    checkpoint of it (plus weights, optimizer, RNG and recurrent state) continues the run exactly."""

    def __init__(
        self,
        corpus: str | os.PathLike[str] | Corpus,
        *,
        model: ModelConfig | None,
        config: TrainConfig,
        out: str | os.PathLike[str] | None,
        resume: bool | str | os.PathLike[str],
        init_from: str | os.PathLike[str] | None,
        overwrite: bool,
        on_event: Callable[[Event], None] | None,
    ) -> None:
        configure_cpu(config.threads)
        device = resolve_device(config.device)
        self.dist, self.device = distributed.setup(device)
        self.precision = resolve_precision(config.precision, self.device)
        listener = on_event or (lambda event: None)
        self.emit = listener if self.dist.is_main else (lambda event: None)

        # --- where things go, and what we continue from
        resume_header = init_header = None
        if isinstance(corpus, Corpus):
            name = corpus.name
        else:
            from .corpora import resolve

            corpus_path, name = resolve(corpus)
        placement_note = ""
        if resume:
            last = resume_path(name, out, resume)
            if not last.exists():
                raise CheckpointError(
                    f"--resume: no resume checkpoint at {last}",
                    "start without --resume, or give the .last.safetensors file to continue",
                )
            resume_header = ckpt.read_header(last)
            if resume_header.kind != "last" or "optim_groups" not in resume_header.state:
                raise CheckpointError(
                    f"--resume: {last} holds no training state (it is a best checkpoint)",
                    f"resume from {ckpt.sibling_paths(best_path_of(last))[0].name}, or fine-tune "
                    f"with --init-from {last}",
                )
            best_path = default_paths(name, out) if out is not None else best_path_of(last) or default_paths(name, out)
        else:
            best_path, placement_note = new_run_path(name, out, overwrite=overwrite)
        self.best_path = best_path
        self.last_path, self.metrics_path = ckpt.sibling_paths(best_path)
        if resume:
            config = _rebatch(resume_header, config, self.dist.world)
            if config.lr is None:
                config = replace(config, lr=resume_header.train.get("lr"))
        elif init_from is not None:
            init_header = ckpt.read_header(init_from)
        self.config = config

        # --- text -> vocab -> ids
        new_chars: list[str] = []
        if isinstance(corpus, Corpus):
            data = corpus
            if resume_header is not None and data.vocab != resume_header.vocab:
                raise CheckpointError("--resume: the text's vocab differs from the checkpoint's")
        else:
            scan = cached_scan(corpus_path)
            if resume_header is not None:
                vocab = resume_header.vocab
            elif init_header is not None:
                vocab, new_chars = extend_vocab(init_header.vocab, scan.counts)
            else:
                vocab = scan.vocab(min_count=config.min_count)
            data = load_corpus(corpus_path, vocab=vocab, name=name)
        if resume_header is not None:
            _check_resume(resume_header, data, config, self.dist.world)
        self.global_batch = config.batch_size * self.dist.world
        need = math.ceil(Batches.min_chars(self.global_batch, config.seq_len) / (1 - config.val_fraction)) + 2
        if len(data) < need:
            raise CorpusError(
                f"{data.path or data.name} is too short to train on: {len(data)} characters, need at least {need} for "
                f"--batch-size {self.global_batch}, --seq-len {config.seq_len} and --val-fraction "
                f"{config.val_fraction}",
                "lower --batch-size or --seq-len, or use a longer text",
            )
        self.train_ids, self.val_ids = split(data.ids, config.val_fraction, max_chars=config.max_val_chars)
        self.batches = Batches(self.train_ids, self.global_batch, config.seq_len, config.rng_seed)
        self.rows = slice(self.dist.rank * config.batch_size, (self.dist.rank + 1) * config.batch_size)
        if self.dist.is_main:
            _check_writable(best_path.parent)
        self.data = data

        # --- model and optimizer
        seed_everything(config.rng_seed)
        tensors: dict[str, torch.Tensor] = {}
        if resume_header is not None:
            tensors = ckpt.read_tensors(resume_header)
            net = ckpt.build_model(resume_header, tensors)
            if model is not None:
                _check_resume_model(replace(model, vocab_size=net.config.vocab_size), net.config)
        elif init_header is not None:
            net = ckpt.build_model(init_header)
            if len(data.vocab) > net.config.vocab_size:
                net = grow_model(net, len(data.vocab))
        else:
            net = CharRNN(replace(fill_model(model or ModelConfig(), config), vocab_size=len(data.vocab)))
        if config.lr is None:
            config = self.config = replace(config, lr=default_lr(net.config.hidden_size))
        self.net = net.to(self.device).train()
        self.forward: torch.nn.Module = self.net
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            torch.manual_seed(config.rng_seed + self.dist.rank)  # each rank its own dropout masks
            self.forward = DistributedDataParallel(
                self.net, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.opt = make_optimizer(self.net, config, self.device)
        self.params = sum(p.numel() for p in self.net.parameters())

        # --- training state
        self.st: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "chunk": 0,
            "chars": 0,
            "elapsed": 0.0,
            "best_val": math.inf,
            "best_step": 0,
            "evals_since_best": 0,
            "plateau_scale": 1.0,
            "plateau_best": math.inf,
            "plateau_bad": 0,
            "skipped": 0,
            "last_eval_step": -1,
            "train_loss": None,
            "world": self.dist.world,
        }
        self.state: State = self.net.initial_state(config.batch_size, self.device)
        if resume_header is not None:
            saved = resume_header.state
            self.st.update({k: saved[k] for k in self.st if k in saved and k != "world"})
            load_optimizer(self.opt, tensors, saved["optim_groups"])
            if self.dist.is_main:
                set_rng_state({k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}, self.device)
            hidden = [tensors.get(f"hidden.{i}") for i in range(len(self.state))]
            if all(h is not None and h.shape[1] == self.global_batch for h in hidden):
                self.state = tuple(h[:, self.rows].to(self.device) for h in hidden)  # type: ignore[index]

        self.eval_every = auto_eval_every(len(self.val_ids), config)
        corpus_info = {**data.identity(), "train_chars": len(self.train_ids), "val_chars": len(self.val_ids)}
        self.header_common = {
            "model": self.net.config.to_dict(),
            "vocab": list(data.vocab.chars),
            "folded": list(data.vocab.folded),
            "train": config.to_dict(),
            "corpus": corpus_info,
        }
        if placement_note:
            self.emit(Note(placement_note))
        if self.dist.active:
            self.emit(
                Note(
                    f"data-parallel on {self.dist.world} processes: global batch {self.global_batch} "
                    f"streams ({config.batch_size} per process)"
                )
            )
        self.emit(
            Started(
                model=self.net.config,
                config=config,
                params=self.params,
                device=str(self.device),
                precision=self.precision,
                corpus=corpus_info,
                train_chars=len(self.train_ids),
                val_chars=len(self.val_ids),
                eval_every=self.eval_every,
                checkpoint=best_path,
                resumed_step=self.st["step"] if resume_header is not None else None,
                init_from=str(init_from) if init_from is not None else None,
                new_chars=new_chars,
            )
        )
        self.log = (
            _MetricsLog(self.metrics_path, resume_step=self.st["step"] if resume_header is not None else None)
            if self.dist.is_main
            else None
        )

        # --- session counters (not checkpointed)
        self.session_start = time.perf_counter()
        self.elapsed_before = self.st["elapsed"]
        self.non_train_time = 0.0
        self.session_chars = 0
        self.session_steps = 0
        self.last_save = time.perf_counter()
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_steps = 0
        self.bad_run = torch.zeros((), device=self.device)
        self.skipped = torch.zeros((), device=self.device)
        self.steps_in_epoch = self.batches.steps_in_epoch(self.st["epoch"])
        self.last_val: Metrics | None = None
        self.tuner = ThreadTuner(self.device, config.threads)
        self.eval_speed: float | None = None  # validation chars/s per process at the last evaluation
        self.save_s = 0.0  # the slowest checkpoint write so far

    # --- clocks and schedule

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def train_time(self) -> float:
        return max(1e-9, time.perf_counter() - self.session_start - self.non_train_time)

    def epoch_float(self) -> float:
        return self.st["epoch"] + self.st["chunk"] / max(1, self.steps_in_epoch)

    def fraction(self) -> float | None:
        c, parts = self.config, []
        if c.steps:
            parts.append(self.st["step"] / c.steps)
        if c.epochs:
            parts.append(self.epoch_float() / c.epochs)
        if c.time:
            parts.append(self.elapsed() / max(1e-9, c.time - self.finish_reserve()))
        return min(1.0, max(parts)) if parts else None

    def finish_reserve(self) -> float:
        """Seconds the final validation and checkpoint writes will take, so that --time bounds the
        whole run: the validation text over the speed of the last evaluation (before the first,
        a third of the cost per character of training), plus the slowest save so far, twice."""
        speed = self.eval_speed
        if speed is None and self.session_steps >= 3:  # the first steps pay for warm-up: not a speed
            speed = 3 * self.session_chars / self.train_time() / self.dist.world
        eval_s = len(self.val_ids) / self.dist.world / speed if speed else 0.0
        # never more than half the budget: a machine so slow that validation would take longer
        # still gets half its time for training, and overshoots rather than training nothing
        return min(1.15 * (eval_s + 2 * self.save_s) + 0.2, 0.5 * (self.config.time or math.inf))

    def current_lr(self) -> float:
        return learning_rate(
            self.config,
            step=self.st["step"],
            fraction=self.fraction(),
            epoch=self.epoch_float(),
            plateau_scale=self.st["plateau_scale"],
        )

    def budget_reached(self) -> str:
        c, st = self.config, self.st
        if c.steps is not None and st["step"] >= c.steps:
            return "steps"
        if c.epochs is not None and self.epoch_float() >= c.epochs:
            return "epochs"
        if c.time is not None and self.elapsed() + self.finish_reserve() >= c.time:
            return "time"
        if c.patience and st["evals_since_best"] >= c.patience:
            return "patience"
        return ""

    # --- the work

    def step(self) -> None:
        """One optimizer step on the next chunk of every stream. No host sync on the fast path:
        a non-finite loss or gradient is skipped by the fused optimizer itself (found_inf)."""
        st, lr = self.st, self.current_lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        x_np, y_np = self.batches.get(st["epoch"], st["chunk"])
        x = torch.from_numpy(x_np[self.rows]).to(self.device, non_blocking=True)
        y = torch.from_numpy(y_np[self.rows]).to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            logits, new_state = self.forward(x, self.state)  # [B, T, V]
        loss = nll_sum(logits, y) / y.numel()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across ranks here
        params = [p for p in self.net.parameters() if p.grad is not None]
        if self.config.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        bad = ~(torch.isfinite(norm) & torch.isfinite(loss))
        if self.opt.defaults.get("fused"):
            self.opt.found_inf = bad.float()  # the fused kernel skips the update (and the step count)
            self.opt.step()
        elif not bool(bad):
            self.opt.step()
        self.state = tuple(
            torch.where(bad, old.to(new.dtype), new.detach()) for old, new in zip(self.state, new_state, strict=True)
        )
        self.loss_sum += torch.where(bad, 0.0, loss.detach())
        self.bad_run = (self.bad_run + 1) * bad
        self.skipped += bad
        self.loss_steps += 1
        st["step"] += 1
        st["chunk"] += 1
        st["chars"] += x_np.size
        self.session_chars += x_np.size
        self.session_steps += 1
        if st["chunk"] >= self.steps_in_epoch:
            st["epoch"] += 1
            st["chunk"] = 0
            self.steps_in_epoch = self.batches.steps_in_epoch(st["epoch"])
            self.state = self.net.initial_state(self.config.batch_size, self.device)
        report = st["step"] % self.config.log_every == 0
        if report:
            self.report(lr)
        self.emit(
            Progress(
                step=st["step"],
                epoch=self.epoch_float(),
                chars=st["chars"],
                elapsed_s=self.elapsed(),
                fraction=self.fraction(),
                lr=lr,
                train_loss=st["train_loss"] if report else None,
                chars_per_sec=self.session_chars / self.train_time(),
            )
        )

    def report(self, lr: float) -> None:
        """Every log_every steps: the one host sync, the training loss, and the divergence check."""
        st = self.st
        n_bad = int(self.skipped.item())
        has_loss = self.loss_steps > n_bad  # a window of only skipped steps has no loss to report
        if has_loss:
            st["train_loss"] = float(self.dist.sum(self.loss_sum).item()) / self.dist.world / (self.loss_steps - n_bad)
        if n_bad:
            st["skipped"] += n_bad
            self.emit(Note(f"skipped {n_bad} step(s) with a non-finite loss or gradient (total {st['skipped']})"))
        self.loss_sum.zero_()
        self.skipped.zero_()
        self.loss_steps = 0
        if int(self.bad_run.item()) >= MAX_BAD_STEPS:
            raise TrainingError(
                f"the loss or gradients were not finite for {MAX_BAD_STEPS} steps in a row (step {st['step']}); "
                "the last good checkpoint is kept",
                f"lower --lr (now {self.config.lr:g}) or --clip (now {self.config.clip:g}), or try --precision fp32",
            )
        if self.log and has_loss:
            self.log.write(
                {
                    "event": "train",
                    "step": st["step"],
                    "epoch": round(self.epoch_float(), 5),
                    "chars": st["chars"],
                    "elapsed_s": round(self.elapsed(), 3),
                    "lr": lr,
                    **_loss_record("train", st["train_loss"]),
                    "chars_per_sec": self.session_chars / self.train_time(),
                }
            )

    def evaluate(self) -> None:
        st, began = self.st, time.perf_counter()
        metrics = evaluate(
            self.net,
            self.val_ids,
            start_id=self.data.vocab.start_id,
            batch_size=self.config.eval_batch_size,
            device=self.device,
            precision=self.precision,
            dist=self.dist,
            fold=self.data.vocab.fold_penalty,
            tuner=self.tuner,
        )
        self.eval_speed = len(self.val_ids) / self.dist.world / max(1e-9, time.perf_counter() - began)
        self.last_val = metrics
        st["last_eval_step"] = st["step"]
        improved = metrics.cross_entropy < st["best_val"]
        if improved:
            st.update(best_val=metrics.cross_entropy, best_step=st["step"], evals_since_best=0)
        else:
            st["evals_since_best"] += 1
        if metrics.cross_entropy < st["plateau_best"] - 1e-4:
            st.update(plateau_best=metrics.cross_entropy, plateau_bad=0)
        else:
            st["plateau_bad"] += 1
            if st["plateau_bad"] > self.config.plateau_patience:
                st.update(
                    plateau_scale=max(self.config.min_lr_ratio, st["plateau_scale"] * self.config.plateau_factor),
                    plateau_bad=0,
                )
        self.non_train_time += time.perf_counter() - began
        if self.log:
            self.log.write(
                {
                    "event": "eval",
                    "step": st["step"],
                    "epoch": round(self.epoch_float(), 5),
                    "chars": st["chars"],
                    "elapsed_s": round(self.elapsed(), 3),
                    "lr": self.current_lr(),
                    **_loss_record("val", metrics.cross_entropy),
                    **({} if st["train_loss"] is None else _loss_record("train", st["train_loss"])),
                }
            )
        if improved:
            self.save("best")
        self.save("last")
        self.emit(
            Evaluated(
                step=st["step"],
                val=metrics,
                train_loss=st["train_loss"],
                best=improved,
                best_val=st["best_val"],
                evals_since_best=st["evals_since_best"],
            )
        )

    def save(self, kind: str) -> None:
        """Rank 0 writes; under torchrun every rank must call this (the recurrent state is gathered)."""
        began = time.perf_counter()
        hidden = [self.dist.gather_rows(s) for s in self.state] if kind == "last" else []
        if self.dist.is_main:
            meta = {
                **self.header_common,
                "kind": kind,
                "state": {**self.st, "elapsed": self.elapsed()},
                "metrics": _metrics_summary(self.st, self.last_val),
            }
            tensors = ckpt.model_tensors(self.net)
            if kind == "last":
                opt_tensors, groups = optimizer_tensors(self.opt)
                meta["state"]["optim_groups"] = groups
                tensors.update(opt_tensors)
                tensors.update({f"rng.{k}": v for k, v in rng_state(self.device).items()})
                tensors.update({f"hidden.{i}": s for i, s in enumerate(hidden)})
            ckpt.write(self.best_path if kind == "best" else self.last_path, tensors, meta)
        if kind == "last":
            self.last_save = time.perf_counter()
        self.save_s = max(self.save_s, time.perf_counter() - began)
        self.non_train_time += time.perf_counter() - began

    def final_eval_near(self) -> bool:
        """A periodic validation this close to the end of the time budget would be repeated by the
        final one within moments: skip it and train instead (one process only: under torchrun
        every rank must take the same branch)."""
        c = self.config
        return c.time is not None and not self.dist.active and self.elapsed() + 3 * self.finish_reserve() >= c.time

    def loop(self) -> TrainResult:
        stopped = ""
        stop_codes = ["", "steps", "epochs", "time", "patience", "interrupted"]
        stop_requested = StopRequest()
        try:
            with _graceful_stop() as stop_requested:
                while True:
                    stopped = "interrupted" if stop_requested.is_set() else self.budget_reached()
                    save_due = time.perf_counter() - self.last_save >= self.config.save_every
                    code = self.dist.decide(stop_codes.index(stopped) * 2 + save_due, self.device)
                    stopped, save_due = stop_codes[code // 2], bool(code % 2)
                    if stopped:
                        break
                    if save_due and self.st["step"] % self.eval_every:
                        self.save("last")
                    with self.tuner.unit(self.config.batch_size * self.config.seq_len):
                        self.step()
                    if self.st["step"] % self.eval_every == 0 and not self.final_eval_near():
                        self.evaluate()
                if self.st["last_eval_step"] != self.st["step"]:
                    self.evaluate()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keeping the work done so far
            stopped = "interrupted"
            stop_requested.signal = stop_requested.signal or signal.SIGINT
            if not self.dist.active:
                self.save("last")
        finally:
            self.tuner.close()
            if self.log:
                self.log.close()
        st = self.st
        if not math.isfinite(st["best_val"]):
            raise TrainingError(
                "training stopped before the first evaluation, so no checkpoint was written", "train for longer"
            )
        return TrainResult(
            checkpoint=self.best_path,
            last_checkpoint=self.last_path,
            metrics_log=self.metrics_path,
            steps=st["step"],
            epochs=self.epoch_float(),
            params=self.params,
            train_loss=st["train_loss"],
            val_loss=st["best_val"],
            best_step=st["best_step"],
            chars_per_sec=self.session_chars / self.train_time(),
            elapsed_s=self.elapsed(),
            stopped=stopped,
            skipped_steps=st["skipped"],
            signal=int(stop_requested.signal or signal.SIGINT) if stopped == "interrupted" else None,
            threads=self.tuner.threads,
        )


def _rebatch(header: ckpt.Header, config: TrainConfig, world: int) -> TrainConfig:
    """Resuming with another number of processes keeps the global batch, so the data and the
    optimizer see the same run: per-process batch = saved global batch / processes now."""
    saved_world = int(header.state.get("world", 1))
    saved_batch = header.train.get("batch_size")
    if not isinstance(saved_batch, int) or saved_world == world:
        return config
    global_batch = saved_batch * saved_world
    if global_batch % world:
        raise CheckpointError(
            f"--resume: the run's global batch of {global_batch} streams does not split over {world} processes",
            f"resume with a number of processes that divides {global_batch}",
        )
    if config.batch_size not in (saved_batch, global_batch // world):
        return config  # _check_resume reports the conflicting --batch-size
    return replace(config, batch_size=global_batch // world)


def _metrics_summary(st: dict, val: Metrics | None) -> dict:
    out = {"step": st["step"], "best_step": st["best_step"], "train_loss": st["train_loss"]}
    if math.isfinite(st["best_val"]):
        out.update(_loss_record("best_val", st["best_val"]))
    if val is not None:
        out.update(_loss_record("val", val.cross_entropy))
    return out


def _check_writable(folder: Path) -> None:
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(
            f"cannot write checkpoints to {folder}/: {blocker} is a file, not a folder",
            "choose another place with --out",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".charlm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write checkpoints to {folder}/ ({e.strerror})", "choose a writable place with --out"
        ) from None


def _check_resume_model(asked: ModelConfig, saved: ModelConfig) -> None:
    """Refuse model options that differ from the interrupted run's, naming each with both values."""
    diffs = [
        f"{flag} {getattr(asked, key)!r} (was {getattr(saved, key)!r})"
        for key, flag in MODEL_FLAGS.items()
        if getattr(asked, key) != getattr(saved, key) and not (key == "hidden_size" and not asked.hidden_size)
    ]
    if diffs:
        raise CheckpointError(
            f"--resume: the model options differ from the interrupted run: {', '.join(diffs)}",
            "drop them to continue the same run, or start a new one with --init-from",
        )


def _check_resume(header: ckpt.Header, data: Corpus, config: TrainConfig, world: int = 1) -> None:
    """Refuse a resume that could not continue the same run, saying exactly what differs."""
    was = header.corpus
    if was.get("sha256") and was.get("sha256") != data.sha256:
        raise CheckpointError(
            f"--resume: the corpus differs from the one this run trained on ({was.get('name')}, "
            f"{was.get('chars')} chars, sha256 {str(was.get('sha256'))[:12]}...; this is {data.name}, "
            f"{len(data)} chars, sha256 {data.sha256[:12]}...)",
            f"resume with the original text, or fine-tune with --init-from {header.path}",
        )
    before = header.train
    diffs = [
        f"--{k.replace('_', '-')} {getattr(config, k)!r} (was {before[k]!r})"
        for k in RESUME_FIXED
        if k in before and k != "batch_size" and before[k] != getattr(config, k)
    ]
    saved_global = before.get("batch_size", config.batch_size) * int(header.state.get("world", 1))
    if saved_global != config.batch_size * world:
        diffs.insert(
            0,
            f"--batch-size {config.batch_size} (was {before.get('batch_size')!r}"
            f"{' per process' if world > 1 or saved_global != before.get('batch_size') else ''})",
        )
    if diffs:
        raise CheckpointError(
            f"--resume: options differ from the interrupted run: {', '.join(diffs)}",
            "drop them to continue the same run, or start a new one with --init-from",
        )
