"""Z-Image (`ZImageTransformer2DModel` in a `ZImagePipeline`; Z-Image-Turbo), a single-stream
rectified-flow transformer. It is the third flow family because it is the most used of the
newer ones diffusers ships (docs/published-layouts.md: Z-Image-Turbo leads Flux.2 and
Qwen-Image in likes, 5.03k, and has 775 adapter models on the Hub).

Quirks handled here:
- Lists, not batches: the transformer takes one (C, 1, H, W) latent and one caption
  sequence per sample, of that caption's own length; `forward` splits the batch and the
  cached captions (zero-padded, with a mask of their real tokens) and stacks the outputs.
- Its time runs the other way and its output is the negative velocity: the pipeline passes
  t = 1 - sigma and negates what comes out; `forward` does both, so objectives see the
  velocity eps - x0 at sigma * 1000 as for every flow family.
- Text (data/text.py's ChatTextEncoder): each prompt wrapped in the Qwen3 tokenizer's chat
  template, the encoder's penultimate hidden states of its real tokens (512-token window).
- Guidance: ZImagePipeline's guidance is pos + g (pos - neg), difcompress's neg + s (pos -
  neg): s = g + 1. Z-Image-Turbo samples without it (the pipeline's example: guidance_scale
  0.0, 8 steps), so the default scale is 1 (none); pass --guidance-scale g + 1 for the base model.
- Training: u uniform (diffusers publishes no Z-Image training script; the density Tongyi used
  was not found), shifted by the scheduler's shift (3.0 for Turbo); sampled at
  ZImagePipeline's linear sigmas. The native size is its VAE's sample_size (1024 px).
- Depth (`--depth` / `--blocks`) prunes the main single-stream stack (`layers`); the noise and
  caption refiners stay whole. Width (`--ratio`) removes whole heads in every block (the
  refiners' too) and the residual width `dim` with them; head_dim, hence the RoPE axes, stays,
  and the feed-forward width follows dim as the config derives it (8/3 dim).
- Img2img, inpainting, ControlNet and Omni pipelines are other pipeline classes: the registry
  refuses them by name.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from difcompress.core.errors import UserError
from difcompress.data.text import ChatTextEncoder
from difcompress.diffusion.flow import FlowTraining
from difcompress.families.block_transformer import BlockListFamily
from difcompress.pruning.blocklists import HEADS, RES, BlockLayout, BlockList

LAYERS, REFINERS = "layers", ("noise_refiner", "context_refiner")
ADALN_WIDTH = 256  # the timestep embedding is min(dim, 256) wide (transformer_z_image.py ADALN_EMBED_DIM)
NATIVE_LATENT = 128  # ZImagePipeline's default 1024 px through the 8x VAE
EXAMPLE_CAPTION = 32  # caption tokens of example inputs (a short prompt in its chat template)
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default window


def _rules(model) -> tuple:
    """Index rules; the timestep embedding follows the residual width only while dim <= 256."""
    emb = RES if model.config.dim <= ADALN_WIDTH else None
    block = r"(layers|noise_refiner|context_refiner)\.\d+\."
    return (
        (r"(x|cap)_pad_token", (None, RES)),
        (r"all_x_embedder\.[\w-]+\.(weight|bias)", (RES, None)),
        (r"all_final_layer\.[\w-]+\.linear\.(weight|bias)", (None, RES)),
        (r"all_final_layer\.[\w-]+\.adaLN_modulation\.1\.(weight|bias)", (RES, emb)),
        (r"t_embedder\.mlp\.0\.(weight|bias)", (None, None)),
        (r"t_embedder\.mlp\.2\.(weight|bias)", (emb, None)),
        (r"cap_embedder\.0\.weight", (None,)),
        (r"cap_embedder\.1\.(weight|bias)", (RES, None)),
        (block + r"attention\.to_[qkv]\.weight", (HEADS, RES)),
        (block + r"attention\.to_out\.0\.weight", (RES, HEADS)),
        (block + r"attention\.norm_[qk]\.weight", (None,)),
        (block + r"feed_forward\.w[13]\.weight", ("ff:ff", RES)),
        (block + r"feed_forward\.w2\.weight", (RES, "ff:ff")),
        (block + r"(attention|ffn)_norm[12]\.weight", (RES,)),
        (block + r"adaLN_modulation\.0\.(weight|bias)", ((RES, 4), emb)),
    )


class ZImageFamily(BlockListFamily):
    name = "zimage"
    model_class = ZImageTransformer2DModel
    pipelines = ("ZImagePipeline",)
    text_parts = ("text_encoder", "tokenizer")
    default_guidance = 1.0  # Z-Image-Turbo samples without guidance (ZImagePipeline's example: 0.0 there)
    teacher_data_guidance = 1.0

    def layout(self, model):
        lists = (BlockList(LAYERS, "n_layers", returns=("x",)),
                 *(BlockList(name, "n_refiner_layers", "", "", returns=("x",)) for name in REFINERS))
        return BlockLayout(lists, _rules(model), heads_key="n_heads", head_dim=model.config.dim // model.config.n_heads)

    def config_updates(self, model, kept, keep_heads):
        config = model.config
        head_dim, width = config.dim // config.n_heads, config.dim
        new_width = keep_heads * head_dim
        if new_width == width:
            return {}
        if config.n_kv_heads != config.n_heads or config.get("siglip_feat_dim") is not None:
            raise UserError("--ratio prunes Z-Image transformers whose every head has its own keys and values and "
                            "no SigLIP refiner (Z-Image-Turbo's layout)", exit_code=2)
        hidden = int(width / 3 * 8)
        if width > ADALN_WIDTH > new_width or int(new_width / 3 * 8) != hidden * new_width // width:
            raise UserError(f"--ratio: {keep_heads} heads give a width of {new_width}, whose feed-forward or "
                            "timestep-embedding width the stock config cannot express from this teacher's; choose "
                            "another --ratio", exit_code=2)
        return {"dim": new_width, "n_kv_heads": keep_heads}

    def pipeline(self, model, scheduler, autoencoder=None, text=None):
        if autoencoder is None or text is None:
            raise UserError("a Z-Image transformer needs its pipeline's VAE, text encoder and tokenizer")
        return ZImagePipeline(scheduler=scheduler, vae=autoencoder.model, transformer=model, **text.components())

    def card_usage(self, where, load_args, imports, info):
        return ["```python", *imports, "from diffusers import ZImagePipeline",
                f"pipe = ZImagePipeline.from_pretrained({load_args})",
                "image = pipe('a photo of an astronaut riding a horse', guidance_scale=0.0, "
                "num_inference_steps=8).images[0]", "```"]

    def sample_shape(self, model):
        size = getattr(model, "native_latent_size", NATIVE_LATENT)
        return model.config.in_channels, size, size

    def size_multiple(self, model):
        return model.config.all_patch_size[0]

    def flow_training(self, model):
        return FlowTraining(density="none", patch=model.config.all_patch_size[0], linear_sigmas=True)

    def text_side(self, parts):
        return ChatTextEncoder(parts["tokenizer"], parts["text_encoder"], MAX_SEQUENCE_LENGTH)

    def conditions(self, model, *, labels=None, text=None, geometry=None, guidance=None):
        return None if text is None else {"cap_feats": text["cap_feats"], "cap_mask": text["cap_mask"]}

    def null_conditions(self, model, *, text=None):
        """The empty (or negative) prompt's encoding and its mask."""
        return None if text is None else {"cap_feats": text["cap_feats"][:1], "cap_mask": text["cap_mask"][:1]}

    def dropout_option(self, model):
        return "caption_dropout"

    def example_inputs(self, model, batch_size=1):
        device, config = next(model.parameters()).device, model.config
        c, h, w = self.sample_shape(model)
        return {"x": [torch.randn(c, 1, h, w, device=device) for _ in range(batch_size)],
                "t": torch.full((batch_size,), 0.5, device=device),
                "cap_feats": [torch.randn(EXAMPLE_CAPTION, config.cap_feat_dim, device=device)
                              for _ in range(batch_size)]}

    def forward(self, model, inputs):
        cond, sample = inputs.cond, inputs.sample
        if "cap_feats" not in cond:
            raise UserError("a Z-Image transformer needs text conditioning (captions or prompts)", exit_code=2)
        dtype = sample.dtype
        captions = [row[mask > 0.5].to(dtype) for row, mask in zip(cond["cap_feats"], cond["cap_mask"])]
        t = 1 - inputs.timestep.to(sample.device, torch.float32) / 1000  # the pipeline's (1000 - t) / 1000
        out = model(list(sample.unsqueeze(2).unbind(0)), t.to(dtype), captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2), None

    def stage_widths(self, model):
        block = model.layers[0]
        return {"blocks": len(model.layers), "refiner blocks": f"{len(model.noise_refiner)} + "
                f"{len(model.context_refiner)}", "heads x dim": f"{block.attention.heads}x{block.head_dim}",
                "residual width": model.config.dim, "feed-forward width": block.feed_forward.w1.out_features}
