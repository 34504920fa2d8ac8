"""What a denoiser is called with: the noisy sample, its timesteps and named conditions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from difcompress.data.conditions import Conditions, concat, to


@dataclass
class ModelInputs:
    """One batch of denoiser inputs; each family turns it into its model's forward call."""

    sample: torch.Tensor
    timestep: torch.Tensor
    cond: Conditions = field(default_factory=dict)

    def doubled(self, second: Conditions) -> ModelInputs:
        """The batch twice, the second copy under `second` conditions (one guided call)."""
        return ModelInputs(torch.cat([self.sample, self.sample]), torch.cat([self.timestep, self.timestep]),
                           concat(self.cond, second) or {})

    def cast(self, dtype: torch.dtype) -> ModelInputs:
        """The sample and floating-point conditions in `dtype` (a teacher kept in another dtype)."""
        return ModelInputs(self.sample.to(dtype), self.timestep, to(self.cond, self.sample.device, dtype) or {})


def cast_floating(inputs: dict, dtype: torch.dtype) -> dict:
    """A model's keyword inputs with every floating-point tensor in `dtype`, nested dicts
    (SDXL's added_cond_kwargs) and lists (Z-Image's per-sample tensors) included: the call a
    teacher kept in another dtype takes."""
    return {k: _cast(v, dtype) for k, v in inputs.items()}


def _cast(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return cast_floating(value, dtype)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value.to(dtype) if value.is_floating_point() else value
