"""Reference architectures built from configs (no download): for tests and benchmarks."""

# google/ddpm-cifar10-32's UNet2DModel config (35.7M params, 6.2G MACs with the attention matmuls).
DDPM_CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    mid_block_scale_factor=1,
    act_fn="silu",
    center_input_sample=False,
)


# The embedded digits teacher: the same block pattern narrowed for 16x16 grayscale digits
# (1.1M params; 90% pruning leaves tens of thousands).
DIGITS_TEACHER_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=16,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
)


# facebook/DiT-XL-2-256's DiTTransformer2DModel config (28 blocks, 16 heads x 72 = 1152
# wide, learned sigma over 4 x 32 x 32 SD-VAE latents, 1000 ImageNet classes).
DIT_XL_2_256 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    activation_fn="gelu-approximate",
    attention_bias=True,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
)


# The embedded pixel-space DiT digits teacher: patch 2 over 16x16 grayscale digits
# (64 tokens), 10 classes with a null class for guidance, no learned variance.
DIGITS_DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=24,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=16,
    patch_size=2,
    num_embeds_ada_norm=10,
    activation_fn="gelu-approximate",
)


# stabilityai/stable-diffusion-2-1-base's UNet2DConditionModel config (865.9M params): SD's
# block pattern, 512 px through the VAE's factor 8; attention_head_dim is heads per level
# (64 channels each) in SD 2.x configs.
SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)

# CompVis/stable-diffusion-v1-4 unet/config.json: SD 1.x differs from 2.x in 8 heads at every
# level (attention_head_dim 8), CLIP ViT-L/14 text width 768 and 1x1-conv projections.
SD14_UNET = {**SD21_BASE_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False}

# stabilityai/stable-diffusion-xl-base-1.0's U-Net (unet/config.json, as quoted in
# docs/published-layouts.md): 2,567,463,684 parameters counted on the meta device (KOALA's
# model card: 2,567M).
SDXL_BASE_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    mid_block_scale_factor=1,
)

# The embedded digits-t2i teacher (difcompress build-digits --family t2i): Stable Diffusion's
# U-Net block pattern (so the BK-SDM presets apply) over 8x8x4 latents of 16x16 digits, 16
# GroupNorm groups (so --ratio 0.5 keeps 8), heads per level as SD 2.x names them.
DIGITS_T2I_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=SD21_BASE_UNET["down_block_types"],
    up_block_types=SD21_BASE_UNET["up_block_types"],
    block_out_channels=(32, 48, 48, 48),
    layers_per_block=2,
    norm_num_groups=16,
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4, 4),
    use_linear_projection=True,
)
# Its autoencoder: 16x16 grey digits to 8x8x4 latents (one downsampling).
DIGITS_T2I_VAE = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
# Its frozen text encoder: a 2-layer CLIP text transformer over the character tokenizer
# difcompress writes (data/text.py), prompts of up to 22 characters.
DIGITS_T2I_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1)

# The embedded digits-flux teacher (difcompress build-digits --family flux): FLUX.1's layout
# in miniature over digits-t2i's autoencoder (8x8x4 latents, packed 2x2 into 16 tokens of
# 16 channels), 4 double + 8 single blocks of 4 heads x 12 (rotary axes 4 + 4 + 4), no
# guidance embedder (schnell's kind: docs/embedded.md says why).
DIGITS_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=4, num_single_layers=8, attention_head_dim=12,
                               num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=False, axes_dims_rope=(4, 4, 4))
# Its frozen T5 stand-in (beside DIGITS_T2I_TEXT's CLIP, whose pooled output Flux reads):
# 2 layers of width 32 over the project's T5 character tokenizer, 32 tokens (the longest
# digits caption is 21).
DIGITS_FLUX_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      decoder_start_token_id=0)
DIGITS_FLUX_T5_LENGTH = 32
# FLUX.1-schnell's scheduler_config.json: shift 1, no resolution-dependent shift.
DIGITS_FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                             max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# ---- flow-matching transformers (counts on the meta device: docs/published-layouts.md) ----
# black-forest-labs/FLUX.1-dev transformer/config.json (HF copies markury/flux-fused-v19 and
# reshamgaire/flux-dev-orignal, _name_or_path the official snapshot 0ef5fff789c8): 19 double-
# and 38 single-stream blocks, 24 heads x 128, a guidance embedder. "12 billion parameter"
# (black-forest-labs/flux model_cards/FLUX.1-dev.md); 11,901,408,320 counted here.
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# FLUX.1-schnell: the same layout without the guidance embedder (HF copies db900/PRO_FLUX_0load,
# art42me/flux-schnell-fp8-quantized); 11,891,178,560 counted here.
FLUX1_SCHNELL_TRANSFORMER = {**FLUX1_DEV_TRANSFORMER, "guidance_embeds": False}
# ostris/Flex.1-alpha: 8 double + 38 single blocks (Runware/Flex.1-alpha transformer/config.json),
# a guidance embedder; "8 billion parameter" (its card); 8,163,264,064 counted here.
FLEX1_ALPHA_TRANSFORMER = {**FLUX1_DEV_TRANSFORMER, "num_layers": 8, "num_single_layers": 38}
# TencentARC Flux-Mini: 5 double + 10 single blocks, otherwise FLUX.1-dev's fields
# (huggingface.co/spaces/TencentARC/Flux-Mini config.json, commit 97ee1ad); "3.2B" (its README);
# 3,179,199,552 counted here. Freepik's Flux.1-lite-8B has 8 double blocks (stable-diffusion.cpp
# PR #474) but its single-block count was not found, so it has no layout here.
FLUX_MINI_TRANSFORMER = {**FLUX1_DEV_TRANSFORMER, "num_layers": 5, "num_single_layers": 10}

# stabilityai/stable-diffusion-3.5-large transformer/config.json (mirror
# frankjoshua/stable-diffusion-3.5-large, "SD3.5 Large Public Release" 4c4df3f): 38 joint blocks,
# 38 heads x 64, no dual-attention layers. "8B" (huggingface.co/blog/sd3-5); 8,056,627,520
# parameters here, 8,146,280,768 with the position table (the "8.1B" third-party pages quote).
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    dual_attention_layers=(),
    qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-medium (MMDiT-X; mirror frankjoshua/stable-diffusion-3.5-medium
# b8c39704, Prgckwb/trpfrog-sd3.5-medium): 24 blocks, dual attention in blocks 0-12.
# 2,243,171,520 parameters counted here; with the persistent position table (384^2 x 1536, a
# buffer) 2,469,663,936 tensors, the "2.47B" a GGUF card and "2.5B" third-party pages quote.
SD35_MEDIUM_TRANSFORMER = {**SD35_LARGE_TRANSFORMER, "num_layers": 24, "num_attention_heads": 24,
                           "caption_projection_dim": 1536, "pos_embed_max_size": 384,
                           "dual_attention_layers": tuple(range(13))}

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (HF copies TheCodingBug/Z-Image-Turbo-int8,
# epispasm/zit_foretea at the official snapshot 0e36c2b3): one single-stream stack of 30 blocks
# (`layers`) after 2 noise and 2 caption refiner blocks, 30 heads x 128. "6B" (HF listing,
# diffusers PR #12775); 6,154,908,736 counted here.
Z_IMAGE_TURBO_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=(32, 48, 48),
    axes_lens=(1536, 512, 512),
)
