"""How many times a run will see its text, and the depth, batch size and learning rate that follow from it.

The rule (README: "How charlm picks its defaults"): expected passes = time budget x measured
characters per second / training characters. A text seen many times over learns more from more,
smaller, larger steps than from fewer large batches (a 550k-character text, 2.5 minutes, 2-core
EPYC: batch 32 1.983 bits/char against batch 64's 1.998 though 64 streams run 25% faster; batch
32 at 1.5x the learning rate 1.963); a text seen once or twice wants the characters per second of
the larger batch. The speed is measured, not assumed: a few steps of the model to be trained, on
this device, before the run starts (about a second on two CPU cores); for a run of up to 30 minutes
with its shape open, of the plain 2-layer model first, whose passes choose the depth (goes_deep).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ..config import LARGE_VOCAB, LONG_BUDGET_S, MANY_PASSES, SHORT_BUDGET_S, deep_passes, dropout_passes
from ..device import autocast
from ..model import CharRNN

# From MANY_PASSES expected passes (config.py) the smaller batch wins, and, with the weight average
# smoothing the noise, a larger step (MANY_PASSES_LR); and weight decay 30x the default
# (MANY_PASSES_WEIGHT_DECAY): on the 1.1M-character plays at 20 minutes (8.7 passes) training
# falls to 1.46 bits/char while held-out text stops near 2.18. In one run each: 0.1 scored 2.170
# against 0.01's 2.184, and 0.3 2.130 against 0.1's 2.170 (best at step 1,900 and still improving when
# time ran out, where 0.1 stopped on patience at 2,100); at 5 minutes 0.3 2.223 against 0.1's 2.224
# (bench/results/quality-*-wd*-rule-2026-12-03.json). More lost: 0.1 per expected pass up to 1.0
# (about 0.9 there) scored 2.181 against 0.3's 2.131, training loss 1.80 against 1.50 bits/char: it underfits
# (quality-20min-1m-wd-per-pass-2026-12-03.json)
# DropConnect on the recurrent weights (--weight-drop, model.CharRNN._recur) stays out of the rule. On an
# AVX2-only 2-core EPYC (fp32): the 1.1M-character plays at 20 minutes (11.6 passes) 0.25 scored 2.118
# bits/char against 2.131 without (another run, so within run-to-run noise); at 5 minutes (4.5 passes),
# same run, 2.263 against 2.190: 3.3% worse, as it slows the steps 6% and underfits a text seen 4-5 times
# (quality-20min-1m-weight-drop-0.25-2026-12-03.json, quality-5min-weight-drop-rule-2026-12-03.json)
# Also screened for many passes and left out (the first 300k characters of the 1.1M cut, 5 minutes at
# --hidden 384, about ten passes, AVX2 EPYC; proxy-screen-1m-20min-2026-12-04.json): dropout 0.25 on the
# last layer's output 2.255 and with 0.1 on the embedding 2.245 against the defaults' 2.238; weight
# decay 0.5 2.237; LSTM 2.241; seq 256 2.271 against 2.239; GRU 3x320 2.225 against 2.235 and 2.239 (two
# screens; noise is about 0.01, and 3x320 is 22% slower), which led to the deep rule below.
# A run of up to 30 minutes whose plain model will see its text often (config.deep_passes: 16 passes at
# 2x256 up to 6 minutes, 6 at 2x384 over 6, as probed) trains a GRU 3x320 instead: a third layer adds
# capacity where the text is seen often enough to use it, and the narrower layers keep most of 2x384's
# speed (3x320 trains ~22% fewer characters per second).
# At 20 minutes on the 1.1M cut (AVX2 EPYC, fp32, 8-9 passes, one run with the textbook loop;
# quality-20min-1m-3x320-2026-12-04.json): 3x320 2.115 bits/char against 2x384's 2.126 (0.5%) and the
# textbook loop's 2.269 (6.8% better, against 6.3%); on the Chinese fortunes (5.6 passes at 2x384 there,
# just under the threshold on that machine, more on a faster one) 5.511 against 5.532
# (quality-20min-chinese-3x320-2026-12-04.json). Both gains are near run-to-run noise, but the four
# measurements all point the same way; it does not reach the 8% the 1.1M cut aims for at 20 minutes.
# In 5 minutes 2x256 trains twice 3x320's characters per second, so 3x320 needs a text seen more often:
# on cuts of the 1.1M text (AVX2 EPYC, fp32, one run each; proxy-screen-5min-deep-2026-12-04.json) it
# scored 2.217 against 2x256's 2.245 at 21.9 expected passes (300k characters), but lost at 12.3 (400k:
# 2.063 against 2.044), 9.4 (550k: 1.959 against 1.928) and 4.9 (1.1M: 2.328 against 2.210); break-even
# about 16. Checked on 250k characters of Python source (23.3 passes): 1.602 against 1.624.
# Narrower, 3x256, at 20 minutes on the 1.1M cut (fp32, 12.7 passes; quality-20min-1m-avx2cap-3x256-2026-12-06.json):
# 2.107 against 3x320's 2.088-2.102. A third fewer weights ran only 5% more characters per second: the
# step is bound by its 32-row products, which run less efficiently the narrower they are.
# Screened at 3x320 on the 300k cut (about 8.5 passes; proxy-screen-3x320-2026-12-04.json): --weight-drop
# 0.25 2.227, --dropout 0.1 2.234, 1x the lr 2.231 and --average 0.995 2.214 against 2.217.
# Dropout, from DROPOUT_PASSES expected passes at the model trained (config.py; the batch size's passes;
# DEEP_DROPOUT_PASSES at three layers, see "The threshold by depth" below). On an AMD EPYC with AVX512-BF16
# (bf16 autocast) the same 300k cut sees 12.2 passes at 3x320 in 5 minutes, and there the model overfits:
# best at step 400 of 740, training 1.43 bits/char against 2.22 held out. --dropout 0.1 scored 2.205 against
# 2.223 (best at step 700 of 796) and --weight-drop 0.25 2.211; wider layers did not help (3x384 2.222, 3x448
# 2.213, 3x512 2.229), nor 3x448 with dropout 0.15 at 7.8 passes (2.225) (proxy-screen-3x320-bf16-2026-12-04.json).
# Below ten passes dropout, with a new mask per character, the floor 0.1 and 128-character chunks, lost every
# time: 2.234 against 2.217 above (AVX2, 8.4 passes), 2.138 against 2.131 at 20 minutes on the 1.1M cut
# (AMX, about 8.6), 2.085 against 2.025 on a 550k cut seen 7 times. At 20
# minutes on the 1.1M cut on the AVX512-BF16 EPYC (18.4 passes expected, 11-12 made): 2.084 with 0.1,
# still improving at its last step, against 2.108 without (stopped on patience, best at step 2,100 of
# 2,700) and the textbook loop's 2.284 (quality-20min-1m-avx512bf16-*2026-12-04.json). Near the
# threshold it ties: a 750k cut at 5 minutes, 2x256, 12.9 passes expected (8.7-10.2 made), 2.236 with
# 0.1 against 2.230 without, 15% fewer characters per second (proxy-screen-dropout-750k-bf16-2026-12-04.json).
# Left out too (300k cut, 5 minutes, 3x320 and dropout 0.1 by the rule, 12-13 passes, AVX512-BF16 EPYC;
# proxy-screen-late-growth-bf16-2026-12-05.json): doubling the chunk (128 -> 256) or the batch (32 -> 64)
# half-way through, 2.202 and 2.204 against the defaults' 2.202 and 2.205; label smoothing 0.05, 2.222.
# Neither the deep rule nor dropout carried over to a large vocabulary. On the Chinese fortunes at 20
# minutes (1.1M characters, 3,605 symbols after folding, AVX512-BF16 EPYC, bf16; one run each,
# quality-20min-chinese-*-2026-12-05.json), the rule then chose 3x320 with dropout 0.1 and scored 5.563
# bits/char (best at step 2,000 of 2,154) against charlm a48d734's 5.516 in the same run (2x384, batch
# 64, no folding, best at step 700); 3x320 without dropout 5.559 (best at 1,500, stopped on patience);
# 2x384 without dropout, with the many-passes batch, rate and decay and the same folding, 5.507 (best at
# step 1,000, about four passes). On the AVX2 EPYC (fp32, 5.6 passes) 3x320 had scored 5.511 against
# 2x384's 5.532 (above): the two CPUs disagree by about as much as runs differ, and neither shows a gain
# from depth or dropout that would pay for the risk. Hence LARGE_VOCAB (config.py): past 1,000 modelled
# symbols the run keeps 2 layers and no dropout. Run again through that rule (the same 2x384 chosen by
# itself), 5.555 against a48d734's 5.530 in the same run: one 20-minute run on this text moves by about
# 0.05 bits/char, and the rule is not shown to close the gap to a48d734, only not to widen it. Folding is
# not the cost: with --min-count 1 (5,965 symbols) the rule scored 5.580 against a48d734's 5.519 in one run
# (quality-20min-chinese-min-count-1-vs-a48d734-2026-12-05.json). Nor are the many-passes batch, rate and
# decay: with a48d734's (--batch-size 64 --lr 0.0026667 --weight-decay 0.01) the rule's 2x384 scored 5.661
# against a48d734's 5.534 in one run (quality-20min-chinese-plain-batch-vs-a48d734-2026-12-05.json), best at
# step 200 where a48d734 was best at 700. What differed was the unigram start: see setup.py on
# PRIOR_FADE_STEPS.
# The rate's floor (--min-lr-ratio), from the same regime as dropout (learns_by_heart). On the 300k proxy in
# fp32 (AMD EPYC with the dispatch capped to AVX2, 5 minutes, the rule's 3x320 with dropout 0.1, about ten
# passes; proxy-screen-fp32-rate-floor-2026-12-05.json): 0.3 scored 2.2047 and 2.2008 bits/char against
# the defaults' 2.2094 (2.2088-2.2115 in two earlier runs), 0.5 2.2029, 0.01 2.2137 and 2.2128
# (proxy-screen-fp32-floor-fade-2026-12-05.json). The higher floor ends training higher (1.78 against 1.76
# bits/char) and held-out text lower: the larger late steps, smoothed by the weight average, learn the
# text less by heart. The peak rate x 2 in place of x 1.5 scored 2.2060 and 2.2029, and together with the
# floor lost both gains (2.2090, best before its last step), so the rate stays.
# At 20 minutes on the 1.1M cut, with the textbook loop in the same run: fp32 (AVX2-capped) 2.092 bits/char, 7.7%
# better, where 0.1 had scored 2.094 and 7.4%; bf16 (AVX512-BF16) 2.089 and 9.0%, where 0.1 had scored 2.082
# and 8.7% on a day the machine ran 4% faster (quality-20min-1m-*-floor03-2026-12-05.json). A tie there.
# More regularisation lost on that fp32 proxy (proxy-screen-fp32-regularisation-2026-12-05.json): --dropout 0.2
# 2.238, --weight-drop 0.25 on top of dropout 0.1 2.227; and a longer weight average at 20 minutes
# (average-window-20min-1m-avx2cap-2026-12-05.json): 0.995 2.1035 and 0.9965 2.1049 against 0.99's 2.1029.
# Dropout keeps one mask per sequence since 06786a3 (model.LockedDropout): the same quality as a mask per
# character and ~6% cheaper a step, so the slowdowns quoted above for dropout (8-15%) are mostly gone; the
# threshold was screened again (below, "The threshold by depth"). Skip and residual connections across the stack
# overfit the 300k proxy (0.03-0.04 worse even with dropout 0.2; proxy-screen-locked-dropout-2026-12-05.json).
# The chunk length (--seq-len), from the same regime (learns_by_heart) in a budget of up to SHORT_BUDGET_S
# (short_chunks): BY_HEART_SEQ_LEN in place of DEFAULT_SEQ_LEN. On the fp32 proxy (300k cut, 5 minutes, 3x320,
# dropout 0.1 and floor 0.3 pinned, AVX2-capped EPYC; proxy-screen-fp32-seq-len-2026-12-05.json) 64 scored
# 2.1876 and 2.1932 bits/char against 128's 2.2004 and 2.2121 (seeds 1 and 2): 1,145-1,236 steps against 660,
# at 2-10% fewer characters per second; in bf16 (AVX512-BF16, 12 passes) 2.193 against 2.198. 96 tied (2.2010)
# and 32 underfit (2.1973, training 1.92 bits/char against 1.80): 64 characters are still backprop window
# enough, and a short run over a text seen that often gains more from twice the updates. At 20 minutes on the
# 1.1M cut (fp32, 19fbbbe, which took 64 there too; quality-20min-1m-avx2cap-seq64-2026-12-05.json) 64 scored
# 2.102 bits/char, 4,809 steps at 9,013 chars/s, against the textbook loop's 2.254 (6.8%), where 128 had scored
# 2.089-2.103 in six runs at 9,600-10,600 chars/s: no gain, 15% slower. A 20-minute run makes ~2,800 steps at
# 128 and is not short of them, so the rule keeps 128 beyond SHORT_BUDGET_S.
# Screened in the same run and left out: AWD-LSTM's activation regularisation (AR 2, TAR 1) 2.2436; embedding
# dropout 0.1 (whole characters) 2.2527, training 2.22 bits/char; --embed 128 2.2015; a warmup-stable-decay
# rate (flat, then linear to the floor over the last 20/30/50%) 2.2014/2.1963/2.1963, and 2.2123 against
# 2.2121 with seed 2: a tie with the cosine.
# The chunk rule on other texts (0aacca0, the same capped EPYC, one seed each; proxy-screen-seq-len-other-
# texts-2026-12-06.json): 300k characters of Python source at 5 minutes, 0.875 bits/char with the rule's 64
# against 0.887 with 128; 300k of English fortunes, 2.315 against 2.340 (128 with the rule's dropout and
# floor pinned; 2.354 left to the rule, whose probe at 128 judged 8.9 passes and took neither dropout nor
# the floor). At 10 minutes on a 450k cut of the plays (11 passes) 64 scored 1.914 against 128's 1.920 with
# 2,117 steps against 1,119: the gain shrinks with the budget (0.013-0.026 at 5 minutes, 0.005 at 10, a loss
# at 20), so the limit stays at SHORT_BUDGET_S. Beside a 2-thread matmul loop (300k cut, 2 minutes, batch,
# rate and decay pinned so that the probe cannot choose differently) 64 scored 2.431 against 2.599 at the same
# speed (5,140 and 5,190 chars/s, one thread): a busy machine leaves a run shorter of steps still.
# Dropout 0.2 at 20 minutes on the 1.1M cut (fp32; quality-20min-1m-avx2cap-dropout0.2-2026-12-06.json):
# 2.130 against 0.1's 2.088-2.102, training 1.85 bits/char against 1.75: more dropout underfits there too.
# Less decay with the rule's dropout and floor typed (--weight-decay 0.1 --dropout 0.1 --min-lr-ratio 0.3;
# a slower day, 8,880 chars/s, 2,388 steps): 2.131, training 1.78 bits/char
# (quality-20min-1m-avx2cap-wd0.1-dropout0.1-2026-12-06.json).
# The threshold by depth (config.dropout_passes; 11a3ee9, the same capped EPYC, fp32, 5 minutes, seeds 1 and 2,
# shape, batch, rate and decay pinned to the rule's; proxy-screen-dropout-threshold-2026-12-06.json): the
# regime (dropout 0.1, floor 0.3, 64-character chunks) against none of it (0, 0.1, 128) on prefixes of the 1.1M
# cut. At GRU 3x320 on 380k characters (8.0 passes expected) 2.369 and 2.360 bits/char against 2.418 and 2.393
# (best at step 500-600 of 636-672 without), and the floor and chunk without dropout 2.441 and 2.398: dropout
# pays. At 2x256 it won on 575k (12.9-13.3 expected: 2.165/2.149 against 2.184/2.156) and lost on 650k
# (11.0-11.8: 1.945/1.946 against 1.928/1.916) and 850k (8.8-9.2: 2.032/2.040 against 2.011/2.005, training
# 1.93 bits/char against 1.69). 3x320 has 2.5 times 2x256's parameters and learns a text by heart sooner, so
# three layers take the regime from DEEP_DROPOUT_PASSES (every deep run of up to 6 minutes: 16 passes at
# 2x256 are about 7 at 3x320). Two keep DROPOUT_PASSES: between 10 and 12 the texts disagreed, the plays'
# 650k cut losing 0.017-0.030 and 705k characters of Python source (10.5-10.7 expected) gaining 0.043 (1.471
# against 1.514; 625k of it, 12.4 expected, 2.087 against 2.141, best at step 500 of 1,300 without). Deep
# 20-minute runs between 6 and 9 passes, measured later, are the next paragraph. The probe's speed moved
# 10-70% over the morning of this screen (the 850k cut: 15,277 chars/s before it, 24,868-25,950 after), so a
# text near a threshold can fall either side.
# Dropout at three layers in a longer budget (config.LONG_DEEP_DROPOUT_PASSES; the same capped EPYC, fp32, one
# run each; deep-20min-1.8m-avx2cap-dropout-2026-12-06.json): the first 1.8M characters of the plays at 20
# minutes, 6.9-7.8 passes expected at 2x384 and 7.1-8.1 at 3x320 (6.4-7.0 made). The rule of the time (3x320,
# dropout 0.1 and floor 0.3 from 6 passes) scored 1.890 bits/char, training 1.83: it underfit. 3x320 without
# them 1.841 (training 1.65), 2x384 1.854: the third layer pays there, the regime does not; chosen by 10547e1
# itself, 1.846. At 10 minutes on a 780k cut (3x320 pinned, 6.8-7.5 passes made) 1.940 with the regime against
# 1.916 without. Up to 6 minutes 3x320 replaces a 2x256 of 40% its parameters on texts of a few hundred
# thousand characters; over 6 it replaces a 2x384 of nearly its size (1.4M against 1.6M) on texts of 1-2M
# (780k at 10 minutes). The 1.1M cut at 20 minutes, where
# dropout won (2.094 against 2.112 in fp32, 2.082 against 2.108 in bf16), probed 8.7-13.3 passes at 3x320 in
# eight probes on one morning (one under 9), so the threshold sits at 9 between the two texts, nearer the 1.1M
# side: a miss there costs about 0.018 bits/char, taking the regime on the 1.8M text 0.045.
# In bf16 (the same EPYC uncapped; deep-20min-1.8m-bf16-dropout-2026-12-06.json) the 1.8M text probed 9.4-11.6
# passes at 3x320, over 9, and the regime lost there too: 1.865 bits/char against 1.841 without (8.5 passes made
# by both; training 1.81 against 1.60). Passes alone cannot separate it from the 1.1M cut (won at 8.7-13.3 in
# fp32), text size can: past config.LONG_DEEP_DROPOUT_CHARS training characters the threshold grows with the
# text (9 per million, 14.6 on the 1.8M cut), a straight line through the two texts. Between them a 1.4M cut
# (fp32, 9.2 probed, threshold 11.3: no regime) tied: 2.015 without, 2.016 with
# (deep-20min-1.4m-avx2cap-dropout-2026-12-06.json).
# The figures (MANY_PASSES*, SMALL_BATCH, DEEP_PASSES/LAYERS/HIDDEN, DROPOUT*) live in config.py beside
# the budget's hidden sizes, so the command line's help can name them without importing torch.
PROBE_STEPS = 2  # timed, after one warm-up step
# The share of a time budget the passes are counted over. Validation took about a tenth when every threshold
# above was measured; since 5b67f06 it takes about 3% (schedule.auto_eval_every), but the thresholds are
# figures of this formula, so it keeps 0.9: 0.97 would move every decision by 8%, about what the probe's
# speed moves from one minute to the next, without a screen behind it.
TRAINING_SHARE = 0.9


@dataclass(frozen=True)
class Passes:
    """The expectation the batch size was chosen from, for the line printed at the start."""

    passes: float
    chars_per_sec: float  # measured at the batch size of the probe
    train_chars: int
    budget_s: float

    @property
    def many(self) -> bool:
        return self.passes >= MANY_PASSES


def measure_speed(
    net: CharRNN, device: torch.device, precision: str, batch_size: int, seq_len: int, *, adaptive: bool = False
) -> float:
    """Training characters per second of `net` (a copy is trained; `net` and every random generator
    are left as they were, so the run is the same as with the batch size given explicitly).

    `adaptive`: the run will keep whichever of one thread or all cores is faster (device.ThreadTuner),
    so both are timed and the faster counts. Timing all cores alone misjudged runs on a VM whose two
    cores were slower together than one: 3,968 chars/s probed, 13,948 trained (one thread) on a small
    text; a 1.1M-character text at 5 minutes judged under 3 passes made 4.2."""
    threads = torch.get_num_threads()
    if not adaptive or device.type != "cpu" or threads == 1:
        return _timed(net, device, precision, batch_size, seq_len)
    speeds = []
    for n in (threads, 1):
        torch.set_num_threads(n)
        try:
            speeds.append(_timed(net, device, precision, batch_size, seq_len))
        finally:
            torch.set_num_threads(threads)
    return max(speeds)


def _timed(net: CharRNN, device: torch.device, precision: str, batch_size: int, seq_len: int) -> float:
    probe = copy.deepcopy(net).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(net.config.vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        began = 0.0
        for i in range(1 + PROBE_STEPS):
            if i == 1:
                _sync(device)
                began = time.perf_counter()
            with autocast(device, precision):
                logits, _ = probe(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
    return PROBE_STEPS * batch_size * seq_len / max(1e-9, time.perf_counter() - began)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def expected_passes(chars_per_sec: float, budget_s: float, train_chars: int) -> Passes:
    return Passes(
        passes=budget_s * chars_per_sec / max(1, train_chars),
        chars_per_sec=chars_per_sec,
        train_chars=train_chars,
        budget_s=budget_s,
    )


def deepening_budget(time_s: float | None) -> bool:
    """A budget where the deep rule applies: up to 30 minutes (the 256- and 384-unit regimes, where it
    was measured; beyond, the plain model is 512 units wide)."""
    return time_s is not None and 0 < time_s <= LONG_BUDGET_S


def goes_deep(passes: float | None, time_s: float | None, vocab: int = 0) -> bool:
    """Whether a run whose shape is open trains DEEP_LAYERS x DEEP_HIDDEN: a deepening budget whose
    plain model would see its text often (`passes` expected at the plain shape; config.deep_passes),
    a text of at most LARGE_VOCAB modelled symbols (`vocab`; 0: not known yet, taken as small)."""
    if passes is None or time_s is None or not deepening_budget(time_s) or vocab > LARGE_VOCAB:
        return False
    return passes >= deep_passes(time_s)


def learns_by_heart(passes: float | None, vocab: int, layers: int, time_s: float | None, train_chars: int = 0) -> bool:
    """Whether a model of `layers` layers will see a text of at most LARGE_VOCAB modelled symbols often
    enough to learn it by heart (`passes`, at the model trained, in a budget of `time_s`, over `train_chars`
    training characters, 0 if not known; config.dropout_passes): such a run takes DROPOUT when --dropout is
    open (a new model) and the floor DROPOUT_MIN_LR_RATIO when --min-lr-ratio is."""
    return passes is not None and passes >= dropout_passes(layers, time_s, train_chars) and vocab <= LARGE_VOCAB


def short_chunks(passes: float | None, vocab: int, layers: int, time_s: float | None) -> bool:
    """Whether a run whose --seq-len is open trains BY_HEART_SEQ_LEN-character chunks: a budget of up to
    SHORT_BUDGET_S that learns its text by heart. Such a run is short of optimizer steps, and half the
    chunk doubles them; a 20-minute run has steps enough and keeps the faster, longer chunk."""
    return learns_by_heart(passes, vocab, layers, time_s) and time_s is not None and 0 < time_s <= SHORT_BUDGET_S
