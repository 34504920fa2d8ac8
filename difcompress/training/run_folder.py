"""The distill run folder: what may start a run in it, its log, and how the final student is
published.

    OUT/difcompress.json            "status": "running" from the moment a run starts (or is
                                    extended) until the final student is completely in place
    OUT/metrics.jsonl, curves.png   the log and its plot
    OUT/checkpoints/step-XXXXXXX/   resumable training state (artifacts/checkpoint.py)
    OUT/teacher_samples/            data-free runs: the teacher's samples, made once
    OUT/model_index.json, unet/ ... the final student, a diffusers pipeline folder

Everything here runs on the main process while it holds the run's lock (core/files.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from difcompress.artifacts.checkpoint import (
    latest_checkpoint,
    remove_checkpoint_temporaries,
)
from difcompress.artifacts.folders import MANIFEST, read_manifest, save_model_folder
from difcompress.core.errors import UserError
from difcompress.core.files import (
    disk_errors,
    remove,
    share_permissions,
    write_json,
    write_text,
)

STUDENT_TMP = ".student.tmp"
# What an interrupted first run leaves that a restart from step 0 replaces.
RUN_STATE = ("metrics.jsonl", "curves.png", "checkpoints", "teacher_samples")
# The older folder format kept a second copy of the denoiser at the top level.
OLD_TOP_LEVEL_COPY = ("config.json", "diffusion_pytorch_model.safetensors")


def prepare_run_folder(output: Path, resume: bool) -> tuple[bool, list[str]]:
    """Check that `output` may hold this run, clean what killed runs left, and mark it
    running (after check_output_folder has refused files and foreign folders). Returns whether
    to resume from a checkpoint, and notes for the user."""
    notes: list[str] = []
    if output.is_dir():
        shutil.rmtree(output / STUDENT_TMP, ignore_errors=True)
        remove_checkpoint_temporaries(output)
    if output.is_dir() and any(output.iterdir()):
        manifest = read_manifest(output)
        if manifest is None or manifest.get("stage") != "distill":
            raise UserError(f"output folder {output} exists and is not a difcompress distill run; choose another -o")
        has_checkpoint = latest_checkpoint(output) is not None
        if manifest.get("status") == "running" and not has_checkpoint:
            notes.append(f"{output} holds a run that stopped before its first checkpoint: starting it again from "
                         "step 0")
            for name in RUN_STATE:
                remove(output / name)
            resume = False
        elif not resume:
            raise UserError(f"{output} already holds a distill run; pass --resume to continue it (or to extend it "
                            "with a larger --steps), or choose another -o")
        elif not has_checkpoint:
            raise UserError(f"--resume: {output} has no checkpoint to continue from (it ran with "
                            "--checkpoint-every 0); choose another -o")
    elif resume:
        raise UserError(f"--resume: {output} holds no run to resume")
    with disk_errors(output):
        output.mkdir(parents=True, exist_ok=True)
    write_json(output / MANIFEST, {"stage": "distill", "status": "running"})
    return resume, notes


def remove_unused_run_folder(output: Path) -> None:
    """Remove a run folder holding nothing but its "running" mark: a run stopped while
    setting up (models, teacher, data) leaves no folder behind that claims a run."""
    if output.is_dir() and {p.name for p in output.iterdir()} == {MANIFEST}:
        remove(output)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to `step` (a resumed run rewrites what came after), dropping a
    line torn by a crash."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", step + 1) <= step:
                kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: Path, line: dict[str, Any]) -> None:
    with disk_errors(path.parent), path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def publish_student(output: Path, model, loaded_student, manifest: dict[str, Any]) -> None:
    """Write the final student into the run folder. The manifest says "running" while the
    model files are replaced one by one, and "complete" only once all are in place."""
    tmp = output / STUDENT_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(output, sum(p.numel() * p.element_size() for p in model.parameters())):
        tmp.mkdir()
        try:
            save_model_folder(tmp, model, loaded_student.scheduler, loaded_student.family, manifest,
                              loaded_student.structure, autoencoder=loaded_student.autoencoder,
                              pipeline_settings=loaded_student.pipeline_settings, text=loaded_student.text)
            share_permissions(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for name in OLD_TOP_LEVEL_COPY:
            (output / name).unlink(missing_ok=True)
        for item in tmp.iterdir():
            if item.name == MANIFEST:
                continue
            dest = output / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            item.replace(dest)
        (tmp / MANIFEST).replace(output / MANIFEST)
        tmp.rmdir()
