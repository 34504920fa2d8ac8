"""The rectified-flow formulation (flow matching; Esser et al. 2024 for SD3, Black Forest
Labs for FLUX.1): a sample on the straight line between data and noise,
x_t = (1 - sigma) x0 + sigma eps, and a denoiser that predicts the velocity v = eps - x0.

Timesteps are in the scheduler's units, t = sigma * num_train_timesteps (floats), the
values FlowMatchEulerDiscreteScheduler's `timesteps` hold at sampling; a family scales
them for its model (Flux reads t / 1000). Training draws u in (0, 1) as the family
trained (`FlowTraining.density`: uniform, or SD3's logit-normal through diffusers'
`compute_density_for_timestep_sampling`), then shifts it as the scheduler config says:
sigma = shift u / (1 + (shift - 1) u), or, where the config has `use_dynamic_shifting`,
the resolution-dependent shift exp(mu) / (exp(mu) + 1/u - 1) with mu linear in the image
sequence length, as FluxPipeline's `calculate_shift` computes it. The sampler is the
pipeline's FlowMatchEulerDiscreteScheduler, built from its config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from difcompress.core.errors import UserError

# What a sampler name means for a flow model: its one deterministic ODE sampler (DDIM on a
# rectified flow is Euler in sigma, so the default --sampler ddim names it too).
FLOW_SAMPLERS = ("euler", "ddim")


@dataclass(frozen=True)
class FlowTraining:
    """How a flow-matching family was trained and is sampled, beside its scheduler config.

    density: how u is drawn (diffusers' weighting-scheme names: "none" for uniform,
    "logit_normal", "mode"); patch: latent pixels per image token side (Flux packs 2x2),
    which gives the image sequence length a dynamic shift reads; linear_sigmas: sample at
    np.linspace(1, 1/steps, steps) before the shift (FluxPipeline), else the scheduler's own
    spacing (StableDiffusion3Pipeline)."""

    density: str = "none"
    patch: int = 1
    linear_sigmas: bool = False
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def image_tokens(self, sample_shape) -> int:
        h, w = sample_shape[-2:]
        return (h // self.patch) * (w // self.patch)


def calculate_shift(tokens: int, config: Any) -> float:
    """mu for `tokens` image tokens: linear between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift), FluxPipeline's calculate_shift with the config's values."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return tokens * slope + base - slope * base_len


@dataclass
class FlowFormulation:
    """Noise, targets and sampler of a rectified-flow denoiser with `scheduler`'s config."""

    scheduler: Any
    training: FlowTraining = FlowTraining()

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def dynamic(self) -> bool:
        return bool(self.scheduler.config.get("use_dynamic_shifting", False))

    def mu(self, sample_shape) -> float | None:
        """The resolution-dependent shift for samples of `sample_shape`, where the config asks for one."""
        if not self.dynamic:
            return None
        if sample_shape is None:
            raise ValueError("a dynamically shifted flow schedule needs the sample shape (its image sequence length)")
        return calculate_shift(self.training.image_tokens(sample_shape), self.scheduler.config)

    def shifted(self, u: torch.Tensor, sample_shape=None) -> torch.Tensor:
        """sigma for u, shifted as the scheduler shifts its sampling sigmas."""
        if self.dynamic:
            mu = self.mu(sample_shape)
            if self.scheduler.config.get("time_shift_type", "exponential") == "linear":
                return mu / (mu + (1 / u - 1))
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        shift = float(self.scheduler.config.get("shift", 1.0))
        return shift * u / (1 + (shift - 1) * u)

    def draw_timesteps(self, size: int, generator: torch.Generator, antithetic: bool = False,
                       sample_shape=None) -> torch.Tensor:
        """Training timesteps sigma * num_train (floats), u drawn by the family's density
        (in antithetic pairs u, 1 - u when asked) and shifted."""
        t = self.training
        count = (size + 1) // 2 if antithetic else size
        u = compute_density_for_timestep_sampling(t.density, count, logit_mean=t.logit_mean, logit_std=t.logit_std,
                                                  mode_scale=t.mode_scale, generator=generator)
        if antithetic:
            u = torch.cat([u, 1 - u])[:size]
        u = u.clamp(1e-5, 1 - 1e-5)  # sigma stays inside (0, 1): neither pure data nor pure noise
        return self.shifted(u, sample_shape).float() * self.num_train_timesteps

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = t.to(like.device, torch.float32) / self.num_train_timesteps
        return sigma.view(-1, *([1] * (like.dim() - 1)))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t, x0)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity the denoiser predicts: eps - x0."""
        return noise.float() - x0.float()

    def check_sampler(self, name: str) -> str:
        """Refuse a sampler a flow-matching model has no use for (before any work); the name
        of the one it runs (its Euler ODE sampler, whichever of the two names was given)."""
        if name not in FLOW_SAMPLERS:
            raise UserError(f"--sampler {name}: a flow-matching model samples with its Euler ODE sampler "
                            f"({' or '.join(FLOW_SAMPLERS)})", exit_code=2)
        return "flow-euler"

    def sampler(self, name: str, steps: int, learned_variance: bool = False, pixels: bool = True,
                sample_shape=None):
        """The pipeline's FlowMatchEulerDiscreteScheduler, set to `steps` for samples of `sample_shape`."""
        self.check_sampler(name)
        out = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sigmas = np.linspace(1.0, 1 / steps, steps) if self.training.linear_sigmas else None
        out.set_timesteps(steps, sigmas=sigmas, mu=self.mu(sample_shape))
        return out

    def denoise(self, x: torch.Tensor, predict: Callable, *, sampler: str, steps: int, generators=None,
                learned_variance: bool = False, pixels: bool = True) -> torch.Tensor:
        """Integrate the flow from noise `x` (sigma 1) to data; `predict(x, t)` returns
        (velocity, None) for timesteps `t` of shape (N,)."""
        dtype = x.dtype
        sched = self.sampler(sampler, steps, sample_shape=tuple(x.shape[1:]))
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), float(t), device=x.device)
            velocity, _ = predict(x, tt)
            x = sched.step(velocity.float(), t, x.float()).prev_sample.to(dtype)
        return x
