"""What the text-to-image transformer families made of block lists share (Flux, SD3, Z-Image):
pruning through the block-list engine (pruning/blocklists.py) and block-to-block feature
pairs. A family says which lists its model has and how each weight's dims follow the
heads and the residual width (`layout`), what else the smaller stock config must change
(`config_updates`), and which outputs of a block are streams feature KD compares
(`streams`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from difcompress.core.errors import UserError
from difcompress.families.base import ModelFamily, PruneOutcome, PruneRequest
from difcompress.pruning.blocklists import (
    BlockLayout,
    DepthRequest,
    choose_blocks,
    heads_to_keep,
    rebuilt,
    uniform_blocks,
)
from difcompress.pruning.transformer import element_scorer

FEATURE_HOOKS = ("stages", "blocks", "depth")
ATTACHED = ("native_latent_size", "native_text_tokens")  # what `attach` records on a transformer


class BlockListFamily(ModelFamily):
    component = "transformer"
    needs_pipeline = True
    pipeline_tag = "text-to-image"
    supports_depth = True
    takes_text = True
    denoiser_kind = "transformer"
    pruned_unit = "head"

    def layout(self, model: nn.Module) -> BlockLayout:
        raise NotImplementedError

    def config_updates(self, model: nn.Module, kept: dict[str, list[int]], keep_heads: int) -> dict[str, Any]:
        """Config keys besides the block counts and the head count that the smaller model changes."""
        return {}

    def streams(self, block: nn.Module) -> tuple[str, ...]:
        """The tap suffixes of a block's outputs feature KD compares (training/feature_taps.py)."""
        return ("",)

    def learns_variance(self, model):
        return False

    # ---- pruning ---------------------------------------------------------------------------
    def depth_request(self, layout: BlockLayout, request: PruneRequest) -> DepthRequest:
        """--depth / --blocks (and --single-depth / --single-blocks) for the lists that take them."""
        asked = {"--depth": request.depth, "--blocks": request.blocks, "--single-depth": request.single_depth,
                 "--single-blocks": request.single_blocks}
        offered = {option for b in layout.lists for option in (b.depth_option, b.blocks_option)}
        for option, value in asked.items():
            if value is not None and option not in offered:
                raise UserError(f"{option}: a {self.model_class.__name__} has no such block list "
                                f"(it takes {', '.join(sorted(o for o in offered if o))})", exit_code=2)
        return DepthRequest({b.name: asked.get(b.depth_option) for b in layout.lists},
                            {b.name: asked.get(b.blocks_option) for b in layout.lists}, request.depth_criterion)

    def prune(self, model, request: PruneRequest) -> PruneOutcome:
        if request.global_pruning:
            raise UserError(f"{self.model_class.__name__} pruning is uniform (every block keeps the same heads, so the stock config "
                            "expresses it); drop --global", exit_code=2)
        layout = self.layout(model)
        kept, scores = choose_blocks(self, model, layout, self.depth_request(layout, request), request.calibration,
                                     request.seed)
        heads = model.config[layout.heads_key]
        keep_heads = heads_to_keep(heads, request.ratio)
        warnings = []
        if request.ratio > 0 and keep_heads == heads:
            warnings.append(f"--ratio {request.ratio} of {heads} heads rounds to removing none; widths are unchanged")
        pruned = rebuilt(model, layout, kept, keep_heads, element_scorer(request.importance, request.seed),
                         self.config_updates(model, kept, keep_heads))
        self.carry(model, pruned)
        given = request.blocks is not None or request.single_blocks is not None
        details = {"kept_blocks": kept, "blocks": {b.name: len(getattr(model, b.name)) for b in layout.lists},
                   "depth_criterion": "indices" if given else request.depth_criterion,
                   "heads_kept": keep_heads, "heads": heads}
        if scores is not None:
            details["block_scores"] = scores
        return PruneOutcome(model=pruned, details=details, warnings=warnings)

    def attach(self, model, autoencoder, text=None) -> None:
        """Record what the transformer's config does not fix: the pipeline's native latent size
        (its VAE's sample_size) and the text side's window."""
        if autoencoder is not None and autoencoder.model.config.get("sample_size"):
            model.native_latent_size = int(autoencoder.model.config.sample_size) // autoencoder.downscale
        if text is not None:
            model.native_text_tokens = text.max_length

    def carry(self, model: nn.Module, pruned: nn.Module) -> None:
        """Copy what `attach` recorded on the teacher onto the pruned model."""
        for name in ATTACHED:
            if hasattr(model, name):
                setattr(pruned, name, getattr(model, name))

    # ---- distillation ----------------------------------------------------------------------
    def shard_blocks(self, model):
        """Every block of every list (Flux: double- and single-stream)."""
        return [f"{blocks.name}.{i}" for blocks in self.layout(model).lists
                for i in range(len(getattr(model, blocks.name)))]

    def feature_layer_pairs(self, student, teacher, pruning, hooks="stages"):
        """Every student block's streams with its teacher block's: the block it was copied from
        (the pruning record; stages, blocks) or by depth (depth: student block i <-> teacher
        block round(i L / K), Flux-Mini's x -> 4x). Lists never depth-pruned are not paired."""
        if hooks not in FEATURE_HOOKS:
            raise UserError(f"--feature-hooks {hooks}: a {self.name} transformer takes {', '.join(FEATURE_HOOKS)}",
                            exit_code=2)
        record = (pruning or {}).get("kept_blocks")
        pairs = []
        for blocks in self.layout(teacher).lists:
            if not blocks.depth_option:
                continue
            k, layers = len(getattr(student, blocks.name)), len(getattr(teacher, blocks.name))
            kept = record.get(blocks.name) if isinstance(record, dict) else None
            if hooks == "depth":
                kept = [min(layers - 1, round(i * layers / k)) for i in range(k)]
            elif kept is None or len(kept) != k or kept[-1] >= layers:
                kept = uniform_blocks(layers, k) if k else []
            for i, t in enumerate(kept):
                block = getattr(student, blocks.name)[i]
                pairs += [(f"{blocks.name}.{i}{s}", f"{blocks.name}.{t}{s}") for s in self.streams(block)]
        return pairs
