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
every weight into it: the coupling is fixed by the architecture (adaLN's six chunks of the
residual width, q/k/v heads, the final layer's shift/scale), so an explicit index map per
weight is simpler and safer than tracing the graph.
"""

from __future__ import annotations

import math

import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from difcompress.errors import UserError
from difcompress.families.base import ModelFamily, PruneOutcome, PruneRequest

DEPTH_CRITERIA = ("uniform", "output-change")


class DiTFamily(ModelFamily):
    name = "dit"
    model_class = DiTTransformer2DModel
    component = "transformer"
    supports_depth = True

    def pipeline(self, model, scheduler, autoencoder=None):
        # A pixel-space DiT has no VAE: the folder lists vae as null and loads with
        # DiTPipeline.from_pretrained(path, vae=None).
        return DiTPipeline(transformer=model, vae=autoencoder.model if autoencoder else None, scheduler=scheduler)

    def sample_shape(self, model):
        size = model.config.sample_size
        return model.config.in_channels, size, size

    def num_classes(self, model):
        return model.config.num_embeds_ada_norm

    def null_class(self, model):
        table = model.transformer_blocks[0].norm1.emb.class_embedder
        return table.num_classes if table.embedding_table.num_embeddings > table.num_classes else None

    def disable_label_dropout(self, model):
        for module in model.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0

    def example_inputs(self, model, batch_size=1):
        inputs = super().example_inputs(model, batch_size)
        sample = inputs.pop("sample")  # DiT's forward calls it hidden_states
        labels = torch.arange(batch_size, device=sample.device) % self.num_classes(model)
        return {"hidden_states": sample, **inputs, "class_labels": labels}

    def predict_split(self, model, noisy, timesteps, class_labels=None):
        if class_labels is None:
            raise UserError("this DiT is class-conditional: its data needs class labels", exit_code=2)
        out = model(noisy, timesteps, class_labels=class_labels).sample
        c = model.config.in_channels
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
        if width % 4:
            raise UserError(f"{keep_heads} heads of {model.config.attention_head_dim} give a width of {width}, "
                            "which the 2-D position embedding cannot take (needs a multiple of 4)", exit_code=2)
        index = _WidthIndex(model, kept_blocks, keep_heads, _scorer(request))
        pruned = DiTTransformer2DModel.from_config(config).to(next(model.parameters()).device)
        _copy_slices(pruned, model, kept_blocks, index)
        if kept_blocks[0] != 0 and not _same_embedders(model, 0, kept_blocks[0]):
            warnings.append(f"block 0 was removed: the final layer now reads block {kept_blocks[0]}'s "
                            "conditioning embedding, which differs from block 0's (distillation adapts it)")
        details = {"kept_blocks": kept_blocks, "depth_criterion": request.depth_criterion if request.blocks is None
                   else "indices", "heads_kept": keep_heads, "heads": heads, "blocks": layers}
        if block_scores is not None:
            details["block_scores"] = block_scores
        return PruneOutcome(model=pruned, details=details, warnings=warnings)

    def _choose_blocks(self, model, request) -> tuple[list[int], list[float] | None]:
        layers = model.config.num_layers
        if request.blocks is not None:
            blocks = sorted(set(request.blocks))
            if not blocks or blocks[0] < 0 or blocks[-1] >= layers:
                raise UserError(f"--blocks must name blocks between 0 and {layers - 1}", exit_code=2)
            return blocks, None
        keep = layers if request.depth is None else request.depth
        if not 1 <= keep <= layers:
            raise UserError(f"--depth must lie between 1 and {layers} (the model has {layers} blocks)", exit_code=2)
        if request.depth_criterion == "uniform" or keep == layers:
            return uniform_blocks(layers, keep), None
        scores = block_removal_scores(self, model, request.calibration, request.seed)
        ranked = sorted(range(layers), key=lambda i: -scores[i])
        return sorted(ranked[:keep]), scores

    def stage_widths(self, model):
        block = model.transformer_blocks[0]
        return {
            "blocks": len(model.transformer_blocks),
            "heads x dim": f"{block.attn1.heads}x{block.attn1.inner_dim // block.attn1.heads}",
            "residual width": model.pos_embed.proj.out_channels,
            "feed-forward width": block.ff.net[0].proj.out_features,
        }

    # ---- distillation ----------------------------------------------------------------------
    def feature_layer_pairs(self, student, teacher, pruning):
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
    if request.blocks is not None and request.depth is not None:
        raise UserError("give either --depth or --blocks, not both", exit_code=2)
    if request.depth_criterion not in DEPTH_CRITERIA:
        raise UserError(f"unknown --depth-criterion '{request.depth_criterion}'; choose one of "
                        f"{', '.join(DEPTH_CRITERIA)}", exit_code=2)


def uniform_blocks(layers: int, keep: int) -> list[int]:
    """The last block of each of `keep` equal segments: for 28 -> 14, blocks 1, 3, ..., 27."""
    return [math.floor((i + 1) * layers / keep) - 1 for i in range(keep)]


@torch.no_grad()
def block_removal_scores(family, model, calibration, seed: int) -> list[float]:
    """How much the noise prediction changes when each block is skipped (MSE), on a batch
    noised at random timesteps. Blocks whose removal changes the output least go first."""
    if calibration is None:
        raise UserError("--depth-criterion output-change needs a data batch (--data, or the teacher's samples)")
    x0, labels, scheduler = calibration
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x0 = x0.to(device)
    labels = labels.to(device) if labels is not None else None
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
    noisy = scheduler.add_noise(x0, noise, t)
    full = family.predict(model, noisy, t, labels)
    scores = []
    for block in model.transformer_blocks:
        handle = block.register_forward_hook(lambda _m, args, _out: args[0])  # the block becomes identity
        try:
            scores.append(float(torch.mean((family.predict(model, noisy, t, labels) - full) ** 2)))
        finally:
            handle.remove()
    return scores


def _scorer(request: PruneRequest):
    """Per-element importance of a weight: magnitude p^2, Taylor |p * grad|, or random."""
    gen = torch.Generator().manual_seed(request.seed)
    if request.importance == "random":
        return lambda p: torch.rand(p.shape, generator=gen)
    if request.importance == "magnitude":
        return lambda p: p.detach().float().cpu() ** 2

    def taylor(p):
        if p.grad is None:
            raise UserError(f"--importance {request.importance} needs gradients; none were accumulated")
        return (p.detach() * p.grad).abs().float().cpu()

    return taylor


def residual_channels(width: int, new_width: int) -> torch.Tensor:
    """Residual channels whose sin-cos position frequencies match a stock model of new_width."""
    quarter, new_quarter = width // 4, new_width // 4
    stride = quarter / new_quarter
    kept = [min(quarter - 1, round(j * stride)) for j in range(new_quarter)]
    return torch.tensor([q * quarter + k for q in range(4) for k in kept])


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:keep]).values


class _WidthIndex:
    """Which slice of every teacher weight the pruned model keeps, per weight and dim."""

    def __init__(self, model, kept_blocks, keep_heads, score):
        width = model.pos_embed.proj.out_channels
        head_dim = model.config.attention_head_dim
        new_width = keep_heads * head_dim
        self.res = residual_channels(width, new_width) if new_width < width else None
        self.width = width
        self.heads, self.ff, self.emb = {}, {}, {}
        if self.res is None:
            return
        for b in kept_blocks:
            blk = model.transformer_blocks[b]
            attn = blk.attn1
            per_head = sum(score(getattr(attn, n).weight).sum(1) + score(getattr(attn, n).bias)
                           for n in ("to_q", "to_k", "to_v")) + score(attn.to_out[0].weight).sum(0)
            heads = _top(per_head.view(-1, head_dim).sum(1), keep_heads)
            self.heads[b] = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            ff_in, ff_out = blk.ff.net[0].proj, blk.ff.net[2]
            ff_scores = score(ff_in.weight).sum(1) + score(ff_in.bias) + score(ff_out.weight).sum(0)
            self.ff[b] = _top(ff_scores, ff_in.out_features * new_width // width)
            emb = blk.norm1.emb
            emb_scores = (score(emb.timestep_embedder.linear_1.weight).sum(1) + score(emb.timestep_embedder.linear_2.weight).sum(0)
                          + score(emb.timestep_embedder.linear_2.weight).sum(1) + score(emb.class_embedder.embedding_table.weight).sum(0)
                          + score(blk.norm1.linear.weight).sum(0))
            self.emb[b] = _top(emb_scores, new_width)

    def chunks(self, n: int) -> torch.Tensor:
        """The residual selection repeated over n chunks of the residual width (adaLN's 6, final 2)."""
        return torch.cat([self.res + k * self.width for k in range(n)])

    def of(self, name: str, first_block: int) -> list[torch.Tensor | None]:
        """Index per dim for the teacher weight `name` (None: keep the whole dim)."""
        if self.res is None:
            return [None, None, None, None]
        if name.startswith("pos_embed.proj."):
            return [self.res, None, None, None]
        if name.startswith("proj_out_1."):
            return [self.chunks(2), self.emb[first_block]]
        if name.startswith("proj_out_2."):
            return [None, self.res]
        b = int(name.split(".")[1])
        local = name.split(".", 2)[2]
        if local.startswith("norm1.emb.timestep_embedder.linear_1."):
            return [self.emb[b], None]
        if local.startswith("norm1.emb.timestep_embedder.linear_2."):
            return [self.emb[b], self.emb[b]]
        if local.startswith("norm1.emb.class_embedder."):
            return [None, self.emb[b]]
        if local.startswith("norm1.linear."):
            return [self.chunks(6), self.emb[b]]
        if local.startswith(("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")):
            return [self.heads[b], self.res]
        if local.startswith("attn1.to_out.0."):
            return [self.res, self.heads[b]]
        if local.startswith("ff.net.0.proj."):
            return [self.ff[b], self.res]
        if local.startswith("ff.net.2."):
            return [self.res, self.ff[b]]
        raise RuntimeError(f"DiT pruning has no index map for weight {name}")


@torch.no_grad()
def _copy_slices(pruned: nn.Module, teacher: nn.Module, kept_blocks: list[int], index: _WidthIndex) -> None:
    source = teacher.state_dict()
    for name, target in pruned.state_dict().items():
        teacher_name = name
        if name.startswith("transformer_blocks."):
            _, i, rest = name.split(".", 2)
            teacher_name = f"transformer_blocks.{kept_blocks[int(i)]}.{rest}"
        value = source[teacher_name]
        for dim, idx in enumerate(index.of(teacher_name, kept_blocks[0])[: value.dim()]):
            if idx is not None:
                value = value.index_select(dim, idx.to(value.device))
        if value.shape != target.shape:
            raise RuntimeError(f"DiT pruning: {name} sliced to {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value)


def _same_embedders(model, a: int, b: int) -> bool:
    ea, eb = model.transformer_blocks[a].norm1.emb, model.transformer_blocks[b].norm1.emb
    return all(torch.equal(p, q) for p, q in zip(ea.parameters(), eb.parameters()))
