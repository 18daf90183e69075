"""streams.py: how a model advances over text. Streams cut once, inputs shifted once, the start
symbol fed by one rule, state carried the same way whole or in chunks; the archive's cuts fixed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charlm.compress import ARCHIVE_CUTS, FORMAT_VERSION
from charlm.model import CharRNN, ModelConfig
from charlm.streams import IGNORE, Cuts, StepStreams, model_inputs, nll, nll_sum, shifted_chunks, stream_bounds


def _model(cell: str = "lstm", vocab_size: int = 9) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=16, embed_size=6, num_layers=2)).eval()


def test_streams_cover_the_text_once_in_order() -> None:
    for chars in (0, 1, 7, 4095, 4096, 100_003):
        streams = Cuts(max_streams=8, min_chars=4096).count(chars)
        lo, hi = stream_bounds(chars, streams)
        assert list(lo[1:]) == list(hi[:-1]) and (chars == 0 or (lo[0] == 0 and hi[-1] == chars))
        assert (hi - lo).min(initial=4096) >= min(chars, 4096) and streams == (0 if chars == 0 else len(lo))


def test_the_archive_cuts_are_those_old_archives_were_written_with() -> None:
    """A version-2 or 3 archive decodes only if its text is cut as when it was written: these numbers and
    this formula are part of the format, whatever scoring does with its own cuts."""
    assert FORMAT_VERSION == 3 and ARCHIVE_CUTS == Cuts(max_streams=64, min_chars=4096)
    counts = {n: ARCHIVE_CUTS.count(n) for n in (0, 1, 4095, 8191, 8192, 262_143, 262_144, 10**7)}
    assert counts == {0: 0, 1: 1, 4095: 1, 8191: 1, 8192: 2, 262_143: 63, 262_144: 64, 10**7: 64}
    lo, hi = stream_bounds(10_007, 3)
    assert lo.tolist() == [0, 3335, 6671] and hi.tolist() == [3335, 6671, 10_007]


def test_chunks_shift_targets_against_inputs_and_feed_the_start_symbol() -> None:
    ids = np.arange(23, dtype=np.uint8) % 7
    lo, hi = stream_bounds(len(ids), 3)  # lengths 7, 8, 8
    chunks = list(shifted_chunks(ids, lo, hi, start_id=8, chunk=3))
    x = np.concatenate([c[0] for c in chunks], axis=1)  # [3, 8]
    y = np.concatenate([c[1] for c in chunks], axis=1)
    assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == (3, 8)
    for b in range(3):
        length = hi[b] - lo[b]
        assert y[b, :length].tolist() == ids[lo[b] : hi[b]].tolist() and (y[b, length:] == IGNORE).all()
        before = [8] if lo[b] == 0 else [int(ids[lo[b] - 1])]
        assert x[b, :length].tolist() == before + ids[lo[b] : hi[b] - 1].tolist()


def test_the_start_symbol_stands_for_every_missing_character() -> None:
    assert model_inputs(np.array([3, IGNORE, 0, IGNORE]), 5).tolist() == [3, 5, 0, 5]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_text_scored_in_chunks_with_carried_state_equals_one_pass(cell: str) -> None:
    """The whole text in one forward pass == the same text chunk by chunk, the state carried."""
    model = _model(cell)
    ids = np.random.default_rng(1).integers(0, 8, 300).astype(np.uint8)
    lo, hi = stream_bounds(len(ids), 4)
    with torch.no_grad():
        whole_x, whole_y = next(shifted_chunks(ids, lo, hi, start_id=8, chunk=1000))
        logits, _ = model(torch.from_numpy(whole_x))
        whole = nll_sum(logits, torch.from_numpy(whole_y))
        chunked, state = torch.zeros(()), None
        for x, y in shifted_chunks(ids, lo, hi, start_id=8, chunk=16):
            logits, state = model(torch.from_numpy(x), state)
            chunked += nll_sum(logits, torch.from_numpy(y))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)


def test_one_character_steps_follow_the_same_path_as_one_pass() -> None:
    """StepStreams: the start symbol first, then each character fed, IGNORE read as the start symbol."""
    model = _model()
    text = torch.tensor([[1, 2, 3, 4, 5], [6, 7, IGNORE, 1, 2]])  # stream 1 meets a character it cannot read
    steps = StepStreams(model, 2, start_id=8)
    with torch.no_grad():
        stepped = []
        for t in range(5):
            stepped.append(steps.step())
            steps.feed(text[:, t].numpy())
        inputs = torch.from_numpy(model_inputs(np.concatenate([[[IGNORE]] * 2, text[:, :-1].numpy()], 1), 8))
        logits, _ = model(inputs)
    torch.testing.assert_close(torch.stack(stepped, 1), logits, rtol=1e-5, atol=1e-6)


def test_the_loss_skips_ignored_targets() -> None:
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, IGNORE, 4], [IGNORE, 2, 1]])
    each = nll(logits, targets)
    assert each.shape == (6,) and each[1] == 0 and each[3] == 0
    torch.testing.assert_close(nll_sum(logits, targets), each.sum())
    keep = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    torch.testing.assert_close(nll_sum(logits, targets), expected)
