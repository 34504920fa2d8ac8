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
    (SDXL's added_cond_kwargs) included: the call a teacher kept in another dtype takes."""
    return {k: cast_floating(v, dtype) if isinstance(v, dict) else v.to(dtype) if v.is_floating_point() else v
            for k, v in inputs.items()}
