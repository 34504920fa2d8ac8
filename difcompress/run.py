"""`difcompress run RECIPE.yaml`: the whole chain from one recipe, resumable.

A recipe names a run folder and the stages to run in order (prune, distill, eval,
export); each stage's settings are the parameters of the stage function. Stage outputs
are `<output_dir>/<stage>` and feed the next stage. A stage whose output is complete is
skipped, and an interrupted distill resumes from its last checkpoint, so re-running a
recipe after a crash continues where it stopped.

Under `accelerate launch` every process runs the recipe: distill runs data-parallel on
all of them, the other stages on the main process only while the rest wait for its
output folder to be complete.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from difcompress.checkpoint import latest_checkpoint
from difcompress.errors import UserError
from difcompress.folders import read_manifest

STAGE_ORDER = ("prune", "distill", "eval", "export")


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PruneStage(_Stage):
    model: str
    ratio: float
    importance: Literal["random", "magnitude", "taylor", "diff-pruning"] = "magnitude"
    data: Optional[str] = None
    global_pruning: bool = False
    depth: Optional[int] = None
    blocks: Optional[list[int]] = None
    depth_criterion: Literal["uniform", "output-change"] = "uniform"
    batch_size: int = 16
    diff_threshold: float = 0.05
    importance_timesteps: Optional[int] = None


class DistillStage(_Stage):
    student: Optional[str] = None  # default: the prune stage's output
    teacher: Optional[str] = None
    loss: Literal["task", "mse", "feature", "dist", "lift", "place"] = "place"
    data: str = "teacher"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    w_task: float = 1.0
    w_kd: float = 1.0
    w_feat: Optional[float] = None
    group_size: int = 16
    coarse_norm: Literal["l1", "l2"] = "l2"
    ema_decay: float = 0.9999
    grad_clip: Optional[float] = 1.0
    checkpoint_every: int = 500
    antithetic: bool = False
    feature_layers: Optional[list[str]] = None
    feature_mask_std: float = 0.0
    w_feat_schedule: Literal["constant", "linear"] = "constant"
    class_dropout: float = 0.1
    latent_cache: Optional[str] = None
    teacher_samples: int = 512
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


class EvalStage(_Stage):
    models: Optional[list[str]] = None  # default: teacher and the last model stage's output
    fid: bool = False
    num_samples: int = 1000
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sampler_steps: int = 100
    ref: Optional[str] = None
    inception: Optional[str] = None
    feature_extractor: Optional[str] = None
    guidance_scale: Optional[float] = None
    class_labels: Optional[list[int]] = None
    batch_size: int = 64
    latency_batch_size: int = 16
    grid_size: int = 8


class ExportStage(_Stage):
    model: Optional[str] = None  # default: the last model stage's output
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    output_dir: str
    seed: int = 0
    device: str = "auto"
    prune: Optional[PruneStage] = None
    distill: Optional[DistillStage] = None
    eval: Optional[EvalStage] = None
    export: Optional[ExportStage] = None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a YAML mapping of settings")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: {where}: {first['msg']} ({err.error_count()} problem(s) in all)") from None
    if not any(getattr(recipe, s) for s in STAGE_ORDER):
        raise UserError(f"{path} lists no stage (prune, distill, eval, export)")
    if recipe.distill and not recipe.distill.student and not recipe.prune:
        raise UserError(f"{path}: distill needs a student (or a prune stage before it)")
    return recipe


def resolve_stages(recipe: Recipe) -> list[tuple[str, dict[str, Any], Path]]:
    """Each stage's function arguments with the chain filled in, and its output folder."""
    root = Path(recipe.output_dir)
    stages = []
    latest_model = None
    teacher = recipe.prune.model if recipe.prune else None
    for name in STAGE_ORDER:
        spec = getattr(recipe, name)
        if spec is None:
            continue
        out = root / name
        args = spec.model_dump()
        if name == "prune":
            args.update(seed=recipe.seed, device=recipe.device)
            latest_model = str(out)
        elif name == "distill":
            args["student"] = args["student"] or latest_model
            teacher = args["teacher"] or teacher
            args.update(seed=recipe.seed, device=recipe.device)
            latest_model = str(out)
        elif name == "eval":
            args["models"] = args["models"] or [m for m in (teacher, latest_model) if m]
            if not args["models"]:
                raise UserError("eval stage: name models (no earlier stage produced one)")
            args.update(seed=recipe.seed, device=recipe.device)
        elif name == "export":
            args["model"] = args["model"] or latest_model
            if not args["model"]:
                raise UserError("export stage: name a model (no earlier stage produced one)")
        stages.append((name, args, out))
    return stages


def stage_complete(name: str, out: Path) -> bool:
    if name == "eval":
        return (out / "eval.json").is_file()
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None:
        return False
    return manifest.get("status", "complete") == "complete"


def run_recipe(path: str | Path, *, dry_run: bool = False, on_stage=None) -> list[dict[str, Any]]:
    recipe = load_recipe(path)
    plan = resolve_stages(recipe)
    # torchrun / accelerate launch set WORLD_SIZE and RANK; a lone RANK (some job pods) is not a launch.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    main_process = not launched or int(os.environ.get("RANK", "0")) == 0
    results = []
    for name, args, out in plan:
        done = stage_complete(name, out)
        entry = {"stage": name, "output": str(out), "settings": args,
                 "status": "complete (skipped)" if done else ("planned" if dry_run else "ran")}
        if on_stage:
            on_stage(entry)
        if not dry_run and not done:
            if name == "distill" or main_process:
                entry["result"] = _run_stage(name, args, out)
            else:
                if on_stage:
                    on_stage({**entry, "status": "waiting for the main process"})
                _wait_until_complete(name, out)
        results.append(entry)
    return results


def _wait_until_complete(name: str, out: Path, poll_seconds: float = 5.0) -> None:
    """Other processes wait for the main one by polling (a collective barrier would time out
    during a long prune or eval); if the main process fails, the launcher stops them."""
    while not stage_complete(name, out):
        time.sleep(poll_seconds)


def _run_stage(name: str, args: dict[str, Any], out: Path) -> dict[str, Any]:
    if name == "prune":
        from difcompress.prune import prune

        return prune(args.pop("model"), args.pop("ratio"), out, **args)
    if name == "distill":
        return distill_resumable(args.pop("student"), out, **args)
    if name == "eval":
        from difcompress.evaluate import evaluate

        return evaluate(args.pop("models"), output=out, **args)
    from difcompress.export import export

    return export(args.pop("model"), out, **args)


def distill_resumable(student: str, out: Path, **args) -> dict[str, Any]:
    """Distill into `out`, continuing an interrupted run from its last checkpoint."""
    from difcompress.distill import distill

    interrupted = out.is_dir() and (read_manifest(out) or {}).get("status") == "running"
    resume = interrupted and latest_checkpoint(out) is not None
    if interrupted and not resume:
        shutil.rmtree(out)  # stopped before its first checkpoint: nothing to keep
    return distill(student, out, resume=resume, **args)
