"""`--data` for every command, resolved in one place: a folder of images, a saved dataset,
the built-in 'digits', or 'teacher' (the teacher's own samples), in the denoiser's space
(encoded through the cached VAE for latent models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from difcompress.builtin import builtin_data
from difcompress.data.datasets import (
    Framing,
    MirroredDataset,
    TensorImageDataset,
    check_class_data,
    open_image_data,
)
from difcompress.data.latents import default_cache_root, latent_training_data
from difcompress.data.stream import BatchStream
from difcompress.data.text import cached_text, read_prompts
from difcompress.errors import UserError
from difcompress.families.sampling import balanced_labels
from difcompress.io.folders import resolved_source, write_tensors
from difcompress.io.report import warn

TEACHER = "teacher"
TEXT_GUIDANCE = 7.5  # Stable Diffusion's default guidance scale (StableDiffusionPipeline)


def image_data(data: str, loaded, split: str | None = None, image_column: str | None = None,
               caption_column: str | None = None, size: int | None = None, crop_seed: int | None = None) -> Dataset:
    """Pixel images (with class labels for class-conditional models, captions for text-to-image
    ones) for `loaded`'s channels, at its size unless `size` is given; checked against the
    model before any long work."""
    c, h, _ = loaded.image_shape()
    h = size or h
    dataset = builtin_data(data, h, c) or open_image_data(data, h, c, split=split, image_column=image_column,
                                                          caption_column=caption_column, crop_seed=crop_seed)
    if loaded.family.conditioning == "text" and getattr(dataset, "captions", None) is None:
        raise UserError(f"{data} has no captions for a text-to-image model: give an imagefolder with a metadata "
                        "file, a dataset with a text column (--caption-column), or same-stem .txt files", 2)
    classes = loaded.family.num_classes(loaded.model)
    if classes:
        check_class_data(dataset, classes, data)
    return dataset


def training_size(loaded, resolution: int | None) -> int:
    """The image size training reads: the model's own, or --resolution where its U-Net can
    take it (every level halves it, after the autoencoder's downscale)."""
    native = loaded.image_shape()[1]
    if resolution is None or resolution == native:
        return native
    levels = loaded.model.config.get("block_out_channels")
    if levels is None:
        raise UserError(f"--resolution: a {loaded.family.name} model's position embeddings fix its image size "
                        f"({native}); drop --resolution", exit_code=2)
    factor = (loaded.autoencoder.downscale if loaded.autoencoder else 1) * 2 ** (len(levels) - 1)
    if resolution % factor:
        raise UserError(f"--resolution {resolution} must be a multiple of {factor} for this model (its size is "
                        f"{native})", exit_code=2)
    return resolution


def framed_image_data(data: str, loaded, framing: Framing, seed: int, **columns) -> Dataset:
    """Training images framed as asked: resolution, centre or seeded crops, mirrored copies."""
    images = image_data(data, loaded, size=training_size(loaded, framing.resolution),
                        crop_seed=None if framing.center_crop else seed, **columns)
    return MirroredDataset(images) if framing.random_flip else images


def teacher_samples(teacher, count: int, *, label_seed: int, noise_seed: int, steps: int, cache: Path | None = None,
                    write_cache: bool = True) -> TensorImageDataset:
    """The teacher's own samples (latents for latent models; labels balanced over classes),
    generated once and kept in `cache` when given."""
    classes = teacher.family.num_classes(teacher.model)
    labels = balanced_labels(count, classes, label_seed) if classes else None

    def generate():
        images = teacher.sample(count, seed=noise_seed, steps=steps, class_labels=labels)
        return {"images": images, **({"labels": labels} if labels is not None else {})}

    saved = _kept_samples(cache, write_cache, generate)
    return TensorImageDataset(saved["images"], saved.get("labels"))


def _kept_samples(cache: Path | None, write_cache: bool, generate) -> dict[str, torch.Tensor]:
    """Generated tensors, read back from `cache` when an earlier run (or process) kept them."""
    if cache is not None and cache.is_file():
        return load_file(cache)
    tensors = generate()
    if cache is not None and write_cache:
        write_tensors(cache, tensors)
    return tensors


def training_data(data: str, student, teacher, *, samples: int, sampler_steps: int, seed: int,
                  cache_dir: Path, latent_cache: Path | None, is_main: bool, is_local_main: bool,
                  show_progress: bool, split: str | None = None, image_column: str | None = None,
                  caption_column: str | None = None, prompts: str | None = None,
                  framing: Framing = Framing()) -> tuple[Dataset, dict[str, Any]]:
    """The training set in the denoiser's space and a report (data, latent cache, skipped files);
    for text-to-image models each item's condition is its caption's encoding."""
    if data == TEACHER and not framing.is_default:
        raise UserError("--resolution, --no-center-crop and --random-flip frame image data; --data teacher is "
                        "the teacher's own samples", exit_code=2)
    if student.family.conditioning == "text":
        return _text_to_image_data(data, student, teacher, samples=samples, sampler_steps=sampler_steps, seed=seed,
                                   cache_dir=cache_dir, latent_cache=latent_cache, is_main=is_main,
                                   is_local_main=is_local_main,
                                   show_progress=show_progress, split=split, image_column=image_column,
                                   caption_column=caption_column, prompts=prompts, framing=framing)
    if data == TEACHER:
        # Data-free: generated once and kept with the run, so a resume trains on the same samples.
        dataset = teacher_samples(teacher, samples, label_seed=seed, noise_seed=seed + 1_000_003, steps=sampler_steps,
                                  cache=cache_dir / "teacher_samples.safetensors", write_cache=is_main)
        return dataset, {"data": TEACHER, "items": len(dataset)}
    images = framed_image_data(data, student, framing, seed, split=split, image_column=image_column)
    report = _source_report(data, images, warn_here=is_main)
    size = training_size(student, framing.resolution)
    dataset, latents = latent_training_data(images, student.autoencoder, size, cache_root=latent_cache,
                                            is_main=is_local_main, show_progress=show_progress)
    if latents:
        report["latent_cache"] = latents
    return dataset, report


def _source_report(data: str, images: Dataset, *, warn_here: bool) -> dict[str, Any]:
    """What the training images came from, with the unreadable files an image folder passed
    over (warned about once, by the process that says so)."""
    scan = getattr(images, "scan", None)
    skipped = scan.unreadable if scan else []
    if skipped and warn_here:
        warn(scan.unreadable_note())
    return {"data": data, "resolved": resolved_source(data), "split": getattr(images, "split", None),
            "items": len(images), "unreadable_skipped": len(skipped),
            "first_unreadable": str(skipped[0]) if skipped else None}


def calibration_batch(loaded, data: str | None, batch_size: int, seed: int, split: str | None = None,
                      image_column: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch in the denoiser's space, with class labels for conditional models: real data
    from --data (encoded directly for latent models: one batch needs no cache), or the
    teacher's samples."""
    classes = loaded.family.num_classes(loaded.model)
    if data and data != TEACHER:
        images, labels = BatchStream(image_data(data, loaded, split, image_column), batch_size,
                                     seed=seed).next_labeled_batch()
        if loaded.autoencoder is not None:
            images = loaded.autoencoder.encode(images)
        return images, labels if classes else None
    samples = teacher_samples(loaded, batch_size, label_seed=seed, noise_seed=seed, steps=50)
    return samples.images, samples.labels


def _text_to_image_data(data, student, teacher, *, samples, sampler_steps, seed, cache_dir, latent_cache,
                        is_main, is_local_main, show_progress, split, image_column, caption_column, prompts, framing):
    """Latents and caption encodings, both encoded once and cached; or, data-free, the
    teacher's samples of --prompts (guidance 7.5, as Stable Diffusion samples)."""
    root = latent_cache or default_cache_root()
    if data == TEACHER:
        if not prompts:
            raise UserError("--data teacher for a text-to-image model needs --prompts FILE", exit_code=2)
        captions = (read_prompts(prompts) * samples)[:samples]
        encodings, empty, _ = cached_text(captions, student.text, root, encode_here=is_local_main)
        images = _kept_samples(cache_dir / "teacher_samples.safetensors", is_local_main, lambda: {
            "images": teacher.sample(samples, seed=seed + 1_000_003, steps=sampler_steps, class_labels=encodings,
                                     guidance_scale=TEXT_GUIDANCE, null_condition=empty)})["images"]
        return TensorImageDataset(images, encodings, empty), {"data": TEACHER, "prompts": str(prompts),
                                                              "items": samples}
    images = framed_image_data(data, student, framing, seed, split=split, image_column=image_column,
                               caption_column=caption_column)
    size = training_size(student, framing.resolution)
    latents, latent_report = latent_training_data(images, student.autoencoder, size, cache_root=latent_cache,
                                                  is_main=is_local_main, show_progress=show_progress)
    encodings, empty, text_report = cached_text(images.captions, student.text, root, encode_here=is_local_main)
    report = {**_source_report(data, images, warn_here=is_main), "latent_cache": latent_report,
              "text_cache": text_report}
    return TensorImageDataset(latents.images, encodings, empty), report
