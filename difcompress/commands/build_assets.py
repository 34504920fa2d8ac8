"""`difcompress build-digits`: train the embedded digits teachers and classifier that ship
in difcompress/assets/digits/ (the recipe of the shipped files: docs/embedded.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from difcompress.builtin import ASSETS, TEACHERS, train_digits_classifier
from difcompress.commands.run import run_stage
from difcompress.config import BuildDigitsConfig, DistillConfig
from difcompress.families.registry import FAMILIES
from difcompress.io.folders import atomic_folder, write_json
from difcompress.layouts import DIGITS_DIT_CONFIG, DIGITS_TEACHER_CONFIG

LAYOUTS = {"unet2d": DIGITS_TEACHER_CONFIG, "dit": DIGITS_DIT_CONFIG}
# Training state stays in the run folder; only the pipeline ships.
NOT_SHIPPED = ("checkpoints", "metrics.jsonl", "teacher_samples.safetensors")


def create_untrained_teacher(folder: Path, seed: int, config: dict[str, Any] = DIGITS_TEACHER_CONFIG,
                             family: str = "unet2d") -> None:
    """A freshly initialised pipeline folder: the starting point the trainer trains."""
    torch.manual_seed(seed)
    adapter = FAMILIES[family]
    with atomic_folder(folder) as tmp:
        adapter.pipeline(adapter.model_class(**config), DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
            tmp, safe_serialization=True)
        write_json(tmp / "difcompress.json", {"stage": "init", "status": "complete", "config": config})


def build_digits_assets(config: BuildDigitsConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Train the digits classifier (with the U-Net) and a digits teacher; write them to the
    output (default: the package's assets)."""
    output = Path(config.output or ASSETS)
    folder_name = next(folder for folder, fam in TEACHERS.values() if fam == config.family)
    output.mkdir(parents=True, exist_ok=True)
    report = None
    if config.family == "unet2d":
        classifier, report = train_digits_classifier(config.seed)
        save_file(classifier.state_dict(), output / "classifier.safetensors")
        (output / "classifier.json").write_text(json.dumps(report, indent=2) + "\n")
    work_dir = Path(config.work_dir)
    init = work_dir / f"{folder_name}-init"
    if not init.is_dir():
        create_untrained_teacher(init, config.seed, LAYOUTS[config.family], config.family)
    run = work_dir / folder_name
    summary = run_stage("distill", DistillConfig(
        student=str(init), output=run, loss="task", data="digits", steps=config.teacher_steps,
        batch_size=config.batch_size, lr=config.lr, ema_decay=0.999, seed=config.seed, checkpoint_every=500,
        device=config.device), show_progress)
    target = output / folder_name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target, ignore=lambda _folder, names: [n for n in names if n in NOT_SHIPPED])
    return {"classifier": report, "teacher_steps": config.teacher_steps,
            "final_loss": summary["final"].get("loss"), "output": str(output)}
