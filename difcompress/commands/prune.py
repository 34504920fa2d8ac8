"""`difcompress prune`: remove a fraction of every prunable layer's channels (U-Net), or
heads and blocks (DiT), and write a folder stock diffusers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difcompress.artifacts.folders import (
    check_output_folder,
    pruning_report,
    save_model_folder,
)
from difcompress.config import GRADIENT_CRITERIA, PruneConfig
from difcompress.core.console import progress_bar
from difcompress.core.environment import resolve_device, seed_everything, versions
from difcompress.core.errors import UserError
from difcompress.core.files import atomic_folder, folder_lock, remove_temporaries
from difcompress.families.base import PruneRequest
from difcompress.loading.data import calibration_batch
from difcompress.loading.models import LoadedModel, load_model
from difcompress.metrics.cost import model_size
from difcompress.pruning.graph import groupnorm_groups
from difcompress.pruning.importance import accumulate_gradients


def prune(config: PruneConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Prune `config.model` into `config.output`; returns the prune report (widths, params
    and MACs before/after, kept blocks, warnings)."""
    depth_pruning = any(v is not None for v in (config.depth, config.blocks, config.single_depth,
                                                config.single_blocks))
    if config.ratio == 0 and not depth_pruning and config.preset is None:
        raise UserError("--ratio must be above 0 (0 is allowed with --depth/--blocks or --preset)", exit_code=2)
    if config.depth_criterion != "uniform" and config.depth is None and config.single_depth is None:
        raise UserError(f"--depth-criterion {config.depth_criterion} chooses which blocks --depth keeps; "
                        "give --depth", exit_code=2)
    output = check_output_folder(config.output, inputs=[config.model])
    with folder_lock(output):
        remove_temporaries(output)
        seed_everything(config.seed)
        loaded = load_model(config.model, resolve_device(config.device))
        if loaded.structure is not None and not config.global_pruning:
            raise UserError(f"{config.model} was pruned with --global (its widths are not uniform); prune it again "
                            "with --global")
        family = loaded.family
        if config.preset and config.preset not in family.presets:
            offers = f"its presets are {', '.join(family.presets)}" if family.presets else "it has none"
            raise UserError(f"--preset {config.preset} does not apply to a {family.name} model ({offers})",
                            exit_code=2)
        if depth_pruning and not loaded.family.supports_depth:
            raise UserError(f"depth pruning (--depth/--blocks) applies to transformer models, not "
                            f"{loaded.family.name}", exit_code=2)
        report, student, structure = _prune_loaded(config, loaded, show_progress)
        manifest = {"stage": "prune", "family": loaded.family.name, "teacher": _teacher_reference(loaded),
                    "structure": "record" if config.global_pruning else "config", "seed": config.seed,
                    "data": config.data, "versions": versions(), "report": report}
        needed = sum(p.numel() * p.element_size() for p in student.parameters())
        with atomic_folder(output, needed_bytes=needed) as tmp:
            save_model_folder(tmp, student.to("cpu"), loaded.scheduler, loaded.family, manifest, structure,
                              autoencoder=loaded.autoencoder, pipeline_settings=loaded.pipeline_settings,
                              text=loaded.text)
    report["output"] = str(output.resolve())
    return report


def _gradients(config: PruneConfig, loaded: LoadedModel, calibration, show_progress: bool) -> int:
    """Accumulate the gradients Taylor-style criteria read, with a bar over timesteps."""
    with progress_bar(show_progress) as progress:
        task = progress.add_task(f"{config.importance} importance (timesteps)", total=None)
        return accumulate_gradients(
            loaded.model, loaded.family, loaded.scheduler, calibration[0], calibration[1], config.importance,
            seed=config.seed, threshold=config.diff_threshold, max_timesteps=config.importance_timesteps,
            timesteps_per_pass=config.timesteps_per_pass or (16 if loaded.model.device.type == "cuda" else 1),
            on_progress=lambda done, total: progress.update(task, completed=done, total=total))


def _prune_loaded(config: PruneConfig, loaded: LoadedModel, show_progress: bool):
    """(report, pruned model, --global structure record) for a loaded model."""
    family, model = loaded.family, loaded.model
    teacher_size = model_size(model, family)
    widths_before = family.stage_widths(model)
    base_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    calibration = timesteps_used = None
    if config.importance in GRADIENT_CRITERIA or config.depth_criterion != "uniform":
        x0, conditions = calibration_batch(loaded, config.data, config.batch_size, config.seed, config.split,
                                           config.image_column)
        calibration = (x0, conditions, loaded.scheduler)
    if config.importance in GRADIENT_CRITERIA:
        timesteps_used = _gradients(config, loaded, calibration, show_progress)
    request = PruneRequest(ratio=config.ratio, importance=config.importance, global_pruning=config.global_pruning,
                           depth=config.depth, blocks=config.blocks, single_depth=config.single_depth,
                           single_blocks=config.single_blocks, depth_criterion=config.depth_criterion,
                           calibration=calibration, seed=config.seed, round_to=config.round_to,
                           preset=config.preset)
    outcome = family.prune(model, request)
    earlier = pruning_report(loaded.manifest) or {}
    if "kept_blocks" in outcome.details and "kept_blocks" in earlier:
        # Pruned again: record blocks of the original teacher, which stays the teacher.
        outcome.details["kept_blocks"] = _through(earlier["kept_blocks"], outcome.details["kept_blocks"])
        outcome.details["blocks"] = earlier["blocks"]
    model.zero_grad(set_to_none=True)
    student = outcome.model
    family.check_pruned(student)
    structure = None
    if config.global_pruning:
        # Pruning a --global result again extends its record, so one replay rebuilds both.
        earlier_record = loaded.structure or {"base_config": base_config, "history": []}
        structure = {"base_config": earlier_record["base_config"],
                     "history": earlier_record["history"] + outcome.history,
                     "groupnorm_groups": groupnorm_groups(student)}
    student_size = model_size(student, family)
    report = {
        "source": loaded.source, "family": family.name, "pruned_unit": family.pruned_unit,
        "latent": loaded.autoencoder is not None,
        "ratio": config.ratio, "importance": config.importance, "mode": "global" if config.global_pruning else "uniform",
        **outcome.details, "importance_timesteps": timesteps_used,
        "widths": {k: [widths_before[k], v] for k, v in family.stage_widths(student).items()},
        "params": [teacher_size["params"], student_size["params"]],
        "macs": [teacher_size["macs"], student_size["macs"]],
        "params_reduction": 1 - student_size["params"] / teacher_size["params"],
        "macs_reduction": 1 - student_size["macs"] / teacher_size["macs"],
        "requested_channel_reduction": config.ratio, "warnings": outcome.warnings,
    }
    return report, student, structure


def _through(earlier, now):
    """Blocks of the original teacher: `now` indexes the blocks `earlier` kept (one list, or
    one list per block list by name)."""
    if isinstance(now, dict):
        return {name: _through(earlier[name], kept) if name in earlier else kept for name, kept in now.items()}
    return [earlier[i] for i in now]


def _teacher_reference(loaded: LoadedModel) -> str:
    """Where the teacher lives: the original source, followed through difcompress folders."""
    if loaded.manifest and loaded.manifest.get("teacher"):
        return loaded.manifest["teacher"]
    return str(loaded.path.resolve()) if Path(loaded.source).exists() else loaded.source
