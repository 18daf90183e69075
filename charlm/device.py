"""All hardware choices live here: which device, which precision, seeding and threads."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
from typing import Literal

import torch

from .errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16"]


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


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AMX or AVX512-BF16), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    return bool(words & {"amx_bf16", "avx512_bf16"})


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


def resolve_sample_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16", "int8"]:
    """The weights a sampler reads each step. 'auto': int8 on an x86 CPU, where one stream is bound by
    the bytes of weights read per character (int8 reads a quarter of fp32's); bf16 on a GPU that has it."""
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise ConfigError(f"--precision must be auto, fp32, bf16 or int8 (got {precision!r})")
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(f"int8 sampling runs on the CPU only (not {device.type})", "use --precision bf16 or fp32")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    if device.type == "cpu" and cpu_has_fast_int8():
        return "int8"
    return resolve_precision("auto", device)


def cpu_has_fast_int8() -> bool:
    """torch's CPU int8 matmul runs on oneDNN's VNNI/AVX2 kernels on x86; elsewhere it may fall back
    to a plain loop slower than fp32."""
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def configure_cpu(threads: int | None = None) -> None:
    """Denormals cost ~100x on x86; flushing them changes nothing a language model can notice."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


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
