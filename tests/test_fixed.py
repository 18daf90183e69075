"""The integer model (charlm.fixed) and the archives it makes portable: the same integers from the
compiled kernel and from numpy, any thread count, any instruction set; close to the float model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text

from charlm import fixed
from charlm.config import ModelConfig
from charlm.errors import ArchiveError
from charlm.model import CharRNN

pytest.importorskip("constriction", reason="needs the compress extra: pip install 'charlm[compress]'")


def random_model(cell: str, layers: int = 2, hidden: int = 24, vocab: int = 19, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    net = CharRNN(ModelConfig(vocab_size=vocab, cell=cell, hidden_size=hidden, num_layers=layers, embed_size=8))
    with torch.no_grad():  # biases and a wider spread than the initialisation, so every table region is used
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
            if cell == "rnn-relu":  # a ReLU network that stays below the clamp at 8, as trained ones do
                p.mul_(0.5)
    return net.eval()


def run(model: fixed.FixedModel, ids: np.ndarray, steps: int, threads: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    state = model.initial_state(ids.shape[1])
    outs = [model.step(ids[t], state, threads) for t in range(steps)]
    return outs, state


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn", "rnn-relu"])
def test_the_kernel_and_numpy_give_the_same_integers(cell: str, narrow: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    m = fixed.FixedModel.from_model(random_model(cell, layers=3 if cell == "gru" else 2), narrow=narrow)
    assert m.w_hh.dtype == (np.int8 if narrow else np.int16) and m.w_out.dtype == np.int16
    ids = np.random.default_rng(1).integers(0, m.vocab, size=(12, 9))
    compiled, state_c = run(m, ids, 12)
    threaded, state_t = run(m, ids, 12, threads=3)
    fixed._kernel.cache_clear()
    monkeypatch.setenv("CHARLM_NO_NUMBA", "1")
    try:
        plain, state_p = run(m, ids, 12)
    finally:
        fixed._kernel.cache_clear()
    for a, b, c in zip(compiled, plain, threaded, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(state_c, state_p) and np.array_equal(state_c, state_t)


@pytest.mark.parametrize(("rows", "depth"), [(37, 13), (768, 256), (16, 8), (5, 1)])
def test_the_packed_products_are_exact(rows: int, depth: int) -> None:
    """The compiled multiply-add-pairs kernel, its numpy reference and a plain int64 product agree,
    with padded rows and inputs and at the extremes the format allows (11-bit weights, ReLU inputs
    at the clamp, as far as FixedModel.check lets a row's sum go), where a wrong order or width of
    the sums would show."""
    rng = np.random.default_rng(rows)
    top = min(fixed.RELU_MAX, ((1 << 31) - 1) // (depth * fixed.WEIGHT_MAX))
    cases = [
        (
            rng.integers(-fixed.WEIGHT_MAX, fixed.WEIGHT_MAX + 1, (rows, depth)),
            rng.integers(-fixed.ONE, fixed.ONE + 1, depth),
        ),
        (np.full((rows, depth), fixed.WEIGHT_MAX), np.full(depth, top)),
        (np.full((rows, depth), -fixed.WEIGHT_MAX), np.full(depth, top)),
    ]
    narrow = [  # 8-bit weights (sampling's narrow step): the same kernel widening int8 as it loads
        (rng.integers(-fixed.NARROW, fixed.NARROW + 1, (rows, depth)), rng.integers(-fixed.ONE, fixed.ONE + 1, depth)),
        (np.full((rows, depth), -fixed.NARROW), np.full(depth, fixed.RELU_MAX)),
    ]
    for w, x in cases + narrow:
        expected = w.astype(np.int64) @ x.astype(np.int64)
        x16 = np.zeros(-(-depth // fixed.DEPTH) * fixed.DEPTH, dtype=np.int16)
        x16[:depth] = x
        packed = fixed._pack(w.astype(np.int8 if np.abs(w).max() <= fixed.NARROW else np.int16))
        for dot in (fixed._dot_rows_numpy, fixed._dot_rows):
            out = np.full(-(-rows // fixed.LANES) * fixed.LANES, 7, dtype=np.int64)
            if dot is fixed._dot_rows:
                if fixed._njit is None:
                    continue
                call = fixed._njit(lambda a, b, c: fixed._dot_rows(a, b, c))  # an intrinsic runs inside compiled code
                call(packed, x16, out)
            else:
                dot(packed, x16, out)
            assert np.array_equal(out[:rows], expected)
            assert not out[rows:].any()  # padded rows sum zero weights


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn", "rnn-relu"])
def test_integer_logits_follow_the_float_model(cell: str) -> None:
    net = random_model(cell)
    m = fixed.FixedModel.from_model(net)
    ids = np.random.default_rng(2).integers(0, m.vocab, size=(30, 4))
    outs, _ = run(m, ids, 30)
    with torch.inference_mode():
        logits, _ = net(torch.from_numpy(ids.T.copy()))  # [S, T, V]
    diff = np.abs(np.stack([fixed.to_float(o) for o in outs], 1) - logits.numpy())
    assert diff.max() < 0.05, diff.max()  # 11-bit weights, Q12 activations: errors of a few thousandths


def test_tables_are_correctly_rounded() -> None:
    sig, tanh, exp = fixed.tables()
    u = np.arange(1, 1 << 15)
    assert np.array_equal(sig[(1 << 15) + u] + sig[(1 << 15) - u], np.full(len(u), 4096))  # s(x) + s(-x) = 1
    assert np.array_equal(tanh[(1 << 15) + u], -tanh[(1 << 15) - u])
    assert sig[1 << 15] == 2048 and tanh[1 << 15] == 0 and exp[0] == 1 << 24 and exp.min() == 1
    with localcontext() as ctx:
        ctx.prec = 40
        for i in np.random.default_rng(3).integers(0, 1 << 16, 200):
            x = Decimal(int(i) - (1 << 15)) / 4096
            assert sig[i] == int((4096 / (1 + (-x).exp())).to_integral_value())


def test_frequencies_sum_exactly_and_keep_every_symbol(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    logits = rng.integers(-40_000, 20_000, size=(16, 70))
    logits[3] = logits[3] // 5_000 * 5_000  # equal maxima: the first one takes the remainder
    free = (1 << 24) - 71 - 256
    w = fixed.frequencies(logits, free)
    assert (w.sum(axis=1) == free).all() and (w >= 0).all()
    assert (w.argmax(axis=1) == logits.argmax(axis=1)).all()
    fixed._kernel.cache_clear()
    monkeypatch.setenv("CHARLM_NO_NUMBA", "1")
    try:
        assert np.array_equal(fixed.frequencies(logits, free), w)  # compiled and numpy: the same integers
    finally:
        fixed._kernel.cache_clear()


def test_an_unsafe_model_is_refused_not_miscomputed() -> None:
    net = random_model("rnn-relu", hidden=600)
    with torch.no_grad():
        net.rnn.weight_hh_l1.fill_(1.0)  # every row sums to 600 x 1023 x 8: beyond int32
    with pytest.raises(Exception, match="too large for the portable integer arithmetic"):
        fixed.FixedModel.from_model(net)


# ------------------------------------------------------------------------------- archives across machines

CAPPED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "NUMBA_CPU_NAME": "generic"}

CODE = """
import sys
from charlm.compress import compress_file, decompress_file
if sys.argv[1] == "compress":
    compress_file(sys.argv[2], sys.argv[3], checkpoint=sys.argv[4], threads=int(sys.argv[5]), force=True)
else:
    decompress_file(sys.argv[2], sys.argv[3], checkpoint=sys.argv[4], force=True)
"""


def charlm_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CODE, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "encode_env, encode_threads, decode_env",
    [
        (CAPPED, 1, {}),  # AVX2 kernels and one thread -> default kernels, two threads
        ({}, 2, {**CAPPED, "CHARLM_NO_NUMBA": "1"}),  # and back, decoded by numpy alone
    ],
    ids=["avx2-1-thread-to-default", "default-2-threads-to-avx2-numpy"],
)
def test_an_archive_decodes_byte_exact_under_other_kernels_and_threads(
    encode_env: dict[str, str], encode_threads: int, decode_env: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    text = tmp_path / "t.txt"
    text.write_text(make_text(20_000, seed=31) + "ünïcödé 😀\n", encoding="utf-8")
    archive, back = tmp_path / "t.clm", tmp_path / "back.txt"
    made = charlm_python(["compress", str(text), str(archive), str(tiny_checkpoint), str(encode_threads)], encode_env)
    assert made.returncode == 0, made.stderr
    info = read_info(archive)
    assert info["arithmetic"] == f"integer-{fixed.FORMAT}"
    if encode_env:
        assert info["isa"] == "AVX2"
    done = charlm_python(
        ["decompress", str(archive), str(back), str(tiny_checkpoint)], {**decode_env, "OMP_NUM_THREADS": "2"}
    )
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == text.read_bytes()


def read_info(archive: Path) -> dict:
    from charlm.compress import read_archive_header

    return read_archive_header(archive.read_bytes()).info


def test_a_machine_bound_archive_names_what_differs(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--machine-bound archives bind to the arithmetic that wrote them; decoded where it differs, the message
    names the difference (here a recorded instruction set other than this machine's) and never says
    damaged: the payload's checksum shows it is intact."""
    from test_compress import forge

    from charlm.compress import coder, compress_bytes, decompress_bytes, load_model, read_archive_header

    lm, sha = load_model(tiny_checkpoint)
    archive, _ = compress_bytes(make_text(3000, seed=32).encode(), lm, model_sha256=sha, machine_bound=True)
    info = read_archive_header(archive).info
    other = "AVX2" if info["isa"] != "AVX2" else "AVX512"
    forged = forge(archive, info=json.dumps({**info, "isa": other}, separators=(",", ":")).encode())
    assert decompress_bytes(forged, lm, model_sha256=sha)  # the record alone changes nothing here
    quantize = coder.quantize
    monkeypatch.setattr(coder, "quantize", lambda probs: np.roll(quantize(probs), 1, axis=1))  # other arithmetic
    with pytest.raises(ArchiveError) as e:
        decompress_bytes(forged, lm, model_sha256=sha)
    message = str(e.value)
    assert "cannot be decoded here: it was compressed with --machine-bound" in message, message
    assert f"isa {other} there, {info['isa']} here" in message and "corrupt" not in message


@pytest.mark.parametrize("name", ["v2-static.clm", "v2-adapt.clm"])
def test_format_2_archives_still_decode(name: str, tmp_path: Path) -> None:
    """Archives written by charlm before format 3 (float arithmetic, no payload checksum). They are
    machine-bound: made on an Intel Xeon (AVX512), they decode here or fail with the honest message."""
    from charlm.compress import decompress_file

    folder = Path(__file__).parent / "data" / "format2"
    out = tmp_path / "back.txt"
    try:
        decompress_file(folder / name, out, checkpoint=folder / "v2model.safetensors")
    except ArchiveError as e:
        assert "corrupt" not in str(e) and ("cannot be decoded here" in str(e) or "made on a CPU" in str(e)), e
        pytest.skip(f"this machine's arithmetic differs from the one that made it: {e}")
    assert out.read_bytes() == (folder / "v2.txt").read_bytes()


def test_narrow_weights_follow_the_float_model_and_only_big_models_take_two_cores() -> None:
    """8-bit layer weights (what FixedStep samples with) stay close to the float model, if less close
    than 11 bits; only models whose int8 weights outgrow half an L2 may take two cores."""
    from charlm.sample import FixedStep

    net = random_model("lstm")
    ids = np.random.default_rng(2).integers(0, net.config.vocab_size, size=(30, 4))
    with torch.inference_mode():
        logits = net(torch.from_numpy(ids.T.copy()))[0].numpy()
    errors = []
    for narrow in (False, True):
        outs, _ = run(fixed.FixedModel.from_model(net, narrow=narrow), ids, 30)
        errors.append(np.abs(np.stack([fixed.to_float(o) for o in outs], 1) - logits).max())
    assert errors[0] < errors[1] < 0.3, errors
    assert not fixed.split_pays(ModelConfig(vocab_size=99, num_layers=2))  # the default GRU 2x256: 0.6 MB in int8
    assert fixed.split_pays(ModelConfig(vocab_size=99, num_layers=2, hidden_size=384))  # 1.3 MB
    assert fixed.split_pays(ModelConfig(vocab_size=99, num_layers=2, cell="lstm", hidden_size=512))  # 3.1 MB
    step = FixedStep(random_model("gru"))
    assert step.fixed.w_hh.dtype == np.int8 and not step.can_split


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn", "rnn-relu"])
def test_one_stream_on_two_cores_writes_what_one_core_writes(cell: str) -> None:
    """FixedModel.generate with threads=2 (each layer's units in two halves, taken by either thread)
    gives the same characters, state and logits as one thread, across calls and with the last
    character not read; narrow weights for the LSTM, wide for the others."""
    pytest.importorskip("numba")
    m = fixed.FixedModel.from_model(
        random_model(cell, hidden=32, layers=3 if cell == "gru" else 2), narrow=cell == "lstm"
    )
    assert m.can_split
    noise = np.random.default_rng(3).gumbel(size=(200, m.vocab)).astype(np.float32)
    results = []
    for threads in (1, 2):
        state, logits = m.initial_state(1), np.zeros(m.vocab, np.float32)
        first = m.generate(state, logits, noise, 120, advance_last=True, threads=threads)
        second = m.generate(state, logits, noise[120:], 80, advance_last=False, threads=threads)
        results.append((np.concatenate([first, second]).tolist(), state, logits))
    assert results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1]) and np.array_equal(results[0][2], results[1][2])


def test_a_sampler_on_two_cores_writes_the_text_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    from charlm import sample
    from charlm.sample import Sampler
    from charlm.vocab import Vocab

    monkeypatch.setattr(sample, "split_pays", lambda config: True)  # a tiny model, as if it were big
    monkeypatch.setattr(sample, "cpu_cores", lambda: 2)
    calls: list[int] = []
    generate = fixed.FixedModel.generate
    monkeypatch.setattr(
        fixed.FixedModel, "generate", lambda self, *a, **k: calls.append(k["threads"]) or generate(self, *a, **k)
    )

    vocab = Vocab.from_text("abcdefgh ijklmnop\n")
    net = random_model("lstm", hidden=32, vocab=len(vocab))
    texts = [
        "".join(
            c[0] for c in Sampler(net, vocab, weight_format="fixed", threads=t).stream("ab", length=300, rng_seed=5)
        )
        for t in (1, 2)
    ]
    assert texts[0] == texts[1] and len(texts[0]) == 300
    assert 2 in calls  # the two-core writer ran


def test_sampling_falls_back_to_the_torch_step_for_a_model_the_integers_cannot_hold() -> None:
    from charlm.sample import FixedStep, StepModel, make_step

    net = random_model("rnn-relu", hidden=600)
    with torch.no_grad():
        net.rnn.weight_hh_l1.fill_(1.0)
    assert isinstance(make_step(net, "fixed", 1), StepModel)
    assert isinstance(make_step(random_model("gru"), "fixed", 1), FixedStep)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn", "rnn-relu"])
def test_the_compiled_writer_writes_what_stepping_and_drawing_write(cell: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FixedModel.generate (many characters in one compiled call) against a step at a time with the
    float32 sum and argmax done in numpy; with numba and without, Gumbel rows and greedy."""
    m = fixed.FixedModel.from_model(random_model(cell))
    rng = np.random.default_rng(2)
    noise = (rng.gumbel(size=(40, m.vocab)) * 0.8).astype(np.float32)
    start = rng.normal(size=m.vocab).astype(np.float32)

    def stepping(rows: np.ndarray, count: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        state, logits, chosen = m.initial_state(1), start.copy(), []
        for t in range(count):
            chosen.append(int(np.argmax(logits + rows[t] if len(rows) else logits)))
            logits = fixed.to_float(m.step(np.array(chosen[-1:]), state)[0])
        return chosen, state, logits

    def writing(rows: np.ndarray, count: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        state, logits = m.initial_state(1), start.copy()
        chosen = m.generate(state, logits, rows, count, advance_last=True)
        return chosen.tolist(), state, logits

    for rows in (noise, noise[:0]):
        expected = stepping(rows, 40)
        got = [writing(rows, 40)]
        fixed._kernel.cache_clear()
        monkeypatch.setenv("CHARLM_NO_NUMBA", "1")
        try:
            got.append(writing(rows, 40))
        finally:
            monkeypatch.delenv("CHARLM_NO_NUMBA")
            fixed._kernel.cache_clear()
        for chosen, state, logits in got:
            assert chosen == expected[0]
            assert np.array_equal(state, expected[1]) and np.array_equal(logits, expected[2])
    state, logits = m.initial_state(1), start.copy()
    m.generate(state, logits, noise, 3, advance_last=False)  # the last one chosen but not read
    assert np.array_equal(state, writing(noise, 2)[1])
