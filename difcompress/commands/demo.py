"""`difcompress demo`: the whole chain offline, on real handwritten digits.

Starts from the embedded teacher (a pixel U-Net trained on scikit-learn's digits, shipped
in the package), prunes 90% of its channels, distills the student with PLACE, compares
teacher and student (digits-FID, params, MACs, latency), and exports the student. Each
step is skipped when its output is already complete, so an interrupted demo continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from difcompress.builtin import TEACHER_NAME
from difcompress.commands.run import run_stage, stage_complete
from difcompress.config import (
    DemoConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    PruneConfig,
)

FULL = {"steps": 2000, "batch_size": 64, "sampler_steps": 50, "fid_samples": 1000, "grid": 16}
QUICK = {"steps": 20, "batch_size": 16, "sampler_steps": 10, "fid_samples": 64, "grid": 8}


def demo_stages(config: DemoConfig) -> list[tuple[str, str, Any]]:
    """(step name, stage, config) of the demo chain."""
    s = QUICK if config.quick else FULL
    out = Path(config.output)
    common = {"seed": config.seed, "device": config.device}
    return [
        ("pruned", "prune", PruneConfig(model=TEACHER_NAME, ratio=config.ratio, output=out / "pruned", **common)),
        ("student", "distill", DistillConfig(
            student=str(out / "pruned"), output=out / "student", teacher=TEACHER_NAME, loss="place", data="digits",
            steps=s["steps"], batch_size=s["batch_size"], lr=1e-3, ema_decay=0.999, checkpoint_every=500,
            **common)),
        # The student's own eval folder: export puts these numbers in the model card.
        ("eval", "eval", EvalConfig(
            models=[TEACHER_NAME, str(out / "student")], fid=True, num_samples=s["fid_samples"],
            sampler_steps=s["sampler_steps"], grid_size=s["grid"], output=out / "student" / "eval", **common)),
        ("export", "export", ExportConfig(model=str(out / "student"), output=out / "export")),
    ]


def demo(config: DemoConfig, *, announce: Callable[[str], None] = print,
         show_progress: bool = False) -> dict[str, Any]:
    """Run the demo chain into `config.output`; returns every stage's result."""
    results: dict[str, Any] = {}
    for name, stage, stage_config in demo_stages(config):
        if name != "eval" and stage_complete(stage, Path(stage_config.output)):
            announce(f"{name}: complete, skipped")
            results[name] = None
            continue
        announce(f"{name} ...")
        results[name] = run_stage(stage, stage_config, show_progress)
    return {"eval": results["eval"], "pruning": results["pruned"], "export": results["export"],
            "output": str(config.output)}
