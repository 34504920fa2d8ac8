"""`difcompress build-digits`: train the embedded digits teachers and classifier that ship
in difcompress/assets/digits/ (the recipe of the shipped files: docs/embedded.md)."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from difcompress.builtin import (
    ASSETS,
    T2I_TEACHER_NAME,
    TEACHERS,
    digits_images,
    train_digits_classifier,
)
from difcompress.commands.run import run_stage
from difcompress.config import BuildDigitsConfig, DistillConfig
from difcompress.core.errors import UserError
from difcompress.core.files import atomic_folder, write_json
from difcompress.data.text import write_character_tokenizer, write_t5_tokenizer
from difcompress.families.registry import FAMILIES
from difcompress.layouts import (
    DIGITS_DIT_CONFIG,
    DIGITS_FLUX_SCHEDULER,
    DIGITS_FLUX_T5,
    DIGITS_FLUX_T5_LENGTH,
    DIGITS_FLUX_TRANSFORMER,
    DIGITS_T2I_TEXT,
    DIGITS_T2I_UNET,
    DIGITS_T2I_VAE,
    DIGITS_TEACHER_CONFIG,
)

# Stable Diffusion's noise schedule (its scheduler_config.json): latents are never clipped.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, steps_offset=1)
# Training state stays in the run folder; only the pipeline ships.
NOT_SHIPPED = ("checkpoints", "metrics.jsonl", "teacher_samples")


def create_untrained_teacher(folder: Path, seed: int, config: dict[str, Any] = DIGITS_TEACHER_CONFIG,
                             family: str = "unet2d") -> None:
    """A freshly initialised pipeline folder: the starting point the trainer trains."""
    torch.manual_seed(seed)
    adapter = FAMILIES[family]
    with atomic_folder(folder) as tmp:
        adapter.pipeline(adapter.model_class(**config), DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
            tmp, safe_serialization=True)
        write_json(tmp / "difcompress.json", {"stage": "init", "status": "complete", "config": config})


def train_digits_autoencoder(seed: int, steps: int = 1500) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The digits-t2i autoencoder: reconstruction MSE plus a tiny KL (SD's VAE recipe in
    miniature), then SD's convention of a scaling factor giving latents unit variance."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**DIGITS_T2I_VAE)
    images = digits_images(DIGITS_T2I_VAE["sample_size"], 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = images[torch.randint(len(images), (64,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = (vae.decode(posterior.sample(generator)).sample - batch).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        error = (vae.decode(latents).sample - images).pow(2).mean().item()
    vae.register_to_config(scaling_factor=round(1 / latents.std().item(), 5))
    return vae, {"autoencoder_steps": steps, "reconstruction_mse": error,
                 "scaling_factor": vae.config.scaling_factor}


def create_untrained_t2i_teacher(folder: Path, seed: int) -> dict[str, Any]:
    """The digits-t2i starting point: a trained autoencoder, a frozen random CLIP text
    encoder over the project's character tokenizer, an untrained SD-pattern U-Net."""
    vae, report = train_digits_autoencoder(seed)
    torch.manual_seed(seed)
    with atomic_folder(folder) as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_character_tokenizer(
            tmp / "tokenizer", model_max_length=DIGITS_T2I_TEXT["max_position_embeddings"]))
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **DIGITS_T2I_TEXT)).eval()
        StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=UNet2DConditionModel(**DIGITS_T2I_UNET),
            scheduler=DDPMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False).save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "difcompress.json", {"stage": "init", "status": "complete", "config": DIGITS_T2I_UNET,
                                              "autoencoder": report})
    return report


def shifted_autoencoder(vae: AutoencoderKL) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Give an autoencoder FLUX.1's latent convention, (z - shift_factor) * scaling_factor of
    zero mean and unit variance over the digits (FluxPipeline reads both factors)."""
    with torch.no_grad():
        latents = vae.encode(digits_images(vae.config.sample_size, vae.config.in_channels)).latent_dist.mean
    vae.register_to_config(shift_factor=round(latents.mean().item(), 5),
                           scaling_factor=round(1 / latents.std().item(), 5))
    return vae, {"shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor}


def create_untrained_flux_teacher(folder: Path, seed: int) -> dict[str, Any]:
    """The digits-flux starting point: digits-t2i's trained autoencoder (shifted and scaled as
    Flux's), frozen random CLIP and T5 encoders over the project's character tokenizers, an
    untrained FLUX.1-layout transformer and schnell's flow-matching scheduler."""
    t2i = ASSETS / TEACHERS[T2I_TEACHER_NAME][0]
    if not (t2i / "vae").is_dir():
        raise UserError("digits-flux reuses digits-t2i's autoencoder: build it first with "
                        "`difcompress build-digits --family t2i`")
    vae, report = shifted_autoencoder(AutoencoderKL.from_pretrained(t2i / "vae").eval())
    torch.manual_seed(seed)
    with atomic_folder(folder) as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_character_tokenizer(
            tmp / "tokenizer", model_max_length=DIGITS_T2I_TEXT["max_position_embeddings"]))
        t5_tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp / "tokenizer_2", DIGITS_FLUX_T5_LENGTH))
        FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**DIGITS_FLUX_SCHEDULER), vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **DIGITS_T2I_TEXT)).eval(),
            tokenizer=tokenizer, tokenizer_2=t5_tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **DIGITS_FLUX_T5)).eval(),
            transformer=FluxTransformer2DModel(**DIGITS_FLUX_TRANSFORMER)).save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "difcompress.json", {"stage": "init", "status": "complete", "config": DIGITS_FLUX_TRANSFORMER,
                                              "autoencoder": {"from": "digits-t2i", **report}})
    return report


@dataclass(frozen=True)
class TeacherBuild:
    """How one family's digits teacher starts and trains: the untrained folder, what its
    training adds to the shared settings, and whether the digits classifier is trained with it."""

    start: Callable[[Path, int], Any]
    training: dict[str, Any] = field(default_factory=dict)
    with_classifier: bool = False


TEACHER_BUILDS = {
    "unet2d": TeacherBuild(functools.partial(create_untrained_teacher, config=DIGITS_TEACHER_CONFIG, family="unet2d"),
                           with_classifier=True),
    "dit": TeacherBuild(functools.partial(create_untrained_teacher, config=DIGITS_DIT_CONFIG, family="dit")),
    # The text-to-image U-Net warms its learning rate up (attention from scratch at lr 1e-3 diverges otherwise).
    "t2i": TeacherBuild(create_untrained_t2i_teacher,
                        {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 200}),
    # Flux never drops captions (families/flux.py): the task loss on every caption.
    "flux": TeacherBuild(create_untrained_flux_teacher,
                         {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 200}),
}


def build_digits_assets(config: BuildDigitsConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Train the digits classifier (with the U-Net) and a digits teacher; write them to the
    output (default: the package's assets)."""
    output = Path(config.output or ASSETS)
    folder_name = next(folder for folder, fam in TEACHERS.values() if fam == config.family)
    build = TEACHER_BUILDS[config.family]
    output.mkdir(parents=True, exist_ok=True)
    classifier_report = None
    if build.with_classifier:
        classifier, classifier_report = train_digits_classifier(config.seed)
        save_file(classifier.state_dict(), output / "classifier.safetensors")
        (output / "classifier.json").write_text(json.dumps(classifier_report, indent=2) + "\n")
    work_dir = Path(config.work_dir)
    init = work_dir / f"{folder_name}-init"
    if not init.is_dir():
        build.start(init, config.seed)
    autoencoder_report = json.loads((init / "difcompress.json").read_text()).get("autoencoder")
    run = work_dir / folder_name
    summary = run_stage("distill", DistillConfig(
        student=str(init), output=run, loss="task", data="digits", steps=config.teacher_steps,
        batch_size=config.batch_size, lr=config.lr, ema_decay=0.999, seed=config.seed, checkpoint_every=500,
        device=config.device, latent_cache=work_dir / "cache", **build.training), show_progress)
    target = output / folder_name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target, ignore=lambda _folder, names: [n for n in names if n in NOT_SHIPPED])
    return {"classifier": classifier_report, "autoencoder": autoencoder_report, "teacher_steps": config.teacher_steps,
            "final_loss": summary["final"].get("loss"), "output": str(output)}
