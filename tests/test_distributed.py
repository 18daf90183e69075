"""Data-parallel training with torchrun (2 CPU processes, gloo) equals one process with the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charlm import checkpoint as ckpt

TINY = [
    "--hidden",
    "32",
    "--embed",
    "16",
    "--layers",
    "2",
    "--seq-len",
    "32",
    "--eval-every",
    "6",
    "--steps",
    "12",
    "--lr",
    "0.01",
    "--warmup",
    "2",
    "--precision",
    "fp32",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--json",
]


def charlm(args: list[str], cwd: Path, *, processes: int = 1) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    done = subprocess.run(
        [*launcher, "-m", "charlm", "train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # only rank 0 prints
    return json.loads(lines[0])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt.read_tensors(ckpt.read_header(path)).items() if k.startswith("model.")}


def test_two_processes_match_one_process_with_the_global_batch(text_file: Path, tmp_path: Path) -> None:
    two = charlm([str(text_file), "--batch-size", "4", "--out", "two/m.safetensors", *TINY], tmp_path, processes=2)
    one = charlm([str(text_file), "--batch-size", "8", "--out", "one/m.safetensors", *TINY], tmp_path)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "m.last.safetensors",
        "m.metrics.jsonl",
        "m.safetensors",
    ]
    a, b = weights(tmp_path / "two/m.last.safetensors"), weights(tmp_path / "one/m.last.safetensors")
    # The two runs do the same maths in another order: each process sums the gradient over its 4
    # streams and gloo averages the halves, where one process sums all 8 in one kernel whose blocking
    # depends on the CPU (AVX2, AVX-512, AMX). That moves each gradient by float32 rounding (~1e-7
    # relative), and Adam divides by sqrt(v): for a weight whose gradient is near zero the rounding is
    # a large part of it, and that weight's update (at most ~lr = 1e-2 a step) can differ in earnest.
    # So: nearly every weight equal to 1e-5, none apart by more than a small fraction of lr x steps,
    # and the same validation loss.
    diffs = torch.cat([(a[key] - b[key]).abs().flatten() for key in a])
    assert (diffs > 1e-5).float().mean().item() < 0.01, f"{int((diffs > 1e-5).sum())} of {diffs.numel()} weights"
    assert diffs.max().item() < 1e-3
    # validation is split across the ranks and reduced exactly
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    assert two["steps"] == one["steps"] == 12

    # a 2-process run resumes in one process (the global batch of 8 streams is kept) and goes on
    resumed = charlm(
        [str(text_file), "--resume", "--out", "two/m.safetensors", *TINY[:-3], "--json", "--steps", "18"], tmp_path
    )
    assert resumed["steps"] == 18
    header = ckpt.read_header(tmp_path / "two/m.last.safetensors")
    assert header.train["batch_size"] == 8 and header.state["world"] == 1
