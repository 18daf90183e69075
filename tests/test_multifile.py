"""Training on what people have: several files, a folder (with --glob), stdin. Documents are joined
by U+001E, validation is the last whole documents, and resume refuses a changed set of files."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_text, run_cli
from test_cli import TINY

from charlm import ModelConfig, TrainConfig, train
from charlm import checkpoint as ckpt
from charlm.data import SEPARATOR, find_documents, load_documents, split_documents
from charlm.vocab import Vocab


@pytest.fixture
def notes(in_tmp: Path) -> Path:
    """A folder of three text files, a binary one and a hidden one."""
    folder = in_tmp / "notes"
    folder.mkdir()
    for i, name in enumerate("abc"):
        (folder / f"{name}.txt").write_text(make_text(12_000, seed=10 + i), encoding="utf-8")
    (folder / "img.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (folder / ".hidden.txt").write_text("never read\n", encoding="utf-8")
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_folder_trains_resumes_and_refuses_an_edited_file(notes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", "notes", "--steps", "10", *TINY], capsys)
    assert code == 0, err
    assert "skipped: notes/img.bin is not a text file: NUL byte at byte offset 8" in err
    assert "3 documents: 2 train, 1 validation (notes/c.txt)" in err
    last = Path("checkpoints/notes.last.safetensors")
    corpus = ckpt.read_header(last).corpus
    assert corpus["files"] == [
        {"path": f"notes/{n}.txt", "sha256": sha(notes / f"{n}.txt"), "chars": 12_000} for n in "abc"
    ]
    assert corpus["chars"] == 3 * 12_000 + 2  # two separators
    assert (corpus["train_chars"], corpus["val_chars"]) == (2 * 12_000 + 1, 12_000)

    code, _, err = run_cli(["train", "notes", "--resume", "--steps", "20", *TINY], capsys)
    assert code == 0, err
    assert ckpt.read_header(last).state["step"] == 20
    code, out, _ = run_cli(["info", str(last)], capsys)
    assert code == 0 and "notes (36.0k chars, 3 files, sha256" in out

    before = last.read_bytes()
    with open(notes / "b.txt", "a", encoding="utf-8") as f:
        f.write("One more line, with a character the run never saw: \u00fc.\n")
    (notes / "d.txt").write_text(make_text(3_000, seed=20), encoding="utf-8")
    (notes / "a.txt").unlink()
    code, _, err = run_cli(["train", "notes", "--resume", "--steps", "30", *TINY], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: --resume: the corpus files differ from the run's: notes/b.txt changed (sha256 "
        f"{sha(notes / 'b.txt')[:12]}..., was {corpus['files'][1]['sha256'][:12]}...), notes/d.txt added, "
        f"notes/a.txt missing: resume with the original files, or fine-tune with --init-from {last}"
    )
    assert last.read_bytes() == before


def test_validation_is_whole_documents_never_seen_in_training(notes: Path) -> None:
    docs, skipped = find_documents(["notes"])
    assert [d.shown for d in docs] == ["notes/a.txt", "notes/b.txt", "notes/c.txt"]
    assert [p for p, _ in skipped] == ["notes/img.bin"]
    texts = [d.path.read_text() for d in docs]
    corpus = load_documents(docs, vocab=Vocab(sorted({*"".join(texts), SEPARATOR})), name="notes")
    assert corpus.vocab.decode(np.asarray(corpus.ids)).split(SEPARATOR) == texts

    train_ids, val_ids, n_val = split_documents(corpus, 0.1)
    assert n_val == 1
    assert corpus.vocab.decode(val_ids) == (notes / "c.txt").read_text()
    assert corpus.vocab.decode(train_ids).split(SEPARATOR) == [(notes / n).read_text() for n in ("a.txt", "b.txt")]

    train_ids, val_ids, n_val = split_documents(corpus, 0.5)  # 12k or 24k of 36k: the two last are closer
    assert n_val == 2 and len(val_ids) == 2 * 12_000 + 1
    train_ids, val_ids, n_val = split_documents(corpus, 0.5, max_chars=20_000)  # the cap drops whole documents
    assert n_val == 1 and len(val_ids) == 12_000
    train_ids, val_ids, n_val = split_documents(corpus, 0.1, max_chars=5_000)  # the last one alone is too long
    assert n_val == 1 and corpus.vocab.decode(val_ids) == (notes / "c.txt").read_text()[:5_000]
    assert len(train_ids) == 2 * 12_000 + 1


def test_the_python_api_takes_a_list_of_files_and_one_file_stays_as_before(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, seed in (("first", 1), ("second", 2)):
        (in_tmp / f"{name}.txt").write_text(make_text(15_000, seed=seed), encoding="utf-8")
    tiny = ModelConfig(hidden_size=32, embed_size=16, num_layers=1)
    config = TrainConfig(steps=5, batch_size=8, seq_len=32, device="cpu")
    result = train(["first.txt", "second.txt"], model=tiny, config=config)
    assert result.checkpoint == Path("checkpoints/first.safetensors")
    corpus = ckpt.read_header(result.checkpoint).corpus
    assert [f["path"] for f in corpus["files"]] == ["first.txt", "second.txt"]
    assert SEPARATOR in ckpt.read_header(result.checkpoint).vocab.chars

    one = train("second.txt", model=tiny, config=config)  # one plain file: no list of files, no separator
    header = ckpt.read_header(one.checkpoint)
    assert "files" not in header.corpus and header.corpus["sha256"] == sha(in_tmp / "second.txt")
    assert SEPARATOR not in header.vocab.chars


def test_stdin_is_a_corpus(in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = make_text(20_000, seed=3)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    code, _, err = run_cli(["train", "-", "--steps", "5", *TINY], capsys)
    assert code == 0, err
    corpus = ckpt.read_header(Path("checkpoints/stdin.safetensors")).corpus
    assert corpus["name"] == "stdin" and corpus["chars"] == 20_000
    assert corpus["files"] == [{"path": "-", "sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": 20_000}]


def test_a_folder_with_no_text_is_one_line(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_tmp / "empty").mkdir()
    (in_tmp / "empty" / "x.bin").write_bytes(b"\0\1\2")
    code, _, err = run_cli(["train", "empty", "--steps", "5", *TINY], capsys)
    assert code == 2
    assert err.startswith("error: no text file to train on in empty (1 skipped: empty/x.bin: empty/x.bin is not")
