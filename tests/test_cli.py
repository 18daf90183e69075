"""The command line end to end: stdout carries only the product; every user mistake is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

TINY = [
    "--hidden",
    "32",
    "--embed",
    "16",
    "--layers",
    "1",
    "--batch-size",
    "8",
    "--seq-len",
    "32",
    "--eval-every",
    "10",
    "--device",
    "cpu",
]


def test_train_sample_perplexity_info_end_to_end(in_tmp: Path, text_file: Path, capsys: pytest.CaptureFixture[str]):
    code, out, err = run_cli(["train", str(text_file), "--steps", "30", "--json", *TINY], capsys)
    assert code == 0, err
    result = json.loads(out)  # stdout holds exactly one JSON object
    for key in (
        "checkpoint",
        "steps",
        "epochs",
        "params",
        "train_loss",
        "val_loss",
        "val_perplexity",
        "val_bpc",
        "chars_per_sec",
        "elapsed_s",
    ):
        assert key in result
    assert result["steps"] == 30 and Path(result["checkpoint"]) == Path("checkpoints/corpus.safetensors")
    assert (in_tmp / "checkpoints" / "corpus.last.safetensors").exists()
    assert "\x1b" not in err  # not a terminal: no escape codes

    code, out, err = run_cli(["sample", "--seed", "The ", "--length", "50", "--rng-seed", "3"], capsys)
    assert code == 0 and out.startswith("The ") and len(out) == len("The ") + 50 + 1
    assert "checkpoints/corpus.safetensors" in err

    code, out, _ = run_cli(
        ["sample", "--seed", "A", "-n", "20", "--num-samples", "3", "--rng-seed", "1", "--json"], capsys
    )
    samples = json.loads(out)
    assert len(samples["samples"]) == 3 and all(len(s) == 21 for s in samples["samples"])

    code, out, _ = run_cli(["perplexity", str(text_file), "--json"], capsys)
    score = json.loads(out)
    assert score["chars"] == 40_000 and score["unknown"] == 0 and score["perplexity"] > 1

    code, out, _ = run_cli(["info", "--json"], capsys)
    assert json.loads(out)["model"]["hidden_size"] == 32
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0 and "gru 1x32" in out


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d: d / "missing.txt", [], "error: {p}: no such file: check the path"),
        (lambda d: d, [], "error: no text file to train on in {p}: check the paths and --glob"),  # an empty folder
        (lambda d: write(d / "empty.txt", b""), [], "error: {p} is empty: give a file with some text in it"),
        (
            lambda d: write(d / "bin.txt", b"abc\x00def"),
            [],
            "error: {p} is not a text file: NUL byte at byte offset 3: give a UTF-8 text file",
        ),
        (
            lambda d: write(d / "latin.txt", "café".encode("latin-1")),
            [],
            "error: {p} is not valid UTF-8: bad byte at byte offset 3: convert it to UTF-8 (for example: "
            "iconv -f latin1 -t utf-8)",
        ),
        (
            lambda d: write(d / "short.txt", b"too short for a batch\n" * 20),
            [],
            "error: {p} is too short to train on: 440 characters, need at least 9248 for --batch-size 64, "
            "--seq-len 128 and --val-fraction 0.1: lower --batch-size or --seq-len, or use a longer text",
        ),
        (
            lambda d: Path("shakespear"),
            [],
            "error: shakespear: no such file and no built-in corpus of that name: known corpora: shakespeare, "
            "python-stdlib",
        ),
        (
            lambda d: write(d / "ok.txt", b"x" * 50_000),
            ["--hidden", "-5"],
            "error: --hidden must be a whole number from 1 to 65536 (got -5)",
        ),
        (
            lambda d: write(d / "ok.txt", b"x" * 50_000),
            ["--dropout", "1.5"],
            "error: --dropout must be in [0, 1) (got 1.5)",
        ),
        (
            lambda d: write(d / "ok.txt", b"x" * 50_000),
            ["--time", "5x"],
            "error: --time '5x' is not a duration: write it like 90s, 5m or 2h",
        ),
        (
            lambda d: write(d / "ok.txt", b"x" * 50_000),
            ["--lr", "-1"],
            "error: --lr must be greater than zero (got -1.0)",
        ),
        (
            lambda d: write(d / "ok.txt", b"x" * 50_000),
            ["--hidden", "abc"],
            "error: Invalid value for '--hidden': 'abc' is not a valid integer. (see 'charlm train --help')",
        ),
    ],
)
def test_train_bad_input_is_one_line_exit_2(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], make, extra: list[str], message: str
) -> None:
    path = make(in_tmp)
    code, out, err = run_cli(["train", str(path), *extra], capsys)
    assert code == 2
    assert out == ""
    assert err.rstrip("\n") == message.format(p=path)
    assert not (in_tmp / "checkpoints").exists()  # nothing written


def test_unwritable_out_directory(in_tmp: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = write(in_tmp / "afile", b"")
    code, _, err = run_cli(
        ["train", str(text_file), "--out", str(blocker / "m.safetensors"), "--steps", "5", *TINY], capsys
    )
    assert code == 2
    assert err == (
        f"error: cannot write checkpoints to {blocker}/: {blocker} is a file, not a folder: "
        "choose another place with --out\n"
    )


def test_sample_without_checkpoints_says_how_to_train(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["sample", "--seed", "x"], capsys)
    assert code == 2 and out == ""
    assert err == (
        "error: no checkpoint in checkpoints/: train one first (charlm train FILE) or pass --checkpoint PATH\n"
    )


def test_python_dash_m_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "charlm", "--help"], capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}
    )
    assert done.returncode == 0
    for command in ("train", "sample", "perplexity", "info"):
        assert command in done.stdout
    done = subprocess.run([sys.executable, "-m", "charlm", "--version"], capture_output=True, text=True)
    assert done.stdout.startswith("charlm, version ")
