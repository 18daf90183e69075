"""What a model is and how to train it, as plain data: validated on creation, stored in every checkpoint.

The one source of defaults and choices: the CLI's options read them from here, so `train("corpus.txt")`
and `charlm train corpus.txt` build the same model. Kept apart from model.py and the trainer so that
reading a checkpoint header (`charlm info`) or `charlm --help` needs no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from .errors import CheckpointError, ConfigError

Cell = Literal["lstm", "gru", "rnn", "rnn-relu"]
Init = Literal["orthogonal", "xavier", "he", "pytorch"]
Schedule = Literal["auto", "constant", "cosine", "exponential", "plateau"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
TrainPrecision = Literal["auto", "fp32", "bf16"]  # the autocast dtype of training and scoring

MAX_PARAMS = 2_000_000_000
MAX_VOCAB = 0x110000
# Validation text is the tail of the corpus, capped so that a big corpus spends its budget training
# and still draws a learning curve: 500k characters score in seconds and pin bits/char to ~0.003.
MAX_VAL_CHARS = 500_000


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    vocab_size: int = 0  # 0: filled in from the training text by train()
    cell: Cell = "gru"  # the recurrent cell (`--model` on the command line)
    hidden_size: int = 0  # 0: chosen from the time budget by train() (budget_hidden_size)
    # 0: 2, or 3 for a text of a small alphabet (LARGE_VOCAB) that a run of up to 30 minutes sees often;
    # filled in by train() (fill_model)
    num_layers: int = 0
    embed_size: int = 64
    # None: from the passes the run will make, filled in by train() (0, or DROPOUT for a text seen
    # dropout_passes(num_layers, time) times or more, of at most LARGE_VOCAB symbols); a model built directly treats
    # None as 0
    dropout: float | None = None
    # DropConnect on the recurrent (hidden-to-hidden) weights while training (model.CharRNN._recur);
    # out of the defaults' rule: see training/sizing.py for what it measured
    weight_drop: float = 0.0
    init: Init = "orthogonal"

    def __post_init__(self) -> None:
        _check_int("vocab size", self.vocab_size, 0, MAX_VOCAB)
        _check_choice("--model", self.cell, Cell)
        _check_choice("--init", self.init, Init)
        if self.hidden_size != 0:  # 0 is "from the budget", filled in by train()
            _check_int("--hidden", self.hidden_size, 1, 65536)
        if self.num_layers != 0:  # 0 is "from the budget and the passes", filled in by train()
            _check_int("--layers", self.num_layers, 1, 64)
        _check_int("--embed", self.embed_size, 1, 65536)
        if self.dropout is not None and (not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not isinstance(self.weight_drop, (int, float)) or not 0.0 <= self.weight_drop < 1.0:
            raise ConfigError(f"--weight-drop must be in [0, 1) (got {self.weight_drop})")
        if self.num_params() > MAX_PARAMS:
            raise ConfigError(f"the model would have {self.num_params():,} parameters", "choose a smaller model")

    def gates(self) -> int:
        return {"lstm": 4, "gru": 3}.get(self.cell, 1)

    def recurrent_macs(self) -> int:
        """Multiply-adds per character in the recurrent layers (their weight matrices' size): what
        auto_min_count weighs the output layer against."""
        h, e = self.hidden_size, self.embed_size
        return sum(self.gates() * h * ((e if i == 0 else h) + h) for i in range(self.num_layers))

    def num_params(self) -> int:
        h, e, v = self.hidden_size, self.embed_size, self.vocab_size
        rnn = self.recurrent_macs() + self.num_layers * self.gates() * h * 2  # weights and both biases
        return v * e + rnn + h * v + v

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> ModelConfig:
        """Validated rebuild from untrusted JSON (a checkpoint header)."""
        if not isinstance(data, dict):
            raise CheckpointError("the checkpoint's model config is not an object")
        if "model" in data and "cell" not in data:  # checkpoints written before 2026-12 call the cell "model"
            data = {("cell" if k == "model" else k): v for k, v in data.items()}
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise CheckpointError(
                f"the checkpoint's model config has unknown keys {sorted(unknown)}",
                "it was written by a newer charlm: upgrade charlm",
            )
        try:
            config = cls(**data)
            if config.dropout is None:  # a checkpoint's model is resolved: open means none
                config = replace(config, dropout=0.0)
            if config.hidden_size == 0 or config.num_layers == 0 or config.vocab_size == 0:
                raise ConfigError(
                    "--hidden, --layers and the vocab size must be at least 1 "
                    f"(got {config.hidden_size}, {config.num_layers} and {config.vocab_size})"
                )
            return config
        except ConfigError as e:
            raise CheckpointError(f"the checkpoint's model config is invalid ({e.message})") from None
        except TypeError as e:
            raise CheckpointError(f"the checkpoint's model config is incomplete ({e})") from None


def _check_int(what: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what} must be a whole number from {low} to {high} (got {value!r})")


def _check_choice(what: str, value: object, choices: object) -> None:
    if value not in get_args(choices):
        raise ConfigError(f"{what} must be one of {', '.join(get_args(choices))} (got {value!r})")


SHORT_BUDGET_S = 360  # up to 6 minutes: 256 units
LONG_BUDGET_S = 1800  # up to 30 minutes: 384; longer: 512. Up to here a text seen often trains 3x320 (deep_passes)
DEFAULT_LAYERS = 2
# A run of up to 30 minutes trains DEEP_LAYERS x DEEP_HIDDEN when its plain model would see the text
# this many times or more (measured: training/sizing.py): DEEP_PASSES at 2x384 (over 6 minutes),
# DEEP_PASSES_SHORT at 2x256, which trains twice as many characters per second as the deeper model
DEEP_PASSES = 6.0
DEEP_PASSES_SHORT = 16.0
DEEP_LAYERS = 3  # (measured: training/sizing.py)
DEEP_HIDDEN = 320


def deep_passes(time_s: float) -> float:
    """The passes of the plain model from which a budget of `time_s` goes deep (DEEP_PASSES*)."""
    return DEEP_PASSES_SHORT if time_s <= SHORT_BUDGET_S else DEEP_PASSES


def budget_hidden_size(time_s: float | None) -> int:
    """Hidden units when none are given, from the time budget.

    Measured on 2 CPU cores on Shakespeare (bench/quality.py): within a few minutes a small model
    sees several times more text than a large one and ends lower; the larger model only pays off
    when the budget lets it see enough text. GRU beat LSTM of the same width at every budget tried.
    """
    seconds = time_s or math.inf
    return 256 if seconds <= SHORT_BUDGET_S else 384 if seconds <= LONG_BUDGET_S else 512


DEFAULT_BATCH = 64  # streams per step unless the run will see its text many times
DEFAULT_WEIGHT_DECAY = 0.01
# A run that will see its text MANY_PASSES times or more takes SMALL_BATCH streams, the learning rate
# x MANY_PASSES_LR and weight decay MANY_PASSES_WEIGHT_DECAY (measured: training/sizing.py); the
# numbers live here so the command line's help can name them without importing torch.
MANY_PASSES = 3.0
SMALL_BATCH = 32
MANY_PASSES_LR = 1.5
MANY_PASSES_WEIGHT_DECAY = 0.3
# A run that will see its text DROPOUT_PASSES times or more (at the model it trains, as the batch
# size's passes), or DEEP_DROPOUT_PASSES times for a model of DEEP_LAYERS layers or more (2.5 times the
# parameters of the 2x256 it replaces, it learns a text by heart in fewer passes), takes --dropout DROPOUT
# when it is open (measured: training/sizing.py). In a --time over SHORT_BUDGET_S, DEEP_LAYERS take it from
# LONG_DEEP_DROPOUT_PASSES: there 3x320 replaces a 2x384 of nearly its size, a text seen 6-9 times is 1-2M
# characters rather than a few hundred thousand, and dropout made the model underfit (sizing.py, "Dropout
# at three layers in a longer budget").
# A text of more than LONG_DEEP_DROPOUT_CHARS training characters needs proportionally more passes there: the
# same parameters learn a larger text by heart later (the first 1.8M characters of the plays lost with the
# regime in bf16 at 9.4-11.6 passes probed, where the 1.1M cut, 990k training characters, won at 8.7-13.3 in
# fp32; a 1.4M cut in between tied at 9.2). Other texts of 1.4M, in bf16: English fortunes tied near the line
# (9.8-14.2 probed), Python source gained 0.047 from the regime at 14.2, over it, and tied at 1.8M under it
# (10.8 probed, threshold 14.6: 1.777 against 1.782; deep-20min-1.4m-other-texts-*).
DROPOUT_PASSES = 10.0
DEEP_DROPOUT_PASSES = 6.0
LONG_DEEP_DROPOUT_PASSES = 9.0
LONG_DEEP_DROPOUT_CHARS = 1_000_000
DROPOUT = 0.1


def dropout_passes(layers: int, time_s: float | None, train_chars: int = 0) -> float:
    """The expected passes from which a model of `layers` layers, in a budget of `time_s` (None: not a
    time), learns a text of `train_chars` training characters (0: not known) by heart (DROPOUT_PASSES,
    DEEP_DROPOUT_PASSES, LONG_DEEP_DROPOUT_PASSES scaled past LONG_DEEP_DROPOUT_CHARS)."""
    if layers < DEEP_LAYERS:
        return DROPOUT_PASSES
    if time_s is None or time_s <= SHORT_BUDGET_S:
        return DEEP_DROPOUT_PASSES
    return LONG_DEEP_DROPOUT_PASSES * max(1.0, train_chars / LONG_DEEP_DROPOUT_CHARS)


# Every decay's floor, as a fraction of the peak rate (--min-lr-ratio): DEFAULT_MIN_LR_RATIO, or
# DROPOUT_MIN_LR_RATIO for a run in dropout's regime (the same passes and vocabulary, whatever --dropout
# says): there the late steps stay larger, the weight average smooths their noise, and the model learns its
# text less by heart: training ends higher and held-out text lower (measured: training/sizing.py)
DEFAULT_MIN_LR_RATIO = 0.1
DROPOUT_MIN_LR_RATIO = 0.3
# Characters per chunk (--seq-len): DEFAULT_SEQ_LEN, or BY_HEART_SEQ_LEN for a run of up to SHORT_BUDGET_S in
# the same regime: half the chunk makes twice the steps for 2-15% fewer characters per second, and a short run
# over a text seen that often gains more from the extra updates than it loses to the shorter backprop window;
# at 20 minutes it tied, 15% slower (measured: training/sizing.py)
DEFAULT_SEQ_LEN = 128
BY_HEART_SEQ_LEN = 64
# A text whose modelled vocabulary (after --min-count) has more than LARGE_VOCAB symbols, as a logographic
# script does (Chinese, Japanese), keeps the plain 2-layer shape and takes no dropout however often it is
# seen: both rules were measured on alphabets and code (73 to 166 symbols) and did not carry over to 3,605
# symbols of Chinese (measured: training/sizing.py); 1,000 lies between, where no text was measured.
LARGE_VOCAB = 1000
# A new model starts at the training text's unigram distribution (model.start_at_unigram), so that a handful
# of steps already scores what counting gives. Past LARGE_VOCAB symbols the first PRIOR_FADE_STEPS steps take
# those log frequencies back out of the output bias (training/setup.Learner.fade_prior): a model that keeps
# thousands of them there learns its training text faster and held-out text worse (measured: training/setup.py)
PRIOR_FADE_STEPS = 100
MAX_FOLDED_SHARE = 0.02  # auto --min-count never folds more than this share of the text


def auto_min_count(counts: dict[int, int], model: ModelConfig) -> int:
    """--min-count when none is given: fold the rarest characters until the output layer costs no
    more per character than the recurrent layers (vocab x hidden <= recurrent multiply-adds),
    folding at most 2% of the text. A character seen a few times cannot be learned in one run
    anyway, and with thousands of them the output layer would take most of the time: on the 5,965
    distinct characters of Debian's Chinese fortunes a 5-minute run scored 5.70 bits/char keeping
    them all and 5.44 with the 2,418 seen 10 times or more (the rule's choice for a GRU 2x256),
    folded characters honestly charged. English text and code (under ~200 characters) are never
    folded."""
    limit = model.recurrent_macs() // max(1, model.hidden_size)
    if len(counts) <= limit:
        return 1
    total = sum(counts.values())
    by_count = sorted(counts.values(), reverse=True)
    k = by_count[limit] + 1  # the smallest count that keeps at most `limit` characters
    while k > 1 and sum(n for n in by_count if n < k) > MAX_FOLDED_SHARE * total:
        k -= 1
    return k


def default_lr(hidden_size: int) -> float:
    """Peak rate when none is given: 2e-3 at 512 units, scaled inversely with the width (narrower
    layers take larger steps; 4e-3 at 256 measured best at a 2.5-minute budget)."""
    return 2e-3 * 512 / hidden_size


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Budgets (steps, epochs, time) may be combined: the first one reached stops."""

    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN, or BY_HEART_SEQ_LEN (sizing.short_chunks)
    batch_size: int | None = None  # None: 64, or 32 for a run that will see its text many times (training/sizing.py)
    lr: float | None = None  # None: default_lr(hidden size)
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY, or MANY_PASSES_WEIGHT_DECAY (sizing.py)
    clip: float = 1.0  # a guard: at 3x320 in the regime the norm never reached it (proxy-screen-clip-2026-12-06)
    average: float = 0.99  # decay of the weights' moving average that validation scores and saves; 0: off
    schedule: Schedule = "auto"
    warmup: int = 30
    min_lr_ratio: float | None = None  # None: DEFAULT_MIN_LR_RATIO, or DROPOUT_MIN_LR_RATIO (sizing.py)
    lr_decay: float = 0.95
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    steps: int | None = None
    epochs: float | None = None
    time: float | None = None  # seconds for the whole run, final validation and checkpoints included
    patience: int = 5
    eval_every: int = 0  # 0: auto_eval_every
    eval_batch_size: int = 64
    val_fraction: float = 0.1
    max_val_chars: int | None = MAX_VAL_CHARS  # None: no cap (runs from before the cap existed)
    min_count: int | None = None  # None: auto_min_count (the resolved value is what a checkpoint keeps)
    log_every: int = 10
    save_every: float = 300.0
    rng_seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None  # None: adapt between one thread and all cores as the load changes

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "eval_batch_size", "log_every", "min_count"):
            value = getattr(self, name)
            if value is None and name in ("min_count", "batch_size", "seq_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 1 << 24:
                raise ConfigError(f"{_flag(name)} must be a whole number of at least 1 (got {value!r})")
        _check_number("lr", self.lr, optional=True)
        _check_number("weight_decay", self.weight_decay, allow_zero=True, optional=True)
        _check_number("clip", self.clip, allow_zero=True)
        _check_number("warmup", self.warmup, allow_zero=True)
        _check_number("steps", self.steps, optional=True)
        _check_number("epochs", self.epochs, optional=True)
        _check_number("time", self.time, optional=True)
        _check_number("patience", self.patience, allow_zero=True)
        _check_number("eval_every", self.eval_every, allow_zero=True)
        _check_number("save_every", self.save_every)
        _check_number("plateau_patience", self.plateau_patience, allow_zero=True)
        _check_choice("--schedule", self.schedule, Schedule)
        _check_choice("--precision", self.precision, TrainPrecision)
        for name in ("min_lr_ratio", "lr_decay", "plateau_factor"):
            if name == "min_lr_ratio" and self.min_lr_ratio is None:
                continue
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{_flag(name)} must be in (0, 1] (got {getattr(self, name)!r})")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"--val-fraction must be between 0 and 0.5 (got {self.val_fraction!r})")
        if isinstance(self.average, bool) or not isinstance(self.average, (int, float)) or not 0 <= self.average < 1:
            raise ConfigError(f"--average must be in [0, 1) (got {self.average!r})")
        if self.max_val_chars is not None:
            _check_int("--max-val-chars", self.max_val_chars, 2, 1 << 40)
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ConfigError(f"--threads must be at least 1 (got {self.threads!r})")
        if isinstance(self.rng_seed, bool) or not isinstance(self.rng_seed, int) or self.rng_seed < 0:
            raise ConfigError(f"--rng-seed must be a whole number of 0 or more (got {self.rng_seed!r})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """From a checkpoint header; a run saved before the validation cap existed keeps no cap, so
        resuming it splits its text as it did."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("max_val_chars", None)
        values.setdefault("average", 0.0)  # runs from before the weight average saved their last weights
        try:
            return cls(**values)
        except (ConfigError, TypeError) as e:
            from .errors import CheckpointError

            raise CheckpointError(f"the checkpoint's training config is invalid ({e})") from None

    @property
    def lr_floor(self) -> float:
        """--min-lr-ratio as the schedule applies it: a config built directly, not yet through the
        rule that fills it (training/setup.plan_passes), floors at the default."""
        return DEFAULT_MIN_LR_RATIO if self.min_lr_ratio is None else self.min_lr_ratio

    def effective_schedule(self) -> str:
        if self.schedule != "auto":
            return self.schedule
        return "cosine" if self.has_budget() else "plateau"

    def has_budget(self) -> bool:
        return self.steps is not None or self.epochs is not None or self.time is not None


# Options that decide which numbers a resumed run computes; changing them breaks exact resume.
RESUME_FIXED = (
    "seq_len",
    "batch_size",
    "lr",
    "weight_decay",
    "clip",
    "average",
    "schedule",
    "warmup",
    "min_lr_ratio",
    "lr_decay",
    "plateau_factor",
    "plateau_patience",
    "val_fraction",
    "max_val_chars",
    "rng_seed",
    "min_count",
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$")


def parse_duration(text: str, option: str = "--time") -> float:
    """'90s', '5m', '2h' or plain seconds -> seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"{option} {text!r} is not a duration", "write it like 90s, 5m or 2h")
    unit = {"m": 60, "min": 60, "h": 3600, "hr": 3600}.get(match.group(2) or "s", 1)
    seconds = float(match.group(1)) * unit
    if seconds <= 0:
        raise ConfigError(f"{option} must be more than zero (got {text!r})")
    return seconds


def default(cls: type, name: str) -> Any:
    """A dataclass field's default, for the CLI's options."""
    value = {f.name: f.default for f in fields(cls)}[name]
    if value is MISSING:
        raise KeyError(name)
    return value


def choices(kind: Any) -> list[str]:
    """The values of a Literal type, for the CLI's click.Choice."""
    return list(get_args(kind))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(name: str, value: object, *, allow_zero: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        need = "zero or more" if allow_zero else "greater than zero"
        raise ConfigError(f"{_flag(name)} must be {need} (got {value!r})")
