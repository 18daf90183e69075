"""Crash safety under `kill -9`: every checkpoint stays loadable and a kill loses at most one save interval.

Runs `charlm train` on a small generated corpus and SIGKILLs it again and again: at random moments while
it trains, right as a checkpoint temp file appears (mid-write: any write, or a write of the best file),
and at random moments during start-up (import, resume loading, metrics-log rewrite). After each kill both
checkpoint files, when present, must pass `charlm info --json` and `charlm sample`, and the next
`charlm train --resume` must continue from the step saved in the `.last` file. Work lost per kill =
(time trained when killed) - (time trained when the `.last` file was written), on the trainer's own
elapsed clock; it must stay within --save-every plus a small slack (one step, one write), and within one
evaluation interval in steps (the `.last` file is also written at every evaluation).

    python bench/crash_safety.py            # full form: 24 kills, table on stdout, bench/results/crash_safety.json
    python bench/crash_safety.py --kills 5  # quicker

tests/test_crash_safety.py runs the same `run()` with three kills.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# kill while training / as a checkpoint is written / while starting up / as the best checkpoint is written
MODES = ("train", "write", "startup", "write-best")
MODEL_OPTIONS = (
    "--model",
    "lstm",
    "--hidden",
    "32",
    "--embed",
    "16",
    "--layers",
    "1",
    "--batch-size",
    "8",
    "--seq-len",
    "32",
    "--patience",
    "0",
    "--precision",
    "fp32",
    "--threads",
    "1",
    "--verbose",
)
BIG_BUDGET = 10_000_000  # steps: the run must still be going whenever it is killed
STEP_LINE = re.compile(r"^step\s+(\d+)\s", re.MULTILINE)
RESUMED_LINE = re.compile(r"resuming at step (\d+)")
START_TIMEOUT = 120.0  # seconds for a run to reach its first logged step on a busy machine


@dataclass
class Kill:
    """What one SIGKILL did and what was found afterwards."""

    index: int
    mode: str
    started_from: int | None  # step in .last when the run was started with --resume (None: fresh start)
    seconds_alive: float
    resumed_at: int | None = None  # step the run said it resumed at ("resuming at step N"), if it got that far
    tmp_seen: bool = False  # modes "write*": a checkpoint temp file appeared and the kill followed it
    mid_write: str = ""  # "best"/"last": the file whose temp survived the kill (died between mkstemp and rename)
    steps_done: int = 0  # last step the killed run logged (the metrics log has a record every 10 steps)
    saved_step: int = 0  # step in .last after the kill
    lost_steps: int = 0
    lost_seconds: float = 0.0
    loadable: dict[str, bool] = field(default_factory=dict)  # file name -> info and sample both worked
    problems: list[str] = field(default_factory=list)


class Trainer:
    """One training folder: starts `charlm train` (fresh or --resume) and inspects what it left."""

    def __init__(self, workdir: Path, corpus: Path, *, eval_every: int, save_every: float) -> None:
        self.workdir = workdir
        self.corpus = corpus
        self.folder = workdir / "checkpoints"
        self.best = self.folder / "crash.safetensors"
        self.last = self.folder / "crash.last.safetensors"
        self.metrics = self.folder / "crash.metrics.jsonl"
        self.options = [*MODEL_OPTIONS, "--eval-every", str(eval_every), "--save-every", f"{save_every}s"]
        self.sessions = 0

    def command(self, steps: int) -> list[str]:
        resume = ["--resume"] if self.last.exists() else []
        return [
            sys.executable,
            "-m",
            "charlm",
            "train",
            str(self.corpus),
            *self.options,
            "--steps",
            str(steps),
            "--out",
            str(self.best),
            *resume,
        ]

    def start(self, steps: int = BIG_BUDGET) -> tuple[subprocess.Popen, Path]:
        self.sessions += 1
        log = self.workdir / f"session-{self.sessions:03d}.stderr"
        with open(log, "wb") as err:
            process = subprocess.Popen(
                self.command(steps), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        return process, log

    def temp_files(self) -> set[str]:
        """Checkpoint temp files (`.<name>.XXXX.tmp`, from checkpoint.write) in the folder now."""
        if not self.folder.is_dir():
            return set()
        return {p.name for p in self.folder.iterdir() if p.name.startswith(".crash.") and p.name.endswith(".tmp")}

    def saved(self) -> tuple[int, float]:
        """(step, trained seconds) recorded in the .last file; (0, 0) when there is none."""
        if not self.last.exists():
            return 0, 0.0
        header = cli_json(["info", str(self.last), "--json"])
        state = header.get("state", {}) if header else {}
        return int(state.get("step", 0)), float(state.get("elapsed", 0.0))

    def last_logged(self) -> tuple[int, float, float] | None:
        """(step, trained seconds, wall time of the write) of the newest metrics-log record."""
        if not self.metrics.exists():
            return None
        newest = None
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if newest is None or record["step"] >= newest["step"]:
                    newest = record
        if newest is None:
            return None
        return int(newest["step"]), float(newest["elapsed_s"]), self.metrics.stat().st_mtime


def cli(argv: list[str]) -> tuple[int, str, str]:
    """Runs a charlm command in this process (exit code, stdout, stderr): the real entry point, no start-up."""
    from charlm.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code
    return int(code or 0), out.getvalue(), err.getvalue()


def cli_json(argv: list[str]) -> dict | None:
    code, out, _ = cli(argv)
    if code != 0:
        return None
    try:
        return json.loads(out)
    except ValueError:
        return None


def check_loadable(path: Path) -> str:
    """'' when `charlm info --json` and `charlm sample` both accept the file, else what went wrong."""
    code, out, err = cli(["info", str(path), "--json"])
    if code != 0:
        return f"info {path.name}: exit {code}: {err.strip()}"
    try:
        json.loads(out)
    except ValueError:
        return f"info {path.name}: stdout is not JSON"
    code, out, err = cli(["sample", "-c", str(path), "--length", "3", "--rng-seed", "1", "--threads", "1"])
    if code != 0:
        return f"sample {path.name}: exit {code}: {err.strip()}"
    return ""


def wait_for_training(process: subprocess.Popen, log: Path, timeout: float) -> bool:
    """True once the run has logged a training step (so it is past start-up and the metrics-log rewrite)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if STEP_LINE.search(log.read_text(errors="replace")):
            return True
        time.sleep(0.01)
    return False


def wait_for_write(
    trainer: Trainer, process: subprocess.Popen, before: set[str], *, prefix: str, timeout: float
) -> bool:
    """Polls the folder until a new temp file starting with `prefix` appears (a write in progress)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(name.startswith(prefix) for name in trainer.temp_files() - before):
            return True
        time.sleep(0.0002)  # a write (with fsync) keeps its temp file for milliseconds
    return False


def written_file(temp_names: set[str]) -> str:
    """Which checkpoint the leftover temp files belonged to."""
    return ", ".join(sorted("last" if ".last.safetensors." in name else "best" for name in temp_names))


def kill_once(trainer: Trainer, index: int, mode: str, rng: random.Random, *, save_every: float) -> Kill:
    started_from = trainer.saved()[0] if trainer.last.exists() else None
    before = trainer.temp_files()
    began = time.monotonic()
    process, log = trainer.start()
    kill = Kill(index=index, mode=mode, started_from=started_from, seconds_alive=0.0)
    if mode == "startup":
        time.sleep(rng.uniform(0.0, 2.5))  # start-up (import, load, resume) takes about that long
    elif not wait_for_training(process, log, START_TIMEOUT):
        kill.problems.append(f"the run never reached a training step: {log.read_text(errors='replace')[-400:]!r}")
    elif mode == "write":
        kill.tmp_seen = wait_for_write(trainer, process, before, prefix=".crash.", timeout=3 * save_every + 10)
    elif mode == "write-best":  # written only at an evaluation that improved, so allow for a slow machine
        kill.tmp_seen = wait_for_write(trainer, process, before, prefix=".crash.safetensors.", timeout=90)
    else:
        time.sleep(rng.uniform(0.0, 2.0 * save_every))  # before and after the run's first save
    if process.poll() is not None:
        kill.problems.append(f"the run ended by itself (exit {process.returncode}) before the kill")
    killed_at = time.time()
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kill.seconds_alive = time.monotonic() - began
    kill.mid_write = written_file(trainer.temp_files() - before)
    inspect_after_kill(trainer, kill, log, killed_at)
    return kill


def inspect_after_kill(trainer: Trainer, kill: Kill, log: Path, killed_at: float) -> None:
    stderr = log.read_text(errors="replace")
    resumed = RESUMED_LINE.search(stderr)
    kill.resumed_at = int(resumed.group(1)) if resumed else None
    if kill.started_from is not None and kill.resumed_at not in (None, kill.started_from):
        kill.problems.append(f"resumed at step {kill.resumed_at}, but .last held step {kill.started_from}")
    for path in (trainer.best, trainer.last):
        if path.exists():
            problem = check_loadable(path)
            kill.loadable[path.name] = not problem
            if problem:
                kill.problems.append(problem)
    kill.saved_step, saved_elapsed = trainer.saved()
    if kill.started_from is not None and kill.saved_step < kill.started_from:
        kill.problems.append(f".last went back from step {kill.started_from} to {kill.saved_step}")
    logged = trainer.last_logged() if STEP_LINE.search(stderr) else None  # only this run's records count
    if logged is None:  # killed before its first logged step: under --log-every steps were lost
        kill.steps_done = kill.saved_step
        return
    step, elapsed, written_at = logged
    kill.steps_done = step
    kill.lost_steps = max(0, step - kill.saved_step)
    kill.lost_seconds = max(0.0, elapsed + max(0.0, killed_at - written_at) - saved_elapsed)


def finish(trainer: Trainer, extra_steps: int) -> list[str]:
    """One last --resume run that ends on its own: it must start at the saved step and reach the budget."""
    problems = []
    saved_step, _ = trainer.saved()
    target = saved_step + extra_steps
    process, log = trainer.start(steps=target)
    try:
        process.wait(timeout=START_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    stderr = log.read_text(errors="replace")
    if process.returncode != 0:
        problems.append(f"final --resume run exited {process.returncode}: {stderr.strip()[-400:]}")
    resumed = RESUMED_LINE.search(stderr)
    if trainer.last.exists() and (resumed is None or int(resumed.group(1)) != saved_step):
        problems.append(f"final run did not resume at step {saved_step}")
    if trainer.saved()[0] != target:
        problems.append(f"final run ended at step {trainer.saved()[0]}, not {target}")
    for path in (trainer.best, trainer.last):
        problem = check_loadable(path) if path.exists() else f"{path.name} missing after the final run"
        if problem:
            problems.append(problem)
    from charlm.checkpoint import newest_checkpoint

    if newest_checkpoint(trainer.folder) != trainer.best:
        problems.append(f"stray files confuse the default checkpoint: {newest_checkpoint(trainer.folder)}")
    return problems


def run(
    kills: int,
    *,
    workdir: str | os.PathLike[str],
    corpus: str | os.PathLike[str],
    eval_every: int = 200,
    save_every: float = 1.0,
    slack: float = 1.0,
    rng_seed: int = 0,
) -> dict:
    """Kills `charlm train` `kills` times (modes in turn, see MODES) and returns the figures.

    `ok` in the result is the verdict: every checkpoint loadable after every kill, every --resume at the
    saved step, no kill losing more than `save_every` + `slack` seconds or `eval_every` steps of training.
    """
    rng = random.Random(rng_seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(workdir, Path(corpus).resolve(), eval_every=eval_every, save_every=save_every)
    began = time.monotonic()
    records = [kill_once(trainer, i, MODES[i % len(MODES)], rng, save_every=save_every) for i in range(kills)]
    final_problems = finish(trainer, extra_steps=30)
    too_much = [k.index for k in records if k.lost_seconds > save_every + slack or k.lost_steps > eval_every]
    problems = [f"kill {k.index} ({k.mode}): {p}" for k in records for p in k.problems] + final_problems
    problems += [f"kill {i}: lost more than one save interval" for i in too_much]
    resumed = [k for k in records if k.started_from is not None and k.resumed_at is not None]
    return {
        "kills": kills,
        "kills_by_mode": {mode: sum(k.mode == mode for k in records) for mode in MODES},
        "kills_at_temp_file": sum(k.tmp_seen for k in records),
        "kills_mid_write": sum(bool(k.mid_write) for k in records),
        "kills_mid_write_of_best": sum("best" in k.mid_write for k in records),
        "files_checked": sum(len(k.loadable) for k in records),
        "all_loadable": all(all(k.loadable.values()) for k in records) and not final_problems,
        "resumes_started": sum(k.started_from is not None for k in records) + 1,  # + the final run
        "resumes_confirmed": len(resumed) + 1,  # got as far as "resuming at step N" (the rest: killed before)
        "resumes_at_saved_step": sum(k.resumed_at == k.started_from for k in resumed) + (not final_problems),
        "max_lost_seconds": round(max((k.lost_seconds for k in records), default=0.0), 3),
        "mean_lost_seconds": round(sum(k.lost_seconds for k in records) / max(1, kills), 3),
        "max_lost_steps": max((k.lost_steps for k in records), default=0),
        "save_every_s": save_every,
        "eval_every_steps": eval_every,
        "slack_s": slack,
        "stray_temp_files": len(trainer.temp_files()),
        "final_step": trainer.saved()[0],
        "wall_seconds": round(time.monotonic() - began, 1),
        "problems": problems,
        "ok": not problems,
        "per_kill": [asdict(k) for k in records],
    }


def print_table(figures: dict) -> None:
    print(
        f"{'#':>3} {'mode':<10} {'from':>6} {'done':>6} {'saved':>6} {'lost s':>7} {'lost st':>7} "
        f"{'at tmp':>6} {'mid-wr':>6} loadable"
    )
    for k in figures["per_kill"]:
        files = (
            ", ".join(
                f"{'last' if name.endswith('.last.safetensors') else 'best'}={'yes' if ok else 'NO'}"
                for name, ok in k["loadable"].items()
            )
            or "(no files yet)"
        )
        start = "-" if k["started_from"] is None else k["started_from"]
        print(
            f"{k['index']:>3} {k['mode']:<10} {start:>6} {k['steps_done']:>6} {k['saved_step']:>6} "
            f"{k['lost_seconds']:>7.3f} {k['lost_steps']:>7} {k['tmp_seen']!s:>6} {k['mid_write'] or '-':>6} {files}"
        )
    summary = {k: v for k, v in figures.items() if k not in ("per_kill", "machine")}
    for key, value in summary.items():
        print(f"{key:>24}: {value}")


def generated_corpus(path: Path, chars: int = 40_000) -> Path:
    """The tests' generated English-like text (tests/conftest.py make_text), so bench and tests agree."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_text

    path.write_text(make_text(chars, seed=1), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--save-every", type=float, default=1.0)
    parser.add_argument("--slack", type=float, default=1.0)
    parser.add_argument("--rng-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "crash_safety.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="charlm-crash-") as tmp:
        os.environ["CHARLM_CACHE_DIR"] = str(Path(tmp) / "cache")
        corpus = generated_corpus(Path(tmp) / "corpus.txt")
        figures = run(
            args.kills,
            workdir=Path(tmp) / "run",
            corpus=corpus,
            eval_every=args.eval_every,
            save_every=args.save_every,
            slack=args.slack,
            rng_seed=args.rng_seed,
        )
    sys.path.insert(0, str(REPO / "bench"))
    from report import machine

    figures["machine"] = machine()
    print_table(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    sys.exit(0 if figures["ok"] else 1)


if __name__ == "__main__":
    main()
