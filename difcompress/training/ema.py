"""Exponential moving average of a model's weights (the final student is the EMA)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Float32 shadow copies of a model's state, updated after every optimizer step.

    Warm-up as in common diffusion trainers (diffusers' EMAModel): the decay at step k is
    ``min(decay, (1 + k) / (10 + k))``, so early averages do not drag in the initial
    weights. ``device="cpu"`` keeps the shadow off the GPU (``--ema-offload``).
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str | None = None):
        self.decay = decay
        state = model.state_dict()
        self.shadow = {k: v.detach().to(device or v.device, dtype=torch.float32, copy=True) for k, v in state.items()}
        self._floats = [k for k, v in state.items() if v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the shadow towards `model`'s current weights (one foreach kernel per dtype)."""
        d = min(self.decay, (1 + step) / (10 + step))
        state = model.state_dict()
        shadow = [self.shadow[k] for k in self._floats]
        current = [state[k].detach().to(shadow[0].device, torch.float32) for k in self._floats]
        if shadow:
            torch._foreach_lerp_(shadow, current, 1 - d)
        for k, v in state.items():
            if not v.is_floating_point():
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (in its own dtype and device)."""
        params = model.state_dict()
        model.load_state_dict({k: v.to(params[k].device, params[k].dtype) for k, v in self.shadow.items()})
