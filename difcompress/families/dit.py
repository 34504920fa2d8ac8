"""Diffusion Transformer (`DiTTransformer2DModel`, the facebook/DiT-XL-2-256 layout).

Quirks handled here:
- Class-conditional: every block's adaLN-Zero has its own timestep + label embedder, and
  the final layer reuses block 0's. The label table has one extra row, the "null" class
  classifier-free guidance uses (id = num_classes).
- Learned variance: with out_channels = 2 * in_channels the output is (eps, variance);
  KD compares the epsilon channels, the variance channels get a plain MSE.
- Depth pruning keeps K of the L blocks (`num_layers` in the stock config).
- Width pruning removes whole attention heads. The stock config ties the residual width to
  heads x head_dim and the feed-forward width to 4x that, so all three shrink together and
  the pruned model stays a stock `DiTTransformer2DModel` (no JSON record needed).
- The 2-D sin-cos position embedding is not stored: diffusers recomputes it from the
  width. Its four quarters hold frequencies 10000^(-k / (D/4)); keeping channels
  k = round(j * D / D') of each quarter gives exactly the frequencies the smaller stock
  model computes when D / D' is an integer (nearest ones otherwise), so the residual
  channels are chosen by that stride, not by importance. Heads, feed-forward units and the
  conditioning-embedding channels (private to each block) are chosen by importance.

Pruning builds the smaller stock model from its config and copies the kept slices of
every weight into it (the engine is difcompress/pruning/transformer.py).
"""

from __future__ import annotations

import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from difcompress.core.errors import UserError
from difcompress.families.base import ModelFamily, PruneOutcome, PruneRequest
from difcompress.pruning.blocklists import (
    BlockLayout,
    BlockList,
    DepthRequest,
    choose_blocks,
    uniform_blocks,
)
from difcompress.pruning.transformer import (
    WidthIndex,
    copy_slices,
    element_scorer,
    same_embedders,
)

LAYOUT = BlockLayout((BlockList("transformer_blocks", "num_layers"),))


class DiTFamily(ModelFamily):
    name = "dit"
    model_class = DiTTransformer2DModel
    component = "transformer"
    pipelines = ("DiTPipeline",)
    supports_depth = True
    denoiser_kind = "transformer"
    default_guidance = 1.5  # DiT's FID setting (Peebles & Xie 2023, Table 4: DiT-XL/2 FID 2.27 at cfg 1.50)
    pruned_unit = "head"

    def pipeline(self, model, scheduler, autoencoder=None, text=None):
        # A pixel-space DiT has no VAE: the folder lists vae as null and loads with
        # DiTPipeline.from_pretrained(path, vae=None).
        return DiTPipeline(transformer=model, vae=autoencoder.model if autoencoder else None, scheduler=scheduler)

    def card_usage(self, where, load_args, imports, info):
        if info["autoencoder"] is None:
            return ["A pixel-space DiT: the folder has no VAE, so load it with `vae=None` and sample with",
                    f"`difcompress eval {where}` (DiTPipeline's own sampling loop decodes through a VAE).", "",
                    "```python", *imports, "from diffusers import DiTPipeline",
                    f"pipe = DiTPipeline.from_pretrained({load_args}, vae=None)", "```"]
        guidance = "4.0" if info["num_classes"] == 1000 else "1.0"  # DiTPipeline's null class id is 1000
        return ["```python", *imports, "from diffusers import DiTPipeline",
                f"pipe = DiTPipeline.from_pretrained({load_args})",
                f"images = pipe(class_labels=[0, 1, 2, 3], guidance_scale={guidance}).images", "```"]

    def sample_shape(self, model):
        size = model.config.sample_size
        return model.config.in_channels, size, size

    def num_classes(self, model):
        return model.config.num_embeds_ada_norm

    def null_class(self, model):
        table = model.transformer_blocks[0].norm1.emb.class_embedder
        return table.num_classes if table.embedding_table.num_embeddings > table.num_classes else None

    def conditions(self, model, *, labels=None, text=None, geometry=None, guidance=None):
        return None if labels is None else {"class_labels": labels}

    def null_conditions(self, model, *, text=None):
        null = self.null_class(model)
        return None if null is None else {"class_labels": torch.tensor([null])}

    def dropout_option(self, model):
        return "class_dropout"

    def disable_label_dropout(self, model):
        for module in model.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0

    def example_inputs(self, model, batch_size=1):
        inputs = super().example_inputs(model, batch_size)
        sample = inputs.pop("sample")  # DiT's forward calls it hidden_states
        labels = torch.arange(batch_size, device=sample.device) % self.num_classes(model)
        return {"hidden_states": sample, **inputs, "class_labels": labels}

    def forward(self, model, inputs):
        if "class_labels" not in inputs.cond:
            raise UserError("this DiT is class-conditional: its data needs class labels", exit_code=2)
        out = model(inputs.sample, inputs.timestep, class_labels=inputs.cond["class_labels"]).sample
        c = inputs.sample.shape[1]  # not model.config: DDP and DeepSpeed wrappers have none
        return out[:, :c], (out[:, c:] if out.shape[1] > c else None)

    # ---- pruning ---------------------------------------------------------------------------
    def prune(self, model, request: PruneRequest) -> PruneOutcome:
        if request.global_pruning:
            raise UserError("DiT pruning is uniform (every block keeps the same heads, so the stock config "
                            "expresses it); drop --global", exit_code=2)
        _check_prunable(model, request)
        layers = model.config.num_layers
        kept_blocks, block_scores = self._choose_blocks(model, request)
        heads = model.config.num_attention_heads
        keep_heads = max(1, round(heads * (1 - request.ratio)))
        warnings = []
        if request.ratio > 0 and keep_heads == heads:
            warnings.append(f"--ratio {request.ratio} of {heads} heads rounds to removing none; widths are unchanged")
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        config.update(num_layers=len(kept_blocks), num_attention_heads=keep_heads)
        width = keep_heads * model.config.attention_head_dim
        if width % 4 or width % request.round_to:
            raise UserError(f"{keep_heads} heads of {model.config.attention_head_dim} give a width of {width}, which "
                            f"is not a multiple of {4 if width % 4 else request.round_to} (the 2-D position embedding "
                            "needs 4; --round-to asks for the other)", exit_code=2)
        index = WidthIndex(model, kept_blocks, keep_heads, element_scorer(request.importance, request.seed))
        pruned = DiTTransformer2DModel.from_config(config).to(next(model.parameters()).device)
        copy_slices(pruned, model, kept_blocks, index)
        if kept_blocks[0] != 0 and not same_embedders(model, 0, kept_blocks[0]):
            warnings.append(f"block 0 was removed: the final layer now reads block {kept_blocks[0]}'s "
                            "conditioning embedding, which differs from block 0's (distillation adapts it)")
        details = {"kept_blocks": kept_blocks, "depth_criterion": request.depth_criterion if request.blocks is None
                   else "indices", "heads_kept": keep_heads, "heads": heads, "blocks": layers}
        if block_scores is not None:
            details["block_scores"] = block_scores
        return PruneOutcome(model=pruned, details=details, warnings=warnings)

    def _choose_blocks(self, model, request) -> tuple[list[int], list[float] | None]:
        """The block-list engine's choice for DiT's one list (the same checks as Flux's)."""
        name = LAYOUT.lists[0].name
        kept, scores = choose_blocks(self, model, LAYOUT, DepthRequest({name: request.depth}, {name: request.blocks},
                                                                       request.depth_criterion),
                                     request.calibration, request.seed)
        return kept[name], None if scores is None else scores[name]

    def stage_widths(self, model):
        block = model.transformer_blocks[0]
        return {
            "blocks": len(model.transformer_blocks),
            "heads x dim": f"{block.attn1.heads}x{block.attn1.inner_dim // block.attn1.heads}",
            "residual width": model.pos_embed.proj.out_channels,
            "feed-forward width": block.ff.net[0].proj.out_features,
        }

    # ---- distillation ----------------------------------------------------------------------
    def shard_blocks(self, model):
        """Every transformer block but the first: DiT's output layer reads the first block's
        adaLN embedding (`transformer_blocks[0].norm1.emb`) outside that block's forward, so
        it stays in the root unit, gathered for the whole forward."""
        return [f"transformer_blocks.{i}" for i in range(1, len(model.transformer_blocks))]

    def feature_layer_pairs(self, student, teacher, pruning, hooks="stages"):
        """Student block i <-> the teacher block it was copied from (recorded at pruning);
        without a record, the last teacher block of the i-th of K equal segments, which for
        halving depth is TinyFusion's map i <-> 2i+1."""
        k, layers = len(student.transformer_blocks), len(teacher.transformer_blocks)
        kept = (pruning or {}).get("kept_blocks") or uniform_blocks(layers, k)
        if len(kept) != k or kept[-1] >= layers:
            kept = uniform_blocks(layers, k)
        return [(f"transformer_blocks.{i}", f"transformer_blocks.{t}") for i, t in enumerate(kept)]


def _check_prunable(model, request: PruneRequest) -> None:
    """The index maps cover the DiT-XL layout; refuse variants they would mis-slice."""
    config = model.config
    if config.norm_type != "ada_norm_zero" or config.norm_elementwise_affine:
        raise UserError("difcompress prunes DiTs with adaLN-Zero and affine-free LayerNorms (the DiT-XL/2 layout); "
                        f"this one has norm_type={config.norm_type}, norm_elementwise_affine={config.norm_elementwise_affine}")
    if config.activation_fn not in ("gelu", "gelu-approximate"):
        raise UserError(f"difcompress prunes DiT feed-forwards with gelu / gelu-approximate, not {config.activation_fn}")
    if request.single_depth is not None or request.single_blocks is not None:
        raise UserError("--single-depth / --single-blocks: a DiT has one block list; use --depth / --blocks",
                        exit_code=2)
