"""train(): one training run, put together from the steps in charlm/training/.

train() never prints: it reports typed events to a callback (console.py renders them), writes the
checkpoints and the metrics log, and returns a TrainResult. Everything it needs to continue a run
bit for bit (weights, optimizer moments, data position, recurrent state, RNG) goes into the
`.last` checkpoint, so a resumed CPU run ends with exactly the weights of an uninterrupted one.
Resume is decided in the library (training/resume.py): the CLI passes only what the user typed.

The names users import from here stay here: `from charlm.trainer import TrainConfig, Stepped, ...`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import distributed
from .config import ModelConfig, TrainConfig, parse_duration
from .data import Corpus
from .device import cpu_settings
from .run_state import RunState
from .training.events import Evaluated, Event, EventSink, Note, Started, Stepped, TrainResult
from .training.loop import Loop
from .training.metrics_log import MetricsLog
from .training.paths import (
    best_path_of,
    check_writable,
    default_paths,
    new_run_path,
    numbered_runs,
    resume_path,
    run_files,
    taken,
)
from .training.resume import continued_config, last_checkpoint, run_settings
from .training.schedule import auto_eval_every, learning_rate
from .training.setup import (
    build_learner,
    event_sink,
    explain_defaults,
    fill_model,
    load_data,
    plan_devices,
    plan_origin,
    plan_passes,
    plan_shape,
    restore_state,
    run_header,
)

__all__ = [
    "Evaluated",
    "Event",
    "EventSink",
    "ModelConfig",
    "Note",
    "RunState",
    "Started",
    "Stepped",
    "TrainConfig",
    "TrainResult",
    "auto_eval_every",
    "best_path_of",
    "default_model",
    "default_paths",
    "learning_rate",
    "new_run_path",
    "numbered_runs",
    "parse_duration",
    "resume_path",
    "run_files",
    "taken",
    "train",
]


def default_model(config: TrainConfig, passes: float | None = None, vocab: int = 0) -> ModelConfig:
    """The architecture for a run when none is given: ModelConfig's defaults, sized by the budget,
    and for a run of up to 30 minutes by the passes its plain model will make over its text and the
    number of symbols it models (train() measures both: README "How charlm picks its defaults");
    without `passes`, the plain 2-layer shape; without `vocab`, the text is taken as a small alphabet."""
    return fill_model(ModelConfig(), config, passes, vocab)


def train(
    corpus: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Corpus,
    *,
    model: ModelConfig | Mapping[str, Any] | None = None,
    config: TrainConfig | Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool | str | os.PathLike[str] = False,
    init_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    on_event: EventSink | None = None,
    glob: str = "*",
) -> TrainResult:
    """Train a character model on `corpus` (a file path, a built-in corpus name or a Corpus).

    `corpus` may also be a folder (its files matching `glob`, searched recursively, hidden ones
    skipped), `"-"` (stdin) or a list of these: the documents are joined in order by U+001E
    (data.SEPARATOR), validation is the last whole documents, and the checkpoint lists each file
    with its sha256, so a resume refuses a changed set of files.

    `model` gives the architecture (its vocab_size is filled in from the text); `resume` continues
    the `.last` checkpoint beside `out` (or the path given); `init_from` starts from another
    checkpoint's weights, extending its vocab with the new text's characters. A new run never
    replaces an earlier model unless `overwrite` (see new_run_path). Under torchrun each process
    trains `config.batch_size` of the streams (global batch = processes x batch size).

    `model` and `config` may be mappings of only the options to change: on top of the defaults for
    a new run, on top of the interrupted run's settings with `resume`, so that
    `train(corpus, resume=True, config={"steps": 400})` continues exactly as
    `charlm train CORPUS --resume --steps 400`. With `resume`, `config=None` keeps the run's settings.

    `model=None` and `config=None` for a new run mean the defaults of ModelConfig and TrainConfig
    (the same as `charlm train`'s), and what they leave open is chosen by the same rule as on the
    command line (README: "How charlm picks its defaults"): a GRU 2x256 for budgets up to 6 minutes,
    2x384 up to 30, else 2x512, and 3x320 up to 30 minutes when the plain model will see its text
    often (16 times or more at 2x256, 6 at 2x384); batch 32 and 1.5x the rate when the run will see
    its text 3 times or more, and dropout 0.1 from 10 times (6 at 3 layers); rare characters folded when the
    vocabulary would make the output layer the costliest part.
    The Started event lists each choice with its reason; the checkpoint stores them resolved.
    """
    last = last_checkpoint(corpus, out, resume) if resume else None
    saved = ckpt.read_header(last) if last is not None and last.exists() else None
    asked_model, config = run_settings(model, config, saved)
    with cpu_settings(config.threads):  # the caller's thread count and denormal mode come back after
        return _train(
            corpus,
            asked_model,
            config,
            out=out,
            last=last,
            saved=saved,
            init_from=init_from,
            overwrite=overwrite,
            on_event=on_event,
            glob=glob,
        )


def _train(
    corpus: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Corpus,
    asked_model: ModelConfig | None,
    config: TrainConfig,
    *,
    out: str | os.PathLike[str] | None,
    last: Path | None,
    saved: ckpt.Header | None,
    init_from: str | os.PathLike[str] | None,
    overwrite: bool,
    on_event: EventSink | None,
    glob: str,
) -> TrainResult:
    devices = plan_devices(config)
    emit = event_sink(on_event, devices.dist)
    origin = plan_origin(corpus, out=out, last=last, saved=saved, init_from=init_from, overwrite=overwrite)
    if origin.resumed is not None:
        config = continued_config(origin.resumed, config, devices.dist.world)
    asked = config
    data, config = load_data(corpus, origin, config, devices.dist, pattern=glob, model=asked_model)
    if devices.dist.is_main:
        check_writable(origin.best_path.parent)
    saved_tensors = ckpt.read_tensors(origin.resumed) if origin.resumed is not None else {}
    planned, shape_probe = plan_shape(asked_model, config, data, origin, devices)
    learner, config = build_learner(origin, data, planned, config, devices, saved_tensors)
    # only a new model's open settings are chosen and explained; a resume or fine-tune keeps its model's
    new_model = origin.resumed is None and origin.init is None
    dropout_open = new_model and (asked_model or ModelConfig()).dropout is None
    config, data, passes = plan_passes(config, asked, data, learner, devices, shape_probe, dropout_open)
    state, hidden = restore_state(learner, origin, data, config, devices, saved_tensors)
    eval_every = auto_eval_every(len(data.val_ids), config)
    resume_step = state.step if origin.resumed is not None else None
    if origin.note:
        emit(Note(origin.note))
    for note in data.notes:
        emit(Note(note))
    if devices.dist.active:
        emit(
            Note(
                f"data-parallel on {devices.dist.world} processes: global batch {data.batches.batch_size} "
                f"streams ({config.batch_size} per process)"
            )
        )
    emit(
        Started(
            model=learner.net.config,
            config=config,
            params=learner.params,
            device=str(devices.device),
            precision=devices.precision,
            corpus=data.identity(),
            train_chars=len(data.train_ids),
            val_chars=len(data.val_ids),
            eval_every=eval_every,
            checkpoint=origin.best_path,
            resumed_step=resume_step,
            init_from=str(init_from) if init_from is not None else None,
            new_chars=data.new_chars,
            defaults=explain_defaults(
                asked_model,
                asked,
                learner.net.config,
                config,
                data,
                passes,
                shape_probe,
                prior_fades=learner.prior is not None,
            )
            if new_model
            else [],
        )
    )
    log = MetricsLog(origin.metrics_path, resume_step=resume_step) if devices.dist.is_main else None
    loop = Loop(
        config=config,
        devices=devices,
        data=data,
        learner=learner,
        state=state,
        hidden=hidden,
        origin=origin,
        header=run_header(learner.net, data, config),
        eval_every=eval_every,
        emit=emit,
        log=log,
    )
    try:
        return loop.run()
    finally:
        distributed.teardown(devices.dist)
