"""The cache: visible (`charlm cache`), emptied on demand (`--clear`), bounded (LRU eviction under a cap)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import make_text, run_cli

from charlm import cache
from charlm.data import load_corpus
from charlm.errors import ConfigError


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(root))
    monkeypatch.delenv("CHARLM_CACHE_MAX", raising=False)
    return root


def write_text(folder: Path, name: str, seed: int, chars: int = 6000) -> Path:
    path = folder / name
    path.write_text(make_text(chars, seed=seed), encoding="utf-8")
    return path


def ids_entries(root: Path) -> set[str]:
    """The sha256 prefixes of the files whose ids are cached."""
    return {p.name[:32] for p in (root / "ids").glob("*.ids")}


def test_report_counts_real_entries_after_loading_a_corpus(cache_root: Path, tmp_path: Path) -> None:
    assert cache.report().entries == 0
    corpus = load_corpus(write_text(tmp_path, "a.txt", seed=1))
    r = cache.report()
    assert r.folder == cache_root
    assert (r.kinds["scans"].entries, r.kinds["ids"].entries, r.kinds["corpora"].entries) == (1, 1, 0)
    on_disk = sum(p.stat().st_size for p in cache_root.rglob("*") if p.is_file())
    assert r.bytes == on_disk
    assert r.kinds["ids"].bytes >= len(corpus.ids)  # one byte per character at least
    assert (r.max_bytes, r.max_source) == (4 * 10**9, "default")


def test_foreign_files_and_symlinks_are_not_counted_or_cleared(cache_root: Path, tmp_path: Path) -> None:
    load_corpus(write_text(tmp_path, "a.txt", seed=1))
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (cache_root / "ids" / "notes.txt").write_text("mine")
    (cache_root / "corpora").mkdir()
    (cache_root / "corpora" / "linked-v1.txt").symlink_to(outside)
    assert cache.report().entries == 2
    freed = cache.clear()
    assert freed.entries == 2
    assert outside.read_text() == "keep me" and (cache_root / "ids" / "notes.txt").exists()
    assert (cache_root / "corpora" / "linked-v1.txt").is_symlink()


def test_clear_empties_the_cache_and_the_next_load_still_works(
    cache_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_text(tmp_path, "a.txt", seed=1)
    first = load_corpus(path)
    size = cache.report().bytes
    code, out, err = run_cli(["cache", "--clear"], capsys)
    assert code == 0 and out == ""
    assert err == f"cleared {cache_root}: 2 entries, {cache.format_size(size)} freed\n"
    assert cache.report().entries == 0 and cache.report().bytes == 0
    assert cache_root.is_dir()  # the folder itself stays
    again = load_corpus(path)
    assert (again.ids == first.ids).all()
    assert cache.report().entries == 2


def test_the_cap_evicts_least_recently_used_entries_first(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c, d = (write_text(tmp_path, f"{name}.txt", seed=i) for i, name in enumerate("abcd"))
    sha = {}
    for path in (a, b, c):
        sha[path.stem] = load_corpus(path).sha256[:32]
        time.sleep(0.02)
    three = cache.report().bytes
    monkeypatch.setenv("CHARLM_CACHE_MAX", str(three + three // 6))  # room for half of one more file
    load_corpus(a)  # a cache hit: a becomes the most recently used
    time.sleep(0.02)
    sha["d"] = load_corpus(d).sha256[:32]
    assert ids_entries(cache_root) == {sha["a"], sha["c"], sha["d"]}  # b, the least recently used, went
    r = cache.report()
    assert (r.kinds["scans"].entries, r.kinds["ids"].entries) == (3, 3)
    assert r.bytes <= three + three // 6
    assert not list((cache_root / "ids").glob(f"{sha['b']}*"))  # the .ids and its .json went together


def test_an_entry_bigger_than_the_cap_is_still_written_and_evicts_everything_older(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_corpus(write_text(tmp_path, "a.txt", seed=1)).sha256[:32]
    time.sleep(0.02)
    monkeypatch.setenv("CHARLM_CACHE_MAX", "100")
    big = load_corpus(write_text(tmp_path, "big.txt", seed=2, chars=20_000))
    assert len(big.ids) == 20_000  # the run works
    assert ids_entries(cache_root) == {big.sha256[:32]} != {first}
    assert cache.report().kinds["scans"].entries == 0  # its scan was older than its ids: evicted too


@pytest.mark.parametrize("value", ["0", "off", "OFF"])
def test_zero_or_off_means_no_cap(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CHARLM_CACHE_MAX", value)
    for i in range(3):
        load_corpus(write_text(tmp_path, f"{i}.txt", seed=i))
    assert cache.report().entries == 6 and cache.report().max_bytes is None


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2G", 2 * 10**9),
        ("500M", 500 * 10**6),
        ("10GB", 10 * 10**9),
        ("123456", 123456),
        ("1.5k", 1500),
        ("4GiB", 4 * 2**30),
        (" 64 mb ", 64 * 10**6),
        ("0", None),
        ("off", None),
    ],
)
def test_sizes_parse(text: str, size: int | None) -> None:
    assert cache.parse_size(text) == size


@pytest.mark.parametrize("value", ["lots", "-1", "2X", "G", "1e9", "2 G B"])
def test_a_malformed_cap_is_one_line_naming_the_variable(
    cache_root: Path, tmp_path: Path, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHARLM_CACHE_MAX", value)
    expected = (
        f"CHARLM_CACHE_MAX={value!r} is not a size: give bytes or a size such as 500M, 2G or 10GB (0 or off for no cap)"
    )
    with pytest.raises(ConfigError) as e:
        load_corpus(write_text(tmp_path, "a.txt", seed=1))
    assert str(e.value) == expected
    code, out, err = run_cli(["cache"], capsys)
    assert (code, out, err) == (2, "", f"error: {expected}\n")


def test_cache_json(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    load_corpus(write_text(tmp_path, "a.txt", seed=1))
    monkeypatch.setenv("CHARLM_CACHE_MAX", "2G")
    code, out, err = run_cli(["cache", "--json"], capsys)
    assert code == 0 and err == ""
    data = json.loads(out)
    r = cache.report()
    assert data == {
        "folder": str(cache_root),
        "entries": 2,
        "bytes": r.bytes,
        "kinds": {
            "scans": {"entries": 1, "bytes": r.kinds["scans"].bytes},
            "ids": {"entries": 1, "bytes": r.kinds["ids"].bytes},
            "corpora": {"entries": 0, "bytes": 0},
        },
        "max_bytes": 2 * 10**9,
        "max_source": "CHARLM_CACHE_MAX=2G",
    }
    code, out, err = run_cli(["cache", "--clear", "--json", "-q"], capsys)
    data = json.loads(out)
    assert code == 0 and err == "" and data["entries"] == 0 and data["freed"] == {"entries": 2, "bytes": r.bytes}


def test_cache_table(cache_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_corpus(write_text(tmp_path, "a.txt", seed=1))
    code, out, _ = run_cli(["cache"], capsys)
    assert code == 0 and str(cache_root) in out and "\x1b" not in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert {"scans", "ids", "corpora", "total", "cap"} <= set(rows)
    assert "4.0 GB" in rows["cap"] and "default" in rows["cap"]


def test_stale_temp_files_are_counted_and_cleared_fresh_ones_kept(cache_root: Path, tmp_path: Path) -> None:
    load_corpus(write_text(tmp_path, "a.txt", seed=1))
    stale, fresh = cache_root / "ids" / "tmpdead1234.tmp", cache_root / "ids" / "tmplive5678.tmp"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y" * 10)
    old = time.time() - 2 * cache.STALE_TMP_S
    os.utime(stale, (old, old))
    before = cache.report()
    assert before.entries == 2 and before.kinds["ids"].bytes >= 1010
    freed = cache.clear()
    assert freed.entries == 2 and not stale.exists() and fresh.exists()
