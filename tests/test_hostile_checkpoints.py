"""Hostile and broken checkpoints: loading never runs code, every bad file is one line and exit 2.

A checkpoint is untrusted input. Pickle payloads named like checkpoints must be refused without being
unpickled; damaged, foreign, newer or inconsistent files must be refused with a line that names the file;
header values must be validated before any model is built (a header cannot make charlm allocate).
"""

from __future__ import annotations

import ast
import json
import pickle
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from charlm import checkpoint as ckpt
from charlm.model import CharRNN

REPO = Path(__file__).resolve().parent.parent
REFUSED_FORMAT = "is not a safetensors checkpoint (bad header length; truncated or another format)"
GIVE_CHARLM = "give a checkpoint written by `charlm train`"


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The single error line of a command that must refuse its input (exit 2, nothing on stdout)."""
    code, out, err = run_cli(args, capsys)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    return lines[0].removeprefix("error: ")


class MakesMarker:
    """Unpickling this object opens (creates) the marker file: the classic pickle code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------------------ crafting files


def split_file(path: Path) -> tuple[dict, bytes]:
    """(header JSON, tensor bytes) of a safetensors file: 8-byte little-endian length, JSON, data."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def rewrite(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    """A copy of `source` whose header JSON went through `change` (tensor bytes untouched)."""
    header, data = split_file(source)
    change(header)
    raw = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return target


def set_meta(key: str, value: object) -> Callable[[dict], None]:
    """Sets a metadata entry to `value` as given (charlm writes JSON strings; other JSON types test the reader)."""
    return lambda header: header["__metadata__"].__setitem__(key, value)


def set_json_field(key: str, **changes: object) -> Callable[[dict], None]:
    def change(header: dict) -> None:
        value = json.loads(header["__metadata__"][key])
        value.update(changes)
        header["__metadata__"][key] = json.dumps(value)

    return change


@pytest.fixture
def corpus_for(tiny_checkpoint: Path) -> Path:
    """The text the tiny checkpoint was trained on (a resume must use the same corpus)."""
    return tiny_checkpoint.parent / "words.txt"


def loading_commands(path: Path, corpus: Path, out: Path) -> list[list[str]]:
    """Every way a checkpoint enters charlm from the command line."""
    return [
        ["info", str(path), "--json"],
        ["sample", "-c", str(path), "--length", "3", "--threads", "1"],
        ["perplexity", str(corpus), "-c", str(path), "--threads", "1"],
        ["train", str(corpus), "--init-from", str(path), "--steps", "1", "--out", str(out), "--threads", "1"],
        ["train", str(corpus), "--resume", str(path), "--steps", "1", "--out", str(out), "--threads", "1"],
    ]


# ------------------------------------------------------------------------------------ pickle payloads


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(MakesMarker(marker)))  # noqa: S301 - proves the payload below is real
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors", "evil.last.safetensors"])
def test_pickle_named_like_a_checkpoint_is_refused_unopened(
    name: str, tmp_path: Path, corpus_for: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(MakesMarker(marker)))
    for args in loading_commands(path, corpus_for, tmp_path / "out" / "new.safetensors"):
        assert refused(args, capsys) == f"{path} {REFUSED_FORMAT}: {GIVE_CHARLM}", args
        assert not marker.exists(), args
    assert path.read_bytes() == pickle.dumps(MakesMarker(marker))  # left intact
    assert not (tmp_path / "out" / "new.safetensors").exists()


def test_torch_save_zip_is_refused_unopened(
    tmp_path: Path, corpus_for: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": MakesMarker(marker)}, path)  # a torch.save zip archive around the payload
    for args in loading_commands(path, corpus_for, tmp_path / "new.safetensors"):
        assert refused(args, capsys) == f"{path} {REFUSED_FORMAT}: {GIVE_CHARLM}", args
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the only safe torch.load, for comparison
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_no_pickle_loading_anywhere_in_charlm() -> None:
    """Source check: no pickle/marshal import, and any torch.load passes weights_only=True."""
    for source in sorted((REPO / "charlm").rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "marshal", "cloudpickle"} & {n.split(".")[0] for n in names}, source
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                keywords = {k.arg: k.value for k in node.keywords}
                safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
                assert safe, f"{source}:{node.lineno}: torch.load without weights_only=True"


# ------------------------------------------------------------------------------------ broken files


def test_truncated_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, corpus_for: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = tiny_checkpoint.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[: len(whole) // 2])
    expected = (
        f"{path} is truncated ({len(whole) // 2} bytes, its header promises {len(whole)}): "
        "the file was cut short; use another copy or the .last checkpoint"
    )
    for args in loading_commands(path, corpus_for, tmp_path / "new.safetensors"):
        assert refused(args, capsys) == expected, args
    path.write_bytes(whole[:5])
    assert (
        refused(["info", str(path)], capsys)
        == f"{path} is not a checkpoint (too short to be a safetensors file): {GIVE_CHARLM}"
    )


def test_random_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(0)
    path = tmp_path / "noise.safetensors"
    path.write_bytes(rng.randbytes(4096))
    assert refused(["sample", "-c", str(path)], capsys) == f"{path} {REFUSED_FORMAT}: {GIVE_CHARLM}"
    path.write_bytes(struct.pack("<Q", 100) + rng.randbytes(4096))  # a plausible length, then noise
    assert (
        refused(["sample", "-c", str(path)], capsys)
        == f"{path} is not a safetensors checkpoint (its header is not JSON): {GIVE_CHARLM}"
    )
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")  # a header length no file has
    assert refused(["info", str(path)], capsys) == f"{path} {REFUSED_FORMAT}: {GIVE_CHARLM}"


def test_safetensors_from_another_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"format": "pt"})
    for args in (["info", str(path)], ["sample", "-c", str(path)]):
        assert refused(args, capsys) == f"{path} is a safetensors file but not a charlm checkpoint: {GIVE_CHARLM}"


def test_newer_format_version(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "future.safetensors", set_meta("format_version", "999"))
    expected = (
        f"{path} uses checkpoint format version 999, newer than this charlm reads (1): "
        "upgrade charlm: pip install -U charlm"
    )
    for args in (["info", str(path)], ["sample", "-c", str(path)]):
        assert refused(args, capsys) == expected


def test_tensor_shapes_that_do_not_match_the_config(
    tiny_checkpoint: Path, tmp_path: Path, corpus_for: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the tiny model is an LSTM 2x48 with embed 16: weight_ih_l0 is [4*48, 16]; a config of 64 needs [256, 16]
    path = rewrite(tiny_checkpoint, tmp_path / "shapes.safetensors", set_json_field("model", hidden_size=64))
    expected = f"{path} has tensor model.rnn.weight_ih_l0 of shape [192, 16], its config needs [256, 16]: {GIVE_CHARLM}"
    for args in loading_commands(path, corpus_for, tmp_path / "new.safetensors")[1:4]:
        assert refused(args, capsys) == expected, args
    last, _ = ckpt.sibling_paths(tiny_checkpoint)
    resumable = rewrite(last, tmp_path / "shapes.last.safetensors", set_json_field("model", hidden_size=64))
    message = refused(
        [
            "train",
            str(corpus_for),
            "--resume",
            str(resumable),
            "--steps",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "new.safetensors"),
        ],
        capsys,
    )
    assert message.startswith(f"{resumable} has tensor model.rnn.weight_ih_l0 of shape [192, 16]")
    assert not (tmp_path / "new.safetensors").exists()


def test_non_float_weights(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def as_int32(header: dict) -> None:
        header["model.embed.weight"]["dtype"] = "I32"  # same byte count, wrong meaning

    path = rewrite(tiny_checkpoint, tmp_path / "ints.safetensors", as_int32)
    assert (
        refused(["sample", "-c", str(path)], capsys)
        == f"{path} has tensor model.embed.weight of non-float type I32: {GIVE_CHARLM}"
    )


@pytest.mark.parametrize(
    "entry",
    [
        {"shape": [-1, 16]},
        {"shape": [1.5, 16]},
        {"data_offsets": "0-100"},
        {"dtype": "F128"},
        {"data_offsets": [0, 1 << 40]},
    ],
)
def test_malformed_tensor_entries(
    entry: dict, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "bad.safetensors", lambda h: h["model.embed.weight"].update(entry))
    assert (
        refused(["info", str(path)], capsys)
        == f"{path} has a malformed entry for tensor 'model.embed.weight': {GIVE_CHARLM}"
    )


# ------------------------------------------------------------------------------------ untrusted header values


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"hidden_size": 10**9}, "--hidden must be a whole number from 1 to 65536 (got 1000000000)"),
        ({"num_layers": 10**6}, "--layers must be a whole number from 1 to 64 (got 1000000)"),
        ({"vocab_size": 10**12}, "to 1114112 (got 1000000000000)"),
        ({"embed_size": -3}, "--embed must be a whole number from 1 to 65536 (got -3)"),
        ({"hidden_size": "48"}, "--hidden must be a whole number from 1 to 65536 (got '48')"),
        ({"num_layers": True}, "--layers must be a whole number from 1 to 64 (got True)"),
        ({"num_layers": 0}, "--hidden, --layers and the vocab size must be at least 1 (got 48, 0 and"),
        ({"hidden_size": 0}, "--hidden, --layers and the vocab size must be at least 1 (got 0, "),
        ({"cell": "transformer"}, "--model must be one of lstm, gru, rnn, rnn-relu (got 'transformer')"),
        ({"dropout": "0.1"}, "--dropout must be in [0, 1) (got 0.1)"),
        ({"hidden_size": 65536, "num_layers": 64}, "the model would have"),
    ],
)
def test_model_config_values_are_validated_before_building(
    changes: dict, problem: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "config.safetensors", set_json_field("model", **changes))
    for args in (["info", str(path)], ["sample", "-c", str(path), "--length", "3"]):
        message = refused(args, capsys)
        assert "model config is invalid (" in message and problem in message, message


def test_a_big_but_valid_config_is_refused_before_allocating(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # hidden 12000 passes the range checks, but the model would hold 1.7e9 floats (7 GB): the header's
    # small tensors must be compared with the config's shapes on the meta device, before anything is built
    built_for_real = []
    original = CharRNN.__init__

    def watch(self: CharRNN, config: object) -> None:
        if torch.empty(0).device.type != "meta":
            built_for_real.append(config)
            raise AssertionError("a model was allocated from an unchecked header")
        original(self, config)

    monkeypatch.setattr(CharRNN, "__init__", watch)
    path = rewrite(tiny_checkpoint, tmp_path / "big.safetensors", set_json_field("model", hidden_size=12000))
    message = refused(["sample", "-c", str(path)], capsys)
    assert message.startswith(f"{path} has tensor model.rnn.weight_ih_l0 of shape [192, 16], its config needs")
    assert built_for_real == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (set_meta("vocab", json.dumps(["ab"] * 52)), "a vocab entry is not a single character"),
        (set_meta("vocab", json.dumps(list(range(52)))), "a vocab entry is not a single character"),
        (set_meta("vocab", json.dumps(["a"] * 52)), "the vocab lists a character twice"),
        (set_meta("vocab", json.dumps(["a", "b"])), "has a vocab of 2 characters but a model for"),
        (set_meta("model", "[1, 2]"), "has a 'model' entry of the wrong type"),
        (set_meta("model", "{not json"), "has an unreadable 'model' entry in its metadata"),
        (set_meta("corpus", "[1]"), "has a 'corpus' entry of the wrong type"),
        (set_meta("format_version", "1.5"), "has an unreadable format_version"),
        (set_meta("format_version", "0"), "has an invalid format_version 0"),
        (set_meta("format", "other"), "is a safetensors file but not a charlm checkpoint"),
        (lambda h: h.pop("__metadata__"), "is a safetensors file but not a charlm checkpoint"),
        (lambda h: h["__metadata__"].pop("model"), "lacks the 'model' entry in its metadata"),
    ],
)
def test_other_header_values_are_validated(
    change: Callable[[dict], None],
    problem: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "header.safetensors", change)
    message = refused(["info", str(path)], capsys)
    assert problem in message, message


# -------------------------------------------------------------------------- header values of the wrong type


@pytest.mark.parametrize("value", [[1], None, {"v": 1}])
def test_format_version_of_the_wrong_json_type(
    value: object, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "version.safetensors", set_meta("format_version", value))
    assert refused(["info", str(path)], capsys) == f"{path} has an unreadable format_version: {GIVE_CHARLM}"


@pytest.mark.parametrize(
    "change", [set_json_field("model", hidden_size=10**9), set_meta("vocab", json.dumps(["ab"] * 52))]
)
def test_invalid_config_or_vocab_errors_name_the_file(
    change: Callable[[dict], None], tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rewrite(tiny_checkpoint, tmp_path / "named.safetensors", change)
    assert refused(["info", str(path)], capsys).startswith(str(path))


@pytest.mark.parametrize("field", ["step", "best_val", "elapsed"])
def test_resume_state_values_are_validated(
    field: str, tiny_checkpoint: Path, corpus_for: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last, _ = ckpt.sibling_paths(tiny_checkpoint)
    path = rewrite(last, tmp_path / "state.last.safetensors", set_json_field("state", **{field: "x"}))
    message = refused(
        [
            "train",
            str(corpus_for),
            "--resume",
            str(path),
            "--steps",
            "100",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "new.safetensors"),
        ],
        capsys,
    )
    assert message.startswith(f"{path} ")
