"""AdamW for a CharRNN, and its state as flat checkpoint tensors (optim.<param index>.<key>)."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..errors import CheckpointError
from ..model import CharRNN


def make_optimizer(model: CharRNN, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; the fused kernel where the device has one (one launch
    for all parameters, and it can skip a step on a non-finite gradient without a host sync)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), fused=fused, foreach=None if fused else True)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """(tensors for the checkpoint, param groups for its header): safetensors holds no Python objects."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    """The inverse of optimizer_tensors; a checkpoint whose state does not fit is a CheckpointError."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit the model ({e})") from None
