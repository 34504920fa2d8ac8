"""docs/quantization.md's memory table: weight bytes and estimated peak inference memory of
full-size pruned students, per weight scheme, built from their configs on the meta device
(nothing downloaded, nothing allocated) and estimated as `export` estimates its own folder
(commands/export.py `inference_parts`, metrics/cost.py `inference_memory`).

    python benchmarks/inference_memory.py            (about a minute on one CPU core)

Layouts: SD-2.1-base's U-Net with BK-SDM's bk-small blocks at 512 px; SDXL's U-Net as
KOALA-700M at 1024 px; a Flux.1-lite-sized transformer (FLUX.1-dev's config with 8 double
blocks, as Flux.1-lite-8B and Flex.1-alpha keep) at 1024 px, 512 T5 tokens, guidance
distilled (no doubled batch). Encoders and VAEs from the published configs named below.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from difcompress import layouts
from difcompress.commands.export import inference_parts
from difcompress.core.console import human
from difcompress.families.flux import FluxFamily
from difcompress.families.sdxl import SDXLFamily
from difcompress.families.t2i import TextToImageFamily
from difcompress.metrics.cost import (
    RUNTIME_RESERVE_BYTES,
    InferencePart,
    inference_memory,
)
from difcompress.pruning.blocks import student_config
from difcompress.pruning.sdxl_layouts import sdxl_student_config

# openai/clip-vit-large-patch14 config.json text_config (SD 1.x's text_encoder, SDXL's
# text_encoder, FLUX.1's text_encoder): 123.06M parameters.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# stabilityai/stable-diffusion-2-1-base text_encoder/config.json (OpenCLIP ViT-H/14's text
# tower, 23 of its 24 layers): 340.39M.
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14,
# with projection): 694.66M.
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# google/t5-v1_1-xxl config.json, the encoder alone (FLUX.1's text_encoder_2,
# T5EncoderModel): 4.76B.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# The SD / SDXL VAE (stabilityai/sd-vae-ft-mse, stable-diffusion-xl-base-1.0 vae/config.json):
# 83.65M; FLUX.1's (black-forest-labs/FLUX.1-dev vae/config.json): 16 latent channels, no
# quant convs, 83.82M.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32)
FLUX_VAE = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
FLUX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length


def sd21_bk_small() -> list[InferencePart]:
    teacher = UNet2DConditionModel(**layouts.SD21_BASE_UNET)
    unet = UNet2DConditionModel.from_config(student_config(dict(teacher.config), "bk-small"))
    return inference_parts(TextToImageFamily(), unet, AutoencoderKL(**SD_VAE, sample_size=512),
                           {"text_encoder": (CLIPTextModel(CLIPTextConfig(**OPENCLIP_H)), 77)}, 77)


def sdxl_koala_700m() -> list[InferencePart]:
    teacher = UNet2DConditionModel(**layouts.SDXL_BASE_UNET)
    unet = UNet2DConditionModel.from_config(sdxl_student_config(dict(teacher.config), "koala-700m"))
    encoders = {"text_encoder": (CLIPTextModel(CLIPTextConfig(**CLIP_L)), 77),
                "text_encoder_2": (CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)), 77)}
    return inference_parts(SDXLFamily(), unet, AutoencoderKL(**SD_VAE, sample_size=1024), encoders, 77)


def flux_lite() -> list[InferencePart]:
    """8 double + 38 single blocks of FLUX.1-dev (Flux.1-lite's 8 doubles; Flex.1-alpha's layout)
    at FluxPipeline's native 1024 px, the Flux family's own step."""
    transformer = FluxTransformer2DModel(**layouts.FLEX1_ALPHA_TRANSFORMER)
    encoders = {"text_encoder": (CLIPTextModel(CLIPTextConfig(**CLIP_L)), 77),
                "text_encoder_2": (T5EncoderModel(T5Config(**T5_XXL)), FLUX_T5_TOKENS)}
    return inference_parts(FluxFamily(), transformer, AutoencoderKL(**FLUX_VAE, sample_size=1024), encoders,
                           FLUX_T5_TOKENS)


LAYOUTS = {"SD-2.1-base bk-small, 512 px": sd21_bk_small, "SDXL KOALA-700M, 1024 px": sdxl_koala_700m,
           "Flux.1-lite-sized (8 double + 38 single blocks), 1024 px": flux_lite}


def rows(parts: list[InferencePart]) -> list[tuple[str, dict]]:
    """(what is quantized, estimate): bf16 throughout, each scheme on the denoiser, and on the
    denoiser and the text encoders together."""
    everything = [InferencePart(p.name, p.module, p.run, p.name.startswith(("unet", "transformer", "text_encoder")))
                  for p in parts]
    out = [("bf16", inference_memory(parts, torch.bfloat16))]
    for scheme in ("int8", "int4"):
        out.append((f"{scheme} denoiser", inference_memory(parts, torch.bfloat16, scheme)))
        out.append((f"{scheme} denoiser + text encoders", inference_memory(everything, torch.bfloat16, scheme)))
    return out


def main() -> None:
    torch.set_num_threads(1)
    print("| layout | weights | denoiser / text encoders / VAE params | weight bytes | peak inference memory | "
          "fits (GB) |")
    print("|---|---|---|---|---|---|")
    for name, build in LAYOUTS.items():
        with torch.device("meta"):
            parts = build()
        counts = {p.name: sum(t.numel() for t in p.module.parameters()) for p in parts}
        denoiser = counts[parts[0].name]
        encoders = sum(v for k, v in counts.items() if k.startswith("text_encoder"))
        params = f"{human(denoiser)} / {human(encoders)} / {human(counts.get('vae', 0))}"
        for label, estimate in rows(parts):
            print(f"| {name} | {label} | {params} | {human(estimate['weight_bytes'], 'B')} | "
                  f"{human(estimate['peak_bytes'], 'B')} | {', '.join(map(str, estimate['fits_gb'])) or 'none'} |")
        stages = ", ".join(f"{k} {human(v, 'B')}" for k, v in rows(parts)[0][1]["stage_peaks"].items())
        print(f"<!-- {name}: stage peaks in bf16: {stages} -->")
    print(f"\nfits: peak + {human(RUNTIME_RESERVE_BYTES, 'B')} reserve <= the card's GiB")


if __name__ == "__main__":
    main()
