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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from . import checkpoint as ckpt
from .data import Batches, Corpus, cached_scan, load_corpus, split
from .device import (
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
from .model import CharRNN, ModelConfig, State, cross_entropy_sum
from .vocab import Vocab

Schedule = Literal["auto", "constant", "cosine", "exponential", "plateau"]
MAX_BAD_STEPS = 10  # consecutive non-finite steps before training gives up


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Budgets (steps, epochs, time) may be combined: the first one reached stops."""

    seq_len: int = 128
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    schedule: Schedule = "auto"
    warmup: int = 100
    min_lr_ratio: float = 0.1
    lr_decay: float = 0.95
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    steps: int | None = None
    epochs: float | None = None
    time: float | None = None
    patience: int = 5
    eval_every: int = 0
    eval_batch_size: int = 64
    val_fraction: float = 0.1
    log_every: int = 10
    save_every: float = 300.0
    rng_seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        def positive(name: str, value: float | None, *, allow_zero: bool = False, optional: bool = False) -> None:
            if value is None and optional:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not allow_zero):
                need = "zero or more" if allow_zero else "greater than zero"
                raise ConfigError(f"--{name.replace('_', '-')} must be {need} (got {value!r})")

        for name in ("seq_len", "batch_size", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 1 << 24:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number of at least 1 (got {value!r})")
        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, allow_zero=True)
        positive("clip", self.clip, allow_zero=True)
        positive("warmup", self.warmup, allow_zero=True)
        positive("steps", self.steps, optional=True)
        positive("epochs", self.epochs, optional=True)
        positive("time", self.time, optional=True)
        positive("patience", self.patience, allow_zero=True)
        positive("eval_every", self.eval_every, allow_zero=True)
        positive("save_every", self.save_every)
        positive("plateau_patience", self.plateau_patience, allow_zero=True)
        if self.schedule not in get_args(Schedule):
            raise ConfigError(f"--schedule must be one of {', '.join(get_args(Schedule))} (got {self.schedule!r})")
        for name in ("min_lr_ratio", "lr_decay", "plateau_factor"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1] (got {getattr(self, name)!r})")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"--val-fraction must be between 0 and 0.5 (got {self.val_fraction!r})")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1 (got {self.threads!r})")
        if isinstance(self.rng_seed, bool) or not isinstance(self.rng_seed, int) or self.rng_seed < 0:
            raise ConfigError(f"--rng-seed must be a whole number of 0 or more (got {self.rng_seed!r})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"the checkpoint's training config is invalid ({e})") from None

    def effective_schedule(self) -> str:
        if self.schedule != "auto":
            return self.schedule
        return "cosine" if self.has_budget() else "plateau"

    def has_budget(self) -> bool:
        return self.steps is not None or self.epochs is not None or self.time is not None


# Options that decide which numbers a resumed run computes; changing them breaks exact resume.
RESUME_FIXED = ("seq_len", "batch_size", "lr", "weight_decay", "clip", "schedule", "warmup", "min_lr_ratio",
                "lr_decay", "plateau_factor", "plateau_patience", "val_fraction", "rng_seed")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$")


def parse_duration(text: str) -> float:
    """'90s', '5m', '2h' or plain seconds -> seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"--time {text!r} is not a duration", "write it like 90s, 5m or 2h")
    unit = {"m": 60, "min": 60, "h": 3600, "hr": 3600}.get(match.group(2) or "s", 1)
    seconds = float(match.group(1)) * unit
    if seconds <= 0:
        raise ConfigError(f"--time must be more than zero (got {text!r})")
    return seconds


def default_paths(name: str, out: str | os.PathLike[str] | None) -> Path:
    return Path(out) if out is not None else Path("checkpoints") / f"{name}.safetensors"


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

    @property
    def val_perplexity(self) -> float:
        return math.exp(self.val_loss)

    @property
    def val_bpc(self) -> float:
        return self.val_loss / math.log(2)

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
        }


Event = Started | Progress | Evaluated | Note


# ------------------------------------------------------------------------------------------- helpers


def learning_rate(config: TrainConfig, *, step: int, fraction: float | None, epoch: float, plateau_scale: float) -> float:
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
    return Vocab(list(old.chars) + new), new


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


@contextlib.contextmanager
def _graceful_stop() -> Iterator[threading.Event]:
    """First Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary; a second one
    interrupts at once. Outside the main thread nothing is installed."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

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
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _loss_record(prefix: str, loss: float) -> dict:
    return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 700)), f"{prefix}_bpc": loss / math.log(2)}


# ---------------------------------------------------------------------------------------------- train


def train(
    corpus: str | os.PathLike[str] | Corpus,
    *,
    model: ModelConfig | None = None,
    config: TrainConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool | str | os.PathLike[str] = False,
    init_from: str | os.PathLike[str] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> TrainResult:
    """Train a character model on `corpus` (a file path, a built-in corpus name or a Corpus).

    `model` gives the architecture (its vocab_size is filled in from the text); `resume` continues
    the `.last` checkpoint beside `out` (or the path given); `init_from` starts from another
    checkpoint's weights, extending its vocab with the new text's characters.
    """
    config = config or TrainConfig()
    emit = on_event or (lambda event: None)
    model_config = model or ModelConfig()
    configure_cpu(config.threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)

    # --- where things go, and what we continue from
    resume_header = init_header = None
    if isinstance(corpus, Corpus):
        name = corpus.name
    else:
        from .corpora import resolve

        corpus_path, name = resolve(corpus)
    best_path = default_paths(name, out)
    if best_path.suffix != ".safetensors":
        best_path = best_path.with_name(best_path.name + ".safetensors")
    last_path, metrics_path = ckpt.sibling_paths(best_path)
    if resume:
        resume_path = last_path if resume is True else Path(resume)
        if not resume_path.exists():
            raise CheckpointError(f"--resume: no resume checkpoint at {resume_path}",
                                  "start without --resume, or give the .last.safetensors file to continue")
        resume_header = ckpt.read_header(resume_path)
        if resume_header.kind != "last" or "optim_groups" not in resume_header.state:
            raise CheckpointError(f"--resume: {resume_path} holds no training state (it is a best checkpoint)",
                                  f"resume from {last_path.name}, or fine-tune with --init-from {resume_path}")
    elif init_from is not None:
        init_header = ckpt.read_header(init_from)

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
            vocab = scan.vocab()
        data = load_corpus(corpus_path, vocab=vocab, name=name)
    if resume_header is not None:
        _check_resume(resume_header, data, config)
    need = math.ceil(Batches.min_chars(config.batch_size, config.seq_len) / (1 - config.val_fraction)) + 2
    if len(data) < need:
        raise CorpusError(
            f"{data.name} is too short to train on: {len(data)} characters, need at least {need} for "
            f"--batch-size {config.batch_size}, --seq-len {config.seq_len} and --val-fraction {config.val_fraction}",
            "lower --batch-size or --seq-len, or use a longer text")
    train_ids, val_ids = split(data.ids, config.val_fraction)
    batches = Batches(train_ids, config.batch_size, config.seq_len, config.rng_seed)
    if len(val_ids) < 2:
        raise ConfigError("the validation split is too small", "raise --val-fraction or use a longer text")
    _check_writable(best_path.parent)

    # --- model and optimizer
    seed_everything(config.rng_seed)
    tensors: dict[str, torch.Tensor] = {}
    if resume_header is not None:
        tensors = ckpt.read_tensors(resume_header)
        net = ckpt.build_model(resume_header, tensors)
        if model is not None and replace(model, vocab_size=net.config.vocab_size) != net.config:
            raise CheckpointError("--resume: the model options differ from the checkpoint's",
                                  "drop the model options when resuming")
    elif init_header is not None:
        net = ckpt.build_model(init_header)
        if len(data.vocab) > net.config.vocab_size:
            net = grow_model(net, len(data.vocab))
    else:
        net = CharRNN(replace(model_config, vocab_size=len(data.vocab)))
    net.to(device)
    net.train()
    opt = make_optimizer(net, config, device)
    params = sum(p.numel() for p in net.parameters())

    # --- training state
    st: dict[str, Any] = {"step": 0, "epoch": 0, "chunk": 0, "chars": 0, "elapsed": 0.0, "best_val": math.inf,
                          "best_step": 0, "evals_since_best": 0, "plateau_scale": 1.0, "plateau_best": math.inf,
                          "plateau_bad": 0, "skipped": 0, "last_eval_step": -1, "train_loss": None}
    state: State = net.initial_state(config.batch_size, device)
    if resume_header is not None:
        saved = resume_header.state
        st.update({k: saved[k] for k in st if k in saved})
        load_optimizer(opt, tensors, saved["optim_groups"])
        set_rng_state({k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}, device)
        hidden = [tensors[f"hidden.{i}"] for i in range(len(state)) if f"hidden.{i}" in tensors]
        if len(hidden) == len(state) and all(h.shape == s.shape for h, s in zip(hidden, state, strict=True)):
            state = tuple(h.to(device) for h in hidden)

    eval_every = auto_eval_every(len(val_ids), config)
    corpus_info = {**data.identity(), "train_chars": len(train_ids), "val_chars": len(val_ids)}
    header_common = {"model": net.config.to_dict(), "vocab": list(data.vocab.chars), "train": config.to_dict(),
                     "corpus": corpus_info}
    if best_path.exists() and resume_header is None:
        emit(Note(f"replacing {best_path} (use --resume to continue a run instead)"))
    emit(Started(model=net.config, config=config, params=params, device=str(device), precision=precision,
                 corpus=corpus_info, train_chars=len(train_ids), val_chars=len(val_ids), eval_every=eval_every,
                 checkpoint=best_path, resumed_step=st["step"] if resume_header is not None else None,
                 init_from=str(init_from) if init_from is not None else None, new_chars=new_chars))

    log = _MetricsLog(metrics_path, resume_step=st["step"] if resume_header is not None else None)
    session_start = time.perf_counter()
    elapsed_before = st["elapsed"]
    non_train_time = 0.0
    session_chars = 0
    last_save = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    loss_steps = 0
    bad_run = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)
    params_list = list(net.parameters())
    fused = bool(opt.defaults.get("fused"))
    steps_in_epoch = batches.steps_in_epoch(st["epoch"])
    last_val: Metrics | None = None
    stopped = ""

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    def epoch_float() -> float:
        return st["epoch"] + st["chunk"] / max(1, steps_in_epoch)

    def fraction() -> float | None:
        parts = []
        if config.steps:
            parts.append(st["step"] / config.steps)
        if config.epochs:
            parts.append(epoch_float() / config.epochs)
        if config.time:
            parts.append(elapsed() / config.time)
        return min(1.0, max(parts)) if parts else None

    def current_lr() -> float:
        return learning_rate(config, step=st["step"], fraction=fraction(), epoch=epoch_float(),
                             plateau_scale=st["plateau_scale"])

    def save(kind: str) -> None:
        nonlocal last_save, non_train_time
        began = time.perf_counter()
        meta = {**header_common, "kind": kind, "state": {**st, "elapsed": elapsed()},
                "metrics": _metrics_summary(st, last_val)}
        tensors_out = ckpt.model_tensors(net)
        if kind == "last":
            opt_tensors, groups = optimizer_tensors(opt)
            meta["state"]["optim_groups"] = groups
            tensors_out.update(opt_tensors)
            tensors_out.update({f"rng.{k}": v for k, v in rng_state(device).items()})
            tensors_out.update({f"hidden.{i}": s for i, s in enumerate(state)})
            last_save = time.perf_counter()
        ckpt.write(best_path if kind == "best" else last_path, tensors_out, meta)
        non_train_time += time.perf_counter() - began

    def run_eval() -> None:
        nonlocal non_train_time, last_val
        began = time.perf_counter()
        metrics = evaluate(net, val_ids, start_id=data.vocab.start_id, batch_size=config.eval_batch_size,
                           device=device, precision=precision)
        last_val = metrics
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
            if st["plateau_bad"] > config.plateau_patience:
                st.update(plateau_scale=max(config.min_lr_ratio, st["plateau_scale"] * config.plateau_factor),
                          plateau_bad=0)
        non_train_time += time.perf_counter() - began
        log.write({"event": "eval", "step": st["step"], "epoch": round(epoch_float(), 5), "chars": st["chars"],
                   "elapsed_s": round(elapsed(), 3), "lr": current_lr(), **_loss_record("val", metrics.cross_entropy),
                   **({} if st["train_loss"] is None else _loss_record("train", st["train_loss"]))})
        if improved:
            save("best")
        save("last")
        emit(Evaluated(step=st["step"], val=metrics, train_loss=st["train_loss"], best=improved,
                       best_val=st["best_val"], evals_since_best=st["evals_since_best"]))

    def budget_reached() -> str:
        if config.steps is not None and st["step"] >= config.steps:
            return "steps"
        if config.epochs is not None and epoch_float() >= config.epochs:
            return "epochs"
        if config.time is not None and elapsed() >= config.time:
            return "time"
        if config.patience and st["evals_since_best"] >= config.patience:
            return "patience"
        return ""

    try:
        with _graceful_stop() as stop_requested:
            while True:
                stopped = budget_reached()
                if stopped:
                    break
                if stop_requested.is_set():
                    stopped = "interrupted"
                    break
                lr = current_lr()
                for group in opt.param_groups:
                    group["lr"] = lr
                x_np, y_np = batches.get(st["epoch"], st["chunk"])
                x = torch.from_numpy(x_np).to(device, non_blocking=True)
                y = torch.from_numpy(y_np).to(device, non_blocking=True)
                with autocast(device, precision):
                    logits, new_state = net(x, state)  # [B, T, V]
                loss = cross_entropy_sum(logits, y) / y.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params_list, config.clip, foreach=True)
                else:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params_list if p.grad is not None])
                bad = ~(torch.isfinite(norm) & torch.isfinite(loss))
                if fused:
                    opt.found_inf = bad.float()  # the fused kernel skips the update (and the step count)
                    opt.step()
                elif not bool(bad):
                    opt.step()
                state = tuple(torch.where(bad, old.to(new.dtype), new.detach())
                              for old, new in zip(state, new_state, strict=True))
                loss_sum += torch.where(bad, 0.0, loss.detach())
                bad_run = (bad_run + 1) * bad
                skipped += bad
                loss_steps += 1
                st["step"] += 1
                st["chunk"] += 1
                st["chars"] += y.numel()
                session_chars += y.numel()
                if st["chunk"] >= steps_in_epoch:
                    st["epoch"] += 1
                    st["chunk"] = 0
                    steps_in_epoch = batches.steps_in_epoch(st["epoch"])
                    state = net.initial_state(config.batch_size, device)
                report = st["step"] % config.log_every == 0
                if report:
                    n_bad = int(skipped.item())
                    if loss_steps > n_bad:
                        st["train_loss"] = float(loss_sum.item()) / (loss_steps - n_bad)
                    if n_bad:
                        st["skipped"] += n_bad
                        emit(Note(f"skipped {n_bad} step(s) with a non-finite loss or gradient "
                                  f"(total {st['skipped']})"))
                    loss_sum.zero_()
                    skipped.zero_()
                    loss_steps = 0
                    if int(bad_run.item()) >= MAX_BAD_STEPS:
                        raise TrainingError(
                            f"the loss or gradients were not finite for {MAX_BAD_STEPS} steps in a row "
                            f"(step {st['step']}); the last good checkpoint is kept",
                            f"lower --lr (now {config.lr:g}) or --clip (now {config.clip:g}), or try --precision fp32")
                    train_time = max(1e-9, time.perf_counter() - session_start - non_train_time)
                    log.write({"event": "train", "step": st["step"], "epoch": round(epoch_float(), 5),
                               "chars": st["chars"], "elapsed_s": round(elapsed(), 3), "lr": lr,
                               **_loss_record("train", st["train_loss"] or 0.0),
                               "chars_per_sec": session_chars / train_time})
                emit(Progress(step=st["step"], epoch=epoch_float(), chars=st["chars"], elapsed_s=elapsed(),
                              fraction=fraction(), lr=lr, train_loss=st["train_loss"] if report else None,
                              chars_per_sec=session_chars / max(1e-9, time.perf_counter() - session_start
                                                                - non_train_time)))
                if st["step"] % eval_every == 0:
                    run_eval()
                elif time.perf_counter() - last_save >= config.save_every:
                    save("last")
            if st["last_eval_step"] != st["step"]:
                run_eval()
    except KeyboardInterrupt:
        stopped = "interrupted"
        save("last")
    finally:
        log.close()
    if not math.isfinite(st["best_val"]):
        raise TrainingError("training stopped before the first evaluation, so no checkpoint was written",
                            "train for longer")
    train_time = max(1e-9, time.perf_counter() - session_start - non_train_time)
    return TrainResult(
        checkpoint=best_path,
        last_checkpoint=last_path,
        metrics_log=metrics_path,
        steps=st["step"],
        epochs=epoch_float(),
        params=params,
        train_loss=st["train_loss"],
        val_loss=st["best_val"],
        best_step=st["best_step"],
        chars_per_sec=session_chars / train_time,
        elapsed_s=elapsed(),
        stopped=stopped,
        skipped_steps=st["skipped"],
    )


def _metrics_summary(st: dict, val: Metrics | None) -> dict:
    out = {"step": st["step"], "best_step": st["best_step"], "train_loss": st["train_loss"]}
    if math.isfinite(st["best_val"]):
        out.update(best_val_loss=st["best_val"], best_val_ppl=math.exp(st["best_val"]),
                   best_val_bpc=st["best_val"] / math.log(2))
    if val is not None:
        out.update(val_loss=val.cross_entropy, val_ppl=val.perplexity, val_bpc=val.bpc)
    return out


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".charlm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write checkpoints to {folder}/ ({e.strerror})",
                          "choose a writable place with --out") from None


def _check_resume(header: ckpt.Header, data: Corpus, config: TrainConfig) -> None:
    """Refuse a resume that could not continue the same run, saying exactly what differs."""
    was = header.corpus
    if was.get("sha256") and was.get("sha256") != data.sha256:
        raise CheckpointError(
            f"--resume: the corpus differs from the one this run trained on ({was.get('name')}, "
            f"{was.get('chars')} chars, sha256 {str(was.get('sha256'))[:12]}...; this is {data.name}, "
            f"{len(data)} chars, sha256 {data.sha256[:12]}...)",
            f"resume with the original text, or fine-tune with --init-from {header.path}")
    before = header.train
    diffs = [f"--{k.replace('_', '-')} {getattr(config, k)!r} (was {before[k]!r})"
             for k in RESUME_FIXED if k in before and before[k] != getattr(config, k)]
    if diffs:
        raise CheckpointError(f"--resume: options differ from the interrupted run: {', '.join(diffs)}",
                              "drop them to continue the same run, or start a new one with --init-from")
