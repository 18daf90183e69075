"""kill -9 during training: both checkpoints always load, --resume continues, at most one save interval is lost.

The short form of bench/crash_safety.py (three kills: while training, as a checkpoint is written, while
starting up); `python bench/crash_safety.py` runs the full form.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from conftest import make_text

BENCH = Path(__file__).resolve().parent.parent / "bench" / "crash_safety.py"
EVAL_EVERY = 200


def crash_safety() -> ModuleType:
    """bench/ is not a package: load the harness from its file."""
    spec = importlib.util.spec_from_file_location("crash_safety", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_kill_9_never_breaks_a_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(40_000, seed=1), encoding="utf-8")
    figures = crash_safety().run(
        3, workdir=tmp_path / "run", corpus=corpus, eval_every=EVAL_EVERY, save_every=0.5, slack=1.0, rng_seed=0
    )
    assert figures["problems"] == []
    assert figures["kills_by_mode"] == {"train": 1, "write": 1, "startup": 1, "write-best": 0}
    assert figures["kills_at_temp_file"] == 1  # the mid-write kill did find a checkpoint being written
    assert figures["all_loadable"] and figures["files_checked"] >= 2
    assert figures["resumes_at_saved_step"] == figures["resumes_confirmed"] >= 2
    assert figures["max_lost_steps"] <= EVAL_EVERY  # .last is also written at every evaluation
    assert figures["ok"]
