"""`difcompress eval`: compare models side by side (size, speed, memory, FID/KID, samples)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difcompress.artifacts.folders import EVAL_FILE, read_manifest
from difcompress.builtin import (
    digit_in_prompt,
    digits_images,
    is_digits_model,
    load_digits_classifier,
    prompt_hits,
    register_digits_extractor,
)
from difcompress.config import EvalConfig
from difcompress.core.console import progress_bar, warn
from difcompress.core.environment import resolve_device, seed_everything
from difcompress.core.errors import UserError
from difcompress.core.files import disk_errors, folder_lock, write_json
from difcompress.data.conditions import take
from difcompress.data.datasets import check_labels
from difcompress.data.images import frame_rows
from difcompress.data.text import read_prompts
from difcompress.diffusion.sampling import Guidance, balanced_labels
from difcompress.loading.models import load_model
from difcompress.metrics.clip import ClipScorer
from difcompress.metrics.cost import model_size, sampling_cost
from difcompress.metrics.extractors import features_of_images, get_feature_extractor
from difcompress.metrics.fid import Reference, fid_kid, load_reference
from difcompress.reports.plots import save_sample_grid

# What `difference_vs_first` subtracts (this row minus the first): quality and latency.
COMPARED = ("fid", "kid", "clip_score", "prompt_accuracy", "latency_s_per_image", "pipeline_s_per_image")


def weights_of(manifest: dict[str, Any] | None) -> str | None:
    """How an exported folder stores its weights: its dtype, or its --quantize scheme."""
    export = (manifest or {}).get("export") or {}
    quantize = export.get("quantize") or {}
    return quantize.get("scheme") or export.get("dtype")


def default_output(models: list[str]) -> Path:
    """Next to the first model when it is a difcompress folder (export reads it there)."""
    first = Path(models[0])
    return first / "eval" if first.is_dir() and read_manifest(first) else Path("difcompress-eval")


def evaluate(config: EvalConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Compare `config.models` side by side: params, MACs, latency, memory, FID/KID and a
    sample grid; writes eval.json and samples.png to the output folder."""
    output = Path(config.output) if config.output else default_output(config.models)
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is a file; choose another -o", exit_code=2)
    dev = resolve_device(config.device)
    with folder_lock(output):
        loaded = [load_model(m, dev) for m in config.models]
        # What --sampler runs as for each model (a flow model's Euler sampler answers to ddim).
        sampler = " / ".join(dict.fromkeys(item.family.formulation(item.model, item.scheduler)
                                           .check_sampler(config.sampler) for item in loaded))
        extractor, reference, protocol = (_fid_setup(config, loaded, dev, show_progress, sampler) if config.fid
                                          else (None, None, None))
        with progress_bar(show_progress and config.fid) as progress:
            rows, grid = _measure_all(config, loaded, progress, extractor, reference)
        for row in rows[1:]:  # against the first model (the teacher, or the unquantized export)
            row["speedup_vs_first"] = rows[0]["latency_s_per_image"] / row["latency_s_per_image"]
            row["macs_reduction_vs_first"] = rows[0]["macs"] / row["macs"]
            row["difference_vs_first"] = {m: row[m] - rows[0][m] for m in COMPARED
                                          if row.get(m) is not None and rows[0].get(m) is not None}
        with disk_errors(output):
            output.mkdir(parents=True, exist_ok=True)
        grid_path = save_sample_grid(output / "samples.png", grid,
                                     caption=_grid_caption(config, sampler, rows, protocol))
        result = {"models": rows, "protocol": protocol, "grid": str(grid_path.resolve()), "device": str(dev),
                  "sampler": sampler, "sampler_steps": config.sampler_steps}
        write_json(output / EVAL_FILE, result)
    result["output"] = str(output.resolve())
    return result


def _grid_caption(config: EvalConfig, sampler: str, rows: list[dict[str, Any]], protocol: dict[str, Any] | None
                  ) -> str:
    """What the grid shows: the sampler, and each model's FID when measured."""
    caption = f"{sampler} {config.sampler_steps} steps, seed {config.seed} (sample i: seed + i)"
    if rows[0].get("prompts"):
        caption += "\nprompts, left to right: " + " | ".join(rows[0]["prompts"])
    if protocol:
        fids = ", ".join(f"{Path(r['model']).name or r['model']} {r['fid']:.2f}" for r in rows)
        caption += f"\nFID: {fids} ({protocol['feature_extractor']}, {protocol['num_samples']} samples)"
    return caption


def _fid_setup(config: EvalConfig, loaded: list, dev: torch.device, show_progress: bool, sampler: str):
    """Feature extractor, reference features and the protocol every FID/KID is reported with."""
    register_digits_extractor()
    digits = is_digits_model(loaded[0])
    name = config.feature_extractor or ("digits" if digits else "inception")
    ref = config.ref or ("digits" if digits else None)
    if ref is None:
        raise UserError("--fid needs --ref DIR|STATS.npz (real images or saved reference statistics)", exit_code=2)
    extractor = get_feature_extractor(name, weights_path=config.inception, device=dev)
    if ref == "digits":  # the real images the embedded teacher learned
        c, h, _ = loaded[0].image_shape()
        reference = Reference.of_features(features_of_images(digits_images(h, c), extractor,
                                                             batch_size=config.batch_size), name, "digits")
    else:
        reference = load_reference(ref, extractor, batch_size=config.batch_size, show_progress=show_progress,
                                   image_size=loaded[0].image_shape()[1])
    protocol = {"mode": "clean", "num_samples": config.num_samples, "sampler": sampler,
                "steps": config.sampler_steps, "seed": config.seed, "reference": reference.source,
                "feature_extractor": name, "feature_dim": reference.dim}
    if config.num_samples < reference.dim:
        warn(f"FID from {config.num_samples} samples of {reference.dim}-d features is biased upward (the "
             f"covariance has fewer samples than dimensions); use --num-samples {reference.dim} or more to "
             "compare with published numbers")
    return extractor, reference, protocol


@dataclass
class EvalConditions:
    """What a model samples under (one condition row per sample, the null condition and the
    guidance scale), and the prompts for a text-to-image model."""

    guidance: Guidance
    prompts: list[str] | None = None


def eval_conditions(item, count: int, config: EvalConfig) -> EvalConditions:
    """Prompts (cycled) for a model that takes text, else class labels (given ones cycled,
    else balanced over classes), with the family's default guidance unless one is given."""
    family, model = item.family, item.model
    scale = family.default_guidance if config.guidance_scale is None else config.guidance_scale
    if family.takes_text:
        if not config.prompts:
            raise UserError(f"{item.source} is a text-to-image model: pass --prompts FILE", exit_code=2)
        prompts = read_prompts(config.prompts)
        prompts = [prompts[i % len(prompts)] for i in range(count)]
        _, height, width = item.image_shape()
        geometry = frame_rows(None, count, height, width)
        # A guidance-distilled model (FLUX.1-dev) reads the scale as an input; it has no null condition.
        cond = family.conditions(model, text=item.text.encode(prompts), geometry=geometry, guidance=scale)
        return EvalConditions(Guidance(cond,
                                       family.null_conditions(model, text=item.text.encode([config.negative_prompt])),
                                       scale), prompts)
    classes = family.num_classes(model)
    if not classes:
        if config.class_labels or config.guidance_scale not in (None, 1.0) or config.prompts:
            raise UserError(f"{item.source} is unconditional: --class-label, --prompts and --guidance-scale do not "
                            "apply", exit_code=2)
        return EvalConditions(Guidance())
    null = family.null_conditions(model)
    if scale != 1.0 and null is None:
        raise UserError(f"{item.source} has no null-class embedding, so no classifier-free guidance; "
                        "pass --guidance-scale 1", exit_code=2)
    if config.class_labels:
        given = check_labels(torch.tensor(config.class_labels), classes, "--class-label")
        labels = given[torch.arange(count) % len(given)]
    else:
        labels = balanced_labels(count, classes, config.seed)
    return EvalConditions(Guidance(family.conditions(model, labels=labels), null, scale))


@functools.lru_cache(maxsize=1)
def _digits_classifier(device: torch.device):
    return load_digits_classifier(device=device)


def _digits_reader(item, prompts: list[str] | None):
    """The digits classifier (loaded once), for prompt accuracy on digits-t2i models when
    every prompt names a digit."""
    if not prompts or not is_digits_model(item) or any(digit_in_prompt(p) is None for p in prompts):
        return None
    return _digits_classifier(next(item.model.parameters()).device)


def _measure_all(config: EvalConfig, loaded: list, progress, extractor, reference):
    rows, grid = [], []
    scorer = ClipScorer(config.clip_model, next(loaded[0].model.parameters()).device) if config.clip_model else None
    for spec, item in zip(config.models, loaded):
        seed_everything(config.seed)
        count = config.num_samples if config.fid else config.grid_size
        started = time.perf_counter()
        cond = eval_conditions(item, count, config)
        pipeline_s = time.perf_counter() - started  # prompt encoding is part of the pipeline
        guidance = cond.guidance
        row: dict[str, Any] = {"model": spec, "path": str(item.path.resolve()), "family": item.family.name,
                               "denoiser_kind": item.family.denoiser_kind, "latent": item.autoencoder is not None}
        if weights_of(item.manifest):
            row["weights"] = weights_of(item.manifest)
        if (item.manifest or {}).get("checkpoint"):
            row["checkpoint_step"] = item.manifest["checkpoint"]["step"]  # a running run looked at mid-way
        if guidance.conditions is not None and (guidance.null or item.family.takes_guidance(item.model)):
            row["guidance_scale"] = guidance.scale  # classifier-free, or the input of a guidance-distilled model
        if cond.prompts:
            row["prompts"] = cond.prompts[: config.grid_size]
        row.update(model_size(item.model, item.family))
        # With guidance every step evaluates the denoiser on a doubled batch.
        row.update(sampling_cost(item.model, item.family, batch_size=config.latency_batch_size,
                                 steps=config.sampler_steps,
                                 calls_per_step=2 if guidance.guided else 1))
        task = progress.add_task(f"sampling {Path(spec).name or spec}", total=count) if config.fid else None
        features, shown, clip, hits = [], [], [], []
        digits_reader = _digits_reader(item, cond.prompts)
        # A batch at a time: decoded images go to the feature extractor and are dropped, so
        # memory does not grow with --num-samples. Sample i still depends only on seed + i.
        for start in range(0, count, config.batch_size):
            end = min(count, start + config.batch_size)
            started = time.perf_counter()
            images = item.to_images(item.sample(
                end - start, seed=config.seed + start, steps=config.sampler_steps, sampler=config.sampler,
                batch_size=config.batch_size,
                guidance=Guidance(take(guidance.conditions, slice(start, end)), guidance.null, guidance.scale)))
            pipeline_s += time.perf_counter() - started
            if config.fid:
                features.append(features_of_images(images, extractor, batch_size=config.batch_size))
                progress.advance(task, end - start)
            if scorer is not None and cond.prompts:
                clip.append(scorer(images, cond.prompts[start:end]))
            if digits_reader is not None:
                hits.append(prompt_hits(digits_reader, images, cond.prompts[start:end]))
            if sum(len(x) for x in shown) < config.grid_size:
                shown.append(images[: config.grid_size - sum(len(x) for x in shown)])
        if config.fid:
            row.update(fid_kid(np.concatenate(features), reference, seed=config.seed), num_samples=count)
        # The whole pipeline as this eval ran it (encode, sample, decode), beside the denoiser alone.
        row.update(pipeline_s_per_image=pipeline_s / count, pipeline_batch_size=min(count, config.batch_size))
        if clip:
            row["clip_score"] = float(torch.cat(clip).mean())
        if hits:
            row["prompt_accuracy"] = float(torch.cat(hits).mean())
        grid.append((Path(spec).name or spec, torch.cat(shown)))
        rows.append(row)
    return rows, grid
