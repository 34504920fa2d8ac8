"""Tiny flow-matching pipelines built from configs (nothing downloaded): Flux, SD3 and Z-Image.

Each keeps the quirks its family handles (SD3: a dual-attention block, the context_pre_only
last block, two CLIP encoders with projections and T5; Z-Image: refiners beside the main
`layers` stack, a chat-templated Qwen3 encoder) over 16x16 RGB images and a 16-channel VAE
with one downsampling, so every prune or distill call takes seconds on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difcompress.data.text import write_character_tokenizer, write_t5_tokenizer

# Qwen3's chat template reduced to what ZImagePipeline uses: one user turn, then the
# assistant's turn opened (enable_thinking=True adds nothing in Qwen3's own template).
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_flow_vae(seed: int = 0):
    """16x16 RGB images <-> 8x8 latents with 16 channels (SD3's, Flux's and Z-Image's latent
    depth), scaled and shifted as their VAEs are."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=16,
                         norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1).eval()


def build_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True, t5_length: int = 24) -> Path:
    """FLUX.1's layout in miniature: 4 double + 8 single blocks of 4 heads x 8 (rotary axes
    2 + 2 + 4), patch-packed 16-channel latents (16 image tokens), CLIP-L (pooled) and T5
    encoders of width 32, FLUX.1-dev's dynamically shifted scheduler; with a guidance
    embedder (dev) unless `guidance_embeds=False` (schnell)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    vae = tiny_flow_vae(seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    tokenizer = CLIPTokenizer.from_pretrained(write_character_tokenizer(folder.parent / f"{folder.name}-clip"))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5_tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder.parent / f"{folder.name}-t5", t5_length))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                 tokenizer_2=t5_tokenizer, transformer=transformer).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3(folder: Path, seed: int = 0, **transformer_overrides) -> Path:
    """SD3.5-Medium's layout in miniature: 4 joint blocks (the first with dual attention, the
    last context_pre_only), RMS qk-norm, CLIP-L / CLIP-G stand-ins with projections (16 wide
    each, padded to T5's 32 in the sequence), a 2-layer T5 encoder, FlowMatchEuler (shift 3)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**dict(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"), **transformer_overrides}).eval()
    _jitter_modulation(transformer)
    tokenizer = CLIPTokenizer.from_pretrained(write_character_tokenizer(folder.parent / f"{folder.name}-clip"))
    clip = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                projection_dim=16)
    t5_tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder.parent / f"{folder.name}-t5"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_flow_vae(seed),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval(), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval(), tokenizer_2=tokenizer,
        text_encoder_3=t5.eval(), tokenizer_3=t5_tokenizer).save_pretrained(folder, safe_serialization=True)
    return folder


def write_qwen_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer (Qwen2Tokenizer, what Qwen3 checkpoints name) over the 256
    byte symbols with no merges, Qwen's chat markers as special tokens and CHAT_TEMPLATE."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_zimage(folder: Path, seed: int = 0, **transformer_overrides) -> Path:
    """Z-Image-Turbo's layout in miniature: a 4-block main stack (`layers`) after one noise
    and one caption refiner block, 2 heads of 16 (RoPE axes 4 + 6 + 6), a 2-layer Qwen3
    encoder 32 wide behind the chat template, FlowMatchEuler (shift 3, as Turbo's)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**{**dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=4, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(4, 6, 6), axes_lens=(256, 32, 32)),
        **transformer_overrides}).eval()
    _jitter_modulation(transformer)
    tokenizer = Qwen2Tokenizer.from_pretrained(write_qwen_tokenizer(folder.parent / f"{folder.name}-qwen"))
    encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=128, pad_token_id=0)).eval()
    ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_flow_vae(seed),
                   text_encoder=encoder, tokenizer=tokenizer, transformer=transformer).save_pretrained(
        folder, safe_serialization=True)
    return folder


def _jitter_modulation(model) -> None:
    """Zero-initialised gates and output layers make every block the identity and every output
    zero; small random weights make depth and head pruning visible."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and float(p.abs().max()) == 0.0:
                p.normal_(0, 0.05)


def assert_guided_sampling_matches(model_dir: Path, pipe, scale: float, stock_scale: float) -> None:
    """difcompress's flow sampler at guidance `scale` lands where the stock pipeline's own loop
    at `stock_scale` does, from the same per-sample noise and prompts (3 steps, 16 px)."""
    from difcompress.diffusion.sampling import Guidance, sample_images
    from difcompress.loading.models import load_model

    loaded = load_model(model_dir)
    family, model, text = loaded.family, loaded.model, loaded.text
    prompts = ["a handwritten 3", "a handwritten 5"]
    guidance = Guidance(family.conditions(model, text=text.encode(prompts)),
                        family.null_conditions(model, text=text.encode([""])), scale)
    ours = sample_images(family, model, loaded.scheduler, 2, seed=7, steps=3, guidance=guidance, pixels=False)
    noise = torch.stack([torch.randn(*family.sample_shape(model), generator=torch.Generator().manual_seed(7 + i))
                         for i in range(2)])
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompts, latents=noise, num_inference_steps=3, guidance_scale=stock_scale, output_type="latent",
                 height=16, width=16).images
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
