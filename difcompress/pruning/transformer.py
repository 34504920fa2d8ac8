"""Width pruning for DiT (whole heads, the residual width with them); its blocks are chosen
by the block-list engine (blocklists.py).

The coupling is fixed by the architecture (adaLN-Zero's six chunks of the residual width,
q/k/v heads, the final layer's shift/scale, each block's private conditioning embedder),
so an explicit index map per weight (:class:`WidthIndex`) is simpler and safer than
tracing the graph. The pruned model is the smaller stock model built from its config,
with the kept slices of every teacher weight copied in (:func:`copy_slices`).
"""

from __future__ import annotations

import torch
from torch import nn

from difcompress.core.errors import UserError


def element_scorer(importance: str, seed: int):
    """Per-element importance of a weight: magnitude p^2, Taylor |p * grad|, or random."""
    gen = torch.Generator().manual_seed(seed)
    if importance == "random":
        return lambda p: torch.rand(p.shape, generator=gen)
    if importance == "magnitude":
        return lambda p: p.detach().float().cpu() ** 2

    def taylor(p):
        if p.grad is None:
            raise UserError(f"--importance {importance} needs gradients; none were accumulated")
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


class WidthIndex:
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
def copy_slices(pruned: nn.Module, teacher: nn.Module, kept_blocks: list[int], index: WidthIndex) -> None:
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


def same_embedders(model, a: int, b: int) -> bool:
    ea, eb = model.transformer_blocks[a].norm1.emb, model.transformer_blocks[b].norm1.emb
    return all(torch.equal(p, q) for p, q in zip(ea.parameters(), eb.parameters()))
