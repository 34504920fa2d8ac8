"""Family-agnostic sampling with per-sample seeds: the formulation's sampler (DDIM or
ancestral for DDPM models, Euler for flow-matching ones) under classifier-free guidance.

Sample i starts from noise drawn with seed `seed + i`, so the same seed gives the same
images whatever the batch size, and teacher and student grids line up column by column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difcompress.data.conditions import Conditions, drop, take, to
from difcompress.diffusion.inputs import ModelInputs


@dataclass
class Guidance:
    """What samples are drawn under: one condition row per sample, the null condition
    classifier-free guidance pushes away from, and its scale (1: no guidance)."""

    conditions: Conditions | None = None
    null: Conditions | None = None
    scale: float = 1.0

    @property
    def guided(self) -> bool:
        return self.conditions is not None and self.scale != 1.0 and bool(self.null)


def balanced_labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Labels uniform over classes and balanced: a seeded shuffled class order, repeated, so
    fewer samples than classes still draw from all of them and each class appears
    floor(N / classes) or one more times."""
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return order[torch.arange(num_samples) % num_classes]


def guided_prediction(family, model, inputs: ModelInputs, guidance: Guidance):
    """(eps, learned variance or None). With guidance, eps = eps_null + s * (eps_cond -
    eps_null) from one batched call, and the variance is the conditioned branch's."""
    if not guidance.guided:
        return family.forward(model, inputs)
    dropped = torch.ones(inputs.sample.shape[0], dtype=torch.bool)
    eps, variance = family.forward(model, inputs.doubled(drop(inputs.cond, guidance.null, dropped)))
    cond, uncond = eps.chunk(2)
    return uncond + guidance.scale * (cond - uncond), (variance.chunk(2)[0] if variance is not None else None)


@torch.no_grad()
def sample_images(family, model, scheduler: Any, num_samples: int, *, seed: int, steps: int, sampler: str = "ddim",
                  batch_size: int = 64, guidance: Guidance = Guidance(), pixels: bool = True, on_batch=None
                  ) -> torch.Tensor:
    """Samples in the denoiser's space; pixels are clamped to [-1, 1], latents never clipped."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    c, h, w = family.sample_shape(model)
    formulation = family.formulation(model, scheduler)
    out = []
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(num_samples, start + batch_size))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        x = torch.stack([torch.randn(c, h, w, generator=g) for g in gens]).to(device, dtype)
        cond = to(take(guidance.conditions, slice(idx.start, idx.stop)), device) or {}
        rows = Guidance(cond or None, to(guidance.null, device), guidance.scale)

        def predict(x_in, t, rows=rows, cond=cond):
            return guided_prediction(family, model, ModelInputs(x_in, t, cond), rows)

        x = formulation.denoise(x, predict, sampler=sampler, steps=steps, generators=gens,
                                learned_variance=family.learns_variance(model), pixels=pixels)
        out.append(x.float().clamp(-1, 1).cpu() if pixels else x.float().cpu())
        if on_batch is not None:
            on_batch(len(idx))
    return torch.cat(out) if out else torch.empty(0, c, h, w)
