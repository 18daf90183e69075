"""charlm compress / decompress: byte-exact round trips, the model's bound, refusals that leave no output."""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charlm import CharLM
from charlm import checkpoint as ckpt
from charlm.cli import main
from charlm.compress import (
    FLAG_ADAPT,
    MAGIC,
    MIN_BITS_PER_CHAR,
    compress_bytes,
    compress_file,
    decompress_bytes,
    decompress_file,
    file_sha256,
    load_model,
    quantize,
    read_archive_header,
    segment_bits,
)
from charlm.compress.coder import symbol_models
from charlm.compress.container import BODY, HEAD
from charlm.errors import ArchiveError, CharlmError
from charlm.streams import IGNORE, Cuts

pytest.importorskip("constriction", reason="needs the compress extra: pip install 'charlm[compress]'")


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> tuple[CharLM, str]:
    return load_model(tiny_checkpoint)


def round_trip(data: bytes, model: tuple[CharLM, str], **options: object) -> bytes:
    lm, sha = model
    archive, _ = compress_bytes(data, lm, model_sha256=sha, **options)
    assert decompress_bytes(archive, lm, model_sha256=sha) == data
    return archive


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "\n",
        "The man said hello.\n",
        "naïve café — “quoted” ✓ 中文\n",  # characters the model never saw go through the escape
        "astral: \U0001f600 \U00010348 \U0010ffff end",
        "crlf line\r\nanother\r\n",
        "mixed\r\nline ends\nand a lone\rcarriage return",
        "\ufeffa byte order mark, a NUL \x00 and a DEL \x7f",
        "中文" * 40,  # nothing the model knows: the adapting model learns from no characters at all
    ],
    ids=["empty", "one", "newline", "known", "unknown", "astral", "crlf", "mixed-eol", "bom-nul", "all-unknown"],
)
def test_round_trip_is_byte_exact(text: str, model: tuple[CharLM, str]) -> None:
    round_trip(text.encode("utf-8"), model)


def test_long_file_over_many_segments(model: tuple[CharLM, str]) -> None:
    data = (make_text(6000, seed=11) + "ünïcödé 😀\r\n").encode("utf-8")
    archive = round_trip(data, model, cuts=Cuts(max_streams=64, min_chars=100))
    assert len(read_archive_header(archive).segment_words) == 60


def test_threads_are_recorded_and_reused(model: tuple[CharLM, str]) -> None:
    archive = round_trip(make_text(500, seed=12).encode(), model, threads=2)
    assert read_archive_header(archive).threads == 2


def test_same_input_same_archive(model: tuple[CharLM, str]) -> None:
    lm, sha = model
    data = make_text(800, seed=13).encode()
    assert compress_bytes(data, lm, model_sha256=sha)[0] == compress_bytes(data, lm, model_sha256=sha)[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24))
def test_any_unicode_string_round_trips(text: str, model: tuple[CharLM, str]) -> None:
    round_trip(text.encode("utf-8"), model)


# ------------------------------------------------------------------------------------------- the bound


def test_quantised_weights_sum_exactly_and_keep_every_symbol() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(70, 0.05), size=32).astype(np.float32)
    weights = quantize(probs)
    assert (weights.sum(axis=1) == (1 << 24) - 71).all() and (weights >= 0).all()
    assert (weights == np.floor(weights)).all()


@pytest.mark.parametrize(
    "adapt, machine_bound", [(False, False), (True, False), (True, True)], ids=["static", "adapting", "machine-bound"]
)
def test_bits_per_char_match_the_models_cross_entropy(
    adapt: bool, machine_bound: bool, model: tuple[CharLM, str]
) -> None:
    lm, sha = model
    text = make_text(9000, seed=14)
    archive, report = compress_bytes(text.encode(), lm, model_sha256=sha, adapt=adapt, machine_bound=machine_bound)
    flush = 64 * report.segments / report.original_chars  # a range coder's last words
    assert abs(report.payload_bits_per_char - report.model_bits_per_char) < 0.01 * report.model_bits_per_char + flush
    assert report.compressed_bytes == len(archive) == report.header_bytes + report.payload_bytes
    assert report.adapted == adapt and bool(read_archive_header(archive).flags & FLAG_ADAPT) == adapt
    if not adapt:  # the same streams `charlm perplexity` scores; only each segment's first input differs
        assert report.model_bits_per_char == pytest.approx(lm.perplexity(text).bpc, rel=2e-3)


def test_adapting_learns_what_recurs_and_leaves_the_model_alone(model: tuple[CharLM, str]) -> None:
    """A passage the model never saw, repeated: the adapting model codes the repeats in fewer bits."""
    lm, sha = model
    before = [p.detach().clone() for p in lm.model.parameters()]
    data = ("Zorblax and Quenthia argued over the vermillion kettle. " * 60).encode()
    static = round_trip(data, model, adapt=False)
    adapting = round_trip(data, model, adapt=True)  # the output layer, in integers
    whole = round_trip(data, model, adapt=True, machine_bound=True)  # the whole float model
    assert len(whole) < 0.8 * len(static) and len(adapting) < 0.9 * len(static)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))


def test_a_version_1_archive_cannot_claim_adaptation(two_segments: bytes, model: tuple[CharLM, str]) -> None:
    head = bytearray(forge(two_segments)[: read_archive_header(two_segments).header_bytes - 4])
    struct.pack_into("<H", head, len(MAGIC), 1)
    forged = bytes(head) + struct.pack("<I", zlib.crc32(head)) + two_segments[len(head) + 4 :]
    with pytest.raises(ArchiveError, match=INCONSISTENT):
        read_archive_header(forged)


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_round_trip_json_and_default_names(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = in_tmp / "notes.txt"
    source.write_text(make_text(3000, seed=15) + "é\n", encoding="utf-8")
    code, out, err = run_cli(["compress", "notes.txt", "--json", "-c", str(tiny_checkpoint)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] == "notes.txt.clm" and report["original_chars"] == 3002 and report["unknown_chars"] == 1
    assert report["compressed_bytes"] == (in_tmp / "notes.txt.clm").stat().st_size
    assert set(report["baselines"]) == {"zlib-9", "bz2-9", "lzma-9"}
    assert math.isclose(report["bits_per_char"], 8 * report["compressed_bytes"] / 3002)
    original = source.read_bytes()
    source.unlink()
    (in_tmp / "checkpoints").mkdir()  # without --checkpoint: checkpoints/<the name the archive records>
    shutil.copy(tiny_checkpoint, in_tmp / "checkpoints" / tiny_checkpoint.name)
    code, out, err = run_cli(["decompress", "notes.txt.clm"], capsys)
    assert code == 0 and out == "", err
    assert source.read_bytes() == original


def test_cli_streams_stdin_to_stdout(
    in_tmp: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    data = make_text(400, seed=16).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    with pytest.raises(SystemExit) as done:
        main(["compress", "-", "-c", str(tiny_checkpoint)])
    archive = capsysbinary.readouterr().out
    assert done.value.code == 0 and archive.startswith(MAGIC)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(archive)))
    with pytest.raises(SystemExit) as done:
        main(["decompress", "-", "-c", str(tiny_checkpoint)])
    assert done.value.code == 0 and capsysbinary.readouterr().out == data


def test_existing_output_is_not_overwritten_without_force(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "a.txt").write_text("hello\n")
    (in_tmp / "a.txt.clm").write_bytes(b"keep me")
    code, _, err = run_cli(["compress", "a.txt", "-c", str(tiny_checkpoint)], capsys)
    assert code == 2 and err == "error: a.txt.clm already exists: pass --force to overwrite it, or choose another -o\n"
    assert (in_tmp / "a.txt.clm").read_bytes() == b"keep me"
    assert run_cli(["compress", "a.txt", "-c", str(tiny_checkpoint), "--force"], capsys)[0] == 0
    code, _, err = run_cli(["decompress", "a.txt", "-c", str(tiny_checkpoint)], capsys)
    assert code == 2 and "a.txt does not end in .clm" in err


def test_non_utf8_input_is_refused(in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_tmp / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    code, _, err = run_cli(["compress", "latin1.txt", "-c", str(tiny_checkpoint)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3 is invalid)" in err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["latin1.txt"]


def other_model(tiny_checkpoint: Path, folder: Path) -> Path:
    """The same weights under different metadata: a file with another sha256."""
    header = ckpt.read_header(tiny_checkpoint)
    path = folder / "other.safetensors"
    ckpt.write(
        path,
        ckpt.read_tensors(header),
        {
            "model": header.model.to_dict(),
            "vocab": list(header.vocab.chars),
            "kind": "best",
            "corpus": {"name": "other"},
        },
    )
    return path


def test_wrong_model_is_refused_by_name(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "t.txt").write_text(make_text(300, seed=17))
    assert run_cli(["compress", "t.txt", "-c", str(tiny_checkpoint)], capsys)[0] == 0
    other = other_model(tiny_checkpoint, in_tmp)
    code, _, err = run_cli(["decompress", "t.txt.clm", "-o", "back.txt", "-c", str(other)], capsys)
    sha = file_sha256(tiny_checkpoint)
    assert code == 2 and err.count("\n") == 1
    assert f"t.txt.clm was compressed with the model {tiny_checkpoint.name} (sha256 {sha[:16]}...), not {other}" in err
    assert f"pass --checkpoint with the {tiny_checkpoint.name} it was compressed with" in err
    assert not (in_tmp / "back.txt").exists()


def damage(archive: bytes, where: str) -> bytes:
    if where == "truncated":
        return archive[:-3]
    if where == "trailing":
        return archive + b"\0"
    if where == "payload-ones":  # words no range coder writes: constriction notices before the checksum does
        start = read_archive_header(archive).header_bytes
        return archive[:start] + b"\xff" * (len(archive) - start)
    position = 20 if where == "header" else len(archive) - 5  # a model-sha byte, or inside the last segment
    return archive[:position] + bytes([archive[position] ^ 0x40]) + archive[position + 1 :]


@pytest.mark.parametrize(
    "where, message",
    [
        ("truncated", "is truncated"),
        ("trailing", "is corrupt: 1 unexpected bytes after its end"),
        ("header", "is corrupt: its header fails its checksum"),
        ("payload", "is corrupt: its payload fails its checksum"),
        ("payload-ones", "is corrupt: its payload fails its checksum"),
    ],
)
def test_damaged_archive_is_refused_without_output(
    where: str, message: str, in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "t.txt").write_text(make_text(2000, seed=18))
    assert run_cli(["compress", "t.txt", "-c", str(tiny_checkpoint)], capsys)[0] == 0
    archive = in_tmp / "t.txt.clm"
    archive.write_bytes(damage(archive.read_bytes(), where))
    code, out, err = run_cli(["decompress", "t.txt.clm", "-o", "back.txt", "-c", str(tiny_checkpoint)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["t.txt", "t.txt.clm"]  # no output, no temp file


def test_another_integer_model_is_named_as_the_cause(
    model: tuple[CharLM, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A portable archive whose first step this charlm computes differently (a charlm whose integer
    model differs wrote it) is not called damaged: its payload checksum holds."""
    from charlm.compress import coder

    lm, sha = model
    with monkeypatch.context() as patch:  # as if the encoder's first step had given other integers
        patch.setattr(coder, "fingerprint", lambda raw: b"\xff" * 8)
        archive, _ = compress_bytes(make_text(500, seed=19).encode(), lm, model_sha256=sha)
    frequencies = coder.frequencies
    monkeypatch.setattr(coder, "frequencies", lambda q, free: np.roll(frequencies(q, free), 1, axis=1))
    with pytest.raises(
        ArchiveError, match="cannot be decoded by this charlm: it was written by charlm .*integer model differs"
    ):
        decompress_bytes(archive, lm, model_sha256=sha)


def test_not_an_archive(in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_tmp / "x.clm").write_text("just text")
    code, _, err = run_cli(["decompress", "x.clm", "-c", str(tiny_checkpoint)], capsys)
    assert code == 2 and "x.clm is not a charlm archive (no .clm signature)" in err
    assert not (in_tmp / "x").exists()


def test_missing_constriction_says_how_to_install(model: tuple[CharLM, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "constriction", None)
    lm, sha = model
    with pytest.raises(CharlmError, match=r"pip install 'charlm\[compress\]'"):
        compress_bytes(b"hello", lm, model_sha256=sha)


def test_api_refuses_another_models_archive(model: tuple[CharLM, str]) -> None:
    lm, sha = model
    archive, _ = compress_bytes(b"hello", lm, model_sha256=sha)
    with pytest.raises(ArchiveError, match="was compressed with the model"):
        decompress_bytes(archive, lm, model_sha256="0" * 64)


# ------------------------------------------------------------------------------------------- forged headers

BODY_FIELDS = ("model_sha", "text_sha", "byte_length", "chars", "segments", "threads", "flags", "probe", "info_len")


def forge(archive: bytes, *, info: bytes | None = None, words: list[int] | None = None, **fields: int) -> bytes:
    """`archive` with header fields replaced and its crc32 recomputed, as a deliberate forger would:
    the checksum then passes and only the checks of the values themselves stand in the way."""
    header = read_archive_header(archive)
    body = dict(zip(BODY_FIELDS, BODY.unpack_from(archive, HEAD.size), strict=True))
    start = HEAD.size + BODY.size
    info = archive[start : start + body["info_len"]] if info is None else info
    words = list(header.segment_words) if words is None else words
    body.update(info_len=len(info), segments=len(words))
    body.update(fields)
    head = archive[: HEAD.size] + BODY.pack(*body.values()) + info + struct.pack(f"<{len(words)}I", *words)
    return head + struct.pack("<I", zlib.crc32(head)) + archive[header.header_bytes :]


@pytest.fixture(scope="module")
def two_segments(model: tuple[CharLM, str]) -> bytes:
    lm, sha = model
    archive, report = compress_bytes(make_text(9000, seed=20).encode(), lm, model_sha256=sha)
    assert report.segments == 2
    return archive


def shifted(archive: bytes, first: int, second: int) -> list[int]:
    words = read_archive_header(archive).segment_words
    return [words[0] + first, words[1] + second]


INCONSISTENT = "is corrupt: its header is inconsistent"
FORGERIES = {  # name: (the forged fields, or a function of the archive giving them; the message)
    "huge char count": (dict(chars=1 << 60, byte_length=1 << 60), INCONSISTENT),
    "largest char count": (dict(chars=(1 << 64) - 1, byte_length=(1 << 64) - 1), INCONSISTENT),
    "no segments for the text": (dict(words=[]), INCONSISTENT),
    "100 segments": (lambda a: dict(words=shifted(a, 0, 0) + [0] * 98), INCONSISTENT),
    "segment count past the end": (dict(segments=(1 << 32) - 1), "is truncated"),
    "segment lengths past the end": (lambda a: dict(words=shifted(a, 1, 0)), "its header promises"),
    "segment lengths short of the end": (lambda a: dict(words=shifted(a, 0, -1)), "4 unexpected bytes after its end"),
    "segment lengths moved": (lambda a: dict(words=shifted(a, 1, -1)), "the decoded text does not match its checksum"),
    "zero threads": (dict(threads=0), INCONSISTENT),
    "unknown flag": (dict(flags=0x80), INCONSISTENT),
    "info length past the end": (dict(info_len=65535), "is truncated"),
    "info nested deeply": (dict(info=b"[" * 60000), INCONSISTENT),
    "info not a dict": (dict(info=b'["model"]'), INCONSISTENT),
    "info value not a string": (dict(info=b'{"model": {"x": 1}}'), INCONSISTENT),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_header_is_refused_without_output(
    name: str, two_segments: bytes, in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fields, message = FORGERIES[name]
    (in_tmp / "t.clm").write_bytes(forge(two_segments, **(fields(two_segments) if callable(fields) else fields)))
    code, out, err = run_cli(["decompress", "t.clm", "-o", "back.txt", "-c", str(tiny_checkpoint)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["t.clm"]


def test_forger_sees_the_same_archive_when_nothing_changes(two_segments: bytes) -> None:
    assert forge(two_segments) == two_segments


def test_thread_count_cannot_exceed_a_byte(two_segments: bytes) -> None:
    with pytest.raises(struct.error):  # the format holds 0..255; 0 is refused, 1..255 are what --threads allows
        forge(two_segments, threads=10**6)


def test_decoding_stops_where_the_payload_runs_out(model: tuple[CharLM, str]) -> None:
    """A count the header checks cannot rule out (a short payload may hold a long, predictable text)
    costs no more decoding than the payload really holds."""
    lm, sha = model
    archive, _ = compress_bytes(make_text(2000, seed=21).encode(), lm, model_sha256=sha)
    forged = forge(archive, chars=2_000_000, byte_length=2_000_000)
    assert read_archive_header(forged).char_count == 2_000_000
    done: list[int] = []
    with pytest.raises(ArchiveError, match="the decoded text does not match its checksum"):
        decompress_bytes(forged, lm, model_sha256=sha, progress=lambda chars, total: done.append(chars))
    assert max(done, default=0) <= 2000 + 256


def test_the_bit_floor_and_the_word_budget_hold_at_their_tightest() -> None:
    """Every character costs at least MIN_BITS_PER_CHAR, and a segment's words hold at most
    segment_bits of them, even for a run of the likeliest symbol: the facts the decoder's limits rest on."""
    import constriction
    import numpy as np

    family, _ = symbol_models()
    probs = np.zeros((1, 1), dtype=np.float32)
    probs[0, 0] = 1  # a one-character vocab: the most mass any symbol can get
    weights = quantize(probs)
    count = 200_000
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(np.zeros(count, dtype=np.int32), family, np.repeat(weights, count, axis=0))
    bits = count * (24 - math.log2(weights[0, 0] + 1))
    assert count * MIN_BITS_PER_CHAR <= bits <= segment_bits(len(encoder.get_compressed()))


def test_unprintable_model_name_stays_on_one_line(two_segments: bytes) -> None:
    header = read_archive_header(forge(two_segments, info=json.dumps({"model": "a\nb\x1b[2J"}).encode()))
    assert header.model_name == "'a\\nb\\x1b[2J'"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chars=st.integers(0, (1 << 64) - 1),
    byte_length=st.integers(0, (1 << 64) - 1),
    threads=st.integers(0, 2),
    flags=st.integers(0, 255),
    words=st.lists(st.integers(0, (1 << 32) - 1), max_size=3),
)
def test_any_forged_header_is_an_archive_error(
    chars: int,
    byte_length: int,
    threads: int,
    flags: int,
    words: list[int],
    two_segments: bytes,
    model: tuple[CharLM, str],
) -> None:
    lm, sha = model
    forged = forge(two_segments, chars=chars, byte_length=byte_length, threads=threads, flags=flags, words=words)
    with pytest.raises(ArchiveError):
        decompress_bytes(forged, lm, model_sha256=sha)


def test_known_ids_are_int64_for_torch_before_2_8(model: tuple[CharLM, str]) -> None:
    """torch.gather took only int64 indices before torch 2.8, and pyproject admits torch 2.3."""
    import numpy as np

    from charlm.compress import known_ids
    from charlm.vocab import text_to_codes

    lm, _ = model
    ids = known_ids(lm.vocab, text_to_codes("the ☃"))
    assert ids.dtype == np.int64 and ids[-1] == IGNORE and lm.vocab.decode(ids[:-1]) == "the "


def test_coding_gives_back_the_threads_denormal_mode_and_kernels(
    model: tuple[CharLM, str], tiny_checkpoint: Path, in_tmp: Path
) -> None:
    """The coder pins CPU arithmetic while it codes; the caller's settings are all back afterwards."""
    from charlm.device import flushes_denormals

    lm, sha = model
    before = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(3)
    torch.set_flush_denormal(False)
    settings = lambda: (torch.get_num_threads(), flushes_denormals(), torch.backends.mkldnn.enabled)  # noqa: E731
    expected = (3, False, before[1])
    try:
        data = make_text(700, seed=23).encode()
        archive, _ = compress_bytes(data, lm, model_sha256=sha, threads=2)
        assert settings() == expected
        assert decompress_bytes(archive, lm, model_sha256=sha) == data
        assert settings() == expected
        (in_tmp / "t.txt").write_bytes(data)
        compress_file("t.txt", checkpoint=tiny_checkpoint)
        assert settings() == expected
        decompress_file("t.txt.clm", "back.txt", checkpoint=tiny_checkpoint)
        assert settings() == expected and (in_tmp / "back.txt").read_bytes() == data
    finally:
        torch.set_num_threads(before[0])
