"""Shared fixtures: tiny diffusers models saved to disk, and helpers to run the CLI.

The tiny U-Nets have the block structure of google/ddpm-cifar10-32 (down: DownBlock2D,
AttnDownBlock2D, DownBlock2D, DownBlock2D; up: UpBlock2D, UpBlock2D, AttnUpBlock2D,
UpBlock2D; one-head attention; sinusoidal time embedding with freq_shift=1) but are
narrow (32/64/64/64 channels, 8 GroupNorm groups, 16x16 samples, 100 train timesteps),
so every prune or distill call takes about a second on two CPU cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY_NUM_TRAIN_TIMESTEPS = 100
TINY_BLOCK_OUT = (32, 64, 64, 64)
TINY_GROUPS = 8
TINY_SIZE = 16
TINY_CHANNELS = 3


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one intra-op thread, and stay fast on a busy 2-core box
    (two spinning OpenMP threads per process slow everything down by an order of magnitude)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_unet_kwargs(**overrides) -> dict:
    kwargs = dict(
        sample_size=TINY_SIZE,
        in_channels=TINY_CHANNELS,
        out_channels=TINY_CHANNELS,
        layers_per_block=1,
        block_out_channels=TINY_BLOCK_OUT,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_eps=1e-6,
        norm_num_groups=TINY_GROUPS,
    )
    kwargs.update(overrides)
    return kwargs


def build_tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**tiny_unet_kwargs(**overrides))
    # Default init leaves every GroupNorm at weight 1 / bias 0; jitter them so magnitude
    # ranking depends on real, channel-specific values everywhere.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return model.eval()


def save_pipeline(model, path: Path, num_train_timesteps: int = TINY_NUM_TRAIN_TIMESTEPS) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=num_train_timesteps)).save_pretrained(
        path, safe_serialization=True
    )
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with the tiny one-head U-Net."""
    path = tmp_path_factory.mktemp("models") / "tiny-ddpm"
    with one_thread():
        return save_pipeline(build_tiny_unet(seed=0), path)


@pytest.fixture(scope="session")
def tiny_heads_model_dir(tmp_path_factory) -> Path:
    """The same layout with multi-head attention (head dim 8: 8 heads at 64 channels)."""
    path = tmp_path_factory.mktemp("models") / "tiny-ddpm-heads"
    with one_thread():
        return save_pipeline(build_tiny_unet(seed=1, attention_head_dim=8), path)


@pytest.fixture(scope="session")
def pruned_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model uniformly pruned at 0.5 (magnitude): a student for distillation."""
    out = tmp_path_factory.mktemp("pruned") / "tiny-pruned-050"
    with one_thread():
        run_prune(tiny_model_dir, 0.5, out, importance="magnitude", device="cpu")
    return out


@pytest.fixture(scope="module")
def single_thread():
    """Use as a module-scoped autouse fixture in modules that run tiny models."""
    with one_thread():
        yield


@pytest.fixture
def run_cli(capsys):
    """Run `difcompress ARGS...` in-process: returns (exit_code, stdout, stderr)."""
    from difcompress.cli import main

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()  # drop whatever was printed before
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:  # sys.exit("message")
                code = 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_python(code: str, *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c CODE` in a fresh interpreter (offline); the run_subprocess fixture, for
    fixtures of a wider scope."""
    full_env = dict(os.environ)
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONWARNINGS": "ignore",
                     "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture
def run_subprocess():
    """Run `python -c CODE` in a fresh interpreter (offline); returns the CompletedProcess.

    For checks that must hold without difcompress: the code should assert at its end that
    difcompress was never imported.
    """
    return run_python


NO_DIFCOMPRESS_CHECK = """
import sys as _sys
assert not any(m == "difcompress" or m.startswith("difcompress.") for m in _sys.modules), "difcompress was imported"
"""


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(code: int, stderr: str, expected_code: int | None = None) -> str:
    """A user mistake: non-zero exit, no traceback, exactly one 'error:' line on stderr."""
    assert code != 0, stderr
    if expected_code is not None:
        assert code == expected_code, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]


# ---- DiT and latent pipelines ------------------------------------------------------------

TINY_DIT_CLASSES = 10  # matches the digits labels used as training data


def build_tiny_dit(seed: int = 0, **overrides):
    """DiT-XL/2's layout in miniature: adaLN-Zero, learned sigma (out = 2 x in), patch 2."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    kwargs = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
                  sample_size=4, patch_size=2, num_embeds_ada_norm=TINY_DIT_CLASSES)
    kwargs.update(overrides)
    model = DiTTransformer2DModel(**kwargs)
    # adaLN-Zero starts every block as the identity; random weights make pruning visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0, 0.05)
    return model.eval()


def build_tiny_autoencoder(kind: str = "kl", seed: int = 0):
    """16x16 RGB images <-> 4x4 latents (4 channels for KL, 3 for VQ)."""
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(seed)
    common = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), norm_num_groups=4,
                  sample_size=16)
    if kind == "kl":
        return AutoencoderKL(latent_channels=4, **common).eval()
    return VQModel(latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3, scaling_factor=1.0, **common).eval()


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """A latent DiTPipeline folder: tiny DiT + tiny AutoencoderKL + DDIM scheduler."""
    from diffusers import DDIMScheduler, DiTPipeline

    path = tmp_path_factory.mktemp("models") / "tiny-dit"
    with one_thread():
        DiTPipeline(transformer=build_tiny_dit(), vae=build_tiny_autoencoder("kl"),
                    scheduler=DDIMScheduler(num_train_timesteps=TINY_NUM_TRAIN_TIMESTEPS)).save_pretrained(
            path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_ldm_dir(tmp_path_factory) -> Path:
    """An LDMPipeline folder: tiny U-Net over the latents of a tiny VQModel."""
    from diffusers import DDIMScheduler, LDMPipeline

    path = tmp_path_factory.mktemp("models") / "tiny-ldm"
    with one_thread():
        unet = build_tiny_unet(seed=2, sample_size=4, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
        LDMPipeline(vqvae=build_tiny_autoencoder("vq"), unet=unet,
                    scheduler=DDIMScheduler(num_train_timesteps=TINY_NUM_TRAIN_TIMESTEPS)).save_pretrained(
            path, safe_serialization=True)
    return path


# ---- the stage functions with the old positional shape, for short test calls ----------------

def run_prune(model, ratio, output, **settings):
    from difcompress.commands.prune import prune
    from difcompress.config import PruneConfig

    return prune(PruneConfig(model=str(model), ratio=ratio, output=output, **settings))


def run_distill(student, output, **settings):
    from difcompress.commands.distill import distill
    from difcompress.config import DistillConfig

    show_progress = settings.pop("show_progress", False)
    return distill(DistillConfig(student=str(student), output=output, **settings), show_progress=show_progress)


def run_eval(models, **settings):
    from difcompress.commands.evaluate import evaluate
    from difcompress.config import EvalConfig

    show_progress = settings.pop("show_progress", False)
    return evaluate(EvalConfig(models=[str(m) for m in models], **settings), show_progress=show_progress)


def run_export(model, output, **settings):
    from difcompress.commands.export import export
    from difcompress.config import ExportConfig

    return export(ExportConfig(model=str(model), output=output, **settings))


# ---- text-to-image: a tiny Stable Diffusion pipeline built from configs -------------------------

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def build_tiny_sd(folder: Path, seed: int = 0, **unet_overrides) -> Path:
    """SD 2.x's block pattern in miniature (4 levels, 2 layers per block, linear projections,
    heads per level): 16x16 images, 8x8 latents, a 2-layer CLIP text encoder over a
    character vocabulary written here."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from difcompress.data.text import write_character_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32, 32),
        down_block_types=SD_DOWN, up_block_types=SD_UP, cross_attention_dim=32, attention_head_dim=(2, 4, 4, 4),
        use_linear_projection=True, norm_num_groups=8), **unet_overrides})
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    tokenizer = CLIPTokenizer.from_pretrained(write_character_tokenizer(folder.parent / f"{folder.name}-tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDPMScheduler(num_train_timesteps=TINY_NUM_TRAIN_TIMESTEPS, steps_offset=1,
                                                    clip_sample=False), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    with one_thread():
        return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


def build_tiny_sdxl(folder: Path, seed: int = 0, **unet_overrides) -> Path:
    """SDXL's block pattern in miniature (3 levels, 2 layers per block, attention on the two
    inner levels at depths 2 and 6, text-and-time conditioning), two CLIP text encoders (the
    second with a projection) over the character vocabulary; 16x16 images, 8x8 latents."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from difcompress.data.text import write_character_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 6), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8), **unet_overrides})
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    tokenizer = CLIPTokenizer.from_pretrained(write_character_tokenizer(folder.parent / f"{folder.name}-tokenizer"))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)), tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(num_train_timesteps=TINY_NUM_TRAIN_TIMESTEPS, steps_offset=1,
                                                    timestep_spacing="leading"),
        add_watermarker=False).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    with one_thread():
        return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def write_captioned_digits(folder: Path, count: int = 24) -> Path:
    """An imagefolder tree of digits with a metadata.jsonl of captions ("a handwritten 7")."""
    from PIL import Image

    from difcompress.builtin import digits_images, digits_labels

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digits_images(16, 3)[:count], digits_labels()[:count]
    with (folder / "metadata.jsonl").open("w") as f:
        for i, (image, label) in enumerate(zip(images, labels)):
            pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"a handwritten {int(label)}"}) + "\n")
    return folder


def write_tiny_clip(folder: Path) -> Path:
    """A tiny transformers CLIPModel folder (character tokenizer, 16 px images) for CLIP score."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from difcompress.data.text import write_character_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_character_tokenizer(folder))
    CLIPModel(CLIPConfig(text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 16,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                      "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                         vision_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                         projection_dim=8)).save_pretrained(folder, safe_serialization=True)
    return folder
