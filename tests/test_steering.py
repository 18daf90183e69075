"""Generation people can steer: stop strings and line counts, a seed file streamed through the
model, and beam search, from the CLI and the Python API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_text, run_cli

from charlm import CharLM
from charlm.data import iter_text
from charlm.errors import ConfigError
from charlm.sample import PRIME_CHUNK, StopRule


@pytest.fixture(scope="module")
def lm(tiny_checkpoint: Path) -> CharLM:
    return CharLM.load(tiny_checkpoint, device="cpu", threads=1)


def feed_all(rule: StopRule, text: str) -> str:
    shown = "".join(rule.feed(ch) for ch in text)
    return shown if rule.stopped else shown + rule.flush()


def test_a_stop_rule_holds_back_a_possible_stop_string_and_never_shows_half_of_it() -> None:
    rule = StopRule(["END"])
    assert [rule.feed(ch) for ch in "aEN"] == ["a", "", ""]  # "EN" might begin END
    assert rule.feed("d") == "ENd"  # it did not
    assert [rule.feed(ch) for ch in "xEND"] == ["x", "", "", ""]
    assert rule.stopped == "stop" and rule.matched == "END" and rule.feed("y") == ""
    assert feed_all(StopRule(["END"], include_stop=True), "abENDcd") == "abEND"
    assert feed_all(StopRule(["\n\n", "."]), "one\ntwo\n\nthree.") == "one\ntwo"
    assert feed_all(StopRule(lines=2), "a\nb\nc\n") == "a\nb\n"
    assert feed_all(StopRule(["zz"]), "abz") == "abz"  # the length cap shows what was held back


@pytest.mark.parametrize(("stops", "lines"), [(["ab", "aab", "\n\n"], None), (["ba"], 3), ([], 4), (["b\n"], 2)])
def test_a_stop_rule_shows_the_same_on_its_quick_path_and_its_full_one(stops: list[str], lines: int | None) -> None:
    """Characters in no stop string take a shortcut; a rule that believes every character might
    be in one (the full path only) shows the same thing at every position."""
    import random

    text = "".join(random.Random(len(stops)).choice("aab c\n") for _ in range(3000))
    quick, full = StopRule(stops, lines), StopRule(stops, lines)
    full.stop_chars = frozenset(text)
    assert [quick.feed(ch) for ch in text] == [full.feed(ch) for ch in text]
    assert (quick.stopped, quick.matched, quick.flush()) == (full.stopped, full.matched, full.flush())


def test_samples_stop_at_a_string_each_on_its_own_and_reproducibly(lm: CharLM) -> None:
    free = lm.sample_many("The ", num_samples=4, length=300, rng_seed=5)
    stopped = lm.sample_many("The ", num_samples=4, length=300, rng_seed=5, stop=[". "])
    for whole, cut in zip(free, stopped, strict=True):
        at = whole.find(". ", len("The "))  # a stop string is looked for in what is generated
        assert cut == (whole[:at] if at >= 0 else whole)  # the same draws, cut where the stop string begins
    assert len({len(s) for s in stopped}) > 1
    kept = lm.sample_many("The ", num_samples=4, length=300, rng_seed=5, stop=[". "], include_stop=True)
    assert all(k == (c + ". " if c != w else c) for k, c, w in zip(kept, stopped, free, strict=True))


def test_a_stop_string_that_never_appears_ends_at_the_length(lm: CharLM) -> None:
    assert lm.sample("The ", length=80, rng_seed=1, stop=["QQQ"]) == lm.sample("The ", length=80, rng_seed=1)


def test_lines_end_a_sample_after_that_many_newlines(lm: CharLM) -> None:
    text = lm.sample("", length=2000, rng_seed=3, lines=2)
    assert text.count("\n") == 2 and text.endswith("\n")
    assert lm.sample("", length=2000, rng_seed=3).startswith(text)


def test_a_seed_file_is_read_in_chunks_and_unknown_characters_are_skipped(lm: CharLM, tmp_path: Path) -> None:
    import torch

    prompt = make_text(3 * PRIME_CHUNK + 123, seed=8)
    path = tmp_path / "prompt.txt"
    path.write_text(prompt.replace("the", "thqe"), encoding="utf-8")  # q is not in the model's vocabulary
    sampler = lm.sampler
    whole = sampler.prime(prompt, 1)
    from_file = sampler.prime("", 1, before=(t for _, t in iter_text(path)))
    assert sampler.skipped == prompt.count("the")
    pieces = sampler.prime("", 1, before=[prompt[i : i + 1000] for i in range(0, len(prompt), 1000)])
    for got in (from_file, pieces):  # the same text read in pieces primes the same state
        torch.testing.assert_close(got[0], whole[0], atol=1e-4, rtol=0)
        for a, b in zip(got[1], whole[1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    text = lm.sample("", length=100, rng_seed=2, seed_file=path)
    assert len(text) == 100 and lm.skipped == prompt.count("the")
    assert (
        lm.sample("The", length=50, rng_seed=2, seed_file=path)
        == "The" + lm.sample("The", length=50, rng_seed=2, seed_file=[prompt])[3:]
    )


def test_beam_search_never_scores_below_greedy_and_beam_1_is_greedy(lm: CharLM) -> None:
    greedy_text, greedy_logp = lm.beam_search("The ", beam=1, length=60)
    assert greedy_text == lm.sample("The ", length=60, temperature=0) == lm.sample("The ", length=60, beam=1)
    for width in (2, 4, 8):
        text, logp = lm.beam_search("The ", beam=width, length=60)
        assert len(text) == 4 + 60 and logp >= greedy_logp - 1e-9
    text, logp = lm.beam_search("The ", beam=4, length=200, stop=["."])
    assert "." not in text and logp < 0
    assert "".join(lm.stream("The ", length=50, rng_seed=3)) == lm.sample("The ", length=50, rng_seed=3)


def test_beam_search_reports_the_log_probability_the_model_gives_its_text(tiny_checkpoint: Path) -> None:
    lm = CharLM.load(tiny_checkpoint, device="cpu", sample_precision="fp32")
    text, logp = lm.beam_search("The ", beam=3, length=40)
    import torch

    from charlm.streams import model_inputs
    from charlm.vocab import text_to_codes

    ids = lm.vocab.lookup(text_to_codes(text))
    with torch.no_grad():
        x = torch.from_numpy(model_inputs(ids[:-1], lm.vocab.start_id)).unsqueeze(0)
        logits, _ = lm.model(x)
        lp = torch.log_softmax(logits[0].double(), -1)
    expected = sum(float(lp[i - 1, ids[i]]) for i in range(4, len(ids)))
    assert logp == pytest.approx(expected, abs=1e-4)


def test_bad_steering_options_are_refused(lm: CharLM) -> None:
    with pytest.raises(ConfigError, match="--lines must be at least 1"):
        lm.sample("The", lines=0)
    with pytest.raises(ConfigError, match="--stop must be a non-empty string"):
        lm.sample("The", stop=[""])
    with pytest.raises(ConfigError, match="stop must be a list of strings"):
        lm.sample("The", stop="\n")
    with pytest.raises(ConfigError, match="--beam must be from 1 to 256"):
        lm.beam_search("The", beam=0)


def test_the_cli_composes_stop_seed_file_beam_with_json_and_rng_seed(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = ["-c", str(tiny_checkpoint), "--device", "cpu", "--threads", "1"]
    code, out, _ = run_cli(
        [
            "sample",
            *ck,
            "--seed",
            "The ",
            "-n",
            "300",
            "--stop",
            ". ",
            "--num-samples",
            "3",
            "--rng-seed",
            "4",
            "--json",
        ],
        capsys,
    )
    data = json.loads(out)
    lm = CharLM.load(tiny_checkpoint, device="cpu", threads=1)
    assert code == 0 and data["samples"] == lm.sample_many("The ", num_samples=3, length=300, rng_seed=4, stop=[". "])
    assert set(data["stopped"]) <= {"stop", "length"}
    prompt = tmp_path / "p.txt"
    prompt.write_text("It was the time of day. And then", encoding="utf-8")
    code, out, err = run_cli(["sample", *ck, "--seed-file", str(prompt), "-n", "50", "--rng-seed", "1"], capsys)
    assert code == 0 and out == lm.sample("", length=50, rng_seed=1, seed_file=prompt) + "\n"
    code, out, _ = run_cli(["sample", *ck, "--seed", "The ", "-n", "40", "--beam", "4", "--json"], capsys)
    data = json.loads(out)
    text, logp = lm.beam_search("The ", beam=4, length=40)
    assert data["samples"] == [text] and data["log_probability"] == pytest.approx(logp)
    assert data["bits"] == pytest.approx(-logp / math.log(2))
    code, _, err = run_cli(["sample", *ck, "--seed-file", str(tmp_path / "none.txt")], capsys)
    missing = tmp_path / "none.txt"
    assert (code, err) == (2, f"error: --seed-file {missing}: no such file: give a text file, or - to read stdin\n")
    code, _, err = run_cli(["sample", *ck, "--beam", "3", "--num-samples", "2"], capsys)
    assert (code, err) == (2, "error: --beam writes one continuation, the most likely: leave out --num-samples\n")


def test_a_session_carries_its_state_between_turns(lm: CharLM, tmp_path: Path) -> None:
    from charlm import Session

    chat = Session(lm, length=60, temperature=0.9, rng_seed=11)
    assert chat.say("The time was right.\n") == 0
    first = "".join(chat.reply())
    chat.temperature = 0.0
    assert chat.say("And thqe day\n") == 1  # q is not in the vocabulary: skipped, not fatal
    second = "".join(chat.reply())
    whole = "The time was right.\n" + first + "And the day\n" + second
    assert chat.transcript == whole
    again = Session(lm, length=60, temperature=0.9, rng_seed=11)
    again.say("The time was right.\n")
    assert "".join(again.reply()) == first  # reproducible with the same rng_seed
    assert chat.save(tmp_path / "t.txt").read_text(encoding="utf-8") == whole
    chat.reset()
    assert chat.transcript == ""


def test_a_session_reply_ends_at_a_stop_string_and_keeps_it(lm: CharLM) -> None:
    from charlm import Session

    chat = Session(lm, length=500, rng_seed=2, stop=[". "])
    chat.say("The ")
    reply = "".join(chat.reply())
    assert reply.endswith(". ") and reply.count(". ") == 1 and chat.transcript == "The " + reply


def test_adapting_to_the_prompt_lowers_the_cost_of_its_new_names(tiny_checkpoint: Path) -> None:
    """A prompt full of a name the model never saw: adapted, the model gives it far more probability."""
    lm = CharLM.load(tiny_checkpoint, device="cpu", threads=1)
    prompt = "".join(f"Grendel said to Grendel that Grendel was {w}.\n" for w in ("good", "there", "right") * 30)
    plain = lm.sample_many(prompt, num_samples=8, length=300, rng_seed=1)
    adapted = lm.sample_many(prompt, num_samples=8, length=300, rng_seed=1, adapt=True)
    count = lambda texts: sum(t[len(prompt) :].count("Grendel") for t in texts)  # noqa: E731
    assert count(adapted) > count(plain) + 5
    assert adapted == lm.sample_many(prompt, num_samples=8, length=300, rng_seed=1, adapt=True)  # reproducible


def test_a_seed_file_far_larger_than_a_piece_is_read_piece_by_piece(
    lm: CharLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory in proportion to the model, not the prompt: no forward pass sees more than one piece,
    and the file's text is never held whole (its pieces are read as the model goes)."""
    from charlm.sample import Sampler

    path = tmp_path / "big.txt"
    path.write_text(make_text(20 * PRIME_CHUNK, seed=3), encoding="utf-8")
    widest: list[int] = []
    original = Sampler._read

    def recording(self, ids, state):  # noqa: ANN001, ANN202
        widest.append(len(ids))
        return original(self, ids, state)

    monkeypatch.setattr(Sampler, "_read", recording)
    lm.sample("", length=20, rng_seed=1, seed_file=path)
    assert len(widest) >= 20 and max(widest) <= PRIME_CHUNK + 1


def test_the_seed_file_dash_reads_stdin(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    prompt = "It was the time of day. And then"
    args = ["-m", "charlm", "sample", "-c", str(tiny_checkpoint), "--device", "cpu", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, *args, "--seed-file", "-", "-n", "60", "--rng-seed", "1", "-q"],
        input=prompt + "Q",  # Q is not in the model's vocabulary: skipped, not fatal
        capture_output=True,
        text=True,
        timeout=120,
    )
    lm = CharLM.load(tiny_checkpoint, device="cpu", threads=1)
    assert done.returncode == 0, done.stderr
    assert done.stdout == lm.sample("", length=60, rng_seed=1, seed_file=[prompt]) + "\n"
