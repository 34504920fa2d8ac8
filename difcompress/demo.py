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
from difcompress.run import distill_resumable, stage_complete

FULL = {"steps": 2000, "batch_size": 64, "sampler_steps": 50, "fid_samples": 1000, "grid": 16}
QUICK = {"steps": 20, "batch_size": 16, "sampler_steps": 10, "fid_samples": 64, "grid": 8}


def demo(output: Path = Path("runs/demo"), *, quick: bool = False, ratio: float = 0.9, seed: int = 0,
         device: str = "auto", announce: Callable[[str], None] = print, show_progress: bool = True) -> dict[str, Any]:
    from difcompress.evaluate import evaluate
    from difcompress.export import export
    from difcompress.prune import prune

    s = QUICK if quick else FULL
    output = Path(output)
    paths = {k: output / k for k in ("pruned", "student", "eval", "export")}

    def step(name: str, stage: str, fn: Callable[[], Any]) -> Any:
        if stage_complete(stage, paths[name]):
            announce(f"{name}: complete, skipped")
            return None
        announce(f"{name} ...")
        return fn()

    # Pruning takes seconds; the prune stage shows no bar.
    pruning = step("pruned", "prune", lambda: prune(TEACHER_NAME, ratio, paths["pruned"], seed=seed, device=device))
    step("student", "distill", lambda: distill_resumable(
        str(paths["pruned"]), paths["student"], teacher=TEACHER_NAME, loss="place", data="digits",
        steps=s["steps"], batch_size=s["batch_size"], lr=1e-3, ema_decay=0.999, seed=seed,
        checkpoint_every=500, device=device, show_progress=show_progress))
    announce("eval ...")
    result = evaluate([TEACHER_NAME, str(paths["student"])], fid=True, num_samples=s["fid_samples"],
                      sampler_steps=s["sampler_steps"], grid_size=s["grid"], seed=seed, output=paths["eval"],
                      device=device, show_progress=show_progress)
    exported = step("export", "export", lambda: export(str(paths["student"]), paths["export"]))
    return {"eval": result, "pruning": pruning, "export": exported, "output": str(output)}
