"""Family-agnostic ancestral / DDIM sampling with per-sample seeds.

Sample i starts from noise drawn with seed `seed + i`, so the same seed gives the same
images whatever the batch size, and teacher and student grids line up column by column.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from difcompress.errors import UserError

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def make_sampler(scheduler: Any, sampler: str, steps: int, learned_variance: bool = False, pixels: bool = True):
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}", exit_code=2)
    # A DDIM sampler built from a DDPM training config keeps betas and prediction type.
    # Ancestral sampling uses a learned variance where the model predicts one (DiT).
    extra = {"variance_type": "learned_range"} if learned_variance and sampler == "ddpm" else {}
    if not pixels:  # latents are not images: no clipping of the predicted x0 to [-1, 1]
        extra.update(clip_sample=False, thresholding=False)
    out = SAMPLERS[sampler].from_config(scheduler.config, **extra)
    out.set_timesteps(steps)
    return out


def balanced_labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Labels uniform over classes and balanced: a seeded shuffled class order, repeated, so
    fewer samples than classes still draw from all of them and each class appears
    floor(N / classes) or one more times."""
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return order[torch.arange(num_samples) % num_classes]


def guided_prediction(family, model, x, t, labels, guidance_scale: float, null: torch.Tensor | None = None):
    """(eps, learned variance or None). With guidance, eps = eps_null + s * (eps_label -
    eps_null) from one batched call, and the variance is the labelled branch's. The
    condition is a class label (null: the model's null class) or a text encoding (null: the
    empty or negative prompt's encoding, given)."""
    if labels is None or guidance_scale == 1.0:
        return family.predict_split(model, x, t, labels)
    null = torch.full_like(labels, family.null_class(model)) if null is None else null.to(labels).expand_as(labels)
    eps, variance = family.predict_split(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = eps.chunk(2)
    return uncond + guidance_scale * (cond - uncond), (variance.chunk(2)[0] if variance is not None else None)


@torch.no_grad()
def sample_images(family, model, scheduler, num_samples: int, *, seed: int, steps: int, sampler: str = "ddim",
                  batch_size: int = 64, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
                  pixels: bool = True, on_batch=None, null_condition: torch.Tensor | None = None) -> torch.Tensor:
    """Samples in the denoiser's space; pixels are clamped to [-1, 1], latents never clipped.
    `class_labels` holds one condition per sample (class ids, or text encodings)."""
    model_device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    c, h, w = family.sample_shape(model)
    out = []
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(num_samples, start + batch_size))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        x = torch.stack([torch.randn(c, h, w, generator=g) for g in gens]).to(model_device, model_dtype)
        labels = class_labels[idx.start:idx.stop].to(model_device) if class_labels is not None else None
        sched = make_sampler(scheduler, sampler, steps, learned_variance=family.learns_variance(model), pixels=pixels)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            tt = torch.full((len(idx),), int(t), device=model_device, dtype=torch.long)
            eps, variance = guided_prediction(family, model, sched.scale_model_input(x, t), tt, labels, guidance_scale,
                                              null_condition)
            prediction = torch.cat([eps, variance], 1) if variance is not None and sampler == "ddpm" else eps
            kwargs = {"generator": gens} if sampler == "ddpm" else {"eta": 0.0}
            x = sched.step(prediction.float(), t, x.float(), **kwargs).prev_sample.to(model_dtype)
        out.append(x.float().clamp(-1, 1).cpu() if pixels else x.float().cpu())
        if on_batch is not None:
            on_batch(len(idx))
    return torch.cat(out) if out else torch.empty(0, c, h, w)
