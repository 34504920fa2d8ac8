"""`difcompress eval`: compare models side by side (size, speed, memory, FID/KID, samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difcompress.errors import UserError
from difcompress.folders import read_manifest, write_json
from difcompress.loading import load_model
from difcompress.measure import model_size, sampling_cost
from difcompress.runtime import resolve_device, seed_everything

EVAL_FILE = "eval.json"
# DiT's FID setting (Peebles & Xie 2023, Table 4: DiT-XL/2 FID 2.27 with cfg = 1.50).
DEFAULT_GUIDANCE = 1.5


def default_output(models: list[str]) -> Path:
    """Next to the first model when it is a difcompress folder (export reads it there)."""
    first = Path(models[0])
    return first / "eval" if first.is_dir() and read_manifest(first) else Path("difcompress-eval")


def evaluate(
    models: list[str],
    *,
    fid: bool = False,
    num_samples: int = 1000,
    sampler: str = "ddim",
    sampler_steps: int = 100,
    ref: str | None = None,
    inception: str | None = None,
    feature_extractor: str | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    class_labels: list[int] | None = None,
    batch_size: int = 64,
    latency_batch_size: int = 16,
    grid_size: int = 8,
    output: Path | None = None,
    device: str = "auto",
    show_progress: bool = False,
) -> dict[str, Any]:
    if not models:
        raise UserError("name at least one model to evaluate", exit_code=2)
    if grid_size < 1:
        raise UserError("--grid-size must be at least 1", exit_code=2)
    if fid and num_samples < 2:
        raise UserError("--num-samples must be at least 2 for FID", exit_code=2)
    dev = resolve_device(device)
    output = Path(output) if output else default_output(models)
    loaded = [load_model(m, dev) for m in models]

    extractor = reference = None
    protocol = None
    if fid:
        from difcompress.metrics import features_of_images, get_feature_extractor, load_reference

        from difcompress.builtin import digits_images, is_digits_model, register_digits_extractor

        register_digits_extractor()
        digits = is_digits_model(loaded[0])
        name = feature_extractor or ("digits" if digits else "inception")
        ref = ref or ("digits" if digits else None)
        if ref is None:
            raise UserError("--fid needs --ref DIR|STATS.npz (real images or saved reference statistics)", exit_code=2)
        extractor = get_feature_extractor(name, weights_path=inception, device=dev)
        if ref == "digits":  # the real images the embedded teacher learned
            c, h, _ = loaded[0].image_shape()
            reference = features_of_images(digits_images(h, c), extractor, batch_size=batch_size)
        else:
            reference = load_reference(ref, extractor)
        protocol = {"mode": "clean", "num_samples": num_samples, "sampler": sampler, "steps": sampler_steps,
                    "seed": seed, "reference": str(ref), "feature_extractor": name}

    from difcompress.report import progress_bar

    with progress_bar(show_progress and fid) as progress:
        rows, grid = _measure_all(models, loaded, progress, fid=fid, num_samples=num_samples, sampler=sampler,
                                  sampler_steps=sampler_steps, seed=seed, guidance_scale=guidance_scale,
                                  class_labels=class_labels, batch_size=batch_size,
                                  latency_batch_size=latency_batch_size, grid_size=grid_size,
                                  extractor=extractor, reference=reference, protocol=protocol)
    from difcompress.plots import save_sample_grid

    output.mkdir(parents=True, exist_ok=True)
    grid_path = save_sample_grid(output / "samples.png", grid)
    result = {"models": rows, "protocol": protocol, "grid": str(grid_path), "device": str(dev),
              "sampler": sampler, "sampler_steps": sampler_steps}
    write_json(output / EVAL_FILE, result)
    result["output"] = str(output)
    return result


def conditioning(item, count: int, guidance_scale: float | None, class_labels: list[int] | None, seed: int):
    """Labels (given ones cycled, else balanced over classes) and guidance for one model."""
    import torch

    from difcompress.data import check_labels
    from difcompress.sampling import balanced_labels

    classes = item.family.num_classes(item.model)
    if not classes:
        if class_labels or guidance_scale not in (None, 1.0):
            raise UserError(f"{item.source} is unconditional: --class-label and --guidance-scale do not apply",
                            exit_code=2)
        return None, 1.0
    guidance = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    if guidance < 1:
        raise UserError("--guidance-scale must be at least 1 (1 disables guidance)", exit_code=2)
    if guidance != 1.0 and item.family.null_class(item.model) is None:
        raise UserError(f"{item.source} has no null-class embedding, so no classifier-free guidance; "
                        "pass --guidance-scale 1", exit_code=2)
    if class_labels:
        given = check_labels(torch.tensor(class_labels), classes, "--class-label")
        return given[torch.arange(count) % len(given)], guidance
    return balanced_labels(count, classes, seed), guidance


def _measure_all(models, loaded, progress, *, fid, num_samples, sampler, sampler_steps, seed, guidance_scale,
                 class_labels, batch_size, latency_batch_size, grid_size, extractor, reference, protocol):
    rows, grid = [], []
    for spec, item in zip(models, loaded):
        seed_everything(seed)
        count = num_samples if fid else grid_size
        labels, guidance = conditioning(item, count, guidance_scale, class_labels, seed)
        row: dict[str, Any] = {"model": spec, "family": item.family.name, "latent": item.autoencoder is not None}
        if labels is not None:
            row["guidance_scale"] = guidance
        row.update(model_size(item.model, item.family))
        # With guidance every step evaluates the denoiser on a doubled batch.
        row.update(sampling_cost(item.model, item.family, batch_size=latency_batch_size, steps=sampler_steps,
                                 calls_per_step=2 if labels is not None and guidance != 1.0 else 1))
        task = progress.add_task(f"sampling {Path(spec).name or spec}", total=count) if fid else None
        features, shown = [], []
        # A batch at a time: decoded images go to the feature extractor and are dropped, so
        # memory does not grow with --num-samples. Sample i still depends only on seed + i.
        for start in range(0, count, batch_size):
            end = min(count, start + batch_size)
            images = item.to_images(item.sample(
                end - start, seed=seed + start, steps=sampler_steps, sampler=sampler, batch_size=batch_size,
                class_labels=labels[start:end] if labels is not None else None, guidance_scale=guidance))
            if fid:
                from difcompress.metrics import features_of_images

                features.append(features_of_images(images, extractor, batch_size=batch_size))
                progress.advance(task, end - start)
            if sum(len(x) for x in shown) < grid_size:
                shown.append(images[: grid_size - sum(len(x) for x in shown)])
        if fid:
            import numpy as np

            from difcompress.metrics import fid_kid

            row.update(fid_kid(np.concatenate(features), reference, seed=seed))
            row["protocol"] = protocol
        grid.append((Path(spec).name or spec, torch.cat(shown)))
        rows.append(row)
    return rows, grid
