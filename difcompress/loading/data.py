"""`--data` for every command, resolved in one place: a folder of images, a saved dataset,
the built-in 'digits', or 'teacher' (the teacher's own samples), in the denoiser's space
(encoded through the cached VAE for latent models)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from difcompress.builtin import builtin_data
from difcompress.config import DistillConfig
from difcompress.core.console import progress_bar, warn
from difcompress.core.errors import UserError
from difcompress.core.files import (
    build_once,
    resolved_source,
    write_json,
    write_tensors,
)
from difcompress.data.conditions import Conditions
from difcompress.data.datasets import (
    Framing,
    MirroredDataset,
    TensorImageDataset,
    TrainingSet,
    check_class_data,
    open_image_data,
)
from difcompress.data.images import frame_rows
from difcompress.data.latents import default_cache_root, latent_training_data
from difcompress.data.stream import BatchStream
from difcompress.data.text import cached_text, read_prompts
from difcompress.diffusion.sampling import Guidance, balanced_labels

TEACHER = "teacher"
TEACHER_SAMPLES = "teacher_samples"  # the cache folder of a data-free run's samples, inside the run
SAMPLES_FILE = "samples.safetensors"


def image_data(data: str, loaded, split: str | None = None, image_column: str | None = None,
               caption_column: str | None = None, size: int | None = None, crop_seed: int | None = None) -> Dataset:
    """Pixel images (with class labels for class-conditional models, captions for text-to-image
    ones) for `loaded`'s channels, at its size unless `size` is given; checked against the
    model before any long work."""
    c, h, _ = loaded.image_shape()
    h = size or h
    dataset = builtin_data(data, h, c) or open_image_data(data, h, c, split=split, image_column=image_column,
                                                          caption_column=caption_column, crop_seed=crop_seed)
    captions = getattr(dataset, "captions", None)
    if loaded.family.takes_text and captions is None:
        raise UserError(f"{data} has no captions for a text-to-image model: give an imagefolder with a metadata "
                        "file, a dataset with a text column (--caption-column), or same-stem .txt files", 2)
    if loaded.family.takes_text and not any(captions):
        raise UserError(f"no row of {data} has a caption (all {len(captions)} are empty); a text-to-image model "
                        "trains on captions: fill the caption column or pass --caption-column", 2)
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
    multiple = loaded.family.size_multiple(loaded.model)
    if multiple is None:
        raise UserError(f"--resolution: a {loaded.family.name} model's position embeddings fix its image size "
                        f"({native}); drop --resolution", exit_code=2)
    factor = (loaded.autoencoder.downscale if loaded.autoencoder else 1) * multiple
    if resolution % factor:
        raise UserError(f"--resolution {resolution} must be a multiple of {factor} for this model (its size is "
                        f"{native})", exit_code=2)
    return resolution


def framed_image_data(data: str, loaded, framing: Framing, seed: int, **columns) -> Dataset:
    """Training images framed as asked: resolution, centre or seeded crops, mirrored copies."""
    images = image_data(data, loaded, size=training_size(loaded, framing.resolution),
                        crop_seed=None if framing.center_crop else seed, **columns)
    return MirroredDataset(images) if framing.random_flip else images


@dataclass(frozen=True)
class Processes:
    """Which process this is: the main one says things and writes the run's files; the
    local main one (one per machine) builds the caches every process reads."""

    is_main: bool = True
    is_local_main: bool = True
    show_progress: bool = False


def teacher_samples(teacher, count: int, *, seed: int, noise_seed: int, steps: int, prompts: list[str] | None = None,
                    cache: Path | None = None, processes: Processes = Processes(), cache_root: Path | None = None,
                    guidance: float | None = None) -> TrainingSet:
    """The teacher's own samples (latents for latent models) under balanced class labels or
    the given prompts (guided as the family samples its data; `guidance`: the value a
    guidance-distilled teacher reads), generated once and kept in `cache` when given."""
    family, model = teacher.family, teacher.model
    classes = family.num_classes(model)
    labels = balanced_labels(count, classes, seed) if classes else None
    text = null_text = None
    if prompts is not None:
        text, null_text, _ = cached_text(prompts, teacher.text, cache_root or default_cache_root(),
                                         encode_here=processes.is_local_main)
    _, height, width = teacher.image_shape()
    conditions = family.conditions(model, labels=labels, text=text, geometry=frame_rows(None, count, height, width),
                                   guidance=guidance)
    null = family.null_conditions(model, text=null_text)

    def generate():
        with progress_bar(processes.show_progress) as progress:
            task = progress.add_task("sampling the teacher's training data (once)", total=count)
            images = teacher.sample(count, seed=noise_seed, steps=steps, on_batch=lambda n: progress.advance(task, n),
                                    guidance=Guidance(conditions, null, family.teacher_data_guidance))
        return {"images": images, **({"labels": labels} if labels is not None else {})}

    saved = _kept_samples(cache, processes.is_local_main, generate)
    return TrainingSet(TensorImageDataset(saved["images"], saved.get("labels")), conditions, null)


def _kept_samples(folder: Path | None, build_here: bool, generate) -> dict[str, torch.Tensor]:
    """Generated tensors, kept in the cache `folder` (core.files.build_once: one process
    generates under the folder's lock, the others wait and read) when given."""
    if folder is None:
        return generate()

    def write(tmp: Path) -> None:
        tensors = generate()
        write_tensors(tmp / SAMPLES_FILE, tensors)
        write_json(tmp / "index.json", {"items": len(next(iter(tensors.values())))})

    build_once(folder, write, build_here=build_here)
    return load_file(folder / SAMPLES_FILE)


def training_data(config: DistillConfig, student, teacher, *, cache_dir: Path, processes: Processes = Processes()
                  ) -> tuple[TrainingSet, dict[str, Any]]:
    """The training set in the denoiser's space, with each item's conditions (class labels,
    or its caption's encoding, encoded once and cached), and a report (data, latent and text
    caches, skipped files)."""
    framing = Framing(config.resolution, config.center_crop, config.random_flip)
    _check_guidance(config.guidance_scale, [m for m in (student, teacher) if m is not None], processes.is_main)
    if config.data == TEACHER:
        if not framing.is_default:
            raise UserError("--resolution, --no-center-crop and --random-flip frame image data; --data teacher is "
                            "the teacher's own samples", exit_code=2)
        return _teacher_data(config, student, teacher, cache_dir, processes)
    images = framed_image_data(config.data, student, framing, config.seed, split=config.split,
                               image_column=config.image_column, caption_column=config.caption_column)
    report = _source_report(config.data, images, warn_here=processes.is_main, captions=student.family.takes_text)
    dataset, latents = latent_training_data(images, student.autoencoder, training_size(student, framing.resolution),
                                            cache_root=config.latent_cache, is_main=processes.is_local_main,
                                            show_progress=processes.show_progress)
    if latents:
        report["latent_cache"] = latents
    text = null_text = None
    if student.family.takes_text:
        text, null_text = _encoded_captions(images.captions, student.text, config.latent_cache, processes, report)
    family, model = student.family, student.model
    geometry = None
    if family.reads_geometry:
        size = training_size(student, framing.resolution)
        geometry = frame_rows(images.geometry() if hasattr(images, "geometry") else None, len(images), size, size)
    conditions = family.conditions(model, labels=getattr(dataset, "labels", None), text=text, geometry=geometry,
                                   guidance=config.guidance_scale)
    return TrainingSet(dataset, conditions, family.null_conditions(model, text=null_text)), report


def _encoded_captions(captions: list[str], text, cache_root: Path | None, processes: Processes,
                      report: dict[str, Any]) -> tuple[Conditions, Conditions]:
    """The captions' encodings (cached) and the empty prompt's; captions the tokenizer
    truncates are counted in the report and warned about once."""
    long = text.truncated(captions)
    report["truncated_captions"] = len(long)
    if long and processes.is_main:
        warn(f"{len(long)} of {len(captions)} captions are longer than {text.max_length} tokens and are truncated "
             f"to them, as the pipeline truncates prompts (first: {long[0][:60]!r})")
    encodings, empty, report["text_cache"] = cached_text(captions, text, cache_root or default_cache_root(),
                                                         encode_here=processes.is_local_main)
    return encodings, empty


def _check_guidance(value: float | None, models: list, warn_here: bool) -> None:
    """Every guidance-distilled model of the run (teacher or student) needs --guidance-scale;
    a value that none of them reads is said once, not silently dropped."""
    for loaded in models:
        loaded.family.check_guidance(loaded.model, value)
    if value is not None and warn_here and not any(m.family.takes_guidance(m.model) for m in models):
        warn(f"--guidance-scale {value:g}: neither teacher nor student is guidance-distilled, so no model reads it")


def _teacher_data(config: DistillConfig, student, teacher, cache_dir: Path, processes: Processes
                  ) -> tuple[TrainingSet, dict[str, Any]]:
    """Data-free: the teacher's samples, generated once and kept with the run, so a resume
    trains on the same samples (under --prompts for a text-to-image teacher)."""
    prompts, report = None, {"data": TEACHER, "items": config.teacher_samples}
    if student.family.takes_text:
        if not config.prompts:
            raise UserError("--data teacher for a text-to-image model needs --prompts FILE", exit_code=2)
        prompts = (read_prompts(config.prompts) * config.teacher_samples)[:config.teacher_samples]
        report["prompts"] = str(config.prompts)
    data = teacher_samples(teacher, config.teacher_samples, seed=config.seed, noise_seed=config.seed + 1_000_003,
                           steps=config.teacher_sampler_steps, prompts=prompts,
                           cache=cache_dir / TEACHER_SAMPLES, processes=processes,
                           cache_root=config.latent_cache, guidance=config.guidance_scale)
    return data, report


def _source_report(data: str, images: Dataset, *, warn_here: bool, captions: bool) -> dict[str, Any]:
    """What the training images came from, with the unreadable files an image folder passed
    over and, for a text-to-image model, the rows without a caption (each warned about
    once, by the process that says so)."""
    scan = getattr(images, "scan", None)
    skipped = scan.unreadable if scan else []
    gaps = getattr(images, "caption_gaps", None) if captions else None
    survey = getattr(images, "survey", None)
    if warn_here:
        notes = (scan.unreadable_note() if skipped else None, gaps.note() if gaps else None,
                 survey.note() if survey else None)
        for note in notes:
            if note:
                warn(note)
    report = {"data": data, "resolved": resolved_source(data), "split": getattr(images, "split", None),
              "items": len(images), "unreadable_skipped": len(skipped),
              "first_unreadable": str(skipped[0]) if skipped else None,
              "converted": survey.converted if survey else {}, "upscaled": survey.upscaled if survey else 0}
    if captions:
        report["uncaptioned"] = gaps.missing if gaps else 0
        report["first_uncaptioned"] = gaps.first if gaps else None
    return report


def calibration_batch(loaded, data: str | None, batch_size: int, seed: int, split: str | None = None,
                      image_column: str | None = None) -> tuple[torch.Tensor, Conditions | None]:
    """A batch in the denoiser's space, with its conditions: real data from --data (encoded
    directly for latent models: one batch needs no cache; captions encoded for text-to-image
    models, which read the family's default guidance where they take one), or the teacher's
    samples."""
    family, model = loaded.family, loaded.model
    if family.takes_text and (not data or data == TEACHER):
        raise UserError("scoring a text-to-image model needs captioned images: pass --data (an imagefolder with "
                        "captions)", exit_code=2)
    if data and data != TEACHER:
        images = image_data(data, loaded, split, image_column)
        labels = getattr(images, "labels", None) if family.num_classes(model) else None
        rows = {"row": torch.arange(len(images))} if family.takes_text else family.conditions(model, labels=labels)
        batch, conditions = BatchStream(images, batch_size, seed=seed, conditions=rows).next_with_conditions()
        if family.takes_text:  # only the batch's captions are encoded
            captions = [images.captions[i] for i in conditions["row"].tolist()]
            conditions = family.conditions(model, text=loaded.text.encode(captions), guidance=family.default_guidance,
                                           geometry=frame_rows(None, len(captions), *loaded.image_shape()[1:]))
        if loaded.autoencoder is not None:
            batch = loaded.autoencoder.encode(batch)
        return batch, conditions
    samples = teacher_samples(loaded, batch_size, seed=seed, noise_seed=seed, steps=50)
    return samples.images.images, samples.conditions
