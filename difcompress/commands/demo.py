"""`difcompress demo`: the whole chain offline, on real handwritten digits.

Starts from an embedded teacher trained on scikit-learn's digits and shipped in the
package, prunes it, distills the student with PLACE, compares teacher and student
(digits-FID, params, MACs, latency; prompt accuracy for text-to-image), and exports the
student. Each step is skipped when its output is already complete, so an interrupted demo
continues.

- unet2d: the pixel U-Net, 90% of its channels removed.
- t2i: the digits-t2i Stable-Diffusion-layout pipeline; BK-SDM's bk-small, then half of
  every width; PLACE with the authors' SD setting (L1 coarse term) plus BK-SDM's feature KD;
  evaluated from one prompt per digit.
- flux: the digits-flux FLUX.1-layout pipeline (schnell's kind: no guidance input, sampled
  unguided); depth halved (2 of 4 double-stream and 4 of 8 single-stream blocks, heads
  kept), PLACE on the velocity; evaluated from one prompt per digit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from difcompress.builtin import (
    FLUX_TEACHER_NAME,
    NUMBER_WORDS,
    T2I_TEACHER_NAME,
    TEACHER_NAME,
)
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
# Per family: the teacher, its default ratio, and what prune, distill and eval add.
FAMILY = {
    "unet2d": {"teacher": TEACHER_NAME, "ratio": 0.9, "prune": {}, "distill": {"loss": "place"}, "eval": {},
               "output": Path("runs/demo")},
    "t2i": {"teacher": T2I_TEACHER_NAME, "ratio": 0.5, "prune": {"preset": "bk-small"},
            "distill": {"loss": "place+feat", "coarse_norm": "l1", "feature_reduction": "sum"},
            "eval": {"guidance_scale": 2.0}, "output": Path("runs/demo-t2i"), "prompted": True,
            # Guided sampling doubles every step: fewer, still enough to compare teacher and student.
            "full": {"steps": 1000, "sampler_steps": 25, "fid_samples": 500, "grid": 10}},
    # --ratio 0: every head kept; the depth is what is halved.
    "flux": {"teacher": FLUX_TEACHER_NAME, "ratio": 0.0, "prune": {"depth": 2, "single_depth": 4},
             "distill": {"loss": "place"}, "eval": {}, "output": Path("runs/demo-flux"), "prompted": True,
             "full": {"steps": 1000, "sampler_steps": 25, "fid_samples": 500, "grid": 10}},
}
DIGIT_PROMPTS = [f"a handwritten {word}" for word in NUMBER_WORDS]


def write_digit_prompts(path: Path) -> Path:
    """One prompt per digit, a line each (eval cycles them over the samples)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(DIGIT_PROMPTS) + "\n")
    return path


def demo_stages(config: DemoConfig) -> list[tuple[str, str, Any]]:
    """(step name, stage, config) of the demo chain."""
    family = FAMILY[config.family]
    s = QUICK if config.quick else {**FULL, **family.get("full", {})}
    out, teacher = Path(config.output or family["output"]), family["teacher"]
    common = {"seed": config.seed, "device": config.device}
    prompts = {"prompts": str(out / "prompts.txt")} if family.get("prompted") else {}
    return [
        ("pruned", "prune", PruneConfig(model=teacher, ratio=config.ratio or family["ratio"], output=out / "pruned",
                                        **family["prune"], **common)),
        ("student", "distill", DistillConfig(
            student=str(out / "pruned"), output=out / "student", teacher=teacher, data="digits", steps=s["steps"],
            batch_size=s["batch_size"], lr=1e-3, ema_decay=0.999, checkpoint_every=500, **family["distill"],
            **common)),
        # The student's own eval folder: export puts these numbers in the model card.
        ("eval", "eval", EvalConfig(
            models=[teacher, str(out / "student")], fid=True, num_samples=s["fid_samples"],
            sampler_steps=s["sampler_steps"], grid_size=s["grid"], output=out / "student" / "eval",
            **family["eval"], **prompts, **common)),
        ("export", "export", ExportConfig(model=str(out / "student"), output=out / "export")),
    ]


def demo(config: DemoConfig, *, announce: Callable[[str], None] = print,
         show_progress: bool = False) -> dict[str, Any]:
    """Run the demo chain into `config.output`; returns every stage's result."""
    results: dict[str, Any] = {}
    stages = demo_stages(config)
    if stages[2][2].prompts:
        write_digit_prompts(Path(stages[2][2].prompts))
    for name, stage, stage_config in stages:
        if name != "eval" and stage_complete(stage, Path(stage_config.output)):
            announce(f"{name}: complete, skipped")
            results[name] = None
            continue
        announce(f"{name} ...")
        results[name] = run_stage(stage, stage_config, show_progress)
    return {"eval": results["eval"], "pruning": results["pruned"], "export": results["export"],
            "output": str(Path(stages[0][2].output).parent)}
