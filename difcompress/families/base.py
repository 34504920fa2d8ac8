"""What a model family must tell the family-agnostic stages.

A family knows its model class's quirks: which layers never prune, how channels group
(GroupNorm groups, attention heads), which attributes diffusers keeps beside the weights,
how to express a pruned width in the stock config, and how to sample. The stages (prune,
distill, evaluate, export) only talk to this interface.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class ModelFamily(ABC):
    name: str
    model_class: type[nn.Module]
    pipeline_class: type
    component: str  # the denoiser's folder inside a pipeline ("unet", "transformer")

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    # ---- shapes and forward -------------------------------------------------------------
    @abstractmethod
    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of one sample the denoiser works on."""

    def example_inputs(self, model: nn.Module, batch_size: int = 1) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        c, h, w = self.sample_shape(model)
        return {
            "sample": torch.randn(batch_size, c, h, w, device=device),
            "timestep": torch.full((batch_size,), 10, dtype=torch.long, device=device),
        }

    @abstractmethod
    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The prediction KD compares (noise / v / x0), epsilon channels only."""

    # ---- pruning ------------------------------------------------------------------------
    @abstractmethod
    def never_prune(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose output channels must keep their size (image channels, ...)."""

    def tracing_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def channel_unit(self, group: Any, num_channels: int, names: dict[nn.Module, str], before: dict[str, Any]) -> int:
        """How many consecutive root channels are removed together (a GroupNorm group, a head)."""

    @abstractmethod
    def record_structure(self, model: nn.Module) -> dict[str, Any]:
        """Attributes kept beside the weights, read before pruning (to keep their ratios)."""

    def time_embedding_subset(self, model: nn.Module, before: dict[str, Any]) -> tuple[nn.Linear, list[int]] | None:
        """The timestep-embedding layer and input columns to keep so the stock config expresses it."""
        return None

    @abstractmethod
    def sync_attributes(self, model: nn.Module, before: dict[str, Any], uniform_groups: int | None) -> None:
        """Make every attribute diffusers keeps beside the weights match the pruned weights."""

    @abstractmethod
    def uniform_groups(self, model: nn.Module, ratio: float) -> tuple[int, float]:
        """For uniform pruning: GroupNorm groups to keep and the resulting keep fraction."""

    @abstractmethod
    def pruned_config(self, model: nn.Module) -> dict[str, Any]:
        """The stock config that rebuilds the pruned model; raise ValueError if impossible."""

    def check_pruned(self, model: nn.Module) -> None:
        """Raise RuntimeError if the pruned model's attributes do not serve a forward pass."""
        with torch.no_grad():
            model(**self.example_inputs(model, 2))

    @abstractmethod
    def stage_widths(self, model: nn.Module) -> dict[str, int]:
        """Width per stage, for before/after reports."""

    # ---- distillation -------------------------------------------------------------------
    @abstractmethod
    def feature_layers(self, model: nn.Module) -> list[str]:
        """Default module names whose outputs feature KD matches."""

    # ---- sampling -----------------------------------------------------------------------
    def sample(
        self,
        model: nn.Module,
        scheduler: Any,
        num_samples: int,
        *,
        seed: int,
        steps: int,
        sampler: str = "ddim",
        batch_size: int = 64,
        on_batch=None,
    ) -> torch.Tensor:
        """Draw samples in [-1, 1] as (N, C, H, W) on CPU; sample i depends only on (seed, i)."""
        from difcompress.sampling import sample_images

        return sample_images(
            self, model, scheduler, num_samples, seed=seed, steps=steps, sampler=sampler, batch_size=batch_size,
            on_batch=on_batch,
        )
