"""Resume, decided here and nowhere else: which run continues, with which settings, and whether it can.

The caller passes only what it wants changed (the CLI: the options typed on the command line), so
`train(corpus, resume=True, config={"steps": 400})` and `charlm train CORPUS --resume --steps 400`
continue the same run the same way. Changes that would break exact resume are refused, each named
with both values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..config import DEFAULT_MIN_LR_RATIO, DEFAULT_SEQ_LEN, DEFAULT_WEIGHT_DECAY, RESUME_FIXED, ModelConfig, TrainConfig
from ..data import Corpus, as_sources, corpus_name
from ..errors import CheckpointError
from .paths import best_path_of, resume_path

MODEL_FLAGS = {
    "cell": "--model",
    "hidden_size": "--hidden",
    "num_layers": "--layers",
    "embed_size": "--embed",
    "dropout": "--dropout",
    "weight_drop": "--weight-drop",
    "init": "--init",
}

ModelSettings = ModelConfig | Mapping[str, Any] | None
TrainSettings = TrainConfig | Mapping[str, Any] | None


def last_checkpoint(
    corpus: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Corpus,
    out: str | os.PathLike[str] | None,
    resume: bool | str | os.PathLike[str],
) -> Path:
    """The .last checkpoint `resume` continues: the path given, else the newest run of the corpus's name."""
    if out is not None:
        name = ""  # --out names the run
    elif isinstance(corpus, Corpus):
        name = corpus.name
    else:
        name = corpus_name(as_sources(corpus))
    return resume_path(name, out, resume)


def run_settings(
    model: ModelSettings, config: TrainSettings, saved: ckpt.Header | None
) -> tuple[ModelConfig | None, TrainConfig]:
    """The run's (model, config). A mapping holds changes: on top of the interrupted run's settings
    when resuming (`saved`), else on top of the defaults. A full config is taken as given (and, on
    resume, checked against the run). A model of None means the defaults, or the run's own."""
    if isinstance(config, TrainConfig):
        train_config = config
    elif saved is not None:
        train_config = replace(TrainConfig.from_dict(saved.train), **(config or {}))
    else:
        train_config = TrainConfig(**(config or {}))
    if isinstance(model, ModelConfig) or model is None:
        return model, train_config
    if saved is not None:
        return (replace(saved.model, **model) if model else None), train_config
    return ModelConfig(**model), train_config


def opened(last: Path, saved: ckpt.Header | None) -> ckpt.Header:
    """The header of the run to continue, refusing a path that holds none (missing, or a best checkpoint)."""
    if saved is None:
        raise CheckpointError(
            f"--resume: no resume checkpoint at {last}",
            "start without --resume, or give the .last.safetensors file to continue",
        )
    if saved.kind != "last" or "optim_groups" not in saved.state:
        raise CheckpointError(
            f"--resume: {last} holds no training state (it is a best checkpoint)",
            f"resume from {ckpt.sibling_paths(best_path_of(last) or last)[0].name}, or fine-tune "
            f"with --init-from {last}",
        )
    return saved


def continued_config(header: ckpt.Header, config: TrainConfig, world: int) -> TrainConfig:
    """`config` as the resumed run uses it: the run's batch per process for this many processes,
    and the run's learning rate, weight decay, rate floor and chunk length when none is given."""
    config = _rebatch(header, config, world)
    if config.lr is None:
        config = replace(config, lr=header.train.get("lr"))
    if config.weight_decay is None:  # a run from before the rule kept 0.01, the default then
        config = replace(config, weight_decay=header.train.get("weight_decay", DEFAULT_WEIGHT_DECAY))
    if config.min_lr_ratio is None:  # every run saved before the rule stored its floor
        config = replace(config, min_lr_ratio=header.train.get("min_lr_ratio", DEFAULT_MIN_LR_RATIO))
    if config.seq_len is None:
        config = replace(config, seq_len=header.train.get("seq_len", DEFAULT_SEQ_LEN))
    return config


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
        return config  # check_resume reports the conflicting --batch-size
    return replace(config, batch_size=global_batch // world)


def check_resume(header: ckpt.Header, data: Corpus, config: TrainConfig, world: int = 1) -> None:
    """Refuse a resume that could not continue the same run, saying exactly what differs."""
    was = header.corpus
    if data.files:
        check_resume_files(header, data.files)
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


def check_resume_files(header: ckpt.Header, now: list[dict]) -> None:
    """Refuse another set of documents than the run's, naming each file changed, added or missing.
    Called before the files are encoded, so an edit that brings new characters is named as an edit."""
    was = header.corpus.get("files")
    if not isinstance(was, list):
        return  # a run on one file: check_resume compares the whole text's sha256
    before = {str(f.get("path")): f for f in was if isinstance(f, dict)}
    after = {f["path"]: f for f in now}
    diffs = [
        f"{path} changed (sha256 {f['sha256'][:12]}..., was {str(before[path].get('sha256'))[:12]}...)"
        for path, f in after.items()
        if path in before and before[path].get("sha256") != f["sha256"]
    ]
    diffs += [f"{path} added" for path in after if path not in before]
    diffs += [f"{path} missing" for path in before if path not in after]
    if not diffs and list(before) != list(after):
        diffs.append(f"the files are in another order (was {', '.join(before)})")
    if diffs:
        raise CheckpointError(
            f"--resume: the corpus files differ from the run's: {', '.join(diffs)}",
            f"resume with the original files, or fine-tune with --init-from {header.path}",
        )


def check_resume_model(asked: ModelConfig, saved: ModelConfig) -> None:
    """Refuse model options that differ from the interrupted run's, naming each with both values."""
    diffs = [
        f"{flag} {getattr(asked, key)!r} (was {getattr(saved, key)!r})"
        for key, flag in MODEL_FLAGS.items()
        if getattr(asked, key) != getattr(saved, key)
        and not (key in ("hidden_size", "num_layers") and not getattr(asked, key))  # 0: open, the run's own
        and not (key == "dropout" and getattr(asked, key) is None)  # None: open, the run's own
    ]
    if diffs:
        raise CheckpointError(
            f"--resume: the model options differ from the interrupted run: {', '.join(diffs)}",
            "drop them to continue the same run, or start a new one with --init-from",
        )
