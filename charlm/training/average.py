"""The saved model is an exponential moving average of the weights, not the last step's weights.

Why: on a text seen many times over, the last step's weights carry the noise of the last few
batches; their average over the last ~hundred steps scores lower at no cost in speed (measured in
bench/quality.py, see the README's rule for the defaults). Validation scores the average, the best
checkpoint holds it, and the resume checkpoint holds both, so a resumed run continues exactly.

torch.optim.swa_utils.AveragedModel keeps the averaged copy; the update here warms up (the decay
grows as (1 + n) / (10 + n) towards its limit) so that early validations do not score the random start.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

from ..errors import CheckpointError
from ..model import CharRNN

PREFIX = "average."


class WeightAverage:
    def __init__(self, net: CharRNN, decay: float) -> None:
        self.decay = decay
        self.count = 0  # updates so far, kept on the host: reading AveragedModel's would sync a GPU

        def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
            d = min(self.decay, self.count / (self.count + 9))
            torch._foreach_lerp_(averaged, current, 1 - d)

        self.averaged = AveragedModel(net, multi_avg_fn=update)
        self.net = net

    @property
    def model(self) -> CharRNN:
        """The averaged model: what validation scores and the best checkpoint holds."""
        return self.averaged.module  # type: ignore[return-value]

    def update(self) -> None:
        """After each optimizer step."""
        self.averaged.update_parameters(self.net)
        self.count += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the resume checkpoint, beside the raw weights and the optimizer."""
        state = self.averaged.state_dict()
        return {PREFIX + k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """From a resume checkpoint; one written without an average starts the average afresh."""
        state = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if not state:
            return
        try:
            self.averaged.load_state_dict(state)
            self.count = int(self.averaged.n_averaged)
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"the checkpoint's weight average does not fit the model ({e})") from None
