"""Text-to-image U-Net (`UNet2DConditionModel` in a `StableDiffusionPipeline`, SD 1.x and 2.x).

Quirks handled here:
- Conditioned on text: the U-Net reads the frozen text encoder's hidden states
  (``encoder_hidden_states``); classifier-free guidance drops a caption to the empty
  prompt's encoding. Epsilon and v-prediction both come from the scheduler config.
- The pipeline's VAE, text encoder, tokenizer and scheduler are frozen and copied through
  unchanged; only the U-Net is compressed.
- Pruning removes whole blocks, BK-SDM's way (`--preset bk-base|bk-small|bk-tiny`,
  difcompress/pruning/blocks.py), and/or channels (`--ratio`) as for the pixel U-Net. SD's
  config names the head COUNT per level (`attention_head_dim`, or `num_attention_heads`),
  so channel pruning keeps every head and shrinks its dim: a q/k/v unit is one position in
  every head. A GEGLU feed-forward projects to (value | gate) halves that lose the same
  positions. The cross-attention keys and values keep reading the text encoder's width.
- Feature KD hooks BK-SDM's modules for a preset (down and up block outputs; Tiny pairs
  shifted blocks and a proj_out), else each stage's output.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.activations import GEGLU

from difcompress.core.errors import UserError
from difcompress.data.text import TextEncoder
from difcompress.families.base import PruneOutcome, PruneRequest
from difcompress.families.unet2d import PixelUNetFamily, attention_modules
from difcompress.pruning.blocks import PRESETS, feature_pairs, remove_blocks
from difcompress.pruning.graph import ChannelUnit


class TextToImageFamily(PixelUNetFamily):
    name = "t2i"
    model_class = UNet2DConditionModel
    component = "unet"
    pipelines = ("StableDiffusionPipeline",)
    needs_pipeline = True
    pipeline_tag = "text-to-image"
    takes_text = True
    text_parts = ("text_encoder", "tokenizer")
    default_guidance = 7.5  # Stable Diffusion's default guidance scale (StableDiffusionPipeline)
    teacher_data_guidance = 7.5
    presets = tuple(PRESETS)
    keeps_head_count = True

    def pipeline(self, model, scheduler, autoencoder=None, text=None):
        if autoencoder is None or text is None:
            raise UserError("a text-to-image U-Net needs its pipeline's VAE, text encoder and tokenizer")
        return StableDiffusionPipeline(vae=autoencoder.model, **text.components(), unet=model, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def card_usage(self, where, load_args, imports, info):
        return ["```python", *imports, "from diffusers import StableDiffusionPipeline",
                f"pipe = StableDiffusionPipeline.from_pretrained({load_args})",
                "image = pipe('a photo of an astronaut riding a horse').images[0]", "```"]

    def example_inputs(self, model, batch_size=1):
        inputs = super().example_inputs(model, batch_size)
        width = model.config.cross_attention_dim
        width = width[0] if isinstance(width, (list, tuple)) else width
        return {**inputs, "encoder_hidden_states": torch.randn(batch_size, 8, width, device=inputs["sample"].device)}

    def matches(self, model):
        # SD's U-Net reads text alone; one with added text-and-time conditioning is SDXL's.
        return isinstance(model, self.model_class) and model.config.get("addition_embed_type") != "text_time"

    def text_side(self, parts):
        return TextEncoder(parts["tokenizer"], parts["text_encoder"])

    def conditions(self, model, *, labels=None, text=None, geometry=None, guidance=None):
        return None if text is None else {"encoder_hidden_states": text["encoder_hidden_states"]}

    def null_conditions(self, model, *, text=None):
        """The empty (or negative) prompt's encoding."""
        return None if text is None else {"encoder_hidden_states": text["encoder_hidden_states"][:1]}

    def dropout_option(self, model):
        return "caption_dropout"

    def forward(self, model, inputs):
        if "encoder_hidden_states" not in inputs.cond:
            raise UserError("a text-to-image U-Net needs text conditioning (captions or prompts)", exit_code=2)
        text = inputs.cond["encoder_hidden_states"].to(inputs.sample.dtype)
        return model(inputs.sample, inputs.timestep, encoder_hidden_states=text).sample, None

    def learns_variance(self, model):
        return False

    def linear_units(self, model):
        units = {f"{n}.{proj}": ChannelUnit(copies=a.heads) for n, a in attention_modules(model)
                 for proj in ("to_q", "to_k", "to_v")}
        return units | {f"{n}.proj": ChannelUnit(copies=2) for n, m in model.named_modules() if isinstance(m, GEGLU)}

    def whole_heads(self, model, kept_widths):
        config = model.config
        heads = config.num_attention_heads or config.attention_head_dim
        heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(kept_widths)
        return all(w % h == 0 for w, h in zip(kept_widths, heads))

    def prune(self, model, request: PruneRequest) -> PruneOutcome:
        if request.preset is None and not request.ratio:
            raise UserError("pass --preset (bk-base, bk-small, bk-tiny) and/or --ratio", exit_code=2)
        details = {}
        if request.preset is not None:
            if request.preset not in PRESETS:
                raise UserError(f"unknown --preset {request.preset!r}; choose one of {', '.join(PRESETS)}",
                                exit_code=2)
            if request.ratio and request.global_pruning:
                raise UserError("--global after --preset: prune in two steps (the preset first, then --global "
                                "--ratio on its output)", exit_code=2)
            teacher_blocks = _block_names(model)
            model = remove_blocks(model, request.preset)
            kept = set(_block_names(model))
            details = {"preset": request.preset, "removed_blocks": [b for b in teacher_blocks if b not in kept]
                       if request.preset != "bk-tiny" else _tiny_removed(teacher_blocks)}
        if not request.ratio:
            return PruneOutcome(model=model, details=details)
        outcome = super().prune(model, request)
        return PruneOutcome(model=outcome.model, history=outcome.history, warnings=outcome.warnings,
                            details=details | outcome.details)

    def stage_widths(self, model):
        widths = {"conv_in": model.conv_in.out_channels, "time_embedding": model.time_embedding.linear_1.out_features}
        for i, block in enumerate(model.down_blocks):
            widths[f"down_blocks.{i} (layers)"] = f"{block.resnets[-1].conv2.out_channels} x {len(block.resnets)}"
        widths["mid_block"] = "none" if model.mid_block is None else model.mid_block.resnets[-1].conv2.out_channels
        for i, block in enumerate(model.up_blocks):
            widths[f"up_blocks.{i} (layers)"] = f"{block.resnets[-1].conv2.out_channels} x {len(block.resnets)}"
        return widths

    def feature_layer_pairs(self, student, teacher, pruning, hooks="stages"):
        """BK-SDM's pairs for the preset the student was made with, else every stage's output."""
        pairs = feature_pairs((pruning or {}).get("preset"))
        return super().feature_layer_pairs(student, teacher, pruning, hooks) if pairs is None else pairs


def _block_names(model) -> list[str]:
    """Every resnet and attention of the U-Net's blocks, by name."""
    return [n for n, m in model.named_modules() if n.count(".") == 3 and (".resnets." in n or ".attentions." in n)
            or n == "mid_block"]


def _tiny_removed(teacher_blocks: list[str]) -> list[str]:
    """Tiny drops the innermost stage, then the base removals of what remains."""
    return ["down_blocks.3", "up_blocks.0", "mid_block"] + [
        b for b in teacher_blocks if b.startswith(("down_blocks.0.", "down_blocks.1.", "down_blocks.2."))
        and b.endswith(".1")] + [b for b in teacher_blocks if b.startswith(("up_blocks.1.", "up_blocks.2.",
                                                                              "up_blocks.3.")) and b.endswith(".1")]
