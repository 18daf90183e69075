"""The models and runs a server offers, by name: a client never gives a path.

The server is started with checkpoint files and folders (default ./checkpoints). Folders are looked
at again on every listing, so a run that finishes while the server is up appears without a restart.
A model is loaded the first time a request uses it and then kept, with its generation pool; a
checkpoint rewritten on disk since (a run still training) is loaded afresh on its next use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import checkpoint as ckpt
from ..errors import CharlmError, CheckpointError
from ..plot import Curves, read_curves

if TYPE_CHECKING:
    from ..lm import CharLM
    from .pool import GenerationPool


class UnknownName(CharlmError):
    """A model or run name the server does not offer (HTTP 404)."""


@dataclass(frozen=True)
class Offer:
    """One model on offer: its name, its file and what its header says."""

    name: str
    path: Path
    header: ckpt.Header
    mtime_ns: int

    def to_json(self) -> dict:
        h = self.header
        m = h.model
        best = h.metrics.get("best_val_bpc", h.metrics.get("val_bpc"))
        return {
            "name": self.name,
            "cell": m.cell,
            "layers": m.num_layers,
            "hidden": m.hidden_size,
            "params": m.num_params(),
            "vocab": len(h.vocab),
            "corpus": h.corpus.get("name"),
            "corpus_chars": h.corpus.get("chars"),
            "val_bpc": best,
            "steps": h.metrics.get("step"),
            "created": h.created,
            "file_size": h.file_size,
        }


class Models:
    """Names -> checkpoints, newest first; loaded models with their pools."""

    def __init__(
        self,
        sources: list[Path],
        *,
        device: str = "auto",
        precision: str = "auto",
    ) -> None:
        self.sources = sources
        self.device = device
        self.precision = precision
        self._loaded: dict[str, tuple[int, CharLM, GenerationPool]] = {}
        self._lock = threading.Lock()

    def _files(self) -> list[Path]:
        found: list[Path] = []
        for source in self.sources:
            if source.is_dir():
                found += [p for p in source.glob("*.safetensors") if not p.name.endswith(".last.safetensors")]
            elif source.is_file():
                found.append(source)
        return found

    def offers(self) -> list[Offer]:
        """Every readable checkpoint, newest first; unreadable files are left out, not fatal."""
        offers: dict[str, Offer] = {}
        for path in self._files():
            try:
                header = ckpt.read_header(path)
                mtime = path.stat().st_mtime_ns
            except (CharlmError, OSError):
                continue
            name = path.name.removesuffix(".safetensors")
            if name not in offers or offers[name].mtime_ns < mtime:
                offers[name] = Offer(name, path, header, mtime)
        return sorted(offers.values(), key=lambda o: (-o.mtime_ns, o.name))

    def offer(self, name: object) -> Offer:
        if not isinstance(name, str):
            raise UnknownName("'model' must be a model name from GET /api/models")
        for o in self.offers():
            if o.name == name:
                return o
        raise UnknownName(f"no model named {name!r}", "GET /api/models lists the models on offer")

    def get(self, name: object) -> tuple[str, CharLM, GenerationPool]:
        """The loaded model and its pool (the first offer when name is None)."""
        if name is None:
            offers = self.offers()
            if not offers:
                raise UnknownName("this server has no model yet", "train one (charlm train FILE)")
            offer = offers[0]
        else:
            offer = self.offer(name)
        from ..lm import CharLM
        from .pool import GenerationPool

        with self._lock:
            loaded = self._loaded.get(offer.name)
            if loaded is not None and loaded[0] == offer.mtime_ns:
                return offer.name, loaded[1], loaded[2]
            lm = CharLM.load(offer.path, device=self.device, sample_precision=self.precision)
            pool = GenerationPool(lm)
            if loaded is not None:
                loaded[2].close("the model was replaced by a newer checkpoint of the same name")
            self._loaded[offer.name] = (offer.mtime_ns, lm, pool)
            return offer.name, lm, pool

    def _logs(self) -> dict[str, Path]:
        logs: dict[str, Path] = {}
        for source in self.sources:
            candidates = list(source.glob("*.metrics.jsonl")) if source.is_dir() else [ckpt.sibling_paths(source)[1]]
            for log in candidates:
                if log.is_file():
                    logs.setdefault(log.name.removesuffix(".metrics.jsonl"), log)
        return logs

    def runs(self) -> list[dict]:
        """The metrics logs beside the checkpoints on offer (runs still training included), newest first."""
        out = []
        for name, log in self._logs().items():
            try:
                stat = log.stat()
            except OSError:
                continue
            out.append({"name": name, "updated_ns": stat.st_mtime_ns, "bytes": stat.st_size})
        return sorted(out, key=lambda r: (-r["updated_ns"], r["name"]))

    def curves(self, name: str) -> Curves:
        """A run's learning curves; a log with nothing in it yet (a run just started) has none."""
        log = self._logs().get(name)
        if log is None:
            raise UnknownName(f"no run named {name!r}", "GET /api/runs lists the runs on offer")
        try:
            return read_curves(log)
        except CheckpointError:
            return Curves(source=log, train_bpc=[], val_bpc=[], lr=[])

    def active(self) -> int:
        """Generations running or about to, over every loaded model."""
        with self._lock:
            pools = [pool for _, _, pool in self._loaded.values()]
        return sum(pool.active for pool in pools)

    def close(self) -> None:
        with self._lock:
            for _, _, pool in self._loaded.values():
                pool.close()
            self._loaded.clear()
