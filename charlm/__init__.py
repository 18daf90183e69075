"""charlm: character-level language models (LSTM, GRU, Elman RNN) you can train on any text.

    from charlm import CharLM, train, TrainConfig, ModelConfig
    result = train("corpus.txt", config=TrainConfig(time=120))
    lm = CharLM.load(result.checkpoint)
    print(lm.sample("The ", length=200, temperature=0.8))
    print(lm.perplexity(pathlib.Path("other.txt")).bpc)

Importing charlm does no work and does not import torch; each name loads its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "CharLM": "lm",
    "Session": "session",
    "train": "trainer",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "ModelConfig": "config",
    "CharRNN": "model",
    "Metrics": "evaluate",
    "Vocab": "vocab",
    "Corpus": "data",
    "load_corpus": "data",
    "corpus_from_text": "data",
    "read_header": "checkpoint",
    "CharlmError": "errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .checkpoint import read_header
    from .config import ModelConfig
    from .data import Corpus, corpus_from_text, load_corpus
    from .errors import CharlmError
    from .evaluate import Metrics
    from .lm import CharLM
    from .model import CharRNN
    from .session import Session
    from .trainer import TrainConfig, TrainResult, train
    from .vocab import Vocab


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
