"""The model and the trainer: chunked == whole, loss falls, determinism, exact resume, checkpoints."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch

from charlm import CharLM, ModelConfig, TrainConfig, train
from charlm import checkpoint as ckpt
from charlm.errors import CheckpointError, ConfigError
from charlm.model import CharRNN
from charlm.trainer import RunState, Stepped

TINY = dict(hidden_size=32, embed_size=16, num_layers=2)


def tiny_config(**overrides: object) -> TrainConfig:
    base = dict(batch_size=8, seq_len=32, eval_every=20, lr=1e-2, warmup=5, precision="fp32", device="cpu", steps=40)
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "rnn-relu"])
def test_whole_sequence_equals_chunks_with_carried_state(cell: str) -> None:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=20, cell=cell, **TINY)).eval()  # type: ignore[arg-type]
    ids = torch.randint(0, 20, (3, 24))
    whole, whole_state = model(ids)
    state = None
    parts = []
    for chunk in ids.split(5, dim=1):
        logits, state = model(chunk, state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, whole_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["orthogonal", "xavier", "he", "pytorch"])
def test_initialisations(init: str) -> None:
    model = CharRNN(ModelConfig(vocab_size=10, cell="lstm", init=init, **TINY))  # type: ignore[arg-type]
    if init == "orthogonal":
        w = model.rnn.weight_hh_l0[:32]
        torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)
    if init != "pytorch":
        assert torch.all(model.rnn.bias_ih_l0[32:64] == 1.0)  # LSTM forget gate open


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "rnn-relu"])
def test_weight_drop_masks_the_recurrent_weights_only_while_training(cell: str) -> None:
    """DropConnect: a training step sees recurrent weights with whole entries zeroed (so its output
    differs and the weights still get their gradients); scoring sees the weights as they are, the
    same as a model without weight drop."""
    torch.manual_seed(0)
    dropped = CharRNN(ModelConfig(vocab_size=20, cell=cell, weight_drop=0.5, **TINY))  # type: ignore[arg-type]
    plain = CharRNN(ModelConfig(vocab_size=20, cell=cell, **TINY))  # type: ignore[arg-type]
    plain.load_state_dict(dropped.state_dict())
    ids = torch.randint(0, 20, (3, 24))
    torch.testing.assert_close(dropped.eval()(ids)[0], plain.eval()(ids)[0], rtol=0, atol=0)
    logits, state = dropped.train()(ids)
    assert not torch.allclose(logits, plain.train()(ids)[0])
    assert [s.shape for s in state] == [s.shape for s in plain(ids)[1]]
    logits.logsumexp(-1).sum().backward()
    for name, p in dropped.rnn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_model_options() -> None:
    with pytest.raises(ConfigError, match=r"--dropout must be in \[0, 1\) \(got 1.5\)"):
        ModelConfig(vocab_size=5, dropout=1.5)
    with pytest.raises(ConfigError, match=r"--weight-drop must be in \[0, 1\) \(got -0.1\)"):
        ModelConfig(vocab_size=5, weight_drop=-0.1)
    with pytest.raises(ConfigError, match="--hidden must be a whole number from 1 to 65536"):
        ModelConfig(vocab_size=5, hidden_size=-3)


def test_loss_falls_and_checkpoint_reloads_identically(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from charlm.training.loop import Loop

    # A copy of the network validation scored (the weights' moving average), taken each time a best
    # checkpoint is written: the last copy holds the in-memory weights that result.checkpoint must give back.
    saved_as_best: list[CharRNN] = []
    real_save = Loop.save

    def save(run: Loop, kind: str) -> None:
        if kind == "best":
            saved_as_best.append(copy.deepcopy(run.learner.scored).eval())
        real_save(run, kind)

    monkeypatch.setattr(Loop, "save", save)
    result = train(
        text_file, model=ModelConfig(vocab_size=1, **TINY), config=tiny_config(steps=80), out=tmp_path / "m.safetensors"
    )
    header = ckpt.read_header(result.checkpoint)
    uniform = torch.log(torch.tensor(float(len(header.vocab)))).item()
    assert result.val_loss < 0.75 * uniform  # learned well beyond the uniform guess
    assert result.train_loss is not None and result.train_loss < 0.8 * uniform
    # Pins saving and loading together against the trained weights (not one file against itself): the
    # same architecture, every tensor under its own name, bit for bit. A weight that saving or loading
    # swapped, reordered, re-cast or perturbed fails here.
    trained = saved_as_best[-1]
    lm = CharLM.load(result.checkpoint, device="cpu")
    assert lm.model.config == trained.config
    want, got = trained.state_dict(), lm.model.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    ids = torch.randint(0, len(header.vocab), (2, 17))
    with torch.no_grad():
        assert torch.equal(lm.model(ids)[0], trained(ids)[0])
    assert header.corpus["name"] == "corpus" and header.corpus["chars"] == 40_000
    assert lm.perplexity(text_file).cross_entropy > 0


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "rnn-relu"])
def test_layer_by_layer_training_path_equals_the_fused_kernel(cell: str) -> None:
    """Dropout between layers runs the stack one layer at a time on the fused module's own weights;
    with the masks left out it must give the fused kernel's outputs, final state and gradients."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=20, cell=cell, hidden_size=16, embed_size=8, num_layers=3)).double()  # type: ignore[arg-type]
    x = model.embed(torch.randint(0, 20, (4, 9)))
    state = tuple(s.double().normal_() for s in model.initial_state(4))
    hidden = state if cell == "lstm" else state[0]
    fused, fused_final = model.rnn(x, hidden)
    layered, layered_final = model._layered(x, hidden, dict(model.rnn.named_parameters()))
    assert torch.equal(fused, layered)
    finals = (fused_final, layered_final) if cell == "lstm" else ((fused_final,), (layered_final,))
    for a, b in zip(*finals, strict=True):
        assert a.shape == (3, 4, 16) and torch.equal(a, b)
    params = list(model.rnn.parameters())
    for a, b in zip(torch.autograd.grad(fused.sum(), params), torch.autograd.grad(layered.sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dropout_keeps_one_mask_per_sequence_and_is_off_when_scoring() -> None:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=20, dropout=0.25, **TINY)).train()
    ones = torch.ones(6, 50, 32)
    dropped = model.drop(ones)
    torch.testing.assert_close(dropped.unique(), torch.tensor([0.0, 1 / 0.75]))  # dropped or scaled up
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # the same at every time step
    assert not torch.equal(dropped[0], dropped[1])  # a mask of its own for each sequence
    ids = torch.randint(0, 20, (2, 10))
    assert not torch.equal(model(ids)[0], model(ids)[0])  # training: random
    model.eval()
    torch.testing.assert_close(model(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_same_seed_gives_identical_weights(text_file: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        r = train(
            text_file,
            model=ModelConfig(vocab_size=1, cell="lstm", dropout=0.1, weight_drop=0.2, **TINY),
            config=tiny_config(steps=25),
            out=tmp_path / f"{name}.safetensors",
        )
        header = ckpt.read_header(r.last_checkpoint)
        assert header.model.weight_drop == 0.2  # the checkpoint describes the model it trained
        runs.append(ckpt.read_tensors(header))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_interrupted_and_resumed_run_ends_bit_identical(text_file: Path, tmp_path: Path) -> None:
    model = ModelConfig(vocab_size=1, cell="lstm", dropout=0.1, weight_drop=0.2, **TINY)
    config = tiny_config(steps=50, eval_every=15)
    whole = train(text_file, model=model, config=config, out=tmp_path / "whole.safetensors")

    def interrupt_at_23(event: object) -> None:
        if isinstance(event, Stepped) and event.step == 23:
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C path: stop at the next step boundary

    part = train(text_file, model=model, config=config, out=tmp_path / "part.safetensors", on_event=interrupt_at_23)
    assert part.stopped == "interrupted" and part.steps == 23
    resumed = train(text_file, model=model, config=config, out=tmp_path / "part.safetensors", resume=True)
    assert resumed.steps == 50
    a = ckpt.read_tensors(ckpt.read_header(whole.last_checkpoint))
    b = ckpt.read_tensors(ckpt.read_header(resumed.last_checkpoint))
    for key in a:
        if key.startswith(("model.", "optim.", "hidden.")):
            assert torch.equal(a[key], b[key]), key


def test_resume_refuses_other_corpus_or_options(text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    train(text_file, model=ModelConfig(vocab_size=1, **TINY), config=tiny_config(steps=20), out=out)
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    with pytest.raises(CheckpointError, match="--resume: the corpus differs from the one this run trained on"):
        train(other, config=tiny_config(steps=30), out=out, resume=True)
    with pytest.raises(
        CheckpointError, match=r"--resume: options differ from the interrupted run: --lr 0.5 \(was 0.01\)"
    ):
        train(text_file, config=tiny_config(steps=30, lr=0.5), out=out, resume=True)


def test_run_state_round_trips_and_refuses_what_a_resume_cannot_count_with() -> None:
    state = RunState(step=7, epoch=1, chunk=3, chars=900, elapsed=2.5, best_val=1.25, best_step=5, train_loss=1.5)
    assert RunState.from_dict(state.to_dict()) == state
    assert RunState.from_dict({}) == RunState()  # missing counters start where a new run starts
    assert RunState.from_dict({**state.to_dict(), "optim_groups": []}) == state  # other header keys are not its
    for key, value in [("step", -1), ("step", True), ("step", 1.5), ("last_eval_step", -2), ("world", 0)]:
        with pytest.raises(ValueError, match=rf"^{key} = {value!r}$"):
            RunState.from_dict({key: value})
    for key, value in [("best_val", float("nan")), ("elapsed", "x"), ("plateau_scale", None), ("train_loss", False)]:
        with pytest.raises(ValueError, match=rf"^{key} = "):
            RunState.from_dict({key: value})
    assert RunState.from_dict({"train_loss": None, "best_val": float("inf")}).best_val == float("inf")


def test_fine_tune_extends_vocab_keeping_old_ids(text_file: Path, tmp_path: Path) -> None:
    first = train(
        text_file,
        model=ModelConfig(vocab_size=1, **TINY),
        config=tiny_config(steps=20),
        out=tmp_path / "base.safetensors",
    )
    new_text = tmp_path / "new.txt"
    new_text.write_text(text_file.read_text()[:20_000] + "Ω and ж are new here.\n" * 50)
    tuned = train(
        new_text, config=tiny_config(steps=20), out=tmp_path / "tuned.safetensors", init_from=first.checkpoint
    )
    old, new = ckpt.read_header(first.checkpoint), ckpt.read_header(tuned.checkpoint)
    assert new.vocab.chars[: len(old.vocab)] == old.vocab.chars
    assert set(new.vocab.chars[len(old.vocab) :]) == {"Ω", "ж"}


def test_nonfinite_steps_are_skipped_and_never_saved(text_file: Path, tmp_path: Path) -> None:
    from charlm.errors import TrainingError

    with pytest.raises(TrainingError, match="not finite for 10 steps in a row"):
        train(
            text_file,
            model=ModelConfig(vocab_size=1, **TINY),
            config=tiny_config(steps=40, lr=1e30, clip=0, warmup=0, log_every=5),
            out=tmp_path / "nan.safetensors",
        )
    assert not (tmp_path / "nan.safetensors").exists() or all(
        torch.isfinite(t).all()
        for k, t in ckpt.read_tensors(ckpt.read_header(tmp_path / "nan.safetensors")).items()
        if k.startswith("model.")
    )


def test_checkpoint_header_reads_without_tensors(tiny_checkpoint: Path) -> None:
    header = ckpt.read_header(tiny_checkpoint)
    assert header.kind == "best" and header.model.hidden_size == 48
    assert "best_val_loss" in header.metrics
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.read_header(tiny_checkpoint.with_name("missing.safetensors"))


def test_a_checkpoint_from_before_the_cell_rename_loads_and_samples_the_same(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Checkpoints written before ModelConfig.model became ModelConfig.cell name the cell "model"."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = json.loads(meta["model"])
    model["model"] = model.pop("cell")
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "model": json.dumps(model)})
    a, b = CharLM.load(tiny_checkpoint), CharLM.load(old)
    assert b.model.config == a.model.config and b.model.config.cell == "lstm"
    assert b.sample("the ", length=40, rng_seed=3) == a.sample("the ", length=40, rng_seed=3)
