"""Pruning engine for transformers made of block lists (DiT's `transformer_blocks`, Flux's
double-stream `transformer_blocks` and single-stream `single_transformer_blocks`, SD3's
`transformer_blocks`, Z-Image's `layers`): keep some blocks of each list (depth), and whole
attention heads with the residual width (width). It knows no family: a family describes
its model with a :class:`BlockLayout` (which lists, which config keys count them, what a
block returns, and an index rule per weight), and the engine

- chooses blocks: given indices, uniform segments, or by a criterion scored on calibration
  inputs: `output-change` (how much the model's prediction changes when the block is
  skipped; the Flux.1-lite / TinyFusion-style ablation) or `block-io-mse` (the MSE between
  each block's input and output alone, as Freepik describes Flux.1-lite's choice);
- chooses heads, feed-forward units and residual channels by weight importance;
- rebuilds the smaller stock model from its config (`type(model).from_config`) and copies
  the kept slices of every teacher weight into it, so the stock config expresses it.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from difcompress.core.errors import UserError
from difcompress.data.conditions import to
from difcompress.diffusion.inputs import ModelInputs

DEPTH_CRITERIA = ("uniform", "output-change", "block-io-mse")
RES = "res"  # the residual width
HEADS = "heads"  # the block's kept heads (x head_dim)


@dataclass(frozen=True)
class BlockList:
    """One list of blocks: its attribute, the config key counting it, the CLI options that
    name how many / which to keep, and the inputs a block hands on (its output when skipped)."""

    name: str
    count_key: str
    depth_option: str = "--depth"
    blocks_option: str = "--blocks"
    returns: tuple[str, ...] = ("hidden_states",)
    keep_last: bool = False  # the last block always stays last (SD3's context_pre_only block)


@dataclass(frozen=True)
class BlockLayout:
    """A transformer as the engine sees it. `rules`: (regex over weight names, index kind
    per dim) where a kind is None (kept whole), RES, (RES, k) (k chunks of the residual
    width: adaLN modulations), HEADS, "ff:NAME" (the block's feed-forward group NAME) or a
    tuple ("cat", kind, ...) (a dim made of those parts side by side)."""

    lists: tuple[BlockList, ...]
    rules: tuple[tuple[str, tuple], ...] = ()
    heads_key: str = "num_attention_heads"
    head_dim_key: str = "attention_head_dim"
    head_dim: int | None = None  # where the config names no head dim (Z-Image: dim / n_heads)
    # Residual channels fixed by the architecture rather than by importance: (width, new
    # width) -> indices (SD3's stored sin-cos position table keeps its frequencies by stride).
    residual: Callable[[int, int], torch.Tensor] | None = None

    def rule(self, name: str) -> tuple | None:
        return next((spec for pattern, spec in self.rules if re.fullmatch(pattern, name)), None)


def uniform_blocks(layers: int, keep: int) -> list[int]:
    """The last block of each of `keep` equal segments: for 28 -> 14, blocks 1, 3, ..., 27."""
    return [math.floor((i + 1) * layers / keep) - 1 for i in range(keep)]


def check_keep(blocks: BlockList, layers: int, depth: int | None, indices: list[int] | None) -> None:
    """One line for a depth or index list that cannot be kept."""
    if depth is not None and indices is not None:
        raise UserError(f"give either {blocks.depth_option} or {blocks.blocks_option}, not both", exit_code=2)
    if indices is not None:
        chosen = sorted(set(indices))
        if not chosen or chosen[0] < 0 or chosen[-1] >= layers:
            raise UserError(f"{blocks.blocks_option} must name blocks between 0 and {layers - 1} "
                            f"({blocks.name} has {layers})", exit_code=2)
        twice = sorted({i for i in indices if indices.count(i) > 1})
        if twice:
            raise UserError(f"{blocks.blocks_option} names block {', '.join(map(str, twice))} more than once",
                            exit_code=2)
        if len(chosen) == layers:  # as --depth {layers}: a list that removes nothing is a slip
            raise UserError(f"{blocks.blocks_option} names all {layers} blocks of {blocks.name}: name fewer, or "
                            f"leave {blocks.blocks_option} out to keep them all", exit_code=2)
        if blocks.keep_last and chosen[-1] != layers - 1:
            raise UserError(f"{blocks.blocks_option} must keep the last block ({layers - 1}): it is the only one "
                            "that ends the text stream", exit_code=2)
    if depth is not None and not 1 <= depth < layers:
        raise UserError(f"{blocks.depth_option} {depth}: keep between 1 and {layers - 1} of the {layers} blocks of "
                        f"{blocks.name}", exit_code=2)


def ranked_keep(scores: list[float], keep: int, keep_last: bool) -> list[int]:
    """The `keep` highest-scoring blocks (ties: the earlier), the last one forced in when asked."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if keep_last:
        order = [len(scores) - 1] + [i for i in order if i != len(scores) - 1]
    return sorted(order[:keep])


def noised_inputs(family, model, calibration, seed: int) -> ModelInputs:
    """The calibration batch noised at random timesteps drawn as the model trains."""
    if calibration is None:
        raise UserError("this --depth-criterion needs a data batch (--data, or the teacher's samples)")
    x0, conditions, scheduler = calibration
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x0 = x0.to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    formulation = family.formulation(model, scheduler)
    t = formulation.draw_timesteps(x0.shape[0], gen, sample_shape=tuple(x0.shape[1:])).to(device)
    return ModelInputs(formulation.noisy(x0, noise, t), t, to(conditions, device) or {})


def _named_inputs(block: nn.Module, args, kwargs) -> dict[str, Any]:
    return inspect.signature(block.forward).bind_partial(*args, **kwargs).arguments


def _passed_on(blocks: BlockList, block: nn.Module, args, kwargs):
    """What a skipped block hands on: its inputs named in `returns`, shaped as its output."""
    named = _named_inputs(block, args, kwargs)
    out = tuple(named[n] for n in blocks.returns)
    return out if len(out) > 1 else out[0]


@torch.no_grad()
def output_change_scores(family, model, layout: BlockLayout, calibration, seed: int) -> dict[str, list[float]]:
    """Per list, how much the prediction changes (MSE) when each block alone is skipped."""
    inputs = noised_inputs(family, model, calibration, seed)
    full = family.predict(model, inputs)
    scores: dict[str, list[float]] = {}
    for blocks in layout.lists:
        scores[blocks.name] = []
        for block in getattr(model, blocks.name):
            handle = block.register_forward_hook(
                lambda m, args, kwargs, _out, b=blocks: _passed_on(b, m, args, kwargs), with_kwargs=True)
            try:
                scores[blocks.name].append(float(torch.mean((family.predict(model, inputs) - full) ** 2)))
            finally:
                handle.remove()
    return scores


@torch.no_grad()
def block_io_scores(family, model, layout: BlockLayout, calibration, seed: int) -> dict[str, list[float]]:
    """Per list, the MSE between each block's input and output streams (summed over the
    streams it returns), from one forward pass of the full model."""
    inputs = noised_inputs(family, model, calibration, seed)
    scores = {b.name: [0.0] * len(getattr(model, b.name)) for b in layout.lists}
    handles = []

    def hook(blocks, index):
        def measure(module, args, kwargs, output):
            named = _named_inputs(module, args, kwargs)
            outs = output if isinstance(output, tuple) else (output,)
            scores[blocks.name][index] = sum(float(torch.mean((o.float() - named[n].float()) ** 2))
                                             for n, o in zip(blocks.returns, outs) if o is not None)
        return measure

    for blocks in layout.lists:
        for i, block in enumerate(getattr(model, blocks.name)):
            handles.append(block.register_forward_hook(hook(blocks, i), with_kwargs=True))
    try:
        family.predict(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return scores


CRITERIA: dict[str, Callable] = {"output-change": output_change_scores, "block-io-mse": block_io_scores}


@dataclass
class DepthRequest:
    """Blocks to keep per list: a count (`depth`) or indices, and how counts choose."""

    depth: dict[str, int | None] = field(default_factory=dict)
    indices: dict[str, list[int] | None] = field(default_factory=dict)
    criterion: str = "uniform"


def choose_blocks(family, model, layout: BlockLayout, request: DepthRequest, calibration, seed: int
                  ) -> tuple[dict[str, list[int]], dict[str, list[float]] | None]:
    """(kept block indices per list, the criterion's scores or None), checked against the model."""
    if request.criterion not in DEPTH_CRITERIA:
        raise UserError(f"unknown --depth-criterion '{request.criterion}'; choose one of "
                        f"{', '.join(DEPTH_CRITERIA)}", exit_code=2)
    counts = {b.name: len(getattr(model, b.name)) for b in layout.lists}
    for blocks in layout.lists:
        check_keep(blocks, counts[blocks.name], request.depth.get(blocks.name), request.indices.get(blocks.name))
    scored = request.criterion != "uniform" and any(request.depth.get(b.name) for b in layout.lists)
    scores = CRITERIA[request.criterion](family, model, layout, calibration, seed) if scored else None
    kept = {}
    for blocks in layout.lists:
        layers, keep = counts[blocks.name], request.depth.get(blocks.name)
        if request.indices.get(blocks.name) is not None:
            kept[blocks.name] = sorted(request.indices[blocks.name])
        elif keep is None:
            kept[blocks.name] = list(range(layers))
        elif scores is None:
            kept[blocks.name] = uniform_blocks(layers, keep)
        else:
            kept[blocks.name] = ranked_keep(scores[blocks.name], keep, blocks.keep_last)
    return kept, scores


def _block_of(layout: BlockLayout, name: str) -> str:
    """The block a weight belongs to ("transformer_blocks.3"), or "" for the model's own weights."""
    for blocks in layout.lists:
        if name.startswith(blocks.name + "."):
            return ".".join(name.split(".")[: blocks.name.count(".") + 2])
    return ""


def _segments(kind, size: int, width: int, heads_width: int) -> list[tuple[str, int]]:
    """A dim's kind as (part, length) pieces side by side; a feed-forward part takes what
    the others leave."""
    if isinstance(kind, tuple) and kind[0] == "cat":
        parts = [p for k in kind[1:] for p in _segments(k, -1, width, heads_width)]
    elif isinstance(kind, tuple):  # (RES, k): k chunks of the residual width
        parts = [(RES, width)] * kind[1]
    else:
        parts = [(kind, width if kind == RES else heads_width if kind == HEADS else -1)]
    if size >= 0:
        rest = size - sum(n for _, n in parts if n >= 0)
        parts = [(p, rest if n < 0 else n) for p, n in parts]
    return parts


class WidthPlan:
    """Which channels of every weight a model with `keep_heads` heads per block keeps:
    residual channels (one set for the whole model), heads and feed-forward units (per
    block), each ranked by the summed importance of the weights that read or write it."""

    def __init__(self, model: nn.Module, layout: BlockLayout, keep_heads: int, score, kept: dict[str, list[int]]):
        config = model.config
        self.layout, self.heads = layout, config[layout.heads_key]
        self.head_dim = layout.head_dim or config[layout.head_dim_key]
        self.width = self.heads * self.head_dim
        self.new_width = keep_heads * self.head_dim
        self.keep_heads = keep_heads
        self.chosen: dict[tuple[str, str], torch.Tensor] = {}
        if self.new_width == self.width:
            return
        kept_blocks = {f"{name}.{i}" for name, indices in kept.items() for i in indices}
        totals: dict[tuple[str, str], torch.Tensor] = {}
        for name, p in model.named_parameters():
            block = _block_of(layout, name)
            if block and block not in kept_blocks:
                continue
            for dim, pieces in enumerate(self._pieces(name, p)):
                if pieces is None:
                    continue
                importance = score(p).sum(dim=[d for d in range(p.dim()) if d != dim]) if p.dim() > 1 else score(p)
                for (part, _), chunk in zip(pieces, importance.split([n for _, n in pieces])):
                    key = ("" if part == RES else block, part)
                    totals[key] = totals.get(key, 0) + chunk
        for (block, part), total in totals.items():
            self.chosen[(block, part)] = self._select(part, total)
        if layout.residual is not None:
            self.chosen[("", RES)] = layout.residual(self.width, self.new_width)

    def _pieces(self, name: str, p: torch.Tensor) -> list:
        spec = self.layout.rule(name)
        if spec is None:
            raise RuntimeError(f"head pruning has no index rule for weight {name}")
        return [None if kind is None else _segments(kind, p.shape[dim], self.width, self.width)
                for dim, kind in enumerate(spec[: p.dim()])]

    def _select(self, part: str, total: torch.Tensor) -> torch.Tensor:
        if part == HEADS:
            heads = _top(total.view(self.heads, self.head_dim).sum(1), self.keep_heads)
            return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        keep = self.new_width if part == RES else len(total) * self.new_width // self.width
        return _top(total, keep)

    def of(self, name: str, value: torch.Tensor) -> list[torch.Tensor | None]:
        """Index per dim of the teacher weight `name` (None: the whole dim)."""
        if not self.chosen:
            return [None] * value.dim()
        block = _block_of(self.layout, name)
        out = []
        for pieces in self._pieces(name, value):
            if pieces is None:
                out.append(None)
                continue
            parts, offset = [], 0
            for part, length in pieces:
                parts.append(self.chosen[("" if part == RES else block, part)] + offset)
                offset += length
            out.append(torch.cat(parts))
        return out


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:keep]).values


def teacher_name(layout: BlockLayout, name: str, kept: dict[str, list[int]]) -> str:
    """The teacher weight a student weight was copied from (block indices through `kept`)."""
    for blocks in layout.lists:
        prefix = blocks.name + "."
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            return f"{prefix}{kept[blocks.name][int(index)]}.{rest}"
    return name


@torch.no_grad()
def rebuilt(model: nn.Module, layout: BlockLayout, kept: dict[str, list[int]], keep_heads: int, score,
            config_updates: dict[str, Any] | None = None) -> nn.Module:
    """The smaller stock model (`kept` blocks of each list, `keep_heads` heads in every
    block, the residual width with them) built from its config, every weight the kept
    slice of the teacher's."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config.update({b.count_key: len(kept[b.name]) for b in layout.lists})
    config[layout.heads_key] = keep_heads
    config.update(config_updates or {})
    plan = WidthPlan(model, layout, keep_heads, score, kept)
    pruned = type(model).from_config(config).to(next(model.parameters()).device)
    source = model.state_dict()
    for name, target in pruned.state_dict().items():
        origin = teacher_name(layout, name, kept)
        value = source[origin]
        for dim, index in enumerate(plan.of(origin, value)):
            if index is not None:
                value = value.index_select(dim, index.to(value.device))
        if value.shape != target.shape:
            raise RuntimeError(f"pruning {type(model).__name__}: {name} sliced to {tuple(value.shape)}, "
                               f"expected {tuple(target.shape)}")
        target.copy_(value)
    return pruned


def heads_to_keep(heads: int, ratio: float) -> int:
    """Heads left by removing `ratio` of them; none left is one clear error."""
    keep = round(heads * (1 - ratio))
    if keep < 1:
        raise UserError(f"--ratio {ratio:g} of {heads} heads leaves no head; use a ratio below "
                        f"{1 - 0.5 / heads:.3g}", exit_code=2)
    return keep
