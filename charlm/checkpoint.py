"""One self-describing .safetensors file per checkpoint: weights, vocab, configs, training state.

safetensors stores raw tensors plus a JSON header, so loading can never run code (unlike pickle).
The header is read by hand (8-byte length + JSON) so `charlm info` needs no torch, and every value
in it is treated as untrusted input and validated before anything is allocated.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CharlmError, CheckpointError
from .files import atomic_write
from .run_state import RunState
from .vocab import Vocab

if TYPE_CHECKING:
    import torch

    from .model import CharRNN, ModelConfig

FORMAT = "charlm"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 << 20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class Header:
    """A checkpoint's metadata, validated; `tensors` maps name -> (dtype, shape)."""

    path: Path
    model: ModelConfig
    vocab: Vocab
    kind: str
    format_version: int
    charlm_version: str
    created: str
    file_size: int
    train: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    corpus: dict = field(default_factory=dict)
    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "format": FORMAT,
            "format_version": self.format_version,
            "charlm_version": self.charlm_version,
            "kind": self.kind,
            "created": self.created,
            "file_size": self.file_size,
            "model": self.model.to_dict(),
            "params": self.model.num_params(),
            "vocab": list(self.vocab.chars),
            "folded": list(self.vocab.folded),
            "train": self.train,
            "state": self.state,
            "metrics": self.metrics,
            "corpus": self.corpus,
        }


def _bad(path: Path, what: str, hint: str = "") -> CheckpointError:
    return CheckpointError(f"{path} {what}", hint or "give a checkpoint written by `charlm train`")


def _raw_header(path: Path) -> tuple[dict, int]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint", "check the path, or train one with `charlm train FILE`")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint", "give a .safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, "is not a checkpoint (too short to be a safetensors file)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, "is not a safetensors checkpoint (bad header length; truncated or another format)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})", "check the file's permissions") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(path, "is not a safetensors checkpoint (its header is not JSON)") from None
    if not isinstance(data, dict):
        raise _bad(path, "is not a safetensors checkpoint (its header is not a JSON object)")
    return data, 8 + n


def _json_field(meta: dict, key: str, kind: type, path: Path) -> Any:
    if key not in meta:
        raise _bad(path, f"lacks the '{key}' entry in its metadata (damaged or not written by charlm)")
    try:
        value = json.loads(meta[key])
    except (TypeError, ValueError):
        raise _bad(path, f"has an unreadable '{key}' entry in its metadata") from None
    if not isinstance(value, kind):
        raise _bad(path, f"has a '{key}' entry of the wrong type")
    return value


def _checked_state(state: dict, path: Path) -> dict:
    """The training state is untrusted too: a resume does arithmetic on every value in it
    (RunState is its one schema)."""
    try:
        RunState.from_dict(state)
    except ValueError as e:
        raise _bad(path, f"has an invalid training state ({e})") from None
    if not isinstance(state.get("optim_groups", []), list):
        raise _bad(path, "has an invalid training state (optim_groups)")
    return state


def read_header(path: str | os.PathLike[str]) -> Header:
    """The validated metadata of a checkpoint, without reading its tensors (and without torch)."""
    from .config import MAX_VOCAB, ModelConfig

    path = Path(path)
    data, data_start = _raw_header(path)
    size = path.stat().st_size
    meta = data.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(
            path, "is a safetensors file but not a charlm checkpoint", "give a checkpoint written by `charlm train`"
        )
    raw_version = meta.get("format_version")
    if (
        not isinstance(raw_version, str)
        or not (raw_version.isascii() and raw_version.isdigit())
        or len(raw_version) > 9
    ):
        raise _bad(path, "has an unreadable format_version")
    version = int(raw_version)
    if version > FORMAT_VERSION:
        raise _bad(
            path,
            f"uses checkpoint format version {version}, newer than this charlm reads ({FORMAT_VERSION})",
            "upgrade charlm: pip install -U charlm",
        )
    if version < 1:
        raise _bad(path, f"has an invalid format_version {version}")
    model_dict = _json_field(meta, "model", dict, path)
    chars = _json_field(meta, "vocab", list, path)
    folded = _json_field(meta, "folded", list, path) if "folded" in meta else []
    try:
        model = ModelConfig.from_dict(model_dict)
        if len(chars) > MAX_VOCAB or len(chars) != model.vocab_size:
            raise _bad(path, f"has a vocab of {len(chars)} characters but a model for {model.vocab_size}")
        vocab = Vocab(chars, folded)
    except CharlmError as e:  # ModelConfig and Vocab know what is wrong, not in which file
        if e.message.startswith(f"{path} "):
            raise
        raise CheckpointError(f"{path}: {e.message}", e.hint or "give a checkpoint written by `charlm train`") from None
    tensors: dict[str, tuple[str, list[int]]] = {}
    end = 0
    for name, info in data.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            if dtype not in _DTYPE_BYTES or stop - begin != count * _DTYPE_BYTES[dtype] or begin < 0:
                raise ValueError
        except (TypeError, ValueError, KeyError):
            raise _bad(path, f"has a malformed entry for tensor {name!r}") from None
        tensors[name] = (dtype, [int(d) for d in shape])
        end = max(end, stop)
    if data_start + end > size:
        raise _bad(
            path,
            f"is truncated ({size} bytes, its header promises {data_start + end})",
            "the file was cut short; use another copy or the .last checkpoint",
        )
    return Header(
        path=path,
        model=model,
        vocab=vocab,
        kind=str(meta.get("kind", "best")),
        format_version=version,
        charlm_version=str(meta.get("charlm_version", "?")),
        created=str(meta.get("created", "")),
        file_size=size,
        train=_json_field(meta, "train", dict, path) if "train" in meta else {},
        state=_checked_state(_json_field(meta, "state", dict, path), path) if "state" in meta else {},
        metrics=_json_field(meta, "metrics", dict, path) if "metrics" in meta else {},
        corpus=_json_field(meta, "corpus", dict, path) if "corpus" in meta else {},
        tensors=tensors,
    )


def write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Atomically writes a checkpoint: a temp file in the same folder, fsync, then rename.

    A crash at any moment leaves either the old file or the new one, never a torn one. Refuses
    non-finite model weights, so a diverged run can never overwrite a good checkpoint.
    """
    import torch
    from safetensors.torch import save

    from .version import __version__

    path = Path(path)
    for name, t in tensors.items():
        if name.startswith("model.") and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"refusing to write {path}: weight {name} is not finite", "the run diverged; lower --lr or --clip"
            )
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "charlm_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in header.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    blob = save(flat, metadata=meta)
    try:
        atomic_write(path, blob)
    except OSError as e:
        raise CheckpointError(
            f"cannot write {path} ({e.strerror}); the previous checkpoint is intact",
            "free some disk space or choose another --out",
        ) from None


def read_tensors(header: Header) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint on the CPU (a GPU-trained file loads anywhere)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(header.path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _bad(header.path, f"could not be read ({str(e).splitlines()[0][:120]})") from None


def expected_shapes(config: ModelConfig) -> dict[str, list[int]]:
    """Parameter shapes of a model built from `config`, computed without allocating it."""
    import torch

    from .model import CharRNN

    with torch.device("meta"):
        meta_model = CharRNN(replace(config, init="pytorch"))
    return {f"model.{k}": list(v.shape) for k, v in meta_model.state_dict().items()}


def build_model(header: Header, tensors: dict[str, torch.Tensor] | None = None) -> CharRNN:
    """The model described by a header, with its weights, shape-checked before loading."""
    from .model import CharRNN

    want = expected_shapes(header.model)
    have = {k: shape for k, (_, shape) in header.tensors.items() if k.startswith("model.")}
    if set(want) != set(have):
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        raise _bad(header.path, f"does not match its model config (missing {missing}, unexpected {extra})")
    for k, shape in want.items():
        if have[k] != shape:
            raise _bad(header.path, f"has tensor {k} of shape {have[k]}, its config needs {shape}")
    for k in want:
        if header.tensors[k][0] not in ("F32", "F16", "BF16", "F64"):
            raise _bad(header.path, f"has tensor {k} of non-float type {header.tensors[k][0]}")
    tensors = tensors if tensors is not None else read_tensors(header)
    model = CharRNN(header.model)
    state = {k[len("model.") :]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model


def model_tensors(model: CharRNN) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v.float() for k, v in model.state_dict().items()}


def newest_checkpoint(folder: str | os.PathLike[str] = "checkpoints") -> Path:
    """The most recently written best checkpoint (not a .last resume file) in `folder`."""
    folder = Path(folder)
    found = (
        [p for p in folder.glob("*.safetensors") if not p.name.endswith(".last.safetensors")] if folder.is_dir() else []
    )
    if not found:
        raise CheckpointError(
            f"no checkpoint in {folder}/", "train one first (charlm train FILE) or pass --checkpoint PATH"
        )
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def sibling_paths(best: Path) -> tuple[Path, Path]:
    """(resume checkpoint, metrics log) that belong to a best checkpoint path."""
    stem = best.name.removesuffix(".safetensors")
    return best.with_name(f"{stem}.last.safetensors"), best.with_name(f"{stem}.metrics.jsonl")
