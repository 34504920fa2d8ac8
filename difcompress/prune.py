"""`difcompress prune`: remove a fraction of every prunable layer's channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difcompress.builtin import builtin_data
from difcompress.data import BatchStream, open_image_data
from difcompress.errors import UserError
from difcompress.folders import atomic_folder, check_output_folder, save_model_folder
from difcompress.loading import load_model
from difcompress.measure import model_size
from difcompress.pruning import (
    IMPORTANCE_CRITERIA,
    accumulate_gradients,
    groupnorm_groups,
    make_importance,
    prune_channels,
)
from difcompress.runtime import resolve_device, seed_everything, versions

GRADIENT_CRITERIA = ("taylor", "diff-pruning")


def importance_batch(loaded, data: str | None, batch_size: int, seed: int) -> torch.Tensor:
    """Real images from --data, or samples the teacher generates itself."""
    family, model = loaded.family, loaded.model
    c, h, _ = family.sample_shape(model)
    if data and data != "teacher":
        dataset = builtin_data(data, h, c) or open_image_data(data, h, c)
        return BatchStream(dataset, batch_size, seed=seed).next_batch()
    return family.sample(model, loaded.scheduler, batch_size, seed=seed, steps=50)


def prune(
    model: str,
    ratio: float,
    output: Path,
    *,
    importance: str = "magnitude",
    data: str | None = None,
    global_pruning: bool = False,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16,
    diff_threshold: float = 0.05,
    importance_timesteps: int | None = None,
) -> dict[str, Any]:
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must lie strictly between 0 and 1 (got {ratio})", exit_code=2)
    if importance not in IMPORTANCE_CRITERIA:
        raise UserError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCE_CRITERIA)}", exit_code=2)
    output = check_output_folder(output)
    seed_everything(seed)
    loaded = load_model(model, resolve_device(device))
    if loaded.structure is not None and not global_pruning:
        raise UserError(f"{model} was pruned with --global (its widths are not uniform); prune it again with --global")
    family, student = loaded.family, loaded.model
    teacher_size = model_size(student, family)
    widths_before = family.stage_widths(student)
    base_config = {k: v for k, v in dict(student.config).items() if not k.startswith("_")}

    timesteps_used = None
    if importance in GRADIENT_CRITERIA:
        batch = importance_batch(loaded, data, batch_size, seed)
        timesteps_used = accumulate_gradients(
            student, family, loaded.scheduler, batch, importance,
            seed=seed, threshold=diff_threshold, max_timesteps=importance_timesteps,
        )
    outcome = prune_channels(student, family, ratio, make_importance(importance), global_pruning=global_pruning)
    student.zero_grad(set_to_none=True)
    family.check_pruned(student)

    structure = None
    if global_pruning:
        # Pruning a --global result again extends its record, so one replay rebuilds both.
        earlier = loaded.structure or {"base_config": base_config, "history": []}
        structure = {"base_config": earlier["base_config"], "history": earlier["history"] + outcome.history,
                     "groupnorm_groups": groupnorm_groups(student)}
    else:
        _check_config_rebuild(student, family)
    student_size = model_size(student, family)
    report = {
        "source": loaded.source,
        "family": family.name,
        "ratio": ratio,
        "importance": importance,
        "mode": "global" if global_pruning else "uniform",
        "groupnorm_groups_kept": outcome.uniform_groups,
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
        save_model_folder(tmp, student.to("cpu"), loaded.scheduler, family, manifest, structure)
    report["output"] = str(output)
    return report


def _teacher_reference(loaded) -> str:
    """Where the teacher lives: the original source, followed through difcompress folders."""
    if loaded.manifest and loaded.manifest.get("teacher"):
        return loaded.manifest["teacher"]
    return str(loaded.path.resolve()) if Path(loaded.source).exists() else loaded.source


def _check_config_rebuild(model, family) -> None:
    """The stock class built from the rewritten config must reproduce the pruned model."""
    config = family.pruned_config(model)
    rebuilt = family.model_class.from_config(config).to(next(model.parameters()).device)
    missing = rebuilt.load_state_dict(model.state_dict(), strict=False)
    inputs = family.example_inputs(model, 2)
    with torch.no_grad():
        same = not (missing.missing_keys or missing.unexpected_keys) and torch.allclose(
            model(**inputs).sample, rebuilt(**inputs).sample, atol=1e-5
        )
    if not same:
        raise RuntimeError("pruned widths are not expressible in the stock config; use --global")
    model.register_to_config(**config)
