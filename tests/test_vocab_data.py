"""Text -> ids -> batches: exact round trips, streaming equals in-memory, batches equal slicing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from charlm import data
from charlm.data import corpus_from_text, iter_text, load_corpus, read_text, split
from charlm.errors import CorpusError, VocabError
from charlm.streams import Batches
from charlm.vocab import Vocab

ASTRAL = "plain ascii, café, 中文, emoji 🙂🚀, math 𝔸𝔹, combining é\n"


def test_round_trip_with_astral_code_points() -> None:
    vocab = Vocab.from_text(ASTRAL)
    ids = vocab.encode(ASTRAL)
    assert vocab.decode(ids) == ASTRAL
    assert list(vocab.chars) == sorted(set(ASTRAL))
    assert ids.dtype == np.uint8


def test_id_dtype_is_smallest_that_fits() -> None:
    many = "".join(chr(0x4E00 + i) for i in range(300))
    assert Vocab.from_text(many).encode(many).dtype == np.uint16
    assert Vocab.from_text("ab").encode("ab").dtype == np.uint8


def test_unknown_characters_error_names_them_and_skip_drops_them() -> None:
    vocab = Vocab.from_text("abc")
    with pytest.raises(VocabError) as info:
        vocab.encode("abxz\t")
    assert str(info.value) == (
        "the text has 3 characters the model never saw: '\\t', 'x', 'z': "
        "remove or replace them, or train on text that contains them"
    )
    assert vocab.decode(vocab.encode("abxz", unknown="skip")) == "ab"


def test_file_encoding_streams_in_chunks_and_matches_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ASTRAL * 50).replace("\n", "\r\n")
    path = tmp_path / "t.txt"
    path.write_bytes(("\ufeff" + text).encode("utf-8"))
    monkeypatch.setattr(data, "CHUNK_BYTES", 7)  # cuts through multi-byte characters and CRLF pairs
    streamed = load_corpus(path)
    whole = corpus_from_text(text)
    assert streamed.vocab == whole.vocab
    assert np.array_equal(np.asarray(streamed.ids), whole.ids)
    assert streamed.vocab.decode(streamed.ids) == text.replace("\r\n", "\n")
    again = load_corpus(path)  # from the cache, memory-mapped
    assert isinstance(again.ids, np.memmap) and np.array_equal(np.asarray(again.ids), whole.ids)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty: give a file with some text in it"),
        (b"hello\x00world", "is not a text file: NUL byte at byte offset 5: give a UTF-8 text file"),
        ("héllo".encode() + b"\xff more", "is not valid UTF-8: bad byte at byte offset 6: convert it to UTF-8"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as info:
        read_text(path)
    assert message in str(info.value)


def test_invalid_utf8_offset_is_exact_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes("ab€".encode() * 10 + b"\xc3(")
    with pytest.raises(CorpusError, match="byte offset 50"):
        list(iter_text(path, chunk_bytes=4))


def test_missing_and_directory() -> None:
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus("nope/missing.txt")
    with pytest.raises(CorpusError, match="is a directory"):
        load_corpus(Path(__file__).parent)
    with pytest.raises(CorpusError, match="no built-in corpus of that name: known corpora: shakespeare"):
        load_corpus("shakespear")


def test_batches_equal_reference_slicing_and_y_is_x_shifted() -> None:
    ids = np.arange(10_000, dtype=np.uint16)
    b = Batches(ids, batch_size=4, seq_len=16, rng_seed=3)
    for epoch in (0, 1):
        offset, stream = b.offset(epoch), b.stream_len(epoch)
        assert 0 <= offset < 16
        for k in range(b.steps_in_epoch(epoch)):
            x, y = b.get(epoch, k)
            for row in range(4):
                start = offset + row * stream + k * 16
                assert np.array_equal(x[row], ids[start : start + 16])
                assert np.array_equal(y[row], ids[start + 1 : start + 17])
        last_x, _ = b.get(epoch, b.steps_in_epoch(epoch) - 1)
        assert last_x.max() < len(ids) - 1
    assert b.offset(0) != b.offset(1) or b.offset(1) != b.offset(2)


def test_consecutive_chunks_continue_each_stream() -> None:
    ids = np.arange(5000, dtype=np.uint16)
    b = Batches(ids, batch_size=3, seq_len=10)
    x0, y0 = b.get(0, 0)
    x1, _ = b.get(0, 1)
    assert np.array_equal(x1[:, 0], y0[:, -1])


def test_too_short_corpus_names_the_minimum() -> None:
    with pytest.raises(CorpusError) as info:
        Batches(np.zeros(100, dtype=np.uint8), batch_size=8, seq_len=32)
    assert "need at least 289 for --batch-size 8 and --seq-len 32" in str(info.value)


def test_split_is_contiguous_tail() -> None:
    ids = np.arange(1000)
    train, val = split(ids, 0.1)
    assert len(val) == 100 and np.array_equal(np.concatenate([train, val]), ids)


def test_min_count_folds_rare_characters_into_the_unknown_symbol() -> None:
    from charlm.vocab import UNK

    counts = {ord("a"): 10, ord("b"): 5, ord("中"): 1, ord("🙂"): 1}
    vocab = Vocab.from_counts(counts, min_count=2)
    assert vocab.chars == ("a", "b", UNK) and vocab.folded == ("中", "🙂")
    assert vocab.decode(vocab.encode("a中🙂b")) == f"a{UNK}{UNK}b"
    assert vocab.fold_penalty == (2, pytest.approx(np.log(2)))
    with pytest.raises(VocabError):
        vocab.encode("z")
