"""Structured channel pruning on torch-pruning's dependency graph (the engine of every
family pruned that way: the U-Nets). It knows no model family: a family plugs in as a
`ChannelSpec` (what never prunes, which channels go together, which attributes to rewrite).

torch-pruning finds which channels are coupled (a residual stream, a skip concatenation,
attention q/k/v) and removes them consistently. We choose what to remove ourselves,
because its MetaPruner keeps every GroupNorm at its original group count and skips what
it cannot shrink: here a group loses whole GroupNorm groups (or whole heads) and the
family rewrites the group counts afterwards, so high ratios really prune.

Uniform pruning keeps the same fraction of every coupled group, which the stock config
can express. Global pruning ranks units across groups and is replayed from the recorded
torch-pruning history when loading.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch_pruning as tp
from torch import nn

from difcompress.core.errors import UserError


class ChannelSpec(Protocol):
    """What the engine asks of a model family (families/channel_pruned.py implements it)."""

    def example_inputs(self, model: nn.Module, batch_size: int = 1) -> dict[str, torch.Tensor]: ...

    def tracing_context(self, model: nn.Module) -> contextlib.AbstractContextManager: ...

    def never_prune(self, model: nn.Module) -> list[nn.Module]: ...

    def channel_unit(self, group: Any, num_channels: int, names: dict[nn.Module, str], before: dict[str, Any]
                     ) -> ChannelUnit: ...

    def record_structure(self, model: nn.Module) -> dict[str, Any]: ...

    def time_embedding_subset(self, model: nn.Module, before: dict[str, Any]) -> tuple[nn.Linear, list[int]] | None: ...

    def sync_attributes(self, model: nn.Module, before: dict[str, Any], uniform_groups: int | None) -> None: ...

    def uniform_groups(self, model: nn.Module, ratio: float, round_to: int = 1) -> tuple[int, float]: ...


@dataclass
class ChannelPruning:
    history: list[list]  # torch-pruning's [module name, is_out_channels, indices] records
    uniform_groups: int | None  # GroupNorm groups kept per layer in uniform mode
    warnings: list[str] = field(default_factory=list)


def build_graph(model: nn.Module, spec: ChannelSpec) -> tp.DependencyGraph:
    """torch-pruning's dependency graph, traced through autograd (so every weight must
    require grad while tracing, even in a frozen model)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with spec.tracing_context(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=spec.example_inputs(model), output_transform=lambda out: out.sample,
                verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)


@dataclass(frozen=True)
class ChannelUnit:
    """What is removed together: `size` consecutive channels (a GroupNorm group, a whole
    head), in each of `copies` equal slices of the layer at once (heads that keep their
    count while their dim shrinks, the value and gate halves of a GEGLU projection)."""

    size: int = 1
    copies: int = 1

    @property
    def width(self) -> int:
        """Channels one unit holds."""
        return self.size * self.copies

    def channels(self, unit: int, num_channels: int) -> list[int]:
        stride = num_channels // self.copies
        return [c * stride + unit * self.size + k for c in range(self.copies) for k in range(self.size)]

    def fits(self, num_channels: int) -> bool:
        return num_channels % self.width == 0


@dataclass
class _GroupPlan:
    root: nn.Module
    prune_fn: Callable
    unit: ChannelUnit
    scores: torch.Tensor  # one score per unit
    keep_units: int = 0


def prune_channels(
    model: nn.Module,
    spec: ChannelSpec,
    ratio: float,
    importance: tp.importance.Importance,
    global_pruning: bool = False,
    round_to: int = 1,
) -> ChannelPruning:
    """Remove `ratio` of the channels of every prunable layer, in place (uniform pruning
    keeps widths that are multiples of `round_to`)."""
    before = spec.record_structure(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    names = {m: n for n, m in model.named_modules()}
    graph = build_graph(model, spec)
    warnings = []

    plans = []
    for group in graph.get_all_groups(ignored_layers=spec.never_prune(model), root_module_types=(nn.Conv2d, nn.Linear)):
        root_dep = group[0].dep
        n = len(group[0].idxs)
        unit = spec.channel_unit(group, n, names, before)
        if not unit.fits(n):
            unit = ChannelUnit()
        with torch.no_grad():
            scores = importance(group)
        if scores is None:  # torch-pruning gives None when a criterion has nothing to score
            scores = torch.zeros(n)
        # (copies, units, size): a unit's score is the mean over its channels in every copy
        scores = scores.detach().float().cpu().view(unit.copies, -1, unit.size).mean((0, 2))
        plans.append(_GroupPlan(root_dep.target.module, root_dep.handler, unit, scores))

    uniform_groups = None
    if global_pruning:
        _plan_global(plans, ratio)
    else:
        uniform_groups, keep_fraction = spec.uniform_groups(model, ratio, round_to)
        for plan in plans:
            units = len(plan.scores)
            plan.keep_units = min(units, max(1, round(units * keep_fraction)))

    for plan in plans:
        units = len(plan.scores)
        drop_units = torch.argsort(plan.scores, stable=True)[: units - plan.keep_units].tolist()
        n = units * plan.unit.width
        drop = sorted(c for u in drop_units for c in plan.unit.channels(u, n))
        name = names[plan.root]
        achieved = 1 - plan.keep_units / units
        if abs(achieved - ratio) > 0.1:
            warnings.append(f"{name}: removed {achieved:.0%} of its channels, not {ratio:.0%} "
                            f"(whole units of {plan.unit.width})")
        if drop:
            graph.get_pruning_group(plan.root, plan.prune_fn, drop).prune()

    if not global_pruning:
        columns = spec.time_embedding_subset(model, before)
        if columns is not None:
            layer, keep = columns
            drop = sorted(set(range(layer.in_features)) - set(keep))
            graph.get_pruning_group(layer, tp.prune_linear_in_channels, drop).prune()
    spec.sync_attributes(model, before, uniform_groups)
    for name, parameter in model.named_parameters():  # pruned layers hold new Parameter objects
        parameter.requires_grad_(name not in frozen)
    history = [[n, bool(out), [int(i) for i in idxs]] for n, out, idxs in graph.pruning_history()]
    return ChannelPruning(history=history, uniform_groups=uniform_groups, warnings=warnings)


def _plan_global(plans: list[_GroupPlan], ratio: float) -> None:
    """Rank units across all groups by importance relative to their group's mean."""
    entries = []
    for i, plan in enumerate(plans):
        normalized = plan.scores / (plan.scores.abs().mean() + 1e-12)
        entries += [(float(s), i) for s in normalized]
        plan.keep_units = len(plan.scores)
    total = sum(len(p.scores) * p.unit.width for p in plans)
    removed = 0
    for score, i in sorted(entries, key=lambda e: e[0]):
        if removed >= ratio * total:
            break
        plan = plans[i]
        if plan.keep_units > 1:
            plan.keep_units -= 1
            removed += plan.unit.width


def replay_history(model: nn.Module, spec: ChannelSpec, history: list[list],
                   groupnorm_groups: dict[str, int] | None = None) -> None:
    """Rebuild a pruned architecture on a fresh base model from the recorded history."""
    before = spec.record_structure(model)
    graph = build_graph(model, spec)
    graph.load_pruning_history(history)
    spec.sync_attributes(model, before, None)
    # Group counts chosen at pruning time win: repeated prunings may have chosen differently.
    modules = dict(model.named_modules())
    for name, groups in (groupnorm_groups or {}).items():
        modules[name].num_groups = groups



def groupnorm_groups(model: nn.Module) -> dict[str, int]:
    """GroupNorm group count per layer (recorded with --global prunes)."""
    return {n: m.num_groups for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


def _outputs_by_module(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every module's tensor output of one forward pass, by name, in execution order."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, out):
            outputs.setdefault(name, out[0] if isinstance(out, tuple) else out)  # returns None: output unchanged
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: o for n, o in outputs.items() if isinstance(o, torch.Tensor)}


def first_difference(model: nn.Module, rebuilt: nn.Module, inputs: dict[str, torch.Tensor], atol: float = 1e-5
                     ) -> str | None:
    """The first module (in execution order) whose output differs between two models, or None."""
    ours, theirs = _outputs_by_module(model, inputs), _outputs_by_module(rebuilt, inputs)
    for name, out in ours.items():
        other = theirs.get(name)
        if other is None or other.shape != out.shape or not torch.allclose(out, other, atol=atol):
            return name
    return None


def check_config_rebuild(model: nn.Module, model_class: type[nn.Module], config: dict[str, Any],
                         inputs: dict[str, torch.Tensor]) -> None:
    """The stock class built from `config` must reproduce the pruned model (both in eval
    mode: dropout would make any two forward passes differ); records `config` on the model."""
    hint = "; prune with --global to keep a record of the exact widths instead"
    try:
        rebuilt = model_class.from_config(config).to(next(model.parameters()).device).eval()
        result = rebuilt.load_state_dict(model.state_dict(), strict=False)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"pruned widths are not expressible in the stock config: {str(err).splitlines()[0]}"
                        f"{hint}") from None
    mismatch = result.missing_keys + result.unexpected_keys
    if mismatch:
        raise UserError(f"pruned widths are not expressible in the stock config: weight {mismatch[0]} "
                        f"has no counterpart{hint}")
    was_training = model.training
    model.eval()
    try:
        layer = first_difference(model, rebuilt, inputs)
    finally:
        model.train(was_training)
    if layer is not None:
        raise UserError(f"the stock config rebuilt from the pruned widths differs first at layer {layer}{hint}")
    model.register_to_config(**config)
