"""Right on the first try: exit codes after signals, no model lost to a second run, one set of
defaults, a bounded validation split, signs of life off a terminal, and the thread policy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from conftest import make_text, run_cli
from test_cli import TINY as CLI_TINY

from charlm import ModelConfig, TrainConfig, train
from charlm import checkpoint as ckpt
from charlm.cli import cli
from charlm.config import budget_hidden_size, default
from charlm.data import split
from charlm.device import ThreadTuner

TINY = [*CLI_TINY, "--steps", "10"]  # test_cli's tiny model, with a step budget


@pytest.fixture
def in_tmp(in_tmp: Path) -> Path:
    """conftest's working folder, with a corpus.txt in it."""
    (in_tmp / "corpus.txt").write_text(make_text(30_000, seed=5), encoding="utf-8")
    return in_tmp


# ------------------------------------------------------------------------------------------ exit codes


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_the_resume_checkpoint_then_exits_128_plus_its_number(
    in_tmp: Path, signum: int, code: int
) -> None:
    (in_tmp / "big.txt").write_text(make_text(400_000, seed=6), encoding="utf-8")
    args = [
        sys.executable,
        "-m",
        "charlm",
        "train",
        "big.txt",
        "--hidden",
        "32",
        "--embed",
        "16",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--eval-every",
        "20",
        "--time",
        "5m",
        "--device",
        "cpu",
        "-v",
    ]
    proc = subprocess.Popen(
        args, cwd=in_tmp, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # wait for the first validation, so there is a run to keep
        if " val " in line:
            break
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == code, rest
    assert "interrupted; resume with --resume" in rest
    header = ckpt.read_header(in_tmp / "checkpoints" / "big.last.safetensors")
    assert header.kind == "last" and header.state["step"] >= 20


def test_sigterm_outside_training_exits_143(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from charlm import cli\n"
            "cli.cli.command('wait')(lambda: time.sleep(60))\n"
            "cli.main(['wait'])",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # not a timing assertion: only lets the interpreter reach the command
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().endswith("error: terminated")


# --------------------------------------------------------------------------------- no model is lost


def test_a_second_run_takes_the_next_free_name_and_keeps_the_first(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["train", "corpus.txt", "--json", *TINY], capsys)
    first = json.loads(out)
    assert code == 0 and Path(first["checkpoint"]) == Path("checkpoints/corpus.safetensors")
    before = (in_tmp / "checkpoints" / "corpus.safetensors").read_bytes()

    code, out, err = run_cli(["train", "corpus.txt", "--json", "--rng-seed", "7", *TINY], capsys)
    second = json.loads(out)
    assert code == 0 and Path(second["checkpoint"]) == Path("checkpoints/corpus-2.safetensors")
    assert (
        "note: checkpoints/corpus.safetensors holds an earlier model, kept; this run writes "
        "checkpoints/corpus-2.safetensors (--overwrite replaces instead)"
    ) in " ".join(err.split())
    assert (in_tmp / "checkpoints" / "corpus.safetensors").read_bytes() == before
    assert sorted(p.name for p in (in_tmp / "checkpoints").iterdir()) == [
        "corpus-2.last.safetensors",
        "corpus-2.metrics.jsonl",
        "corpus-2.safetensors",
        "corpus.last.safetensors",
        "corpus.metrics.jsonl",
        "corpus.safetensors",
    ]

    code, _, err = run_cli(["sample", "-n", "5", "--rng-seed", "1"], capsys)  # the newest model samples
    assert code == 0 and "checkpoints/corpus-2.safetensors" in err

    # --resume continues the newest run of the name
    code, out, _ = run_cli(["train", "corpus.txt", "--resume", "--steps", "20", "--json"], capsys)
    assert code == 0 and Path(json.loads(out)["checkpoint"]) == Path("checkpoints/corpus-2.safetensors")

    # --overwrite replaces the plain name's run
    code, out, err = run_cli(["train", "corpus.txt", "--json", "--overwrite", *TINY], capsys)
    assert code == 0 and Path(json.loads(out)["checkpoint"]) == Path("checkpoints/corpus.safetensors")
    assert "replacing the run at checkpoints/corpus.safetensors (--overwrite)" in err


def test_an_out_path_that_holds_a_model_is_refused_untouched(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run_cli(["train", "corpus.txt", "-o", "m.safetensors", *TINY], capsys)
    assert code == 0
    before = {p.name: p.read_bytes() for p in in_tmp.glob("m.*")}
    code, out, err = run_cli(["train", "corpus.txt", "-o", "m.safetensors", *TINY], capsys)
    assert code == 2 and out == ""
    assert err == (
        "error: m.safetensors already holds a trained model: pass --overwrite to replace it, --resume to "
        "continue it, or choose another --out\n"
    )
    assert {p.name: p.read_bytes() for p in in_tmp.glob("m.*")} == before


def test_decompress_finds_the_model_by_its_hash_after_a_retrain(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("constriction", reason="compression needs the compress extra: pip install 'charlm[compress]'")
    assert run_cli(["train", "corpus.txt", *TINY], capsys)[0] == 0
    (in_tmp / "note.txt").write_text("the people and the water, said one\n" * 20, encoding="utf-8")
    assert run_cli(["compress", "note.txt", "--no-adapt"], capsys)[0] == 0
    assert run_cli(["train", "corpus.txt", "--rng-seed", "9", *TINY], capsys)[0] == 0  # corpus-2, now the newest
    (in_tmp / "note.txt").rename(in_tmp / "original.txt")
    code, _, err = run_cli(["decompress", "note.txt.clm"], capsys)
    assert code == 0, err
    assert (in_tmp / "note.txt").read_bytes() == (in_tmp / "original.txt").read_bytes()
    assert "checkpoints/corpus.safetensors" in err


# ------------------------------------------------------------------------------------------- resume


def test_resume_with_changed_model_options_names_each_with_both_values(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["train", "corpus.txt", *TINY], capsys)[0] == 0
    code, _, err = run_cli(["train", "corpus.txt", "--resume", "--hidden", "64", "--model", "lstm"], capsys)
    assert code == 2
    assert err == (
        "error: --resume: the model options differ from the interrupted run: --model 'lstm' (was 'gru'), "
        "--hidden 64 (was 32): drop them to continue the same run, or start a new one with --init-from\n"
    )
    # options left alone keep the run's values, even where they are not the defaults
    code, out, err = run_cli(["train", "corpus.txt", "--resume", "--steps", "20", "--json"], capsys)
    assert code == 0, err and json.loads(out)["steps"] == 20


def test_resume_from_python_continues_exactly_like_the_cli(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Resume is decided in the library: `train(resume=True)` given only the options to change
    continues the run exactly as `charlm train --resume` with those flags, keeping the run's own
    values (here none of them the defaults) for everything else."""
    options = ["--dropout", "0.1", "--lr", "0.02", "--warmup", "3", "--schedule", "cosine", "--rng-seed", "9"]
    assert run_cli(["train", "corpus.txt", "-o", "cli.safetensors", *TINY, *options], capsys)[0] == 0
    for suffix in (".safetensors", ".last.safetensors", ".metrics.jsonl"):
        (in_tmp / f"api{suffix}").write_bytes((in_tmp / f"cli{suffix}").read_bytes())
    code, out, err = run_cli(
        ["train", "corpus.txt", "--resume", "-o", "cli.safetensors", "--steps", "25", "--json"], capsys
    )
    assert code == 0, err
    by_cli = json.loads(out)
    by_api = train("corpus.txt", resume=True, out="api.safetensors", config={"steps": 25})
    assert by_api.steps == by_cli["steps"] == 25 and by_api.val_loss == by_cli["val_loss"]
    for suffix in (".safetensors", ".last.safetensors"):
        a, b = ckpt.read_header(f"cli{suffix}"), ckpt.read_header(f"api{suffix}")
        assert a.model == b.model and a.train == b.train
        assert a.model.dropout == 0.1 and a.train["lr"] == 0.02 and a.train["steps"] == 25
        tensors_a, tensors_b = ckpt.read_tensors(a), ckpt.read_tensors(b)
        assert tensors_a.keys() == tensors_b.keys()
        for name in tensors_a:
            assert torch.equal(tensors_a[name], tensors_b[name]), (suffix, name)

    def losses(path: str) -> list[tuple]:
        records = map(json.loads, Path(path).read_text().splitlines())
        return [(r["event"], r["step"], r.get("train_loss"), r.get("val_loss")) for r in records]

    assert losses("api.metrics.jsonl") == losses("cli.metrics.jsonl")


def test_resume_from_a_best_checkpoint_names_the_resume_file(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["train", "corpus.txt", *TINY], capsys)[0] == 0
    code, _, err = run_cli(["train", "corpus.txt", "--resume", "checkpoints/corpus.safetensors"], capsys)
    assert code == 2
    assert err == (
        "error: --resume: checkpoints/corpus.safetensors holds no training state (it is a best checkpoint): "
        "resume from corpus.last.safetensors, or fine-tune with --init-from checkpoints/corpus.safetensors\n"
    )


# ---------------------------------------------------------------------------------- one set of defaults


def test_the_cli_reads_its_defaults_from_the_library_config() -> None:
    options = {p.name: p for p in cli.commands["train"].params}
    for flag, (cls, field) in {
        "cell": (ModelConfig, "cell"),
        "embed": (ModelConfig, "embed_size"),
        "dropout": (ModelConfig, "dropout"),
        "weight_drop": (ModelConfig, "weight_drop"),
        "init": (ModelConfig, "init"),
        "seq_len": (TrainConfig, "seq_len"),
        "batch_size": (TrainConfig, "batch_size"),
        "warmup": (TrainConfig, "warmup"),
        "schedule": (TrainConfig, "schedule"),
        "rng_seed": (TrainConfig, "rng_seed"),
        "val_fraction": (TrainConfig, "val_fraction"),
        "max_val_chars": (TrainConfig, "max_val_chars"),
    }.items():
        assert options[flag].default == default(cls, field), flag
    for flag, field in {"layers": "num_layers", "hidden": "hidden_size"}.items():  # chosen by the rule
        assert (options[flag].default, default(ModelConfig, field)) == (None, 0), flag
    assert isinstance(options["cell"].type, click.Choice)
    assert list(options["cell"].type.choices) == ["lstm", "gru", "rnn", "rnn-relu"]


def test_the_api_and_the_cli_train_the_same_model(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = TrainConfig(steps=2, eval_every=2, batch_size=8, seq_len=32, device="cpu")
    api = train("corpus.txt", config=config, out="api.safetensors")
    code, out, _ = run_cli(
        [
            "train",
            "corpus.txt",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "8",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "-o",
            "cli.safetensors",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    a, b = ckpt.read_header(api.checkpoint), ckpt.read_header(Path(json.loads(out)["checkpoint"]))
    assert a.model == b.model and a.model.cell == "gru" and a.model.hidden_size == budget_hidden_size(None)
    assert a.train == b.train


# ---------------------------------------------------------------------------------------- validation


def test_validation_is_the_tail_capped_at_max_val_chars() -> None:
    ids = torch.arange(1000).numpy()
    train_ids, val_ids = split(ids, 0.1)
    assert len(val_ids) == 100 and val_ids[0] == 900
    train_ids, val_ids = split(ids, 0.1, max_chars=30)
    assert len(val_ids) == 30 and val_ids[0] == 970 and len(train_ids) == 970


def test_a_capped_run_records_its_split_and_an_old_run_resumes_uncapped(in_tmp: Path) -> None:
    result = train(
        "corpus.txt",
        model=ModelConfig(hidden_size=16, embed_size=8, num_layers=1),
        config=TrainConfig(steps=2, eval_every=2, batch_size=4, seq_len=16, device="cpu", max_val_chars=1000),
        out="c.safetensors",
    )
    header = ckpt.read_header(result.checkpoint)
    assert header.corpus["val_chars"] == 1000 and header.train["max_val_chars"] == 1000
    old = {k: v for k, v in header.train.items() if k != "max_val_chars"}
    assert TrainConfig.from_dict(old).max_val_chars is None


# ----------------------------------------------------------------------------------------- heartbeat


def test_off_a_terminal_a_progress_line_comes_at_least_every_heartbeat(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("charlm.console.HEARTBEAT_S", 0.0)
    code, _, err = run_cli(["train", "corpus.txt", *TINY[:-1], "12"], capsys)  # --steps 12, default verbosity
    assert code == 0
    beats = [line for line in err.splitlines() if line.startswith("step") and "chars/s" in line]
    assert len(beats) >= 3 and "bits/char" in beats[-1] and "\x1b" not in err


# ------------------------------------------------------------------------------------- thread policy


class FakeLoad:
    """A clock and a workload whose speed depends on the thread count and on a neighbour."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = False

    def clock(self) -> float:
        return self.now

    def work(self, tuner: ThreadTuner, chars: int = 1000) -> None:
        with tuner.unit(chars):
            threads = torch.get_num_threads()
            speed = {(False, 1): 27_000, (False, 2): 33_000, (True, 1): 18_000, (True, 2): 6_000}[self.busy, threads]
            self.now += chars / speed


def test_the_tuner_keeps_the_faster_count_and_follows_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("charlm.device.cpu_cores", lambda: 2)
    before = torch.get_num_threads()
    load = FakeLoad()
    tuner = ThreadTuner("cpu", None, clock=load.clock)
    for _ in range(200):
        load.work(tuner)
    assert tuner.threads == 2 and torch.get_num_threads() == 2  # quiet: two threads win
    load.busy = True
    for _ in range(400):
        load.work(tuner)
    assert tuner.threads == 1 and torch.get_num_threads() == 1  # a neighbour came: one thread
    load.busy = False
    for _ in range(4000):  # the periodic probe notices the neighbour left
        load.work(tuner)
    assert tuner.threads == 2
    tuner.close()
    assert torch.get_num_threads() == before  # the caller's setting comes back


def test_a_fixed_thread_count_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("charlm.device.cpu_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not ThreadTuner("cpu", None).active
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert not ThreadTuner("cpu", 2).active and not ThreadTuner("cuda", None).active
    assert ThreadTuner("cpu", None).active


def test_train_leaves_the_callers_thread_count_and_denormal_mode_as_it_found_them(in_tmp: Path) -> None:
    from charlm.device import flushes_denormals

    before, flush = torch.get_num_threads(), flushes_denormals()
    torch.set_flush_denormal(False)
    try:
        config = TrainConfig(steps=2, eval_every=2, batch_size=8, seq_len=32, threads=1, device="cpu")
        train("corpus.txt", config=config)
        assert torch.get_num_threads() == before
        assert not flushes_denormals()
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(flush)


def test_bf16_is_chosen_only_where_the_cpu_and_its_dispatch_both_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' trains in bf16 on AMX or AVX512-BF16, and in fp32 on an AVX2-only CPU, or when the
    dispatch is capped to AVX2 (how the suite stands in for such a CPU): there bf16 would be emulated."""
    import platform

    from charlm import device as dev

    cpu = torch.device("cpu")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for flags, capability, expected in (
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "bf16"),
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512", "bf16"),
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", "fp32"),
        ({"avx2", "avx512f"}, "AVX512", "fp32"),
        ({"avx2"}, "AVX2", "fp32"),
    ):
        monkeypatch.setattr(dev, "_cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        assert dev.resolve_precision("auto", cpu) == expected, (flags, capability)
        assert dev.resolve_precision("fp32", cpu) == "fp32"
        assert dev.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(dev, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert dev.resolve_precision("auto", cpu) == "fp32"
