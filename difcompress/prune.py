"""`difcompress prune`: remove a fraction of every prunable layer's channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any


from difcompress.builtin import builtin_data
from difcompress.data import BatchStream, check_class_data, open_image_data
from difcompress.errors import UserError
from difcompress.families.base import PruneRequest
from difcompress.folders import atomic_folder, check_output_folder, pruning_report, save_model_folder
from difcompress.loading import load_model
from difcompress.measure import model_size
from difcompress.pruning import IMPORTANCE_CRITERIA, accumulate_gradients, groupnorm_groups
from difcompress.runtime import resolve_device, seed_everything, versions

GRADIENT_CRITERIA = ("taylor", "diff-pruning")


def calibration_batch(loaded, data: str | None, batch_size: int, seed: int):
    """A batch in the denoiser's space, with class labels for conditional models: real data
    from --data (encoded through the cached VAE for latent models), or the teacher's samples."""
    family, model = loaded.family, loaded.model
    classes = family.num_classes(model)
    if data and data != "teacher":
        c, h, _ = loaded.image_shape()
        dataset = builtin_data(data, h, c) or open_image_data(data, h, c)
        if classes:
            check_class_data(dataset, classes, data)
        images, labels = BatchStream(dataset, batch_size, seed=seed).next_labeled_batch()
        if loaded.autoencoder is not None:  # one batch: encode it directly, no need to cache the dataset
            images = loaded.autoencoder.encode(images)
        return images, labels if classes else None
    from difcompress.sampling import balanced_labels

    labels = balanced_labels(batch_size, classes, seed) if classes else None
    return loaded.sample(batch_size, seed=seed, steps=50, class_labels=labels), labels


def prune(
    model: str,
    ratio: float,
    output: Path,
    *,
    importance: str = "magnitude",
    data: str | None = None,
    global_pruning: bool = False,
    depth: int | None = None,
    blocks: list[int] | None = None,
    depth_criterion: str = "uniform",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16,
    diff_threshold: float = 0.05,
    importance_timesteps: int | None = None,
) -> dict[str, Any]:
    depth_pruning = depth is not None or blocks is not None
    if not (0 < ratio < 1 or (ratio == 0 and depth_pruning)):
        raise UserError(f"--ratio must lie strictly between 0 and 1 (0 is allowed with --depth/--blocks; got {ratio})",
                        exit_code=2)
    if importance not in IMPORTANCE_CRITERIA:
        raise UserError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCE_CRITERIA)}", exit_code=2)
    output = check_output_folder(output)
    seed_everything(seed)
    loaded = load_model(model, resolve_device(device))
    if loaded.structure is not None and not global_pruning:
        raise UserError(f"{model} was pruned with --global (its widths are not uniform); prune it again with --global")
    family, student = loaded.family, loaded.model
    if depth_pruning and not family.supports_depth:
        raise UserError(f"depth pruning (--depth/--blocks) applies to transformer models, not {family.name}", 2)
    teacher_size = model_size(student, family)
    widths_before = family.stage_widths(student)
    base_config = {k: v for k, v in dict(student.config).items() if not k.startswith("_")}

    timesteps_used = calibration = None
    if depth_criterion != "uniform" and depth is None:
        raise UserError(f"--depth-criterion {depth_criterion} chooses which blocks --depth keeps; give --depth", 2)
    if importance in GRADIENT_CRITERIA or depth_criterion == "output-change":
        x0, labels = calibration_batch(loaded, data, batch_size, seed)
        calibration = (x0, labels, loaded.scheduler)
    if importance in GRADIENT_CRITERIA:
        timesteps_used = accumulate_gradients(
            student, family, loaded.scheduler, calibration[0], calibration[1], importance,
            seed=seed, threshold=diff_threshold, max_timesteps=importance_timesteps,
        )
    request = PruneRequest(ratio=ratio, importance=importance, global_pruning=global_pruning, depth=depth,
                           blocks=blocks, depth_criterion=depth_criterion, calibration=calibration, seed=seed)
    outcome = family.prune(student, request)
    earlier = pruning_report(loaded.manifest) or {}
    if "kept_blocks" in outcome.details and "kept_blocks" in earlier:
        # Pruned again: record blocks of the original teacher, which stays the teacher.
        outcome.details["kept_blocks"] = [earlier["kept_blocks"][i] for i in outcome.details["kept_blocks"]]
        outcome.details["blocks"] = earlier["blocks"]
    student.zero_grad(set_to_none=True)
    student = outcome.model
    family.check_pruned(student)

    structure = None
    if global_pruning:
        # Pruning a --global result again extends its record, so one replay rebuilds both.
        earlier = loaded.structure or {"base_config": base_config, "history": []}
        structure = {"base_config": earlier["base_config"], "history": earlier["history"] + outcome.history,
                     "groupnorm_groups": groupnorm_groups(student)}
    student_size = model_size(student, family)
    report = {
        "source": loaded.source,
        "family": family.name,
        "latent": loaded.autoencoder is not None,
        "ratio": ratio,
        "importance": importance,
        "mode": "global" if global_pruning else "uniform",
        **outcome.details,
        "importance_timesteps": timesteps_used,
        "widths": {k: [widths_before[k], v] for k, v in family.stage_widths(student).items()},
        "params": [teacher_size["params"], student_size["params"]],
        "macs": [teacher_size["macs"], student_size["macs"]],
        "params_reduction": 1 - student_size["params"] / teacher_size["params"],
        "macs_reduction": 1 - student_size["macs"] / teacher_size["macs"],
        "requested_channel_reduction": ratio,
        "warnings": outcome.warnings,
    }
    manifest = {
        "stage": "prune",
        "family": family.name,
        "teacher": _teacher_reference(loaded),
        "structure": "record" if global_pruning else "config",
        "seed": seed,
        "data": data,
        "versions": versions(),
        "report": report,
    }
    with atomic_folder(output) as tmp:
        save_model_folder(tmp, student.to("cpu"), loaded.scheduler, family, manifest, structure,
                          autoencoder=loaded.autoencoder, pipeline_settings=loaded.pipeline_settings)
    report["output"] = str(output)
    return report


def _teacher_reference(loaded) -> str:
    """Where the teacher lives: the original source, followed through difcompress folders."""
    if loaded.manifest and loaded.manifest.get("teacher"):
        return loaded.manifest["teacher"]
    return str(loaded.path.resolve()) if Path(loaded.source).exists() else loaded.source
