"""Channel importance: torch-pruning's criteria, and the gradients that Taylor-style
criteria (Taylor, Diff-Pruning) read from ``.grad``."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn

from difcompress.data.conditions import Conditions, repeat, to
from difcompress.diffusion.inputs import ModelInputs


def make_importance(criterion: str) -> tp.importance.Importance:
    """torch-pruning's importance for a criterion name."""
    if criterion == "random":
        return tp.importance.RandomImportance()
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    # Taylor and Diff-Pruning differ only in which gradients were accumulated beforehand.
    return tp.importance.GroupTaylorImportance()


def gradient_timesteps(criterion: str, num_train: int, max_timesteps: int | None, generator: torch.Generator
                       ) -> list[int]:
    """Which timesteps a gradient criterion visits, in order: Taylor draws random ones (8
    unless capped otherwise); Diff-Pruning walks up from 0 (strided when capped)."""
    if criterion == "taylor":
        return torch.randint(0, num_train, (max_timesteps or 8,), generator=generator).tolist()
    stride = max(1, num_train // max_timesteps) if max_timesteps else 1
    return list(range(0, num_train, stride))


def _per_timestep_losses(model, family, formulation, images, conditions, chunk, generator):
    """Denoising loss of each timestep in `chunk`, from one batched forward pass."""
    n = images.shape[0]
    noise = torch.cat([torch.randn(images.shape, generator=generator) for _ in chunk]).to(images.device)
    t = torch.tensor(chunk, device=images.device).repeat_interleave(n)
    repeated = images.repeat(len(chunk), *([1] * (images.dim() - 1)))
    inputs = ModelInputs(formulation.noisy(repeated, noise, t), t, repeat(conditions, len(chunk)) or {})
    errors = (family.predict(model, inputs).float() - formulation.target(repeated, noise, t)).square()
    return errors.view(len(chunk), -1).mean(1)  # each entry: the MSE over that timestep's images


def accumulate_gradients(model: nn.Module, family: Any, scheduler: Any, images: torch.Tensor,
                         conditions: Conditions | None, criterion: str, *, seed: int, threshold: float = 0.05,
                         max_timesteps: int | None = None, timesteps_per_pass: int = 1,
                         on_progress: Callable[[int, int], None] | None = None) -> int:
    """Fill .grad for Taylor-style importance; returns how many timesteps were used.

    taylor: the denoising loss at random timesteps. diff-pruning (Fang et al., NeurIPS
    2023): timesteps from 0 upward, accumulating the gradient until the loss falls below
    `threshold` times its running maximum, since the informative (low-noise) steps come first.

    `timesteps_per_pass` timesteps share one batched forward/backward pass. The stop stays
    exact: the chunk's per-timestep losses decide where Diff-Pruning stops, and only the
    timesteps before that point contribute gradient, as if they had run one per pass.
    `on_progress(done, total)` is called after each pass.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    images = images.to(device)
    conditions = to(conditions, device)
    model.zero_grad(set_to_none=True)
    timesteps = gradient_timesteps(criterion, scheduler.config.num_train_timesteps, max_timesteps, generator)
    running_max, used = 0.0, 0
    formulation = family.formulation(model, scheduler)
    for start in range(0, len(timesteps), timesteps_per_pass):
        chunk = timesteps[start: start + timesteps_per_pass]
        losses = _per_timestep_losses(model, family, formulation, images, conditions, chunk, generator)
        keep = len(chunk)
        if criterion == "diff-pruning":
            for i, value in enumerate(losses.detach().tolist()):
                running_max = max(running_max, value)
                if value < threshold * running_max:
                    keep = i
                    break
        if keep:
            losses[:keep].sum().backward()
        used += keep
        if on_progress is not None:
            on_progress(start + len(chunk), len(timesteps))
        if keep < len(chunk):
            break
    return used
