"""Sampling and scoring: exact lengths, reproducibility, decoding filters, exact cross-entropy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm import CharLM, ModelConfig
from charlm.errors import ConfigError, VocabError
from charlm.evaluate import evaluate, score
from charlm.model import CharRNN
from charlm.sample import filter_logits
from charlm.vocab import Vocab


@pytest.fixture(scope="module")
def lm(tiny_checkpoint: Path) -> CharLM:
    return CharLM.load(tiny_checkpoint, device="cpu", precision="fp32")


def test_length_and_prefix_are_exact(lm: CharLM) -> None:
    text = lm.sample("The man", length=123, rng_seed=1)
    assert text.startswith("The man") and len(text) == len("The man") + 123
    assert len(lm.sample("", length=5, rng_seed=1)) == 5


def test_same_rng_seed_same_text(lm: CharLM) -> None:
    assert lm.sample("A", length=80, rng_seed=7) == lm.sample("A", length=80, rng_seed=7)
    assert lm.sample("A", length=80, rng_seed=7) != lm.sample("A", length=80, rng_seed=8)


def test_top_k_1_equals_greedy_equals_temperature_0(lm: CharLM) -> None:
    greedy = lm.sample("When", length=60, temperature=0)
    assert lm.sample("When", length=60, top_k=1, rng_seed=3) == greedy
    assert lm.sample("When", length=60, top_k=1, temperature=2.0, rng_seed=4) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = filter_logits(logits, temperature=1.0, top_k=None, top_p=0.8)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    kept = filter_logits(logits, temperature=1.0, top_k=None, top_p=0.81)
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    kept = filter_logits(logits, temperature=1.0, top_k=None, top_p=0.4)
    torch.testing.assert_close(kept, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    kept = filter_logits(logits, temperature=1.0, top_k=3, top_p=1.0)
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_priming_equals_feeding_one_character_at_a_time(lm: CharLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's one forward pass leaves the same next-character logits and the same recurrent state
    (which every generated character goes on from) as feeding the seed one character at a time."""
    from charlm.sample import Sampler

    seed = "Which other words"
    ids = torch.from_numpy(lm.vocab.encode(seed).astype(np.int64))[None]

    def one_at_a_time(sampler: Sampler, text: str, num_samples: int, before=()) -> tuple[torch.Tensor, tuple]:  # noqa: ANN001
        assert text == seed and num_samples == 1 and not list(before or ())
        state = None
        with torch.no_grad():
            for i in range(ids.shape[1]):
                logits, state = lm.model(ids[:, i : i + 1], state)
        return logits[:, -1], state

    primed_logits, primed_state = lm._sampler.prime(seed, 1)
    one_by_one_logits, one_by_one_state = one_at_a_time(lm._sampler, seed, 1)
    torch.testing.assert_close(primed_logits, one_by_one_logits, rtol=1e-5, atol=1e-5)
    assert len(primed_state) == len(one_by_one_state)
    for primed, one_by_one in zip(primed_state, one_by_one_state, strict=True):
        torch.testing.assert_close(primed, one_by_one, rtol=1e-5, atol=1e-5)
    # And end to end: the text sampled after priming is the text sampled after the one-at-a-time feed.
    primed_text = lm.sample(seed, length=50, rng_seed=11)
    monkeypatch.setattr(Sampler, "prime", one_at_a_time)
    assert lm.sample(seed, length=50, rng_seed=11) == primed_text


def test_batched_samples_match_their_count_and_length(lm: CharLM) -> None:
    samples = lm.sample_many("It", num_samples=3, length=40, rng_seed=2)
    assert len(samples) == 3 and all(len(s) == 42 and s.startswith("It") for s in samples)


def test_unknown_seed_characters_are_named_with_a_suggestion(lm: CharLM) -> None:
    with pytest.raises(VocabError) as info:
        lm.sample("Thé cat\x07", length=5)
    assert str(info.value) == ("the seed has 2 characters the model never saw: '\\x07', 'é': try --seed 'The cat'")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"length": 0}, "--length must be at least 1 (got 0)"),
        ({"temperature": -1.0}, "--temperature must be 0 (greedy) or more (got -1.0)"),
        ({"top_k": 0}, "--top-k must be at least 1 (got 0)"),
        ({"top_p": 1.5}, "--top-p must be in (0, 1] (got 1.5)"),
    ],
)
def test_bad_sampling_options(lm: CharLM, options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        lm.sample("a", **options)
    assert str(info.value) == message


def _uniform_model(vocab_size: int) -> CharRNN:
    model = CharRNN(ModelConfig(vocab_size=vocab_size, cell="lstm", hidden_size=8, embed_size=4, num_layers=1))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model


def test_uniform_model_has_perplexity_equal_to_vocab_size() -> None:
    vocab = Vocab.from_text("abcdefghijklmnopq")
    ids = np.random.default_rng(0).integers(0, len(vocab), 10_000).astype(np.uint8)
    m = evaluate(_uniform_model(len(vocab)), ids, start_id=0, batch_size=4)
    assert m.chars == 10_000
    assert m.perplexity == pytest.approx(len(vocab), rel=1e-6)
    assert m.bpc == pytest.approx(math.log2(len(vocab)), rel=1e-6)
    assert m.perplexity == math.exp(m.cross_entropy) and m.bpc == m.cross_entropy / math.log(2)


def test_streams_score_exactly_their_own_slices(lm: CharLM) -> None:
    """B streams == the sum of B independent single-stream scores; one stream == one plain pass."""
    ids = lm.vocab.encode(("Which words may find the way. " * 600)[:17_000])
    start = lm.vocab.start_id
    nats_1, n = score(lm.model, ids, start_id=start, batch_size=1)
    x = torch.tensor(np.concatenate([[start], ids[:-1]]).astype(np.int64))[None]
    logits, _ = lm.model(x)
    plain = torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids.astype(np.int64)), reduction="sum")
    assert n == len(ids) and nats_1.item() == pytest.approx(plain.item(), rel=1e-5)
    nats_4, _ = score(lm.model, ids, start_id=start, batch_size=4)  # 17000 // 4096 = 4 streams
    parts = 0.0
    for b in range(4):
        lo, hi = b * len(ids) // 4, (b + 1) * len(ids) // 4
        piece = ids[lo:hi]
        first = start if lo == 0 else int(ids[lo - 1])
        x = torch.tensor(np.concatenate([[first], piece[:-1]]).astype(np.int64))[None]
        logits, _ = lm.model(x)
        parts += torch.nn.functional.cross_entropy(
            logits[0], torch.tensor(piece.astype(np.int64)), reduction="sum"
        ).item()
    assert nats_4.item() == pytest.approx(parts, rel=1e-5)
    assert abs(nats_4.item() - nats_1.item()) / nats_1.item() < 0.01  # the stream-start effect is small


def test_unknown_characters_are_skipped_and_counted(lm: CharLM) -> None:
    m = lm.perplexity("The man ☃ said ☃ no ζ.")
    assert m.unknown == 3 and m.unknown_chars == ["ζ", "☃"]
    assert m.chars == len("The man  said  no .")
    with pytest.raises(VocabError, match="never saw"):
        lm.perplexity("snow ☃", unknown="error")
    with pytest.raises(VocabError, match="every character of the text is unknown"):
        lm.perplexity("☃☃")


def test_perplexity_on_the_validation_tail_reproduces_train(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from charlm import checkpoint as ckpt

    header = ckpt.read_header(tiny_checkpoint)
    corpus_text = (tiny_checkpoint.parent / "words.txt").read_text()
    tail = corpus_text[-header.corpus["val_chars"] :]
    (tmp_path / "tail.txt").write_text(tail)
    lm = CharLM.load(tiny_checkpoint, device="cpu")
    m = lm.perplexity(tmp_path / "tail.txt", batch_size=header.train["eval_batch_size"])
    assert m.cross_entropy == pytest.approx(header.metrics["best_val_loss"], abs=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "rnn-relu"])
def test_one_step_cells_match_the_fused_layer(cell: str) -> None:
    from charlm.sample import StepModel

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=12, cell=cell, hidden_size=24, embed_size=8, num_layers=3)).eval()
    ids = torch.randint(0, 12, (4, 9))
    expected, final = model(ids)
    step = StepModel(model)
    step.reset(model.initial_state(4))
    for t in range(9):
        torch.testing.assert_close(step(ids[:, t]), expected[:, t], rtol=1e-5, atol=1e-5)
    for got, want in zip(step.state, final, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_format", ["bf16", "int8"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn-relu"])
def test_smaller_weights_keep_the_next_character_distribution(cell: str, weight_format: str) -> None:
    """bf16 and int8 steps change the probabilities a little, never the picture: after 40 steps the
    distributions stay within a few hundredths (total variation) of fp32's."""
    from charlm.sample import StepModel

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=30, cell=cell, hidden_size=64, embed_size=16, num_layers=2)).eval()
    ids = torch.randint(0, 30, (8, 40))
    exact, approx = StepModel(model, "fp32"), StepModel(model, weight_format)
    for step in (exact, approx):
        step.reset(model.initial_state(8))
    for t in range(40):
        p, q = torch.softmax(exact(ids[:, t]), -1), torch.softmax(approx(ids[:, t]), -1)
        assert 0.5 * (p - q).abs().sum(-1).max() < 0.03


def test_gumbel_draw_follows_the_tempered_distribution() -> None:
    from charlm.sample import _gumbel

    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0, float("-inf"), 0.5]]).expand(20_000, -1)
    pick = _gumbel(0.7, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(pick(logits), minlength=6).float() / 20_000
    assert counts[4] == 0
    torch.testing.assert_close(counts, torch.softmax(logits[0] / 0.7, -1), atol=0.015, rtol=0)


def test_draw_follows_the_distribution_and_never_picks_zero_probability() -> None:
    from charlm.sample import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20_000, -1)
    picks = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=6).float() / 20_000
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)


def test_int8_sampling_is_refused_off_the_cpu_and_auto_picks_it_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from charlm.device import batch_weight_format, resolve_weight_format
    from charlm.errors import ConfigError

    for device in ("cuda", "mps"):
        with pytest.raises(ConfigError) as e:
            resolve_weight_format("int8", torch.device(device))
        assert str(e.value) == f"int8 sampling runs on the CPU only (not {device}): use --precision bf16 or fp32"
    # 'auto' on a CPU is the compiled integer step where numba is; without it, and for many streams at
    # once (batch_weight_format), the machine decides, set here rather than asked of charlm's own check: int8 on an
    # x86 CPU with oneDNN's VNNI kernels and an exact int8 matmul; never on ARM, without oneDNN, on a
    # GPU, without VNNI, with the dispatch capped below AVX-512, or where the int8 matmul saturates.
    from charlm import device as dev

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(dev, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.setattr(dev, "int8_matmul_exact", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(dev, "fixed_kernel_available", lambda: True)
    assert resolve_weight_format("auto", torch.device("cpu")) == "fixed"
    assert resolve_weight_format("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ConfigError, match="fixed sampling runs on the CPU only"):
        resolve_weight_format("fixed", torch.device("cuda"))
    monkeypatch.setattr(dev, "fixed_kernel_available", lambda: False)
    with pytest.raises(ConfigError, match="--precision fixed needs numba"):
        resolve_weight_format("fixed", torch.device("cpu"))
    for machine in ("x86_64", "AMD64"):
        monkeypatch.setattr(platform, "machine", lambda machine=machine: machine)
        assert resolve_weight_format("auto", torch.device("cpu")) == "int8"
        assert batch_weight_format(torch.device("cpu")) == "int8"
        assert resolve_weight_format("auto", torch.device("cuda")) == "bf16"
    for machine in ("aarch64", "arm64"):
        monkeypatch.setattr(platform, "machine", lambda machine=machine: machine)
        assert resolve_weight_format("auto", torch.device("cpu")) in ("fp32", "bf16")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for name, target, value in (
        ("get_cpu_capability", torch.backends.cpu, lambda: "AVX2"),
        ("_cpu_flags", dev, lambda: frozenset({"avx2", "avx512f"})),
        ("int8_matmul_exact", dev, lambda: False),
        ("is_available", torch.backends.mkldnn, lambda: False),
    ):
        with monkeypatch.context() as m:
            m.setattr(target, name, value)
            assert resolve_weight_format("auto", torch.device("cpu")) in ("fp32", "bf16"), name
    assert resolve_weight_format("fp32", torch.device("cpu")) == "fp32"


def test_int8_steps_compute_exact_integer_sums_whichever_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's int8 matmul saturates (oneDNN's AVX2 kernels), the step computes the same integer
    product another way: the result never depends on which path ran."""
    from charlm import sample
    from charlm.device import int8_matmul_exact

    g = torch.Generator().manual_seed(1)
    linear = sample._Linear(torch.randn(48, 96, generator=g), "int8", torch.float32)
    x = torch.randint(-128, 128, (8, 96), generator=g, dtype=torch.int8)
    x[:2] = 127
    base = torch.randn(8, 48, generator=g)
    exact = base + (x.double() @ linear.weight.double()).float() * linear.scale
    monkeypatch.setattr(sample, "int8_matmul_exact", lambda: False)
    torch.testing.assert_close(linear.add_to(base, x), exact, rtol=1e-6, atol=1e-5)
    if int8_matmul_exact.__wrapped__():  # this machine's kernel is exact: it gives the same numbers
        monkeypatch.setattr(sample, "int8_matmul_exact", lambda: True)
        torch.testing.assert_close(linear.add_to(base, x), exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("threads", [1, None], ids=["fixed", "adapting"])
def test_library_calls_give_back_the_threads_and_denormal_mode(tiny_checkpoint: Path, threads: int | None) -> None:
    """CharLM.load, perplexity and sampling set torch's thread count and flush denormals while they
    work, and the caller's settings are back afterwards: a library call changes nothing process-wide."""
    from charlm.device import flushes_denormals

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    torch.set_flush_denormal(False)
    try:
        lm = CharLM.load(tiny_checkpoint, device="cpu", precision="fp32", threads=threads)
        assert (torch.get_num_threads(), flushes_denormals()) == (3, False)
        lm.perplexity("The man said no.")
        assert (torch.get_num_threads(), flushes_denormals()) == (3, False)
        lm.sample("The", length=20, rng_seed=1)
        assert (torch.get_num_threads(), flushes_denormals()) == (3, False)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1.0},
        {"temperature": 0.0},
        {"temperature": 0.7, "stop": ["e "]},
        {"temperature": 1.3, "lines": 3},
    ],
)
def test_the_compiled_writer_writes_what_the_step_loop_writes(tiny_checkpoint: Path, options: dict) -> None:
    """One sample with the integer step goes through the compiled writer in growing blocks; it must
    write what picking and stepping one character at a time writes (what `charlm serve` does)."""
    from charlm.sample import FixedStep, StopRule, make_picker, new_generator

    pytest.importorskip("numba")
    fixed_lm = CharLM.load(tiny_checkpoint, device="cpu", sample_precision="fixed")
    sampler = fixed_lm.sampler
    length = 700  # blocks of 16, 32, ... 512: crosses every size
    logits, state = sampler.prime("The ", 1)
    step = sampler.step_for(1)
    assert isinstance(step, FixedStep)
    step.reset(state)
    temperature = options["temperature"]
    pick = make_picker(
        temperature=temperature, top_k=None, top_p=None, length=length, generator=new_generator(sampler.device, 5)
    )
    rule, text = StopRule(options.get("stop", ()), options.get("lines")), []
    for _ in range(length):
        j = int(pick(logits)[0])
        text.append(rule.feed(sampler.vocab.chars[j]) if rule.active else sampler.vocab.chars[j])
        if rule.stopped:
            break
        logits = step(torch.tensor([j]))
    else:
        text.append(rule.flush() if rule.active else "")
    got = fixed_lm.sample("The ", length=length, rng_seed=5, **options)
    assert got == "The " + "".join(text)
