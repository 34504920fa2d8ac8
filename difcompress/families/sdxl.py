"""SDXL U-Net (`UNet2DConditionModel` with text-and-time conditioning, in a
`StableDiffusionXLPipeline`).

Quirks handled here, beside Stable Diffusion's (families/t2i.py: heads kept, GEGLU halves
paired, the text encoders frozen and copied through):
- Two text encoders (CLIP ViT-L and OpenCLIP bigG with projection): the U-Net reads both
  penultimate hidden states side by side (``encoder_hidden_states``) and the second one's
  pooled output (``text_embeds``); data/text.py's DualTextEncoder builds them.
- Micro-conditioning (``time_ids``): each training image's original size and crop corner
  and the target size; at evaluation and for teacher samples, the full frame at the model's
  size. Caption dropout drops both text conditions together, never the time ids.
- Block removal by the published SDXL students (`--preset koala-1b | koala-700m | ssd-1b |
  vega`, difcompress/pruning/sdxl_layouts.py), alone or followed by `--ratio`.
- Feature KD: each stage's output (stages), every block (blocks), or every transformer
  block's self-attention (self-attention: KOALA's finding that these features matter most).
- The refiner (StableDiffusionXLImg2ImgPipeline), inpainting and ControlNet pipelines are
  other pipeline classes: the registry refuses them by name.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from difcompress.core.errors import UserError
from difcompress.data.text import DualTextEncoder
from difcompress.families.base import PruneOutcome, PruneRequest
from difcompress.families.t2i import TextToImageFamily
from difcompress.families.unet2d import subset_frequencies
from difcompress.pruning.sdxl_layouts import (
    SDXL_PRESETS,
    remove_sdxl_blocks,
    removed_blocks,
    teacher_key,
)

FEATURE_HOOKS = ("stages", "blocks", "self-attention")


class SDXLFamily(TextToImageFamily):
    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    presets = tuple(SDXL_PRESETS)
    reads_geometry = True
    default_guidance = 5.0  # StableDiffusionXLPipeline's default guidance scale
    teacher_data_guidance = 5.0

    def matches(self, model):
        return isinstance(model, self.model_class) and model.config.get("addition_embed_type") == "text_time"

    def text_side(self, parts):
        return DualTextEncoder(parts["tokenizer"], parts["text_encoder"], parts["tokenizer_2"],
                               parts["text_encoder_2"])

    def pipeline(self, model, scheduler, autoencoder=None, text=None):
        if autoencoder is None or text is None:
            raise UserError("an SDXL U-Net needs its pipeline's VAE, both text encoders and tokenizers")
        # No invisible watermark: it needs an extra package, and it changes every image.
        return StableDiffusionXLPipeline(vae=autoencoder.model, **text.components(), unet=model, scheduler=scheduler,
                                         add_watermarker=False)

    def card_usage(self, where, load_args, imports, info):
        return ["```python", *imports, "from diffusers import StableDiffusionXLPipeline",
                f"pipe = StableDiffusionXLPipeline.from_pretrained({load_args})",
                "image = pipe('a photo of an astronaut riding a horse').images[0]", "```"]

    def widths_expressible(self, model, kept_widths):
        """Whole heads, and a first width whose sinusoidal timestep embedding is a column
        subset at the config's frequency shift: the time ids' embedding (add_time_proj) reads
        the same shift, so it cannot change (halving or quartering the width keeps it)."""
        if not self.whole_heads(model, kept_widths):
            return False
        old_half, new_half = model.time_proj.num_channels // 2, kept_widths[0] // 2
        shift = model.time_proj.downscale_freq_shift
        return new_half == old_half or (new_half >= 2 and subset_frequencies(old_half, new_half, shift)[1] == shift)

    def uniform_groups(self, model, ratio, round_to=1):
        keep, fraction = super().uniform_groups(model, ratio, round_to)
        if ratio > 0 and fraction == 1.0:
            raise UserError(f"--ratio {ratio:g}: no smaller width of this SDXL U-Net keeps its timestep embeddings "
                            f"expressible in the stock config (widths {list(model.config.block_out_channels)}); "
                            "ratios that halve or quarter the first width keep it, while it stays 4 or more", exit_code=2)
        return keep, fraction

    def pooled_width(self, model) -> int:
        config = model.config
        return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def example_inputs(self, model, batch_size=1):
        inputs = super().example_inputs(model, batch_size)
        device = inputs["sample"].device
        size = inputs["sample"].shape[-1] * 8
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=device)
        return {**inputs, "added_cond_kwargs": {
            "text_embeds": torch.randn(batch_size, self.pooled_width(model), device=device),
            "time_ids": time_ids.repeat(batch_size, 1)}}

    def conditions(self, model, *, labels=None, text=None, geometry=None, guidance=None):
        """Both text conditions, and time ids (original height, width, crop top, left, target
        height, width) from `geometry` rows."""
        if text is None:
            return None
        if geometry is None or geometry.shape[-1] != 6:
            raise ValueError("SDXL conditions need (N, 6) geometry rows: original size, crop corner, target size")
        return {"encoder_hidden_states": text["encoder_hidden_states"], "text_embeds": text["text_embeds"],
                "time_ids": geometry.to(torch.float32)}

    def null_conditions(self, model, *, text=None):
        """The empty (or negative) prompt's encodings; time ids never drop."""
        if text is None:
            return None
        return {"encoder_hidden_states": text["encoder_hidden_states"][:1], "text_embeds": text["text_embeds"][:1]}

    def forward(self, model, inputs):
        cond, dtype = inputs.cond, inputs.sample.dtype
        if "text_embeds" not in cond:
            raise UserError("an SDXL U-Net needs text conditioning (captions or prompts)", exit_code=2)
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return model(inputs.sample, inputs.timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                     added_cond_kwargs=added).sample, None

    def prune(self, model, request: PruneRequest) -> PruneOutcome:
        if request.preset is None and not request.ratio:
            raise UserError(f"pass --preset ({', '.join(SDXL_PRESETS)}) and/or --ratio", exit_code=2)
        details = {}
        if request.preset is not None:
            if request.ratio and request.global_pruning:
                raise UserError("--global after --preset: prune in two steps (the preset first, then --global "
                                "--ratio on its output)", exit_code=2)
            student = remove_sdxl_blocks(model, request.preset)
            details = {"preset": request.preset, "removed_blocks": removed_blocks(model, student),
                       "teacher_layers_per_block": model.config.layers_per_block}
            model = student
        if not request.ratio:
            return PruneOutcome(model=model, details=details)
        outcome = super(TextToImageFamily, self).prune(model, request)  # channels, as for SD
        return PruneOutcome(model=outcome.model, history=outcome.history, warnings=outcome.warnings,
                            details=details | outcome.details)

    def feature_layer_pairs(self, student, teacher, pruning, hooks="stages"):
        """stages / blocks as for every U-Net (teacher names through the preset's renaming);
        self-attention: every student transformer block's attn1 with its teacher's."""
        if hooks not in FEATURE_HOOKS:
            raise UserError(f"--feature-hooks {hooks}: an SDXL U-Net takes {', '.join(FEATURE_HOOKS)}", exit_code=2)
        teacher_layers = (pruning or {}).get("teacher_layers_per_block", student.config.layers_per_block)
        if hooks == "self-attention":
            names = [n for n, _ in student.named_modules() if n.endswith(".attn1")]
        else:
            names = [s for s, _ in super(TextToImageFamily, self).feature_layer_pairs(student, teacher, pruning,
                                                                                      hooks)]
        rename = (lambda n: teacher_key(n + ".", student.config.layers_per_block, teacher_layers)[:-1])
        return [(n, rename(n)) for n in names]
