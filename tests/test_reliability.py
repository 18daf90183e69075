"""Failures a user can cause or suffer: each is one line, exit 2, and no existing file is damaged."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from charlm import checkpoint as ckpt
from charlm.data import iter_text
from charlm.errors import CheckpointError, CorpusError


def test_a_file_that_shrinks_while_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "growing.txt"
    path.write_text("abcdef" * 1000)
    chunks = iter_text(path, chunk_bytes=1000)
    next(chunks)
    os.truncate(path, 1500)
    with pytest.raises(CorpusError, match="changed size while it was read: wait until it is fully written"):
        list(chunks)


def test_a_full_disk_keeps_the_previous_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.safetensors"
    target.write_bytes(tiny_checkpoint.read_bytes())
    before = target.read_bytes()
    header = ckpt.read_header(target)
    tensors = ckpt.read_tensors(header)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError) as info:
        ckpt.write(target, tensors, {"model": header.model.to_dict(), "vocab": list(header.vocab.chars)})
    assert str(info.value) == (
        f"cannot write {target} (No space left on device); the previous checkpoint is intact: "
        "free some disk space or choose another --out"
    )
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]  # no temp file left


def test_non_finite_weights_are_never_written(tiny_checkpoint: Path, tmp_path: Path) -> None:
    header = ckpt.read_header(tiny_checkpoint)
    tensors = ckpt.read_tensors(header)
    tensors["model.head.bias"] = tensors["model.head.bias"].clone()
    tensors["model.head.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match="weight model.head.bias is not finite"):
        ckpt.write(tmp_path / "nan.safetensors", tensors, {})
    assert not (tmp_path / "nan.safetensors").exists()


def test_a_bug_prints_one_line_and_saves_the_traceback(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("charlm.lm.CharLM.stream_batch", broken)
    code, out, err = run_cli(["sample", "-c", str(tiny_checkpoint), "--length", "3"], capsys)
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: internal error (RuntimeError: simulated bug); this is a bug")
    log = next(tmp_path.glob("charlm-crash-*.log"))
    assert "Traceback" in log.read_text() and "simulated bug" in log.read_text()


def test_same_seed_same_samples_and_same_checkpoint(
    tiny_checkpoint: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = ["sample", "-c", str(tiny_checkpoint), "-n", "80", "--rng-seed"]
    first = run_cli([*sample, "5"], capsys)[1]
    second = run_cli([*sample, "5"], capsys)[1]
    assert first == second and len(first) == 81
    assert run_cli([*sample, "6"], capsys)[1] != first  # the seed is what decides

    def train(seed: str, out: str) -> dict[str, torch.Tensor]:
        """Every tensor of a tiny `charlm train` run's best checkpoint (dropout: the seed acts at every step)."""
        tiny = ["--hidden", "24", "--embed", "8", "--layers", "1", "--batch-size", "4", "--seq-len", "16"]
        options = ["--steps", "12", "--eval-every", "6", "--dropout", "0.1", "--device", "cpu", "--threads", "1"]
        code, _, err = run_cli(
            ["train", str(text_file), "--out", str(tmp_path / out), "--rng-seed", seed, *tiny, *options], capsys
        )
        assert code == 0, err
        return ckpt.read_tensors(ckpt.read_header(tmp_path / out))

    # Two separate runs with one seed write the same weights, every tensor bit for bit; another seed does
    # not (so the comparison can tell runs apart).
    a, b, other = train("5", "a.safetensors"), train("5", "b.safetensors"), train("6", "c.safetensors")
    assert a.keys() == b.keys() and any(name.startswith("model.") for name in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], other[name]) for name in a)
