"""Data-parallel training on PyTorch's own engine (torchrun + DistributedDataParallel).

Nothing here imports torch.distributed unless torchrun started us (WORLD_SIZE > 1), so a normal
run pays nothing. Each rank trains its own rows of the global batch of text streams; gradients
are averaged by DDP; rank 0 alone writes checkpoints, metrics and progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum across ranks (in place on a copy); identity for a single process."""
        if not self.active:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def decide(self, code: int, device: torch.device) -> int:
        """Rank 0's decision (stop, save) for everyone, so all ranks take the same branch."""
        if not self.active:
            return code
        import torch.distributed as dist

        flag = torch.tensor([code], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        return int(flag.item())

    def gather_rows(self, value: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Concatenate every rank's rows (e.g. recurrent state [L, B, H] along B), rank order."""
        if not self.active:
            return value
        import torch.distributed as dist

        parts = [torch.empty_like(value) for _ in range(self.world)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts, dim=dim)


def from_environment() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one: NCCL between GPUs, gloo on CPUs."""
    info = from_environment()
    if not info.active:
        return info, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown(info: Dist) -> None:
    if info.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
