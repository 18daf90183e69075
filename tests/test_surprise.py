"""Where a text surprises the model: per-character bits, per-line figures, the heat-map page, many files."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import make_text, run_cli

from charlm import CharLM
from charlm.surprise import BANDS, band

ODD = "Wwy hhk ttfv yyw kkp vvw bbgh mmy wwk ffy."  # letters the model knows, in no order it has seen


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, int]:
    """Real-looking text with one line of letters in combinations it never has; (file, its line number)."""
    lines = make_text(6000, seed=11).splitlines()
    where = len(lines) * 2 // 3
    lines.insert(where, ODD)
    path = tmp_path / "planted.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, where + 1


def test_lines_add_up_to_the_whole_text_exactly(tiny_checkpoint: Path, planted: tuple[Path, int]) -> None:
    lm = CharLM.load(tiny_checkpoint)
    scored = lm.score(planted[0])
    lines = scored.lines
    assert sum(line.chars for line in lines) == scored.metrics.chars == len(scored.text)
    weighted = math.fsum(line.cross_entropy * line.chars for line in lines) / scored.metrics.chars
    assert weighted == pytest.approx(scored.metrics.cross_entropy, rel=1e-12)
    # the same streamed scoring as `perplexity`, summed per character instead of per chunk
    assert scored.metrics.cross_entropy == pytest.approx(lm.perplexity(planted[0]).cross_entropy, rel=1e-6)
    assert "".join(line.text + "\n" for line in lines) == scored.text


def test_the_planted_odd_line_comes_out_on_top(
    in_tmp: Path, tiny_checkpoint: Path, planted: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    path, number = planted
    code, out, _ = run_cli(
        ["perplexity", str(path), "--checkpoint", str(tiny_checkpoint), "--per-line", "--top", "3"], capsys
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    assert rows[0]["line"] == number and rows[0]["text"] == ODD
    assert set(rows[0]) == {"line", "chars", "cross_entropy", "bpc", "text"}
    assert rows[0]["bpc"] >= rows[1]["bpc"] >= rows[2]["bpc"]
    assert rows[0]["bpc"] == pytest.approx(rows[0]["cross_entropy"] / math.log(2))


def test_per_line_covers_every_line_in_order(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "t.txt").write_text("the man\n\nsaid it was\nnot", encoding="utf-8")
    code, out, _ = run_cli(["perplexity", "t.txt", "--checkpoint", str(tiny_checkpoint), "--per-line"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["line"], r["text"], r["chars"]) for r in rows] == [
        (1, "the man", 8),
        (2, "", 1),
        (3, "said it was", 12),
        (4, "not", 3),
    ]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.scripts: dict[str, str] = {}
        self.sources: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag not in ("meta", "br"):  # the void elements the page uses
            self.open.append(tag)
        if tag == "script":
            self._in = a.get("id") or f"script{len(self.scripts)}"
            self.scripts[self._in] = ""
        for key in ("src", "href"):
            if a.get(key):
                self.sources.append(str(a[key]))

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.scripts[self._in] += data


def test_the_html_page_is_well_formed_self_contained_and_holds_every_character(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = make_text(3000, seed=4) + "<script>alert('x')</script> & \u00e9\u4e2d \U0001f600 end\r\nlast line"
    (in_tmp / "page.txt").write_text(text, encoding="utf-8", newline="")
    code, _, err = run_cli(
        ["perplexity", "page.txt", "--checkpoint", str(tiny_checkpoint), "--html", "out.html"], capsys
    )
    assert code == 0, err
    page = (in_tmp / "out.html").read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.open == []  # every element closed, in order
    assert parser.sources == []  # nothing fetched from anywhere
    assert "<script>alert" not in page  # the text never appears as markup
    data = json.loads(parser.scripts["data"])
    decoded = base64.b64decode(data["text"]).decode("utf-8")
    assert decoded == text.replace("\r\n", "\n")
    centibits = memoryview(base64.b64decode(data["centibits"])).cast("H")
    assert len(centibits) == len(decoded)
    lm = CharLM.load(tiny_checkpoint)
    unknown = [c for c in decoded if c not in lm.vocab]
    assert sum(1 for v in centibits if v == 0xFFFF) == len(unknown) > 0


def test_show_prints_a_short_text_whole_and_a_long_one_by_its_worst_lines(
    in_tmp: Path, tiny_checkpoint: Path, planted: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "short.txt").write_text("the man said\nit was not\n", encoding="utf-8")
    code, out, _ = run_cli(["perplexity", "short.txt", "--checkpoint", str(tiny_checkpoint), "--show"], capsys)
    assert code == 0
    rows = out.splitlines()
    assert [r.split(None, 2)[0] for r in rows] == ["1", "2"]  # not a terminal: no legend, no colour codes
    assert rows[0].endswith("the man said") and "\x1b[" not in out
    path, number = planted
    code, out, err = run_cli(
        ["perplexity", str(path), "--checkpoint", str(tiny_checkpoint), "--show", "--show-lines", "5"], capsys
    )
    rows = out.splitlines()
    assert len(rows) == 5 and rows[0].split()[0] == str(number) and rows[0].endswith(ODD)
    assert "the 5 most surprising of" in err


def test_colour_bands_are_the_documented_scale() -> None:
    assert BANDS[-1] == 12.0
    assert [band(b) for b in (0.0, 0.99, 1.0, 3.9, 7.0, 11.99, 12.0, 40.0)] == [0, 0, 1, 2, 4, 6, 7, 7]


def test_many_files_and_folders_rank_files_and_skip_what_cannot_be_scored(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = in_tmp / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(make_text(5000, seed=1), encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(make_text(3000, seed=2) + ODD * 20, encoding="utf-8")
    (folder / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (folder / ".hidden.txt").write_text("never read", encoding="utf-8")
    (folder / "notes.md").write_text(make_text(800, seed=3), encoding="utf-8")
    other = in_tmp / "c.txt"
    other.write_text(make_text(2000, seed=5), encoding="utf-8")
    args = ["perplexity", "docs", str(other), "--glob", "*.txt", "--checkpoint", str(tiny_checkpoint), "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    result = json.loads(out)
    names = [Path(f["file"]).name for f in result["files"]]
    assert sorted(names) == ["a.txt", "b.txt", "c.txt"]
    assert names[0] == "b.txt"  # most surprising first
    assert [Path(s["file"]).name for s in result["skipped"]] == ["blob.txt"]
    assert result["skipped"][0]["reason"] == "docs/blob.txt is not a text file: NUL byte at byte offset 0"
    total = result["total"]
    assert total["chars"] == sum(f["chars"] for f in result["files"])
    expected = math.fsum(f["cross_entropy"] * f["chars"] for f in result["files"]) / total["chars"]
    assert total["cross_entropy"] == pytest.approx(expected, rel=1e-12)
    assert total["bpc"] == pytest.approx(total["cross_entropy"] / math.log(2))
    code, out, err = run_cli(args[:-1], capsys)
    assert code == 0 and "total (3 files)" in out and "skipped" in err and "blob.txt" in err


def test_views_need_one_text_and_top_needs_per_line(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "a.txt").write_text("the man\n", encoding="utf-8")
    (in_tmp / "b.txt").write_text("it was\n", encoding="utf-8")
    code, _, err = run_cli(["perplexity", "a.txt", "b.txt", "--show", "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 2 and "--show show one text: give one FILE" in err
    code, _, err = run_cli(["perplexity", "a.txt", "--top", "3", "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 2 and "--top goes with --per-line" in err
    code, _, err = run_cli(["perplexity", "nowhere/", "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 2 and err == "error: nowhere/: no such file: check the path\n"
    (in_tmp / "empty").mkdir()
    (in_tmp / "empty" / "x.txt").write_text("the man\n", encoding="utf-8")
    code, _, err = run_cli(["perplexity", "empty", "--glob", "*.md", "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 2 and err == "error: no text file to score in empty: check the paths and --glob\n"


def test_adapt_scores_a_repetitive_text_lower_and_says_so(
    in_tmp: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passage = "Velkar and Oumbrey rode to Quenzhal, where Oumbrey met Velkar again.\n"
    (in_tmp / "rep.txt").write_text(make_text(1500, seed=8) + passage * 40, encoding="utf-8")
    args = ["perplexity", "rep.txt", "--checkpoint", str(tiny_checkpoint), "--json"]
    _, out, _ = run_cli(args, capsys)
    static = json.loads(out)
    _, out, _ = run_cli([*args, "--adapt"], capsys)
    adapted = json.loads(out)
    assert "adapted" not in static and adapted["adapted"] is True
    assert adapted["chars"] == static["chars"]
    assert adapted["bpc"] < 0.9 * static["bpc"]
    lm = CharLM.load(tiny_checkpoint)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    scored = lm.score(in_tmp / "rep.txt", adapt=True)
    assert scored.metrics.cross_entropy == pytest.approx(adapted["cross_entropy"], rel=1e-9)
    assert all((v == before[k]).all() for k, v in lm.model.state_dict().items())  # the caller's model untouched


def test_adapt_scores_streams_of_unequal_length_from_a_file(in_tmp: Path, tiny_checkpoint: Path) -> None:
    """Several streams, the last ones ending a step early, read from a uint8 memmap: every character
    is scored once, and per-character adapting scores add up to the plain adapting figure."""
    (in_tmp / "long.txt").write_text(make_text(3 * 4096 + 7, seed=9), encoding="utf-8")
    lm = CharLM.load(tiny_checkpoint)
    m = lm.perplexity(in_tmp / "long.txt", adapt=True)
    scored = lm.score(in_tmp / "long.txt", adapt=True)
    assert m.chars == scored.metrics.chars == 3 * 4096 + 7 and m.streams == 3
    assert not np.isnan(scored.nats).any() and (scored.nats > 0).all()
    assert m.cross_entropy == pytest.approx(scored.metrics.cross_entropy, rel=1e-9)
    assert m.cross_entropy < lm.perplexity(in_tmp / "long.txt").cross_entropy * 1.05
