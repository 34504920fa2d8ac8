"""SD3 and SD3.5 (`SD3Transformer2DModel` in a `StableDiffusion3Pipeline`), a rectified-flow MMDiT.

Quirks handled here:
- Flow matching (diffusion/flow.py): velocity target; u drawn logit-normal (mean 0, std 1:
  diffusers' train_dreambooth_sd3.py default weighting scheme) and shifted by the scheduler's
  shift (3.0 for SD3 / SD3.5); sampled at the scheduler's own sigmas, as the pipeline does.
  Timesteps go in as sigma * 1000, as the pipeline passes them.
- Three text encoders (data/text.py's ClipT5TextEncoder): CLIP-L's and CLIP-G's pooled,
  projected outputs side by side (``pooled_projections``), and their penultimate hidden
  states side by side, zero-padded to T5's width, before T5's 256 tokens
  (``encoder_hidden_states``). Classifier-free guidance drops both to the empty prompt's.
- Depth (`--depth` / `--blocks`): the last block is `context_pre_only` (it ends the text
  stream), so it always stays last; SD3.5's MMDiT-X blocks with a second attention
  (`dual_attention_layers`) keep it, re-indexed in the student's config.
- Width (`--ratio`): whole heads in every block and the residual width with them; the
  caption projection is that width too. The 2-D sin-cos position table is stored in the
  checkpoint, so the residual channels are chosen by stride within each of its quarters (the
  frequencies a smaller stock table has), heads and feed-forward units by importance.
- ControlNet, img2img and inpainting pipelines are other pipeline classes: the registry
  refuses them by name.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from difcompress.core.errors import UserError
from difcompress.data.text import ClipT5TextEncoder
from difcompress.diffusion.flow import FlowTraining
from difcompress.families.block_transformer import BlockListFamily
from difcompress.pruning.blocklists import HEADS, RES, BlockLayout, BlockList
from difcompress.pruning.transformer import residual_channels

BLOCKS = "transformer_blocks"
STREAMS = ("encoder_hidden_states", "hidden_states")  # what a joint block returns, in this order
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 window
TEXT_TOKENS = 77 + MAX_SEQUENCE_LENGTH  # CLIP's window, then T5's
_B = BLOCKS + r"\.\d+\."
RULES = (
    (r"pos_embed\.pos_embed", (None, None, RES)),
    (r"pos_embed\.proj\.(weight|bias)", (RES, None, None, None)),
    (r"time_text_embed\.\w+\.linear_1\.(weight|bias)", (RES, None)),
    (r"time_text_embed\.\w+\.linear_2\.(weight|bias)", (RES, RES)),
    (r"context_embedder\.(weight|bias)", (RES, None)),
    (r"norm_out\.linear\.(weight|bias)", ((RES, 2), RES)),
    (r"proj_out\.(weight|bias)", (None, RES)),
    (_B + r"attn2?\.(to_[qkv]|add_[qkv]_proj)\.(weight|bias)", (HEADS, RES)),
    (_B + r"attn2?\.norm_(added_)?[qk]\.weight", (None,)),
    (_B + r"attn2?\.(to_out\.0|to_add_out)\.(weight|bias)", (RES, HEADS)),
    (_B + r"ff\.net\.0\.proj\.(weight|bias)", ("ff:image", RES)),
    (_B + r"ff\.net\.2\.(weight|bias)", (RES, "ff:image")),
    (_B + r"ff_context\.net\.0\.proj\.(weight|bias)", ("ff:text", RES)),
    (_B + r"ff_context\.net\.2\.(weight|bias)", (RES, "ff:text")),
)


def _modulation_rules(model) -> tuple:
    """adaLN chunk counts per block: 9 for MMDiT-X blocks with a second attention, else 6;
    the context_pre_only block's continuous norm has 2."""
    rules = []
    for i, block in enumerate(model.transformer_blocks):
        image = 9 if block.use_dual_attention else 6
        text = 2 if block.context_pre_only else 6
        rules += [(rf"{BLOCKS}\.{i}\.norm1\.linear\.(weight|bias)", ((RES, image), RES)),
                  (rf"{BLOCKS}\.{i}\.norm1_context\.linear\.(weight|bias)", ((RES, text), RES))]
    return tuple(rules)


class SD3Family(BlockListFamily):
    name = "sd3"
    model_class = SD3Transformer2DModel
    pipelines = ("StableDiffusion3Pipeline",)
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    default_guidance = 7.0  # StableDiffusion3Pipeline's guidance_scale default
    teacher_data_guidance = 7.0

    def layout(self, model):
        return BlockLayout((BlockList(BLOCKS, "num_layers", returns=STREAMS, keep_last=True),),
                           _modulation_rules(model) + RULES, residual=residual_channels)

    def config_updates(self, model, kept, keep_heads):
        dual = set(model.config.dual_attention_layers or ())
        width = keep_heads * model.config.attention_head_dim
        if width % 4:
            raise UserError(f"{keep_heads} heads of {model.config.attention_head_dim} give a width of {width}, not a "
                            "multiple of 4 (the 2-D position table needs 4); choose another --ratio", exit_code=2)
        return {"dual_attention_layers": tuple(i for i, t in enumerate(kept[BLOCKS]) if t in dual),
                "caption_projection_dim": width}

    def streams(self, block):
        return ("[1]",) if block.context_pre_only else ("[1]", "[0]")  # image stream, then text

    def pipeline(self, model, scheduler, autoencoder=None, text=None):
        if autoencoder is None or text is None:
            raise UserError("an SD3 transformer needs its pipeline's VAE, its three text encoders and tokenizers")
        return StableDiffusion3Pipeline(transformer=model, scheduler=scheduler, vae=autoencoder.model,
                                        **text.components())

    def card_usage(self, where, load_args, imports, info):
        return ["```python", *imports, "from diffusers import StableDiffusion3Pipeline",
                f"pipe = StableDiffusion3Pipeline.from_pretrained({load_args})",
                "image = pipe('a photo of an astronaut riding a horse', guidance_scale=7.0, "
                "num_inference_steps=28).images[0]", "```"]

    def sample_shape(self, model):
        return model.config.in_channels, model.config.sample_size, model.config.sample_size

    def size_multiple(self, model):
        return model.config.patch_size  # the position table is cropped to any size up to its maximum

    def flow_training(self, model):
        return FlowTraining(density="logit_normal", patch=model.config.patch_size)

    def text_side(self, parts):
        clips = ((parts["tokenizer"], parts["text_encoder"]), (parts["tokenizer_2"], parts["text_encoder_2"]))
        return ClipT5TextEncoder(clips, parts["tokenizer_3"], parts["text_encoder_3"], MAX_SEQUENCE_LENGTH)

    def conditions(self, model, *, labels=None, text=None, geometry=None, guidance=None):
        if text is None:
            return None
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "pooled_projections": text["pooled_projections"]}

    def null_conditions(self, model, *, text=None):
        """The empty (or negative) prompt's encodings."""
        if text is None:
            return None
        return {"encoder_hidden_states": text["encoder_hidden_states"][:1],
                "pooled_projections": text["pooled_projections"][:1]}

    def dropout_option(self, model):
        return "caption_dropout"

    def example_inputs(self, model, batch_size=1):
        device, config = next(model.parameters()).device, model.config
        c, h, w = self.sample_shape(model)
        return {"hidden_states": torch.randn(batch_size, c, h, w, device=device),
                "encoder_hidden_states": torch.randn(batch_size, TEXT_TOKENS, config.joint_attention_dim,
                                                     device=device),
                "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, device=device),
                "timestep": torch.full((batch_size,), 500.0, device=device)}

    def forward(self, model, inputs):
        cond, dtype = inputs.cond, inputs.sample.dtype
        if "pooled_projections" not in cond:
            raise UserError("an SD3 transformer needs text conditioning (captions or prompts)", exit_code=2)
        out = model(hidden_states=inputs.sample, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                    pooled_projections=cond["pooled_projections"].to(dtype), timestep=inputs.timestep,
                    return_dict=False)[0]
        return out, None

    def stage_widths(self, model):
        blocks = model.transformer_blocks
        return {"blocks": len(blocks), "dual-attention blocks": sum(b.use_dual_attention for b in blocks),
                "heads x dim": f"{blocks[0].attn.heads}x{model.config.attention_head_dim}",
                "residual width": model.inner_dim, "feed-forward width": blocks[0].ff.net[0].proj.out_features}
