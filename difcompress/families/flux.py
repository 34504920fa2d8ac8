"""FLUX.1 (`FluxTransformer2DModel` in a `FluxPipeline`: dev, with a guidance embedding, and
schnell), a rectified-flow MMDiT.

Quirks handled here:
- Flow matching (diffusion/flow.py): velocity target, u drawn uniform and shifted by the
  scheduler (resolution-dependent where its config has use_dynamic_shifting, as FluxPipeline
  computes mu from the image sequence length); sampled at FluxPipeline's linear sigmas.
- Packed latents: the transformer reads 2x2 latent patches as tokens, (B, H/2 * W/2, 4C),
  with their positions (`img_ids`) and zero text positions (`txt_ids`); `forward` packs and
  unpacks, so objectives see (B, C, H, W) velocities. Timesteps go in as t / 1000, as the
  pipeline passes them.
- Guidance distillation (dev, `guidance_embeds`): the guidance value is an input, not
  classifier-free guidance; it is a condition (`guidance`), the same for teacher and
  student. No caption is ever dropped (Flux trained without caption dropout, and samples
  without classifier-free guidance), so `null_conditions` is None.
- Two text encoders (data/text.py's ClipT5TextEncoder without the CLIP sequence): CLIP's
  pooled output and T5's sequence at min(its max length, 512), FluxPipeline's bound.
- The transformer's config fixes no image size: the pipeline's native size is its VAE's
  `sample_size` (1024 for FLUX.1), which `attach` records on the loaded transformer, with
  the text side's window (what latency and MACs are measured at).
- Pruning (pruning/blocklists.py): `--depth` keeps double-stream blocks, `--single-depth`
  single-stream ones; `--ratio` removes whole heads in every block and the residual width
  with them (head_dim, hence the rotary embedding, stays). Control, Fill, Kontext, img2img
  and inpainting pipelines are other pipeline classes: the registry refuses them by name.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from difcompress.core.errors import UserError
from difcompress.data.text import ClipT5TextEncoder
from difcompress.diffusion.flow import FlowTraining
from difcompress.families.block_transformer import BlockListFamily
from difcompress.pruning.blocklists import HEADS, RES, BlockLayout, BlockList

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
STREAMS = ("encoder_hidden_states", "hidden_states")  # what both block kinds return, in this order
NATIVE_LATENT = 128  # FluxPipeline.default_sample_size: 1024 px through the 8x VAE
_B = r"transformer_blocks\.\d+\."
_S = r"single_transformer_blocks\.\d+\."
RULES = (
    (r"x_embedder\.(weight|bias)", (RES, None)),
    (r"context_embedder\.(weight|bias)", (RES, None)),
    (r"time_text_embed\.\w+\.linear_1\.(weight|bias)", (RES, None)),
    (r"time_text_embed\.\w+\.linear_2\.(weight|bias)", (RES, RES)),
    (r"norm_out\.linear\.(weight|bias)", ((RES, 2), RES)),
    (r"proj_out\.(weight|bias)", (None, RES)),
    (_B + r"norm1(_context)?\.linear\.(weight|bias)", ((RES, 6), RES)),
    (_B + r"attn\.(to_[qkv]|add_[qkv]_proj)\.(weight|bias)", (HEADS, RES)),
    (_B + r"attn\.norm_(added_)?[qk]\.weight", (None,)),
    (_B + r"attn\.(to_out\.0|to_add_out)\.(weight|bias)", (RES, HEADS)),
    (_B + r"ff\.net\.0\.proj\.(weight|bias)", ("ff:image", RES)),
    (_B + r"ff\.net\.2\.(weight|bias)", (RES, "ff:image")),
    (_B + r"ff_context\.net\.0\.proj\.(weight|bias)", ("ff:text", RES)),
    (_B + r"ff_context\.net\.2\.(weight|bias)", (RES, "ff:text")),
    (_S + r"norm\.linear\.(weight|bias)", ((RES, 3), RES)),
    (_S + r"proj_mlp\.(weight|bias)", ("ff:mlp", RES)),
    (_S + r"attn\.to_[qkv]\.(weight|bias)", (HEADS, RES)),
    (_S + r"attn\.norm_[qk]\.weight", (None,)),
    (_S + r"proj_out\.(weight|bias)", (RES, ("cat", HEADS, "ff:mlp"))),
)
LAYOUT = BlockLayout((BlockList(DOUBLE, "num_layers", "--depth", "--blocks", STREAMS),
                      BlockList(SINGLE, "num_single_layers", "--single-depth", "--single-blocks", STREAMS)), RULES)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of height h and width w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) token positions (0, row, column): FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxFamily(BlockListFamily):
    name = "flux"
    model_class = FluxTransformer2DModel
    pipelines = ("FluxPipeline",)
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_guidance = 3.5  # FluxPipeline's guidance_scale default (dev's embedded guidance; schnell ignores it)
    teacher_data_guidance = 3.5
    single_file_layout = "bfl-flux"  # Black Forest Labs' names: what ComfyUI-GGUF and Forge read

    def pipeline(self, model, scheduler, autoencoder=None, text=None):
        if autoencoder is None or text is None:
            raise UserError("a Flux transformer needs its pipeline's VAE, both text encoders and tokenizers")
        return FluxPipeline(scheduler=scheduler, vae=autoencoder.model, transformer=model, **text.components())

    def card_usage(self, where, load_args, imports, info):
        dev = info.get("guidance_embeds", True)
        call = "guidance_scale=3.5, num_inference_steps=28" if dev else "guidance_scale=0.0, num_inference_steps=4"
        length = info.get("max_sequence_length") or 512
        return ["```python", *imports, "from diffusers import FluxPipeline",
                f"pipe = FluxPipeline.from_pretrained({load_args})",
                f"image = pipe('a photo of an astronaut riding a horse', {call}, "
                f"max_sequence_length={length}).images[0]", "```"]

    def card_facts(self, model, text):
        return {"guidance_embeds": bool(model.config.guidance_embeds),
                "max_sequence_length": text.max_sequence_length if text is not None else None}

    def sample_shape(self, model):
        size = getattr(model, "native_latent_size", NATIVE_LATENT)
        return model.config.in_channels // 4, size, size

    def size_multiple(self, model):
        return 2  # latents pack into 2x2 patches

    def flow_training(self, model):
        # diffusers' Flux training scripts: weighting_scheme "none" (u uniform); FluxPipeline's linear sigmas.
        return FlowTraining(density="none", patch=2, linear_sigmas=True)

    def text_side(self, parts):
        t5 = parts["tokenizer_2"]
        # FluxPipeline's default max_sequence_length and its upper bound is 512.
        return ClipT5TextEncoder(((parts["tokenizer"], parts["text_encoder"]),), t5, parts["text_encoder_2"],
                                 min(512, int(t5.model_max_length)), clip_sequence=False)

    def conditions(self, model, *, labels=None, text=None, geometry=None, guidance=None):
        """T5's sequence and CLIP's pooled vector, and the guidance value every row reads: a
        guidance-distilled model (dev) needs one; it rides along whenever one is given, so
        that a dev teacher reads it beside a schnell-layout student, which ignores it."""
        if text is None:
            return None
        cond = {"encoder_hidden_states": text["encoder_hidden_states"],
                "pooled_projections": text["pooled_projections"]}
        self.check_guidance(model, guidance)
        if guidance is not None:
            cond["guidance"] = torch.full((len(cond["pooled_projections"]),), float(guidance))
        return cond

    def takes_guidance(self, model):
        return bool(model.config.guidance_embeds)

    def example_inputs(self, model, batch_size=1):
        device = next(model.parameters()).device
        config = model.config
        _, h, w = self.sample_shape(model)
        tokens = getattr(model, "native_text_tokens", 512)  # the text side's window, else FluxPipeline's default
        inputs = {"hidden_states": torch.randn(batch_size, (h // 2) * (w // 2), config.in_channels, device=device),
                  "encoder_hidden_states": torch.randn(batch_size, tokens, config.joint_attention_dim, device=device),
                  "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, device=device),
                  "timestep": torch.full((batch_size,), 0.5, device=device),
                  "img_ids": image_ids(h, w, device, torch.float32),
                  "txt_ids": torch.zeros(tokens, 3, device=device)}
        if self.takes_guidance(model):
            inputs["guidance"] = torch.full((batch_size,), self.default_guidance, device=device)
        return inputs

    def with_text_tokens(self, inputs, tokens):
        out = super().with_text_tokens(inputs, tokens)
        return {**out, "txt_ids": torch.zeros(tokens, 3, device=out["txt_ids"].device)}

    def forward(self, model, inputs):
        cond, sample = inputs.cond, inputs.sample
        if "pooled_projections" not in cond:
            raise UserError("a Flux transformer needs text conditioning (captions or prompts)", exit_code=2)
        self.check_guidance(model, cond.get("guidance"))
        dtype, (_, _, h, w) = sample.dtype, sample.shape
        text = cond["encoder_hidden_states"].to(dtype)
        out = model(hidden_states=pack(sample), encoder_hidden_states=text,
                    pooled_projections=cond["pooled_projections"].to(dtype),
                    timestep=inputs.timestep.to(dtype) / 1000, img_ids=image_ids(h, w, sample.device, dtype),
                    txt_ids=torch.zeros(text.shape[1], 3, device=sample.device, dtype=dtype),
                    guidance=cond.get("guidance") if self.takes_guidance(model) else None, return_dict=False)[0]
        return unpack(out, h, w), None

    # ---- pruning and feature pairs (families/block_transformer.py) ---------------------------
    def layout(self, model):
        return LAYOUT

    def streams(self, block):
        """Image stream (output 1) of every block, and the text stream (output 0) of double ones."""
        return ("[1]", "[0]") if hasattr(block, "ff_context") else ("[1]",)

    def stage_widths(self, model):
        block = (model.transformer_blocks or model.single_transformer_blocks)[0]
        return {"double blocks": len(model.transformer_blocks), "single blocks": len(model.single_transformer_blocks),
                "heads x dim": f"{block.attn.heads}x{model.config.attention_head_dim}",
                "residual width": model.inner_dim,
                "feed-forward width": block.ff.net[0].proj.out_features if hasattr(block, "ff")
                else block.proj_mlp.out_features}
