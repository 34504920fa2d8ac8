"""The base of every family pruned channel-wise on torch-pruning's graph (the U-Nets):
the family side of `pruning.graph.ChannelSpec`."""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Any

from torch import nn

from difcompress.core.errors import UserError
from difcompress.families.base import ModelFamily, PruneOutcome
from difcompress.pruning.graph import ChannelUnit, check_config_rebuild, prune_channels
from difcompress.pruning.importance import make_importance


class GraphPrunedFamily(ModelFamily):
    """A family pruned channel-wise on torch-pruning's dependency graph."""

    def tracing_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def never_prune(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose output channels must keep their size (image channels, ...)."""

    @abstractmethod
    def channel_unit(self, group: Any, num_channels: int, names: dict[nn.Module, str], before: dict[str, Any]
                     ) -> ChannelUnit:
        """Which root channels are removed together (a GroupNorm group, a head, ...)."""

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
    def uniform_groups(self, model: nn.Module, ratio: float, round_to: int = 1) -> tuple[int, float]:
        """For uniform pruning: GroupNorm groups to keep and the resulting keep fraction."""

    @abstractmethod
    def pruned_config(self, model: nn.Module) -> dict[str, Any]:
        """The stock config that rebuilds the pruned model; raise ValueError if impossible."""

    def prune(self, model, request):
        if request.global_pruning and request.round_to > 1:
            raise UserError("--round-to applies to uniform pruning; drop it or --global", exit_code=2)
        outcome = prune_channels(model, self, request.ratio, make_importance(request.importance),
                                 global_pruning=request.global_pruning, round_to=request.round_to)
        if not request.global_pruning:
            self.check_config_rebuild(model)
        return PruneOutcome(model=model, history=outcome.history, warnings=outcome.warnings,
                            details={"groupnorm_groups_kept": outcome.uniform_groups})

    def check_config_rebuild(self, model: nn.Module) -> None:
        """The stock config rebuilt from the pruned widths must reproduce the pruned model."""
        try:
            config = self.pruned_config(model)
        except ValueError as err:
            raise UserError(f"pruned widths are not expressible in the stock config: {str(err).splitlines()[0]}; "
                            "prune with --global to keep a record of the exact widths instead") from None
        check_config_rebuild(model, self.model_class, config, self.example_inputs(model, 2))
