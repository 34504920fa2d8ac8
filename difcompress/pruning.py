"""Structured channel pruning on torch-pruning's dependency graph.

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

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn

from difcompress.families.base import ModelFamily

IMPORTANCE_CRITERIA = ("random", "magnitude", "taylor", "diff-pruning")


@dataclass
class ChannelPruning:
    history: list[list]  # torch-pruning's [module name, is_out_channels, indices] records
    uniform_groups: int | None  # GroupNorm groups kept per layer in uniform mode
    warnings: list[str] = field(default_factory=list)


def make_importance(criterion: str) -> tp.importance.Importance:
    if criterion == "random":
        return tp.importance.RandomImportance()
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    # Taylor and Diff-Pruning differ only in which gradients were accumulated beforehand.
    return tp.importance.GroupTaylorImportance()


def build_graph(model: nn.Module, family: ModelFamily) -> tp.DependencyGraph:
    with family.tracing_context(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model,
            example_inputs=family.example_inputs(model),
            output_transform=lambda out: out.sample,
            verbose=False,
        )


@dataclass
class _GroupPlan:
    root: nn.Module
    prune_fn: Callable
    unit: int
    scores: torch.Tensor  # one score per unit
    keep_units: int = 0


def prune_channels(
    model: nn.Module,
    family: ModelFamily,
    ratio: float,
    importance: tp.importance.Importance,
    global_pruning: bool = False,
) -> ChannelPruning:
    """Remove `ratio` of the channels of every prunable layer, in place."""
    before = family.record_structure(model)
    names = {m: n for n, m in model.named_modules()}
    graph = build_graph(model, family)
    warnings = []

    plans = []
    for group in graph.get_all_groups(ignored_layers=family.never_prune(model), root_module_types=(nn.Conv2d, nn.Linear)):
        root_dep = group[0].dep
        n = len(group[0].idxs)
        unit = family.channel_unit(group, n, names, before)
        if n % unit:
            unit = 1
        with torch.no_grad():
            scores = importance(group)
        if scores is None:  # torch-pruning gives None when a criterion has nothing to score
            scores = torch.zeros(n)
        scores = scores.detach().float().cpu().view(n // unit, unit).mean(1)
        plans.append(_GroupPlan(root_dep.target.module, root_dep.handler, unit, scores))

    uniform_groups = None
    if global_pruning:
        _plan_global(plans, ratio)
    else:
        uniform_groups, keep_fraction = family.uniform_groups(model, ratio)
        for plan in plans:
            units = len(plan.scores)
            plan.keep_units = min(units, max(1, round(units * keep_fraction)))

    for plan in plans:
        units = len(plan.scores)
        drop_units = torch.argsort(plan.scores, stable=True)[: units - plan.keep_units].tolist()
        drop = sorted(u * plan.unit + k for u in drop_units for k in range(plan.unit))
        name = names[plan.root]
        achieved = 1 - plan.keep_units / units
        if abs(achieved - ratio) > 0.1:
            warnings.append(f"{name}: removed {achieved:.0%} of its channels, not {ratio:.0%} (whole units of {plan.unit})")
        if drop:
            graph.get_pruning_group(plan.root, plan.prune_fn, drop).prune()

    if not global_pruning:
        columns = family.time_embedding_subset(model, before)
        if columns is not None:
            layer, keep = columns
            drop = sorted(set(range(layer.in_features)) - set(keep))
            graph.get_pruning_group(layer, tp.prune_linear_in_channels, drop).prune()
    family.sync_attributes(model, before, uniform_groups)
    history = [[n, bool(out), [int(i) for i in idxs]] for n, out, idxs in graph.pruning_history()]
    return ChannelPruning(history=history, uniform_groups=uniform_groups, warnings=warnings)


def _plan_global(plans: list[_GroupPlan], ratio: float) -> None:
    """Rank units across all groups by importance relative to their group's mean."""
    entries = []
    for i, plan in enumerate(plans):
        normalized = plan.scores / (plan.scores.abs().mean() + 1e-12)
        entries += [(float(s), i) for s in normalized]
        plan.keep_units = len(plan.scores)
    total = sum(len(p.scores) * p.unit for p in plans)
    removed = 0
    for score, i in sorted(entries, key=lambda e: e[0]):
        if removed >= ratio * total:
            break
        plan = plans[i]
        if plan.keep_units > 1:
            plan.keep_units -= 1
            removed += plan.unit


def replay_history(model: nn.Module, family: ModelFamily, history: list[list],
                   groupnorm_groups: dict[str, int] | None = None) -> None:
    """Rebuild a pruned architecture on a fresh base model from the recorded history."""
    before = family.record_structure(model)
    graph = build_graph(model, family)
    graph.load_pruning_history(history)
    family.sync_attributes(model, before, None)
    # Group counts chosen at pruning time win: repeated prunings may have chosen differently.
    modules = dict(model.named_modules())
    for name, groups in (groupnorm_groups or {}).items():
        modules[name].num_groups = groups


def groupnorm_groups(model: nn.Module) -> dict[str, int]:
    return {n: m.num_groups for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


def accumulate_gradients(
    model: nn.Module,
    family: ModelFamily,
    scheduler: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    criterion: str,
    *,
    seed: int,
    threshold: float = 0.05,
    max_timesteps: int | None = None,
) -> int:
    """Fill .grad for Taylor-style importance; returns how many timesteps were used.

    taylor: the denoising loss at random timesteps, one pass per batch image chunk.
    diff-pruning (Fang et al., NeurIPS 2023): timesteps from 0 upward, accumulating the
    gradient until the loss falls below `threshold` times its running maximum, since the
    informative (low-noise) steps come first.
    """
    gen = torch.Generator().manual_seed(seed)
    num_train = scheduler.config.num_train_timesteps
    device = next(model.parameters()).device
    images = images.to(device)
    labels = labels.to(device) if labels is not None else None
    model.zero_grad(set_to_none=True)
    if criterion == "taylor":
        steps = max_timesteps or 8
        timestep_list = torch.randint(0, num_train, (steps,), generator=gen).tolist()
    else:
        stride = max(1, num_train // max_timesteps) if max_timesteps else 1
        timestep_list = list(range(0, num_train, stride))
    running_max, used = 0.0, 0
    for t in timestep_list:
        noise = torch.randn(images.shape, generator=gen).to(device)
        tt = torch.full((images.shape[0],), t, dtype=torch.long, device=device)
        noisy = scheduler.add_noise(images, noise, tt)
        loss = torch.nn.functional.mse_loss(family.predict(model, noisy, tt, labels), noise)
        running_max = max(running_max, loss.item())
        if criterion == "diff-pruning" and loss.item() < threshold * running_max:
            break
        loss.backward()
        used += 1
    return used
