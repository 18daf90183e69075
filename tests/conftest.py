"""Shared fixtures: a private cache folder, generated real-looking text, and one tiny trained model."""

from __future__ import annotations

import os
import random
from pathlib import Path

# Tiny models run fastest on one thread, and parallel test processes must not oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

WORDS = (
    "the of and to in a is that it was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much go good new write our me man too any day same right "
    "look think also around another came come work three word must because does part even place well"
).split()


def make_text(chars: int, seed: int = 0) -> str:
    """Sentences of common English words with capitals, punctuation and line breaks: enough structure
    for a character model to learn quickly, different for every seed."""
    rng = random.Random(seed)
    lines, line, total = [], [], 0
    while total < chars:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(3, 11))]
        sentence[0] = sentence[0].capitalize()
        text = " ".join(sentence) + rng.choice([".", ".", ".", "!", "?", ","])
        line.append(text)
        total += len(text) + 1
        if rng.random() < 0.35:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return ("\n".join(lines) + "\n")[:chars]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "charlm-cache"))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's own folder as the working folder, so ./checkpoints is private to the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(40_000, seed=1), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LSTM trained briefly on generated text; shared by the sample/perplexity/compress tests."""
    from charlm import ModelConfig, TrainConfig, train

    folder = tmp_path_factory.mktemp("tiny")
    os.environ.setdefault("CHARLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "charlm-cache"))
    corpus = folder / "words.txt"
    corpus.write_text(make_text(60_000, seed=2), encoding="utf-8")
    result = train(
        corpus,
        model=ModelConfig(vocab_size=1, cell="lstm", hidden_size=48, embed_size=16, num_layers=2),
        config=TrainConfig(
            steps=60, batch_size=16, seq_len=32, eval_every=30, lr=1e-2, warmup=5, precision="fp32", device="cpu"
        ),
        out=folder / "words.safetensors",
    )
    return result.checkpoint


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`charlm ARGS` in this process: (exit code, stdout, stderr)."""
    from charlm.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err
