"""Pixel-space U-Net (`UNet2DModel`, e.g. the google/ddpm-cifar10-32 layout).

Quirks handled here:
- conv_in keeps its image input and conv_out its image output (never pruned).
- GroupNorm: channels are removed a whole group at a time and the group count shrinks,
  so channels per group stay as trained (torch-pruning alone keeps 32 groups and cannot
  shrink a 128-channel layer below 32 channels).
- Attention: with one head (attention_head_dim=None) head dims shrink; with several,
  whole heads go. heads / inner_dim / scale are rewritten to match.
- The sinusoidal timestep embedding has `block_out_channels[0]` features in the stock
  config. To stay expressible there, uniform pruning keeps an evenly strided subset of the
  frequencies and rewrites `freq_shift` so the stock formula yields exactly that subset.
"""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers import DDPMPipeline, LDMPipeline, UNet2DModel
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
)
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from difcompress.core.errors import UserError
from difcompress.families.channel_pruned import GraphPrunedFamily
from difcompress.pruning.graph import ChannelUnit


def attention_modules(model: nn.Module) -> list[tuple[str, Attention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def set_attention_processor(model: nn.Module, processor_cls) -> None:
    for _, attn in attention_modules(model):
        attn.set_processor(processor_cls())


def subset_frequencies(old_half: int, new_half: int, old_shift: float) -> tuple[int, float]:
    """(stride, frequency shift) with which `new_half` of a sinusoidal embedding's
    `old_half` frequencies (every stride-th) are what the stock formula computes at the new
    width: exponent j / (new_half - shift) equals (stride * j) / (old_half - old_shift)."""
    if new_half < 2:
        return 1, 0.0
    stride = (old_half - 1) // (new_half - 1)
    return stride, new_half - (old_half - old_shift) / stride


class PixelUNetFamily(GraphPrunedFamily):
    """Unconditional `UNet2DModel`: pixel space (DDPMPipeline) or over an autoencoder's
    latents (LDMPipeline, e.g. CompVis/ldm-celebahq-256, which keeps it as `vqvae`)."""

    name = "unet2d"
    model_class = UNet2DModel
    component = "unet"
    pipelines = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "LDMPipeline")
    keeps_head_count = False  # several heads lose whole heads; a single head shrinks its dim

    def pipeline(self, model, scheduler, autoencoder=None, text=None):
        if autoencoder is None:
            return DDPMPipeline(unet=model, scheduler=scheduler)
        return LDMPipeline(vqvae=autoencoder.model, unet=model, scheduler=scheduler)

    def size_multiple(self, model):
        return 2 ** (len(model.config.block_out_channels) - 1)

    def card_usage(self, where, load_args, imports, info):
        pipeline = "LDMPipeline" if info["autoencoder"] else "DDPMPipeline"
        return ["```python", *imports, f"from diffusers import {pipeline}",
                f"pipe = {pipeline}.from_pretrained({load_args})", "images = pipe(batch_size=4).images", "```"]

    def sample_shape(self, model):
        size = model.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return model.config.in_channels, h, w

    def forward(self, model, inputs):
        out = model(inputs.sample, inputs.timestep).sample
        # Learned-variance U-Nets predict (eps, var): KD compares the epsilon channels.
        c = inputs.sample.shape[1]  # not model.config: DDP and DeepSpeed wrappers have none
        return out[:, :c], (out[:, c:] if out.shape[1] > c else None)

    def never_prune(self, model):
        return [model.conv_out]

    def tracing_context(self, model):
        # torch-pruning traces autograd; the classic processor's bmm/softmax graph is one it
        # understands, and both processors share the same weights.
        @contextlib.contextmanager
        def classic():
            previous = {n: a.processor for n, a in attention_modules(model)}
            set_attention_processor(model, AttnProcessor)
            try:
                yield
            finally:
                for n, a in attention_modules(model):
                    a.set_processor(previous[n])

        return classic()

    def channel_unit(self, group, num_channels, names, before):
        for dep, _ in group:
            module = dep.target.module
            if isinstance(module, nn.GroupNorm) and module.num_channels == num_channels:
                return ChannelUnit(size=module.num_channels // module.num_groups)
        for dep, _ in group:
            unit = before["linear_units"].get(names.get(dep.target.module))
            if unit and dep.target.module.out_features == num_channels:
                return unit
        return ChannelUnit()

    def record_structure(self, model):
        attentions = attention_modules(model)
        return {
            "channels_per_group": {
                n: m.num_channels // m.num_groups for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)
            },
            "head_dim": {n: (a.inner_dim // a.heads, a.heads) for n, a in attentions},
            "linear_units": self.linear_units(model),
            "time_proj": {
                "num_channels": model.time_proj.num_channels,
                "downscale_freq_shift": model.time_proj.downscale_freq_shift,
            }
            if isinstance(model.time_proj, Timesteps)
            else None,
        }

    def linear_units(self, model) -> dict[str, ChannelUnit]:
        """q/k/v of multi-head attention lose whole heads: their unit is the head dim."""
        return {f"{n}.{proj}": ChannelUnit(size=a.inner_dim // a.heads) for n, a in attention_modules(model)
                if a.heads > 1 for proj in ("to_q", "to_k", "to_v")}

    def whole_heads(self, model, kept_widths: list[int]) -> bool:
        """Whether pruned block widths still split into the config's attention heads."""
        head_dim = model.config.attention_head_dim
        return not head_dim or all(w % head_dim == 0 for w in kept_widths)

    def widths_expressible(self, model, kept_widths: list[int]) -> bool:
        """Whether the stock config can express these block widths (whole heads here)."""
        return self.whole_heads(model, kept_widths)

    def uniform_groups(self, model, ratio, round_to=1):
        """Groups to keep: the count nearest to (1 - ratio) of them whose widths stay whole
        heads (several heads) and multiples of `round_to` (the time embedding's too)."""
        groups = model.config.norm_num_groups
        widths = [*model.config.block_out_channels, model.time_embedding.linear_1.out_features]

        def ok(k):
            kept = [c * k // groups for c in widths]
            return all(w % round_to == 0 for w in kept) and self.widths_expressible(model, kept[:-1])

        candidates = sorted(range(1, groups + 1), key=lambda k: (abs(k - groups * (1 - ratio)), k))
        keep = next((k for k in candidates if ok(k)), None)
        if keep is None:
            raise UserError(f"no uniform width is a multiple of --round-to {round_to} (and whole heads) for this "
                            f"model's {groups} GroupNorm groups of widths {widths}", exit_code=2)
        return keep, keep / groups

    def sync_attributes(self, model, before, uniform_groups):
        for name, gn in model.named_modules():
            if isinstance(gn, nn.GroupNorm):
                if uniform_groups is not None:
                    gn.num_groups = uniform_groups
                else:
                    gn.num_groups = _group_count(gn.num_channels, before["channels_per_group"][name])
        for name, attn in attention_modules(model):
            head_dim, heads = before["head_dim"][name]
            inner = attn.to_q.out_features
            if heads == 1 or self.keeps_head_count:
                head_dim = inner // heads
            attn.heads = attn.sliceable_head_dim = inner // head_dim
            attn.inner_dim = attn.inner_kv_dim = inner
            attn.query_dim = attn.to_q.in_features
            attn.out_dim = attn.to_out[0].out_features
            attn.out_context_dim = attn.out_dim
            if not attn.is_cross_attention:
                attn.cross_attention_dim = attn.query_dim
            if attn.scale_qk:
                attn.scale = head_dim**-0.5
        for module in model.modules():
            if isinstance(module, ResnetBlock2D):
                module.in_channels = module.conv1.in_channels
                module.out_channels = module.conv2.out_channels
        self._sync_resamplers(model)

    def _sync_resamplers(self, model):
        # Up/Downsample2D assert their input width; read it off a forward pass (they may have no conv).
        hooks = []
        for module in model.modules():
            if isinstance(module, (Upsample2D, Downsample2D)):
                def pre(mod, args, kwargs):
                    x = args[0] if args else kwargs["hidden_states"]
                    mod.channels = x.shape[1]
                    conv = getattr(mod, "conv", None)
                    mod.out_channels = conv.out_channels if isinstance(conv, nn.Conv2d) else x.shape[1]

                hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                model(**self.example_inputs(model))
        finally:
            for h in hooks:
                h.remove()

    def time_embedding_subset(self, model, before):
        """Columns of the sinusoidal embedding to keep so the stock formula reproduces them.

        Sets time_proj to the new width and frequency shift; returns linear_1 and the
        columns of the old embedding it must keep (None when nothing needs to change).
        """
        info = before["time_proj"]
        new_channels = model.conv_in.out_channels
        if info is None or info["num_channels"] == new_channels:
            return None
        old_half, new_half = info["num_channels"] // 2, new_channels // 2
        stride, shift = subset_frequencies(old_half, new_half, info["downscale_freq_shift"])
        kept = [j * stride for j in range(new_half)]
        # Both halves (sin|cos, or cos|sin when flipped) keep the same frequencies in order.
        columns = kept + [old_half + i for i in kept]
        model.time_proj.num_channels = new_channels
        model.time_proj.downscale_freq_shift = shift
        return model.time_embedding.linear_1, columns

    def pruned_config(self, model):
        config = dict(model.config)
        blocks = model.down_blocks
        widths = [blk.resnets[-1].conv2.out_channels for blk in blocks]
        groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
        if len(groups) != 1:
            raise ValueError(f"GroupNorm group counts differ across layers ({sorted(groups)})")
        config.update(
            block_out_channels=widths,
            norm_num_groups=groups.pop(),
            time_embedding_dim=model.time_embedding.linear_1.out_features,
        )
        if isinstance(model.time_proj, Timesteps):
            config["freq_shift"] = model.time_proj.downscale_freq_shift
        if config.get("attn_norm_num_groups"):
            config["attn_norm_num_groups"] = config["norm_num_groups"]
        return {k: v for k, v in config.items() if not k.startswith("_")}

    def check_pruned(self, model):
        if not both_attention_processors_agree(model, self.example_inputs(model, 2)):
            raise RuntimeError("pruned attention attributes disagree between AttnProcessor and AttnProcessor2_0")

    def stage_widths(self, model):
        widths = {"conv_in": model.conv_in.out_channels, "time_embedding": model.time_embedding.linear_1.out_features}
        for i, blk in enumerate(model.down_blocks):
            widths[f"down_blocks.{i}"] = blk.resnets[-1].conv2.out_channels
        if model.mid_block is not None:
            widths["mid_block"] = model.mid_block.resnets[-1].conv2.out_channels
        for i, blk in enumerate(model.up_blocks):
            widths[f"up_blocks.{i}"] = blk.resnets[-1].conv2.out_channels
        for name, attn in attention_modules(model):
            widths[f"{name} (heads x dim)"] = f"{attn.heads}x{attn.inner_dim // attn.heads}"
        return widths

    def feature_layer_pairs(self, student, teacher, pruning, hooks="stages"):
        """stages: the output of each down block, the mid block and each up block (BK-SDM
        style). blocks: every resnet, attention and resampling conv of those blocks, in
        forward order (the LIFT/PLACE authors' DDPM FitNet rule: 34 modules on the
        ddpm-cifar10-32 layout). Pruning keeps module names, so student and teacher pair by name."""
        if hooks == "self-attention":
            raise UserError("--feature-hooks self-attention (KOALA's) applies to SDXL U-Nets; use stages or blocks",
                            exit_code=2)
        if hooks == "blocks":
            names = [n for block in _blocks(student) for n in _block_modules(student, block)]
        else:
            names = _blocks(student)
        return [(n, n) for n in names]

    def shard_blocks(self, model):
        """Every resnet and attention of the down, mid and up blocks: units of one to a few
        million weights in SD's U-Net (a whole up block is up to ~350M), so a rank's peak
        holds one of them gathered, not a whole stage."""
        return [n for block in _blocks(model) for n in _block_modules(model, block)
                if ".resnets." in n or ".attentions." in n]


def _blocks(model) -> list[str]:
    names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    if model.mid_block is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]


def _block_modules(model, block_name: str) -> list[str]:
    """A block's resnets and attentions in forward order, then its resampling conv."""
    block = model.get_submodule(block_name)
    attentions = getattr(block, "attentions", None) or []
    if block_name == "mid_block":  # resnet, (attention, resnet) ...
        names = [f"{block_name}.resnets.0"]
        for j in range(1, len(block.resnets)):
            names += [f"{block_name}.attentions.{j - 1}"] if j - 1 < len(attentions) else []
            names.append(f"{block_name}.resnets.{j}")
        return names
    names = []
    for j in range(len(block.resnets)):
        names.append(f"{block_name}.resnets.{j}")
        if j < len(attentions):
            names.append(f"{block_name}.attentions.{j}")
    for kind in ("downsamplers", "upsamplers"):
        resamplers = getattr(block, kind, None)
        if resamplers:
            names.append(f"{block_name}.{kind}.0" + (".conv" if getattr(resamplers[0], "conv", None) is not None
                                                     else ""))
    return names


def _group_count(num_channels: int, channels_per_group: int) -> int:
    """Groups for a pruned GroupNorm: keep the trained group size where it divides."""
    target = max(1, round(num_channels / channels_per_group))
    divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def both_attention_processors_agree(model, inputs, atol=1e-4) -> bool:
    """Forward once with each attention processor; pruned attributes must serve both."""
    outs = []
    for proc in (AttnProcessor, AttnProcessor2_0):
        set_attention_processor(model, proc)
        with torch.no_grad():
            outs.append(model(**inputs).sample)
    return torch.allclose(outs[0], outs[1], atol=atol, rtol=1e-3) and math.isfinite(outs[0].abs().sum().item())
