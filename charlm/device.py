"""All hardware choices live here: which device, which precision, seeding and threads."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from .errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16"]  # the autocast dtype of training and scoring
WeightFormat = Literal["fp32", "bf16", "int8", "fixed"]  # the weights a sampler reads each step


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu; naming a device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here", "use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: Apple's MPS is not available here", "use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda") and name != "mps":
        raise ConfigError(f"--device must be auto, cpu, cuda or mps (got {name!r})")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with native bf16 matmul (AMX or AVX512-BF16), where bf16 autocast pays off.
    A dispatch capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as when testing for an AVX2-only
    machine) counts as without: its kernels would emulate bf16, so a capped run trains in fp32 the way
    an AVX2-only machine does, as the int8 sampling check below decides for VNNI."""
    return _avx512_dispatch() and bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _avx512_dispatch() -> bool:
    """An x86 CPU whose torch kernels run at AVX-512 or above: not capped (ATEN_CPU_CAPABILITY)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """'auto' means bf16 where the hardware runs it fast, fp32 elsewhere."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16 (got {precision!r})")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def resolve_weight_format(weight_format: str, device: torch.device) -> WeightFormat:
    """The weights a sampler reads each step (`sample --precision`). 'auto': on a CPU the integer model
    compiled into one call per character (`fixed`, charlm.fixed) where numba is installed, else int8
    on an x86 CPU with VNNI (one stream is bound by the bytes of weights read per character; int8 reads
    a quarter of fp32's); bf16 on a GPU that has it."""
    if weight_format not in ("auto", "fp32", "bf16", "int8", "fixed"):
        raise ConfigError(f"--precision must be auto, fp32, bf16, int8 or fixed (got {weight_format!r})")
    if weight_format in ("int8", "fixed") and device.type != "cpu":
        raise ConfigError(
            f"{weight_format} sampling runs on the CPU only (not {device.type})", "use --precision bf16 or fp32"
        )
    if weight_format == "fixed" and not fixed_kernel_available():
        raise ConfigError("--precision fixed needs numba", "install it with: pip install numba")
    if weight_format != "auto":
        return weight_format  # type: ignore[return-value]
    if device.type == "cpu" and fixed_kernel_available():
        return "fixed"
    return batch_weight_format(device)


def batch_weight_format(device: torch.device) -> WeightFormat:
    """The torch weight format for many streams at once (where a batched matmul beats one compiled
    call per stream): int8 on an x86 CPU with VNNI, bf16 or fp32 elsewhere."""
    if device.type == "cpu" and cpu_has_fast_int8():
        return "int8"
    return resolve_precision("auto", device)


def fixed_kernel_available() -> bool:
    from .fixed import kernel_available

    return kernel_available()


def cpu_has_fast_int8() -> bool:
    """Whether int8 sampling is both exact and fast here: torch's CPU int8 matmul is fast on oneDNN's
    VNNI kernels (AVX-512 VNNI, which AMX CPUs have too). Without VNNI it is slower than fp32, and
    oneDNN's AVX2 kernels are not even exact (int8_matmul_exact), so 'auto' keeps to fp32 there."""
    return (
        torch.backends.mkldnn.is_available()
        and _avx512_dispatch()
        and "avx512_vnni" in _cpu_flags()
        and int8_matmul_exact()
    )


@functools.cache
def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor"), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def int8_matmul_exact() -> bool:
    """Whether torch._int_mm gives the exact int32 sums on this machine, checked once on inputs that
    reach the extremes. oneDNN's AVX2 kernels (no VNNI) add pairs of u8 x s8 products in saturating
    int16, so large inputs come out wrong: off by 43,666 in 114,892 with ONEDNN_MAX_CPU_ISA=AVX2 on
    an AVX-512 CPU. sample._Linear then computes the same integer product in float64 instead."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (16, 256), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (256, 32), generator=g, dtype=torch.int8)
    x[:4], w[:, :4] = 127, 127  # every product at its largest
    try:
        got = torch._int_mm(x, w)
    except RuntimeError:
        return False
    return torch.equal(got, (x.double() @ w.double()).to(torch.int32))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def configure_cpu(threads: int | None = None) -> None:
    """Denormals cost ~100x on x86; flushing them changes nothing a language model can notice.
    threads=None leaves the thread count to a ThreadTuner (or to OMP_NUM_THREADS when it is set).
    Process-wide and not undone: for a program's own start-up; library calls use `cpu_settings`."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_cores())


def flushes_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (torch.set_flush_denormal has no getter)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(2.0).item() == 0.0


@contextlib.contextmanager
def cpu_settings(threads: int | None = None) -> Iterator[None]:
    """`configure_cpu(threads)` for the length of a library call: the caller's thread count and
    denormal mode are back when it ends, however it ends."""
    threads_before, flush_before = torch.get_num_threads(), flushes_denormals()
    configure_cpu(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)
        torch.set_flush_denormal(flush_before)


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def fixed_threads(threads: int | None) -> int | None:
    """The thread count the user fixed (--threads, else OMP_NUM_THREADS), or None to adapt."""
    if threads:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


class ThreadTuner:
    """Keeps whichever of one thread or all cores runs the work faster, re-checked as the load changes.

    Why: the fused recurrent kernels synchronise their threads at every time step. On a quiet machine
    a second thread buys ~20%; beside one CPU-bound neighbour each of those barriers waits for a
    descheduled thread, and two threads run 3-5x slower than one (bench/contention.py). No fixed
    choice is right on both, so this measures: it tries one thread, then all cores, for a few units of
    work each (dropping a candidate after one unit when it is under half the speed of the first), keeps the
    faster, probes again after an interval that doubles while the choice holds (20 s up to 80 s), and
    at once when the speed falls below 60% of what the probe measured (a neighbour arrived).

    Work is timed by the caller in units (a training step, a chunk of scoring, a batch of sampled
    characters); `unit(size)` is the context manager that measures one. On a GPU, or when the user
    fixed the count (--threads, OMP_NUM_THREADS), it does nothing. The thread count in force before
    is restored by `close()` (also on exit of `with tuner:`): a library call leaves the process as it
    found it. Results stay deterministic only with a fixed count: thread counts change float sums.
    """

    MIN_UNIT_S = 0.05  # shorter units are pooled into one sample (sampling steps are ~0.2 ms)
    PROBE_S = 0.4  # time measured per candidate in a probe, after one warm-up sample
    FIRST_INTERVAL_S, MAX_INTERVAL_S = 20.0, 80.0
    DROP = 0.6  # speed below this fraction of the probed speed, 3 samples running, triggers a probe
    GIVE_UP = 0.5  # a candidate below this fraction of the best so far is dropped after one sample

    def __init__(
        self,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        all_cores_first: bool = False,
        probe_s: float | None = None,
    ) -> None:
        self.before = torch.get_num_threads()
        fixed = fixed_threads(threads)
        cores = cpu_cores()
        self.active = torch.device(device).type == "cpu" and fixed is None and cores > 1
        # one thread first: it is never far from the best, while all cores beside a neighbour can be
        # 25-50x slower, and a candidate that falls behind is dropped after one sample (see _sample)
        # (all_cores_first: for work in units far shorter than MIN_UNIT_S, as sampling is, a probe
        # takes ~0.1 s whatever the speed, and a short quiet run should not start on the slower count)
        self.choices = [cores, 1] if all_cores_first else [1, cores]
        self.clock = clock
        self.probe_s = self.PROBE_S if probe_s is None else probe_s
        self.choice = self.choices[0] if self.active else (fixed or self.before)
        self.history: list[tuple[float, int]] = []  # (time, threads) at each change, for reports
        self._pending_work = 0.0
        self._pending_time = 0.0
        self._probe: list[int] = []  # candidates still to try
        self._probe_speeds: dict[int, float] = {}
        self._samples: list[tuple[float, float]] = []  # (work, seconds) for the current candidate
        self._warm = False
        self._interval = self.FIRST_INTERVAL_S
        self._next_probe = 0.0
        self._reference = 0.0
        self._slow = 0
        if self.active:
            self._start_probe()

    # --- the caller's side

    @contextlib.contextmanager
    def unit(self, size: float) -> Iterator[None]:
        """Times one unit of `size` (characters) of work at the current thread count."""
        if not self.active:
            yield
            return
        began = self.clock()
        yield
        self._pending_time += self.clock() - began
        self._pending_work += size
        if self._pending_time >= self.MIN_UNIT_S:
            work, seconds = self._pending_work, self._pending_time
            self._pending_work = self._pending_time = 0.0
            self._sample(work, seconds)

    def close(self) -> None:
        if self.active:
            torch.set_num_threads(self.before)
            self.active = False

    def __enter__(self) -> ThreadTuner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def threads(self) -> int:
        return self.choice

    # --- the policy

    def _set(self, threads: int) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.choice = threads

    def _start_probe(self) -> None:
        self._probe = list(self.choices)
        self._probe_speeds = {}
        self._begin_candidate()

    def _begin_candidate(self) -> None:
        self._set(self._probe[0])
        self._samples = []
        self._warm = False
        self._pending_work = self._pending_time = 0.0

    def _sample(self, work: float, seconds: float) -> None:
        speed = work / seconds
        if not self._probe:
            self._slow = self._slow + 1 if speed < self.DROP * self._reference else 0
            if self._slow >= 3 or self.clock() >= self._next_probe:
                if self._slow >= 3:
                    self._interval = self.FIRST_INTERVAL_S / 2  # the load changed: look again soon
                self._start_probe()
            return
        best = max(self._probe_speeds.values(), default=0.0)
        if speed < self.GIVE_UP * best:  # already far behind: a probe must not cost much
            self._probe_speeds[self._probe.pop(0)] = speed
            self._finish_candidate()
            return
        if not self._warm:  # the first sample after a switch pays for waking or parking threads
            self._warm = True
            return
        self._samples.append((work, seconds))
        measured = sum(s for _, s in self._samples)
        if measured < self.probe_s and len(self._samples) < 3 or len(self._samples) < 2:
            return
        self._probe_speeds[self._probe.pop(0)] = sum(w for w, _ in self._samples) / measured
        self._finish_candidate()

    def _finish_candidate(self) -> None:
        """Try the next candidate, or, when all are measured, keep the fastest (fewer threads on a tie)."""
        if self._probe:
            self._begin_candidate()
            return
        best = max(self._probe_speeds, key=lambda n: (self._probe_speeds[n], -n))
        previous = self.history[-1][1] if self.history else None
        self._interval = min(self.MAX_INTERVAL_S, self._interval * 2) if best == previous else self.FIRST_INTERVAL_S
        self._set(best)
        self.history.append((self.clock(), best))
        self._reference = self._probe_speeds[best]
        self._slow = 0
        self._next_probe = self.clock() + self._interval


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Generator states to save for exact resume (CPU always, the CUDA device when used)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"].to(torch.uint8).cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu(), device)
