"""The metrics log, `charlm plot`, --tensorboard, and the conventions every command keeps: plain output
off a terminal, parseable --json, --quiet/--verbose everywhere, defaults in --help, shell completion."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import make_text, run_cli

from charlm.cli import cli
from charlm.plot import EVAL_KEYS, TRAIN_KEYS, find_metrics, read_curves, show_training_curve, write_image

TINY = [
    "--steps",
    "20",
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
    "--threads",
    "1",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def charlm(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m charlm ARGS` in a subprocess whose stdout and stderr are pipes, not terminals."""
    env = {**os.environ, "CHARLM_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "charlm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One tiny run through the real command line: 20 steps, an evaluation every 10."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "corpus.txt").write_text(make_text(40_000, seed=1), encoding="utf-8")
    return folder, charlm(["train", "corpus.txt", "--json", *TINY], folder)


@pytest.fixture
def run_copy(
    trained: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A private copy of the trained run's folder, as the working directory."""
    shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def metrics_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "checkpoints" / "corpus.metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- metrics


def test_train_off_a_terminal_prints_json_and_no_escape_codes(trained) -> None:
    _, done = trained
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is exactly one JSON object
    assert result["steps"] == 20 and result["metrics_log"] == "checkpoints/corpus.metrics.jsonl"
    assert "\x1b" not in done.stdout and "\x1b" not in done.stderr
    assert "bits/char" not in done.stderr  # the closing curve is for terminals only


def test_metrics_log_lines_have_the_documented_keys(trained) -> None:
    folder, done = trained
    lines = metrics_lines(folder)
    assert [(line["event"], line["step"]) for line in lines] == [
        ("train", 10),
        ("eval", 10),
        ("train", 20),
        ("eval", 20),
    ]
    for line in lines:
        assert set(TRAIN_KEYS if line["event"] == "train" else EVAL_KEYS) <= set(line)
        assert line["chars"] == line["step"] * 8 * 32  # batch x seq_len characters per step
        for split in ("train", "val"):
            if f"{split}_loss" in line:
                loss = line[f"{split}_loss"]
                assert line[f"{split}_bpc"] == pytest.approx(loss / math.log(2))
                assert line[f"{split}_ppl"] == pytest.approx(math.exp(loss))
    assert min(line["val_loss"] for line in lines if line["event"] == "eval") == json.loads(done.stdout)["val_loss"]


def test_resumed_run_continues_the_same_metrics_log(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (run_copy / "checkpoints" / "corpus.metrics.jsonl").read_text()
    code, _, err = run_cli(["train", "corpus.txt", "--resume", "--steps", "30", *TINY[2:]], capsys)
    assert code == 0, err
    after = (run_copy / "checkpoints" / "corpus.metrics.jsonl").read_text()
    assert after.startswith(before)
    assert [line["step"] for line in metrics_lines(run_copy)] == [10, 10, 20, 20, 30, 30]


# ------------------------------------------------------------------------------------------------ plot


def test_plot_writes_a_png(trained) -> None:
    folder, _ = trained
    done = charlm(["plot", "-o", "curves.png"], folder)
    assert done.returncode == 0, done.stderr
    data = (folder / "curves.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert done.stdout == "" and "wrote curves.png" in done.stderr and "\x1b" not in done.stderr
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_plot_in_a_pipe_is_plain_text(trained) -> None:
    folder, _ = trained
    done = charlm(["plot", "checkpoints/corpus.metrics.jsonl"], folder)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout + done.stderr
    for text in ("corpus: bits/char (best validation", "++ train", "xx validation", "learning rate", "5,000 chars"):
        assert text in done.stdout
    assert done.stderr == "from checkpoints/corpus.metrics.jsonl (2 train and 2 validation points)\n"


def test_plot_finds_the_log_from_a_checkpoint_a_resume_file_or_a_folder(run_copy: Path) -> None:
    log = Path("checkpoints/corpus.metrics.jsonl")
    for source in (None, "checkpoints", "checkpoints/corpus.safetensors", "checkpoints/corpus.last.safetensors", log):
        assert find_metrics(source) == log
    curves = read_curves()
    assert [x for x, _ in curves.train_bpc] == [x for x, _ in curves.val_bpc] == [2560.0, 5120.0]
    assert len(curves.lr) == 2 and curves.best_val_bpc == min(y for _, y in curves.val_bpc)


def test_closing_curve_is_drawn_only_when_there_is_one(run_copy: Path) -> None:
    stream = io.StringIO()
    assert show_training_curve(Path("checkpoints/corpus.metrics.jsonl"), stream, color=False)
    assert "bits/char" in stream.getvalue() and "learning rate" not in stream.getvalue()
    assert not show_training_curve(Path("checkpoints/missing.metrics.jsonl"), stream, color=False)


def test_train_on_a_terminal_ends_with_the_curve(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    monkeypatch.setattr("charlm.console.err", Console(stderr=True, force_terminal=True, no_color=True, width=90))
    code, _, err = run_cli(["train", "corpus.txt", "-o", "checkpoints/t.safetensors", *TINY], capsys)
    assert code == 0 and "t: bits/char (best validation" in err and "validation" in err.splitlines()[-1]
    code, _, err = run_cli(
        ["train", "corpus.txt", "-o", "checkpoints/t.safetensors", "--overwrite", "--quiet", *TINY], capsys
    )
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (
            lambda d: shutil.rmtree(d / "checkpoints"),
            ["plot"],
            "error: no checkpoint in checkpoints/: train one first (charlm train FILE) or give a checkpoint or "
            ".metrics.jsonl path",
        ),
        (
            lambda d: (d / "checkpoints" / "corpus.metrics.jsonl").unlink(),
            ["plot"],
            "error: no metrics log for checkpoints/corpus.safetensors (looked for checkpoints/corpus.metrics.jsonl): "
            "it is written by `charlm train`; give the .metrics.jsonl path if it was moved",
        ),
        (
            lambda d: (d / "checkpoints" / "corpus.metrics.jsonl").write_text(""),
            ["plot"],
            "error: checkpoints/corpus.metrics.jsonl has no metrics yet: plot again once the run has logged a step "
            "(every --log-every steps)",
        ),
        (
            lambda d: None,
            ["plot", "corpus.txt"],
            "error: corpus.txt is not a metrics log written by `charlm train`: give a checkpoint or its .metrics.jsonl "
            "file",
        ),
        (
            lambda d: None,
            ["plot", "nothing.jsonl"],
            "error: nothing.jsonl: no such metrics log: give a checkpoint or its .metrics.jsonl file (both are in "
            "./checkpoints)",
        ),
        (
            lambda d: None,
            ["plot", "-o", "curves.jpg"],
            "error: -o curves.jpg: cannot tell the image format from the name: end it in .png, .svg, .pdf",
        ),
    ],
)
def test_plot_mistakes_are_one_line(
    run_copy: Path, capsys: pytest.CaptureFixture[str], setup, args: list[str], message: str
) -> None:
    setup(run_copy)
    code, out, err = run_cli(args, capsys)
    assert (code, out, err) == (2, "", message + "\n")


def test_plot_without_matplotlib_says_how_to_get_it(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_copy / "curves.png").write_bytes(b"old picture")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    code, out, err = run_cli(["plot", "-o", "curves.png"], capsys)
    assert (code, out) == (2, "")
    assert err == (
        "error: writing an image needs matplotlib, which is not installed: pip install 'charlm[plot]' (or "
        "pip install matplotlib), or leave out -o to plot in the terminal\n"
    )
    assert (run_copy / "curves.png").read_bytes() == b"old picture"


def test_image_write_is_atomic(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    target = run_copy / "curves.png"
    target.write_bytes(b"old picture")

    def broken(*args, **kwargs):
        raise RuntimeError("disk vanished mid-write")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        write_image(read_curves(), target)
    assert target.read_bytes() == b"old picture"
    assert not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------- tensorboard


def test_tensorboard_not_installed_is_one_line(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(run_copy / "checkpoints")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, out, err = run_cli(["train", "corpus.txt", "--tensorboard", "tb", *TINY], capsys)
    assert (code, out) == (2, "")
    assert err == (
        "error: --tensorboard needs the tensorboard package, which is not installed: pip install "
        "tensorboard (or pip install 'charlm[tensorboard]'), or leave out --tensorboard\n"
    )
    assert not (run_copy / "checkpoints").exists() and not (run_copy / "tb").exists()


def test_tensorboard_logs_the_same_figures_as_the_metrics_log(run_copy: Path, capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install 'charlm[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = run_cli(["train", "corpus.txt", "--tensorboard", "tb", *TINY], capsys)
    assert code == 0, err
    events = EventAccumulator(str(run_copy / "tb"))
    events.Reload()
    assert {"train/loss", "train/bpc", "val/loss", "val/bpc", "val/perplexity", "learning_rate"} <= set(
        events.Tags()["scalars"]
    )
    logged = [(e.step, e.value) for e in events.Scalars("val/bpc")]
    expected = [(line["step"], line["val_bpc"]) for line in metrics_lines(run_copy) if line["event"] == "eval"]
    assert [step for step, _ in logged] == [step for step, _ in expected] == [10, 20]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


# ----------------------------------------------------------------------------------------- conventions


def test_help_lists_every_command_with_a_one_line_description(tmp_path: Path) -> None:
    done = charlm(["--help"], tmp_path)
    assert done.returncode == 0 and "\x1b" not in done.stdout
    listed = done.stdout.split("Commands:\n", 1)[1].splitlines()
    names = [line.split()[0] for line in listed if line.startswith("  ") and not line.startswith("   ")]
    assert sorted(names) == sorted(cli.commands)
    for line in listed:
        assert len(line.split(maxsplit=1)) == 2 and not line.endswith("...")


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_quiet_verbose_and_shows_defaults(name: str) -> None:
    command = cli.commands[name]
    params = {param.name: param for param in command.params}
    assert {"quiet", "verbose"} <= set(params)
    ctx = click.Context(command, info_name=name, show_default=True)
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag and param.default is not None:
            assert "[default: " in param.get_help_record(ctx)[1], f"{name} --{param.name}"


def test_help_of_options_the_rule_fills_names_the_rules_numbers() -> None:
    """The many-pass weight decay once read 0.1 in --help while runs used 0.3: the help now takes its
    numbers from the constants the rule uses."""
    from charlm import config

    command = cli.commands["train"]
    ctx = click.Context(command, info_name="train")
    helps = {p.name: " ".join(p.get_help_record(ctx)[1].split()) for p in command.params if isinstance(p, click.Option)}
    many = f"{config.MANY_PASSES:g} times or more"
    assert f"{config.DEFAULT_WEIGHT_DECAY:g}, or {config.MANY_PASSES_WEIGHT_DECAY:g} when" in helps["weight_decay"]
    assert f"{config.DEFAULT_BATCH}, or {config.SMALL_BATCH} when" in helps["batch_size"]
    assert f"x {config.MANY_PASSES_LR:g} when" in helps["lr"]
    assert all(many in helps[name] for name in ("weight_decay", "batch_size", "lr"))
    assert f"{config.DEEP_LAYERS} (with --hidden {config.DEEP_HIDDEN})" in helps["layers"]
    symbols = f"up to {config.LARGE_VOCAB:,} distinct symbols]"
    assert helps["layers"].endswith(symbols) and helps["dropout"].endswith(symbols)


def test_json_outputs_parse_and_carry_no_escape_codes(
    trained, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = charlm(["info", "--json"], trained[0])
    assert done.returncode == 0 and "\x1b" not in done.stdout + done.stderr
    assert json.loads(done.stdout)["model"]["hidden_size"] == 32
    for args in (["sample", "--json", "-n", "20", "--rng-seed", "1"], ["perplexity", "corpus.txt", "--json"]):
        code, out, err = run_cli([*args, "--device", "cpu", "--threads", "1"], capsys)  # capsys: not a terminal
        assert code == 0 and isinstance(json.loads(out), dict)
        assert "\x1b" not in out + err


def test_shell_completion(tmp_path: Path) -> None:
    env = {**os.environ, "CHARLM_CACHE_DIR": str(tmp_path), "_CHARLM_COMPLETE": "bash_source"}
    done = subprocess.run([sys.executable, "-m", "charlm"], env=env, capture_output=True, text=True)
    assert "complete -o nosort -F _charlm_completion charlm" in done.stdout
    env.update(_CHARLM_COMPLETE="bash_complete", COMP_WORDS="charlm pl", COMP_CWORD="1")
    done = subprocess.run([sys.executable, "-m", "charlm"], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["plain,plot"]
