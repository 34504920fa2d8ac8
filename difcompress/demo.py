"""`difcompress demo`: the whole chain offline, on real handwritten digits.

No hub model can be downloaded here, so the demo makes its own teacher: a small pixel
U-Net built from a config and trained on scikit-learn's digits with the distillation
trainer itself (task loss, no teacher). It then prunes 90% of the channels, distills the
student with PLACE, compares teacher and student, and exports the student. Each step is
skipped when its output is already complete, so an interrupted demo continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from difcompress.folders import atomic_folder, write_json
from difcompress.run import distill_resumable, stage_complete

DIGITS_TEACHER_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=16,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
)

FULL = {"teacher_steps": 1500, "student_steps": 800, "batch_size": 64, "sampler_steps": 50, "grid": 16}
QUICK = {"teacher_steps": 30, "student_steps": 15, "batch_size": 16, "sampler_steps": 10, "grid": 8}


def create_untrained_teacher(folder: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model = UNet2DModel(**DIGITS_TEACHER_CONFIG)
    with atomic_folder(folder) as tmp:
        DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
            tmp, safe_serialization=True
        )
        write_json(tmp / "difcompress.json", {"stage": "init", "status": "complete", "config": DIGITS_TEACHER_CONFIG})


def demo(output: Path = Path("runs/demo"), *, quick: bool = False, ratio: float = 0.9, seed: int = 0,
         device: str = "auto", announce: Callable[[str], None] = print) -> dict[str, Any]:
    from difcompress.evaluate import evaluate
    from difcompress.export import export
    from difcompress.prune import prune

    s = QUICK if quick else FULL
    output = Path(output)
    paths = {k: output / k for k in ("teacher-init", "teacher", "pruned", "student", "eval", "export")}

    def step(name: str, stage: str, fn: Callable[[], Any]) -> Any:
        if stage_complete(stage, paths[name]):
            announce(f"{name}: complete, skipped")
            return None
        announce(f"{name} ...")
        return fn()

    step("teacher-init", "init", lambda: create_untrained_teacher(paths["teacher-init"], seed))
    step("teacher", "distill", lambda: distill_resumable(
        str(paths["teacher-init"]), paths["teacher"], loss="task", data="digits", steps=s["teacher_steps"],
        batch_size=s["batch_size"], lr=1e-3, ema_decay=0.999, seed=seed, checkpoint_every=500, device=device))
    pruning = step("pruned", "prune", lambda: prune(str(paths["teacher"]), ratio, paths["pruned"], seed=seed,
                                                     device=device))
    step("student", "distill", lambda: distill_resumable(
        str(paths["pruned"]), paths["student"], teacher=str(paths["teacher"]), loss="place", data="digits",
        steps=s["student_steps"], batch_size=s["batch_size"], lr=1e-3, ema_decay=0.999, seed=seed,
        checkpoint_every=200, device=device))
    result = evaluate([str(paths["teacher"]), str(paths["student"])], sampler_steps=s["sampler_steps"],
                      grid_size=s["grid"], seed=seed, output=paths["eval"], device=device)
    exported = step("export", "export", lambda: export(str(paths["student"]), paths["export"]))
    return {"eval": result, "pruning": pruning, "export": exported, "output": str(output)}
