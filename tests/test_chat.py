"""`charlm chat` through a pseudo-terminal: turns that carry the state, commands, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from charlm import CharLM, Session  # noqa: E402


def spawn(checkpoint: Path, *args: str, cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "charlm", "chat", "-c", str(checkpoint), "--device", "cpu", "--threads", "1", *args],
        cwd=str(cwd),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    child.expect_exact("> ")
    return child


def turn(child: pexpect.spawn, line: str) -> str:
    """Sends a line; returns what came back before the next prompt, as the terminal shows it."""
    child.sendline(line)
    child.expect_exact("> ")
    shown = child.before.replace("\r\n", "\n")
    assert shown.startswith(line + "\n")  # the terminal's echo of the line
    return shown[len(line) + 1 :]


def test_chat_goes_on_from_the_whole_conversation(tiny_checkpoint: Path, tmp_path: Path) -> None:
    child = spawn(tiny_checkpoint, "--rng-seed", "5", "--length", "50", "--temperature", "0.9", cwd=tmp_path)
    first = turn(child, "The time was right.")
    assert "(temperature 0)" in turn(child, "/temp 0")
    second = turn(child, "And then")
    assert "commands:" in turn(child, "/help")
    assert "saved" in turn(child, "/save talk.txt")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    lm = CharLM.load(tiny_checkpoint, device="cpu", threads=1)
    same = Session(lm, length=50, temperature=0.9, rng_seed=5)
    same.say("The time was right.\n")
    expected_first = "".join(same.reply())
    same.temperature = 0
    same.say("And then\n")
    expected_second = "".join(same.reply())
    assert first.rstrip("\n") == expected_first.rstrip("\n")
    assert second.rstrip("\n") == expected_second.rstrip("\n")
    assert (tmp_path / "talk.txt").read_text(encoding="utf-8") == same.transcript


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(tiny_checkpoint: Path, tmp_path: Path) -> None:
    child = spawn(tiny_checkpoint, "--length", "10000000", cwd=tmp_path)
    child.sendline("The")
    child.expect_exact("The\r\n")  # the terminal's echo: three letters there are not the reply yet
    child.expect(r"\S{3}")  # it has started writing
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact("> ")
    assert "(replies of at most 20 characters)" in turn(child, "/length 20")
    assert "unknown command /frobnicate" in turn(child, "/frobnicate")
    assert "/temp needs a number" in turn(child, "/temp hot")
    reply = turn(child, "And")
    assert 0 < len(reply.rstrip("\n")) <= 20
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
