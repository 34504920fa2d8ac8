"""`difcompress run RECIPE.yaml`: the whole chain from one recipe, resumable.

A recipe names a run folder and the stages to run in order (prune, distill, eval,
export); each stage's settings are those of its command (config.py). Stage outputs are
`<output_dir>/<stage>` and feed the next stage. A stage whose output is complete is
skipped, and an interrupted distill resumes from its last checkpoint, so re-running a
recipe after a crash continues where it stopped.

Under `accelerate launch` every process runs the recipe: distill runs data-parallel on
all of them, the other stages on the main process only while the rest wait for its
output folder to be complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml
from huggingface_hub import try_to_load_from_cache
from pydantic import ValidationError

from difcompress.artifacts.folders import EVAL_FILE, read_manifest
from difcompress.builtin import builtin_model_path
from difcompress.commands.distill import distill, plan_distill
from difcompress.commands.evaluate import evaluate
from difcompress.commands.export import export
from difcompress.commands.prune import prune
from difcompress.config import (
    CHAIN_FIELDS,
    STAGE_CONFIGS,
    DistillConfig,
    Recipe,
    SettingsError,
    StageConfig,
    settings_error,
)
from difcompress.core.environment import hub_offline, is_main_process
from difcompress.core.errors import UserError
from difcompress.core.files import file_in_the_way, read_text, wait_for
from difcompress.data.datasets import HF_PREFIX
from difcompress.loading.models import looks_local
from difcompress.metrics.extractors import resolve_inception_path
from difcompress.metrics.fid import cleanfid_named_stats

STAGE_ORDER = ("prune", "distill", "eval", "export")
RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {"prune": prune, "distill": distill, "eval": evaluate,
                                                     "export": export}


class _RecipeLoader(yaml.SafeLoader):
    """safe_load's YAML, except that a key given twice is an error rather than the last one
    silently winning (`ratio: 0.3` ... `ratio: 0.5` in one stage is a mistake)."""


def _mapping_without_repeats(loader: _RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = []
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node, deep=deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every problem is one UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a recipe file (recipes/*.yaml)")
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = yaml.load(read_text(path), Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a YAML mapping of settings")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: {settings_error(err, 'recipe')}", exit_code=2) from None
    if not any(getattr(recipe, s) is not None for s in STAGE_ORDER):
        raise UserError(f"{path} lists no stage (prune, distill, eval, export)")
    return recipe


def resolve_stages(recipe: Recipe, path: str | Path = "recipe") -> list[tuple[str, StageConfig]]:
    """Each stage's validated config, with the chain filled in (models from earlier stages,
    outputs under output_dir, the recipe's seed and device unless a stage sets its own)."""
    root = Path(recipe.output_dir)
    teacher = (recipe.prune or {}).get("model")
    latest_model: str | None = None
    stages = []
    for name in STAGE_ORDER:
        given = getattr(recipe, name)
        if given is None:
            continue
        if "output" in given:
            raise UserError(f"{path}: {name}.output: stage outputs are {root}/<stage>; set output_dir instead", 2)
        fields = STAGE_CONFIGS[name].model_fields
        defaults = {k: getattr(recipe, k) for k in ("seed", "device") if k in fields}
        values = {**defaults, **given, "output": root / name}
        if name == "distill":
            values.setdefault("student", latest_model)
            teacher = values.get("teacher") or teacher
        elif name == "eval":
            values.setdefault("models", [m for m in (teacher, latest_model) if m])
        elif name == "export":
            values.setdefault("model", latest_model)
        missing = [f for f in CHAIN_FIELDS[name] if values.get(f) in (None, [])]
        if missing:
            raise UserError(f"{path}: {name} needs {missing[0]} (no earlier stage produced one)", exit_code=2)
        try:
            config = STAGE_CONFIGS[name].build(values, where=name)
        except SettingsError as err:
            raise UserError(f"{path}: {err}", exit_code=2) from None
        if name in ("prune", "distill"):
            latest_model = str(config.output)
        stages.append((name, config))
    return stages


def stage_complete(name: str, out: Path) -> bool:
    """Whether a stage's output is finished (a complete manifest, or eval.json for eval)."""
    if name == "eval":
        return (out / EVAL_FILE).is_file()
    manifest = read_manifest(out) if out.is_dir() else None
    return manifest is not None and manifest.get("status", "complete") == "complete"


def _model_missing(reference: str) -> str | None:
    """Why a model reference cannot be loaded here, or None."""
    if builtin_model_path(reference) or Path(reference).expanduser().is_dir():
        return None
    if looks_local(reference):
        return "no such folder"
    if try_to_load_from_cache(reference, "model_index.json") or try_to_load_from_cache(reference, "config.json"):
        return None
    # owner/name could be either: a folder that is not there, or a hub id not cached
    return "no such folder, nor in the Hugging Face cache (HF_HUB_OFFLINE is set)" if hub_offline() else None


def _data_missing(reference: str | None) -> str | None:
    if not reference or reference in ("teacher", "digits") or reference.startswith(HF_PREFIX):
        return None
    return None if Path(reference).expanduser().exists() else "no such folder or file"


def missing_inputs(stages: list[tuple[str, StageConfig]]) -> list[str]:
    """What a dry run can check before anything runs: models, data, --ref and --inception
    (outputs of earlier stages are planned, not missing), and a file where an output's
    folder would go."""
    produced = {str(config.output) for _, config in stages}
    problems = []

    def check(what: str, reference, finder) -> None:
        if reference and str(reference) not in produced:
            reason = finder(str(reference))
            if reason:
                problems.append(f"{what} {reference}: {reason}")

    for name, config in stages:
        blocking = file_in_the_way(config.output) if config.output else None
        if blocking is not None:
            problems.append(f"{name}.output {config.output}: {blocking} is a file, not a folder")
        for field in ("model", "student", "teacher"):
            check(f"{name}.{field}", getattr(config, field, None), _model_missing)
        for model in getattr(config, "models", None) or []:
            check(f"{name}.models", model, _model_missing)
        check(f"{name}.data", getattr(config, "data", None), _data_missing)
        ref = getattr(config, "ref", None)
        if ref and ref != "digits" and not Path(ref).exists() and cleanfid_named_stats(ref) is None:
            problems.append(f"{name}.ref {ref}: no such folder or file, nor a clean-fid dataset in its cache")
        if name == "eval" and config.fid and (config.feature_extractor or "inception") == "inception" \
                and config.ref != "digits":
            try:
                resolve_inception_path(config.inception)
            except UserError as err:
                problems.append(f"eval.inception: {err}")
    return problems


def run_recipe(path: str | Path, *, dry_run: bool = False, on_stage=None,
               show_progress: bool = False) -> list[dict[str, Any]]:
    """Run (or, with `dry_run`, only plan) a recipe's stages; complete ones are skipped. A
    dry run prints the whole plan, then names every missing input (an error when there is one)."""
    recipe = load_recipe(path)
    stages = resolve_stages(recipe, path)
    results = []
    for name, config in stages:
        out = Path(config.output)
        done = stage_complete(name, out)
        entry = {"stage": name, "output": str(out), "settings": config.model_dump(mode="json"),
                 "status": "complete (skipped)" if done else ("planned" if dry_run else "ran")}
        if dry_run and name == "distill" and not done:
            entry["memory"] = _planned_memory(config)
        if on_stage:
            on_stage(entry)
        if not dry_run and not done:
            if name == "distill" or is_main_process():
                entry["result"] = run_stage(name, config, show_progress)
            else:
                if on_stage:
                    on_stage({**entry, "status": "waiting for the main process"})
                wait_for(lambda: stage_complete(name, out))
        results.append(entry)
    if dry_run:
        problems = missing_inputs(stages)
        if problems:
            raise UserError(f"{len(problems)} input(s) or output(s) of {path} are missing or blocked: "
                            + "; ".join(problems))
    return results


def _planned_memory(config: DistillConfig) -> dict[str, Any] | str:
    """The distill stage's peak-memory estimate, once its student exists."""
    if not stage_complete("prune", Path(config.student)):
        return "estimated once the student exists (difcompress distill --dry-run with the same settings)"
    return plan_distill(config)["memory"]


def run_stage(name: str, config: StageConfig, show_progress: bool = False) -> dict[str, Any]:
    """Run one stage; an interrupted distill continues from its checkpoint."""
    if name == "distill" and (read_manifest(config.output) if Path(config.output).is_dir() else None):
        config = config.model_copy(update={"resume": True})
    return RUNNERS[name](config, show_progress=show_progress)
