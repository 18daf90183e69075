"""The rule that picks the defaults: a model starts where counting characters ends, big vocabularies
fold their rarest characters, and explicit options always win."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from charlm import config, train
from charlm.checkpoint import build_model, read_header, read_tensors
from charlm.config import ModelConfig, auto_min_count
from charlm.trainer import auto_eval_every

HAN = [chr(0x4E00 + i) for i in range(3000)]


def zipf_text(chars: int, seed: int = 0) -> str:
    """Characters drawn independently from a Zipf distribution over 3,000 Han characters, in lines:
    no context to learn, so the unigram distribution is the best any model can do."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(HAN))]
    body = rng.choices(HAN, weights=weights, k=chars)
    for i in range(40, chars, 41):
        body[i] = "\n"
    return "".join(body)


def held_out_unigram_bits(text: str, val_fraction: float = 0.1) -> float:
    """What counting characters gives: the validation tail scored by the training text's frequencies
    (a character unseen in training counted as half)."""
    cut = len(text) - int(len(text) * val_fraction)
    counts, total = Counter(text[:cut]), cut
    vocab = set(text)
    norm = total + 0.5 * sum(1 for c in vocab if c not in counts)
    val = text[cut:]
    return sum(-math.log2(counts.get(c, 0.5) / norm) for c in val) / len(val)


def test_a_few_steps_score_no_worse_than_counting_characters(in_tmp: Path) -> None:
    text = zipf_text(60_000)
    Path("zipf.txt").write_text(text, encoding="utf-8")
    result = train(
        "zipf.txt",
        model={"hidden_size": 32},
        config={"steps": 3, "batch_size": 8, "seq_len": 32, "min_count": 1, "threads": 1},
    )
    unigram = held_out_unigram_bits(text)
    assert unigram > 8  # Zipf over 3,000 characters; a random start scores log2(3000) = 11.6 or worse
    assert result.val_bpc <= unigram * 1.002


@pytest.mark.parametrize("chars, fades", [(3000, True), (60, False)])
def test_the_unigram_start_fades_out_of_a_large_vocabularys_output_bias(in_tmp: Path, chars: int, fades: bool) -> None:
    """The start holds the log frequencies in the output bias; past LARGE_VOCAB symbols the first
    PRIOR_FADE_STEPS steps take them back out, so they must live in the weights. A rate too small to
    move the bias by itself shows what the fade did."""
    text = zipf_text(20_000)
    if chars < 3000:
        text = "".join(HAN[HAN.index(c) % chars] if c != "\n" else c for c in text)
    Path("zipf.txt").write_text(text, encoding="utf-8")
    result = train(
        "zipf.txt",
        model={"hidden_size": 16},
        config={
            "steps": config.PRIOR_FADE_STEPS,
            "batch_size": 4,
            "seq_len": 16,
            "min_count": 1,
            "lr": 1e-7,
            "average": 0,
            "threads": 1,
        },
    )
    header = read_header(result.last_checkpoint)  # the weights after the last step
    net = build_model(header, read_tensors(header))
    bias = net.head.bias.detach()
    spread = float(bias.max() - bias.min())  # the log frequencies span several nats
    assert len(header.vocab) > config.LARGE_VOCAB if fades else len(header.vocab) <= config.LARGE_VOCAB
    assert (spread < 1e-3) if fades else (spread > 2.0)


def test_big_vocabularies_fold_their_rarest_characters(in_tmp: Path) -> None:
    text = zipf_text(60_000)
    Path("zipf.txt").write_text(text, encoding="utf-8")
    result = train("zipf.txt", model={"hidden_size": 32}, config={"steps": 2, "batch_size": 8, "seq_len": 32})
    header = read_header(result.checkpoint)
    counts = Counter(text)
    min_count = header.train["min_count"]
    assert min_count > 1  # recorded as resolved, so a resume folds the same characters
    kept = [c for c, n in counts.items() if n >= min_count]
    assert len(header.vocab.chars) == len(kept) + 1  # and the unknown symbol that stands for the rest
    folded = sum(n for n in counts.values() if n < min_count)
    assert 0 < folded <= 0.02 * len(text)
    explicit = train(
        "zipf.txt",
        model={"hidden_size": 32},
        config={"steps": 2, "batch_size": 8, "seq_len": 32, "min_count": 1},
        out="explicit.safetensors",
    )
    assert len(read_header(explicit.checkpoint).vocab) == len(counts)


@pytest.mark.parametrize("hidden, expected", [(256, 1), (32, 1)])
def test_small_vocabularies_are_never_folded(hidden: int, expected: int) -> None:
    english = Counter("The quick brown fox jumps over the lazy dog. 0123456789\n" * 100)
    counts = {ord(c): n for c, n in english.items()}
    assert auto_min_count(counts, ModelConfig(vocab_size=len(counts), hidden_size=hidden, num_layers=2)) == expected


def test_folding_stops_at_two_percent_of_the_text() -> None:
    # GRU 2x256: output layer up to 2,496 characters
    model = ModelConfig(vocab_size=6000, hidden_size=256, num_layers=2)
    common = {0x4E00 + i: 100 for i in range(2400)}
    rare = {0x8000 + i: 1 for i in range(3600)}  # 1.5% of the text
    assert auto_min_count({**common, **rare}, model) == 2
    too_many = {0x8000 + i: 1 for i in range(10_000)}  # 4% of the text: folding them would cost too much
    assert auto_min_count({**common, **too_many}, model) == 1


def test_a_text_seen_many_times_trains_with_more_smaller_steps(in_tmp: Path) -> None:
    from conftest import make_text

    Path("small.txt").write_text(make_text(20_000), encoding="utf-8")
    tiny = {"hidden_size": 16, "embed_size": 8}
    many = train("small.txt", model=tiny, config={"epochs": 3, "seq_len": 16}, out="many.safetensors")
    few = train("small.txt", model=tiny, config={"epochs": 1, "seq_len": 16}, out="few.safetensors")
    given = train(
        "small.txt",
        model=tiny,
        config={"epochs": 3, "seq_len": 16, "batch_size": 64, "weight_decay": 0.05},
        out="given.safetensors",
    )
    for result, batch, decay in ((many, 32, 0.3), (few, 64, 0.01), (given, 64, 0.05)):  # explicit options win
        header = read_header(result.checkpoint)
        assert (header.train["batch_size"], header.train["weight_decay"]) == (batch, decay)
        last = read_header(result.last_checkpoint)
        assert [g["weight_decay"] for g in last.state["optim_groups"]] == [decay, 0.0]  # what AdamW used
        assert header.model.dropout == last.model.dropout == 0.0  # 3 passes: too few for dropout


def test_a_text_learned_by_heart_trains_with_dropout_and_a_higher_rate_floor(in_tmp: Path) -> None:
    """From 10 expected passes (6 for a model of 3 layers) an open --dropout becomes 0.1 and an open
    --min-lr-ratio 0.3, in the model trained and in both checkpoints; a dropout or floor given, dropout 0
    included, is kept, and a resumed run keeps the floor it started with."""
    from conftest import make_text

    Path("small.txt").write_text(make_text(20_000), encoding="utf-8")
    tiny = {"hidden_size": 16, "embed_size": 8}
    quick = {"epochs": 12, "steps": 2, "seq_len": 16}  # 12 passes planned; 2 steps end the run
    started: list = []
    often = train("small.txt", model=tiny, config=quick, out="often.safetensors", on_event=started.append)
    no_dropout = train("small.txt", model={**tiny, "dropout": 0.0}, config=quick, out="no-dropout.safetensors")
    given = train(
        "small.txt", model={**tiny, "dropout": 0.2}, config={**quick, "min_lr_ratio": 0.05}, out="given.safetensors"
    )
    fewer = train("small.txt", model=tiny, config={**quick, "epochs": 9}, out="fewer.safetensors")
    deep = {**tiny, "num_layers": 3}  # a third layer learns its text by heart from 6 passes
    deep_often = train("small.txt", model=deep, config={**quick, "epochs": 7}, out="deep-often.safetensors")
    deep_fewer = train("small.txt", model=deep, config={**quick, "epochs": 5}, out="deep-fewer.safetensors")
    runs = (
        (often, 0.1, 0.3),
        (no_dropout, 0.0, 0.3),
        (given, 0.2, 0.05),
        (fewer, 0.0, 0.1),
        (deep_often, 0.1, 0.3),
        (deep_fewer, 0.0, 0.1),
    )
    for result, dropout, floor in runs:
        for path in (result.checkpoint, result.last_checkpoint):
            header = read_header(path)
            assert (header.model.dropout, header.train["min_lr_ratio"]) == (dropout, floor), path
    defaults = "".join(next(event.defaults for event in started if hasattr(event, "defaults")))
    assert "--dropout 0.1: ~12.0 passes (0.1 from 10 passes at 2 layers: a text seen that often is learned" in defaults
    assert "--min-lr-ratio 0.3: ~12.0 passes (0.3 from 10 passes at 2 layers, else 0.1: larger late steps" in defaults
    resumed = train("small.txt", config={"steps": 3}, out="often.safetensors", resume=True)
    assert read_header(resumed.last_checkpoint).train["min_lr_ratio"] == 0.3


def test_a_short_run_over_a_text_learned_by_heart_trains_shorter_chunks(in_tmp: Path) -> None:
    """A run of up to 6 minutes that will see its text 10 times or more turns an open --seq-len into 64;
    a longer run, a length given, a run whose batch size is given (no passes measured) and a run by
    epochs keep 128 or what was given; a resumed run keeps the length it started with."""
    from conftest import make_text

    Path("small.txt").write_text(make_text(20_000), encoding="utf-8")
    tiny = {"hidden_size": 16, "embed_size": 8}
    quick = {"time": 300, "steps": 2, "threads": 1}  # hundreds of passes expected; 2 steps end the run
    started: list = []
    short = train("small.txt", model=tiny, config=quick, out="short.safetensors", on_event=started.append)
    longer = train("small.txt", model=tiny, config={**quick, "time": 1200}, out="longer.safetensors")
    given = train("small.txt", model=tiny, config={**quick, "seq_len": 100}, out="given.safetensors")
    batch = train("small.txt", model=tiny, config={**quick, "batch_size": 8}, out="batch.safetensors")
    epochs = train("small.txt", model=tiny, config={"epochs": 12, "steps": 2}, out="epochs.safetensors")
    for result, seq_len in ((short, 64), (longer, 128), (given, 100), (batch, 128), (epochs, 128)):
        for path in (result.checkpoint, result.last_checkpoint):
            assert read_header(path).train["seq_len"] == seq_len, path
    defaults = "".join(next(event.defaults for event in started if hasattr(event, "defaults")))
    assert " passes in a 5m budget (64 from 10 passes at 2 layers in up to 6m, else 128: a short run over" in defaults
    resumed = train("small.txt", config={"steps": 3}, out="short.safetensors", resume=True)
    assert read_header(resumed.last_checkpoint).train["seq_len"] == 64
    assert resumed.steps == 3


def test_a_longer_run_over_a_text_seen_many_times_goes_deeper() -> None:
    from charlm.config import TrainConfig
    from charlm.training.setup import fill_model

    def shape(model: ModelConfig, minutes: float, passes: float | None, vocab: int = 0) -> tuple[int, int]:
        filled = fill_model(model, TrainConfig(time=minutes * 60), passes, vocab)
        return filled.num_layers, filled.hidden_size

    assert shape(ModelConfig(), 20, 8.0) == (3, 320)  # `passes`: those of the plain 2x384
    assert shape(ModelConfig(), 20, 4.0) == (2, 384)  # seen a few times: the faster, shallower model
    assert shape(ModelConfig(), 5, 20.0) == (3, 320)  # a small text in a short run
    assert shape(ModelConfig(), 5, 8.0) == (2, 256)  # 2x256 is twice as fast: it needs more passes
    assert shape(ModelConfig(), 60, 20.0) == (2, 512)  # beyond 30 minutes depth was not measured
    assert shape(ModelConfig(), 20, None) == (2, 384)  # not probed (an epoch or step budget)
    assert shape(ModelConfig(), 20, 8.0, vocab=1000) == (3, 320)  # an alphabet, code, a few hundred emoji
    assert shape(ModelConfig(), 20, 8.0, vocab=1001) == (2, 384)  # a logographic script stays plain
    from charlm.trainer import default_model  # the Python API's rule is the same

    assert (
        default_model(TrainConfig(time=1200), 8.0, 3605).num_layers,
        default_model(TrainConfig(time=1200), 8.0).num_layers,
    ) == (2, 3)
    # explicit options win, and a half-given shape is completed plainly
    assert shape(ModelConfig(num_layers=2), 20, 11.0) == (2, 384)
    assert shape(ModelConfig(num_layers=4), 20, 11.0) == (4, 384)
    assert shape(ModelConfig(hidden_size=512), 20, 11.0) == (2, 512)


def test_the_deeper_model_is_built_printed_and_stored(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_text, run_cli

    Path("small.txt").write_text(make_text(20_000), encoding="utf-8")
    # 7 minutes over 18,000 training characters: hundreds of passes; --steps 2 ends it at once
    quick = ["--time", "7m", "--steps", "2", "--seq-len", "16", "--embed", "8"]
    code, _, err = run_cli(["train", "small.txt", *quick], capsys)
    assert code == 0, err
    assert re.search(r"default --layers 3 --hidden 320: ~[\d,.]+ passes expected at 2x384 for a 7m budget", err)
    assert "default --batch-size 32" in err
    model = read_header("checkpoints/small.safetensors").model
    assert (model.num_layers, model.hidden_size) == (3, 320)
    code, _, err = run_cli(["train", "small.txt", *quick, "--layers", "2", "--overwrite"], capsys)
    assert code == 0, err
    assert "default --layers" not in err and "default --hidden 384 for a 7m budget" in err
    model = read_header("checkpoints/small.safetensors").model
    assert (model.num_layers, model.hidden_size) == (2, 384)


def test_a_large_vocabulary_stays_plain_and_takes_no_dropout(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past LARGE_VOCAB modelled symbols a text seen very often keeps 2 layers and no dropout (both
    lost on 3,605 symbols of Chinese), the start-of-run lines say so, and explicit options still win."""
    from conftest import run_cli

    from charlm.training import setup

    timed: list[int] = []

    def speed(net, *args, **kwargs) -> float:  # noqa: ANN001, ANN002, ANN003 - measure_speed's signature
        timed.append(net.config.hidden_size)
        return 1000.0  # 0.9 x 600 s x 1,000 chars/s / 18,000 characters: 30 passes

    monkeypatch.setattr(setup, "measure_speed", speed)
    text = zipf_text(20_000)
    Path("han.txt").write_text(text, encoding="utf-8")
    symbols = len(set(text))
    assert symbols > 1000
    quick = ["--time", "10m", "--steps", "2", "--seq-len", "16", "--embed", "8", "--min-count", "1"]
    code, _, err = run_cli(["train", "han.txt", *quick], capsys)
    assert code == 0, err
    assert timed == [384]  # the plain model's probe is reused: no deeper model to time
    err = " ".join(err.split())
    assert "default --layers 2 (~30.0 passes expected; 3x320 from 6 at 2x384, for up to 1,000 symbols: " in err
    assert f"this text has {symbols:,})" in err
    dropout = f"default --dropout 0: ~30.0 passes, but {symbols:,} symbols (0.1 from 10 passes at 2 layers for up to"
    assert f"{dropout} 1,000" in err
    fade = "default output layer: starts at the character frequencies and takes them back out of its bias"
    assert f"{fade} over the first 100 steps ({symbols:,} symbols, over 1,000: " in err
    model = read_header("checkpoints/han.safetensors").model
    assert (model.num_layers, model.hidden_size, model.dropout) == (2, 384, 0.0)
    given = ["--layers", "3", "--hidden", "320", "--dropout", "0.1", "--overwrite"]
    code, _, err = run_cli(["train", "han.txt", *quick, *given], capsys)
    assert code == 0, err
    assert "default --layers" not in err and "default --dropout" not in err
    model = read_header("checkpoints/han.safetensors").model
    assert (model.num_layers, model.hidden_size, model.dropout) == (3, 320, 0.1)


@pytest.mark.parametrize(
    ("minutes", "plain", "deep", "probed", "shape", "batch", "dropout", "line"),
    [
        (5, 100.0, 0.0, [256], (2, 256), 64, 0.0, "--layers 2 (~1.5 passes expected; 3x320 from 16 at 2x256)"),
        (5, 800.0, 0.0, [256], (2, 256), 32, 0.1, "--layers 2 (~12.0 passes expected; 3x320 from 16 at 2x256)"),
        (5, 1200.0, 350.0, [256, 320], (3, 320), 32, 0.0, "--layers 3 --hidden 320: ~18.0 passes expected at 2x256"),
        (5, 1200.0, 500.0, [256, 320], (3, 320), 32, 0.1, "--dropout 0.1: ~7.5 passes (0.1 from 6 passes at 3 layers"),
        (5, 1200.0, 800.0, [256, 320], (3, 320), 32, 0.1, "--dropout 0.1: ~12.0 passes (0.1 from 6 passes at 3 layers"),
        (10, 1200.0, 50.0, [384, 320], (3, 320), 64, 0.0, "--layers 3 --hidden 320: ~36.0 passes expected at 2x384"),
        # over 6 minutes three layers take dropout from 9 passes, not 6 (config.dropout_passes)
        (10, 1200.0, 250.0, [384, 320], (3, 320), 32, 0.0, "--batch-size 32: ~7.5 passes over 18,000 training"),
        (
            10,
            1200.0,
            400.0,
            [384, 320],
            (3, 320),
            32,
            0.1,
            "--dropout 0.1: ~12.0 passes (0.1 from 9 passes at 3 layers in a run over 6m",
        ),
    ],
)
def test_a_short_run_goes_deep_from_more_passes_and_times_the_model_it_builds(
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    minutes: int,
    plain: float,
    deep: float,
    probed: list[int],
    shape: tuple[int, int],
    batch: int,
    dropout: float,
    line: str,
) -> None:
    """The plain model's passes choose the shape; the deeper model, when chosen, is timed again for the
    batch size and the dropout (its own passes), and a run that stays plain reuses the first probe."""
    from conftest import make_text, run_cli

    from charlm.training import setup

    timed: list[int] = []

    def speed(net, *args, **kwargs) -> float:  # noqa: ANN001, ANN002, ANN003 - measure_speed's signature
        timed.append(net.config.hidden_size)
        return {256: plain, 384: plain, 320: deep}[net.config.hidden_size]

    monkeypatch.setattr(setup, "measure_speed", speed)
    Path("small.txt").write_text(make_text(20_000), encoding="utf-8")  # 18,000 training characters
    # passes = 0.9 x budget x chars/s / 18,000; --steps 2 ends the run at once
    quick = ["--time", f"{minutes}m", "--steps", "2", "--seq-len", "16", "--embed", "8"]
    code, _, err = run_cli(["train", "small.txt", *quick], capsys)
    assert code == 0, err
    assert timed == probed
    assert f"default {line}" in err
    assert f"default --batch-size {batch}:" in err  # the built model's passes: 3 or more are many
    header = read_header("checkpoints/small.safetensors")
    assert (header.model.num_layers, header.model.hidden_size, header.model.dropout) == (*shape, dropout)
    assert ("default --dropout 0.1:" in err) == bool(dropout)
    # a run below the threshold says so, and where the threshold is
    assert ("default --dropout 0 --min-lr-ratio 0.1: ~" in err) == (not dropout)
    assert header.train["min_lr_ratio"] == (0.3 if dropout else 0.1)  # the floor follows the same regime


@pytest.mark.parametrize(("deep", "dropout"), [(19_000.0, 0.0), (20_000.0, 0.1)])
def test_over_a_million_training_characters_three_layers_take_dropout_from_proportionally_more_passes(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, deep: float, dropout: float
) -> None:
    """1,080,000 training characters in 10 minutes: 3x320 learns them by heart from 9 x 1.08 = 9.72 passes
    (config.dropout_passes), so 9.5 keep dropout off where a smaller text would take it, and 10 take it."""
    from conftest import make_text, run_cli

    from charlm.training import setup

    monkeypatch.setattr(setup, "measure_speed", lambda net, *a, **k: {384: 20_000.0, 320: deep}[net.config.hidden_size])
    Path("big.txt").write_text(make_text(1_200_000), encoding="utf-8")
    quick = ["--time", "10m", "--steps", "2", "--seq-len", "16", "--embed", "8"]
    code, _, err = run_cli(["train", "big.txt", *quick], capsys)
    assert code == 0, err
    assert "over 1,080,000 training characters" in err  # passes = 0.9 x 600 s x chars/s / 1,080,000
    header = read_header("checkpoints/big.safetensors")
    assert (header.model.num_layers, header.model.hidden_size, header.model.dropout) == (3, 320, dropout)
    assert header.train["min_lr_ratio"] == (0.3 if dropout else 0.1)
    if dropout:
        assert (
            "default --dropout 0.1: ~10.0 passes (0.1 from 9.72 passes at 3 layers in a run over 6m on 1,080,000 "
            "training characters" in err
        )
    else:
        assert (
            "default --dropout 0 --min-lr-ratio 0.1: ~9.5 passes (dropout 0.1 and the floor 0.3 from 9.72 passes at "
            "3 layers in a run over 6m on 1,080,000 training characters: a text seen fewer times is not yet learned "
            "by heart)\n" in err
        )


def test_a_short_run_below_the_threshold_names_the_regime_it_leaves_out(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings a text seen often would take (dropout, the floor, shorter chunks in a short budget) are
    open here too, so the start says what they are and from how many passes they would change."""
    from conftest import make_text, run_cli

    from charlm.training import setup

    monkeypatch.setattr(setup, "measure_speed", lambda net, *a, **k: 100.0)  # 0.9 x 300 s x 100 / 18,000 = 1.5
    Path("small.txt").write_text(make_text(20_000), encoding="utf-8")
    code, _, err = run_cli(["train", "small.txt", "--time", "5m", "--steps", "2", "--embed", "8"], capsys)
    assert code == 0, err
    assert (
        "default --dropout 0 --min-lr-ratio 0.1 --seq-len 128: ~1.5 passes (dropout 0.1, the floor 0.3 and "
        "64-character chunks from 10 passes at 2 layers: a text seen fewer times is not yet learned by heart)\n"
    ) in err
    pinned = ["--dropout", "0", "--seq-len", "32", "--overwrite"]
    code, _, err = run_cli(["train", "small.txt", "--time", "5m", "--steps", "2", "--embed", "8", *pinned], capsys)
    assert code == 0, err
    assert "default --min-lr-ratio 0.1: ~1.5 passes (the floor 0.3 from 10 passes at 2 layers: " in err
    assert "default --dropout" not in err and "--seq-len 128" not in err


def test_the_chosen_defaults_are_printed_at_the_start(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_text, run_cli

    Path("small.txt").write_text(make_text(20_000), encoding="utf-8")
    code, _, err = run_cli(["train", "small.txt", "--time", "2s", "--seq-len", "16", "--embed", "8"], capsys)
    assert code == 0
    assert "default --hidden 256 for a 2s budget" in err
    batch = re.search(r"default --batch-size (32|64): ~[\d.]+ passes over [\d,]+ training characters at a", err)
    assert batch is not None
    many = batch[1] == "32"  # how many passes 2 seconds make depends on the machine; the rule follows them
    assert f"default --lr {0.006 if many else 0.004:g} " in err
    assert ("default --weight-decay 0.3 for many passes" if many else "default --weight-decay 0.01\n") in err
    assert re.search(r"default --layers 2 \(~[\d.]+ passes expected; 3x320 from 16 at 2x256\)\n", err)
    assert "default output layer" not in err  # an alphabet keeps the unigram start in its bias
    explicit = ["--time", "2s", "--hidden", "16", "--layers", "2", "--batch-size", "8", "--lr", "0.01"]
    explicit += ["--weight-decay", "0.01", "--dropout", "0"]
    explicit.append("--overwrite")
    code, _, err = run_cli(["train", "small.txt", *explicit], capsys)
    assert code == 0 and "default --" not in err


def test_a_stalled_timed_run_lowers_its_rate_instead_of_stopping() -> None:
    from charlm.config import TrainConfig
    from charlm.run_state import RunState
    from charlm.training.schedule import learning_rate

    config = TrainConfig(time=60.0, lr=0.01, warmup=0)
    state, scales = RunState(), []
    for step, loss in enumerate([2.0, 1.9, 1.95, 1.96, 1.97, 1.98], start=1):
        state.step = step
        state.evaluated(loss, config)
        scales.append(state.plateau_scale)
    assert scales == [1, 1, 1, 0.5, 0.5, 0.25]  # halved each time validation misses twice in a row
    full = learning_rate(config, step=100, fraction=0.5, epoch=1.0, plateau_scale=1.0)
    assert learning_rate(config, step=100, fraction=0.5, epoch=1.0, plateau_scale=0.5) == full / 2
    from types import SimpleNamespace

    from charlm.training.loop import Loop

    run = SimpleNamespace(
        config=TrainConfig(time=60.0, patience=2),
        state=RunState(evals_since_best=3, plateau_scale=0.5),
        clock=SimpleNamespace(elapsed=lambda: 10.0, finish_reserve=lambda: 1.0),
        epoch_float=lambda: 0.5,
    )
    run.rate_at_floor = lambda: Loop.rate_at_floor(run)  # type: ignore[arg-type]
    assert Loop.budget_reached(run) == ""  # type: ignore[arg-type] - the rate can still come down: go on
    run.state.plateau_scale = 0.1  # at --min-lr-ratio
    assert Loop.budget_reached(run) == "patience"  # type: ignore[arg-type]
    run.config = TrainConfig(steps=1000, patience=2)
    run.state.plateau_scale = 0.5
    assert Loop.budget_reached(run) == "patience"  # type: ignore[arg-type] - no time budget: stop as before


def test_validation_costs_a_few_percent_of_a_long_run_and_small_texts_keep_every_100_steps() -> None:
    """Every validation is time a --time budget does not train: auto spaces them so scoring the
    split costs ~3% (a forward pass is about a third of a training step per character)."""
    long_run = config.TrainConfig(batch_size=32, seq_len=128)
    assert auto_eval_every(110_000, long_run) == 269  # the 1.1M cut's tail: 3.3% of the time, not 10%
    assert auto_eval_every(500_000, long_run) == 1221  # the capped split of a big corpus
    assert auto_eval_every(30_000, long_run) == 100  # a small text is still validated every 100 steps
    assert auto_eval_every(110_000, config.TrainConfig(batch_size=32, seq_len=128, eval_every=50)) == 50
    cost = 110_000 / 3 / (269 * 32 * 128)
    assert 0.03 < cost < 0.034
