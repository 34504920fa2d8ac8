"""The DDPM formulation (Ho et al. 2020; DDIM sampling, Song et al. 2021): discrete
timesteps, noise added by the scheduler's alphas, and a denoiser that predicts the noise
(epsilon), the velocity (v) or the clean sample, as the scheduler config says.

A formulation is what training and sampling ask of the diffusion process, apart from the
model family: draw timesteps, noise a clean batch, name the regression target, build the
sampler and run it (`denoise`). The flow-matching formulation (flow.py) is the other kind
diffusers trains; formulations.py picks one from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from difcompress.core.errors import UserError

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def antithetic_timesteps(batch: int, num_train: int, generator: torch.Generator) -> torch.Tensor:
    """Pairs (t, T-1-t): lower variance of the loss estimate across timesteps."""
    half = torch.randint(0, num_train, ((batch + 1) // 2,), generator=generator)
    return torch.cat([half, num_train - 1 - half])[:batch]


@dataclass
class DDPMFormulation:
    """Noise and targets of a DDPM-trained denoiser with `scheduler`'s training config."""

    scheduler: Any

    def __post_init__(self):
        # Training noises with DDPM's formula whatever sampler the pipeline ships (SDXL ships
        # Euler, whose add_noise scales by sigma), as diffusers' training scripts do.
        self.training = DDPMScheduler.from_config(self.scheduler.config)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def draw_timesteps(self, size: int, generator: torch.Generator, antithetic: bool = False,
                       sample_shape=None) -> torch.Tensor:
        """Training timesteps, uniform over the schedule (in antithetic pairs when asked);
        the sample shape does not matter to DDPM (it does to a shifted flow)."""
        if antithetic:
            return antithetic_timesteps(size, self.num_train_timesteps, generator)
        return torch.randint(0, self.num_train_timesteps, (size,), generator=generator)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.training.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser predicts: the noise, the velocity, or the clean sample."""
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.training.get_velocity(x0, noise, t)
        return x0

    def check_sampler(self, name: str) -> str:
        """Refuse a sampler this formulation lacks (before any work: eval checks every model
        first); the name of the sampler it runs."""
        if name not in SAMPLERS:
            raise UserError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}", exit_code=2)
        return name

    def sampler(self, name: str, steps: int, learned_variance: bool = False, pixels: bool = True,
                sample_shape=None):
        """A DDIM or ancestral sampler built from the training config (betas, prediction type),
        set to `steps`; ancestral sampling uses a learned variance where the model predicts
        one (DiT); latents (pixels=False) are never clipped to [-1, 1]."""
        self.check_sampler(name)
        extra = {"variance_type": "learned_range"} if learned_variance and name == "ddpm" else {}
        if not pixels:
            extra.update(clip_sample=False, thresholding=False)
        out = SAMPLERS[name].from_config(self.scheduler.config, **extra)
        out.set_timesteps(steps)
        return out


    def denoise(self, x: torch.Tensor, predict: Callable, *, sampler: str, steps: int, generators=None,
                learned_variance: bool = False, pixels: bool = True) -> torch.Tensor:
        """Run the sampler from noise `x`; `predict(x, t)` returns (eps, learned variance or
        None) for integer timesteps `t` of shape (N,). Ancestral steps draw from `generators`
        (one per sample)."""
        dtype = x.dtype
        sched = self.sampler(sampler, steps, learned_variance=learned_variance, pixels=pixels)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            eps, variance = predict(sched.scale_model_input(x, t), tt)
            prediction = torch.cat([eps, variance], 1) if variance is not None and sampler == "ddpm" else eps
            kwargs = {"generator": generators} if sampler == "ddpm" else {"eta": 0.0}
            x = sched.step(prediction.float(), t, x.float(), **kwargs).prev_sample.to(dtype)
        return x
