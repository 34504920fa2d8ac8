"""The objectives benchmark on an embedded digits teacher.

Prunes the teacher at each ratio, distills every student with every objective under the
same steps, lr, batch and seed (several seeds at the highest ratio), and reports
digits-FID (mean +- std over seeds) with the teacher's FID as the floor, params and MACs.
For the DiT teacher (`--teacher digits-dit`) `--ratios` removes attention heads (width)
and `--depth-ratios` removes blocks (depth). Every run folder keeps its metrics.jsonl and
curves.png; finished runs are skipped, so the benchmark resumes after an interruption.

    .venv/bin/python benchmarks/objectives.py -o runs/objectives --steps 1000
    .venv/bin/python benchmarks/objectives.py --teacher digits-dit --ratios 0.5 --depth-ratios 0.5 \
        --seeds-at-max 1 -o runs/objectives-dit
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from difcompress.builtin import TEACHER_NAME, TEACHERS
from difcompress.commands.evaluate import evaluate
from difcompress.commands.prune import prune
from difcompress.commands.run import run_stage, stage_complete
from difcompress.config import DistillConfig, EvalConfig, PruneConfig
from difcompress.io.loading import load_model

OBJECTIVES = ("task", "mse", "feature", "dist", "lift", "place")


def fid_of(models, out, args, seed):
    if (out / "eval.json").is_file():
        return json.loads((out / "eval.json").read_text())["models"]
    return evaluate(EvalConfig(models=models, fid=True, num_samples=args.fid_samples, sampler_steps=args.sampler_steps,
                               seed=seed, output=out, device=args.device, grid_size=8))["models"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--teacher", default=TEACHER_NAME, choices=sorted(TEACHERS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9],
                        help="Channel (U-Net) or head (DiT) ratios.")
    parser.add_argument("--depth-ratios", type=float, nargs="*", default=[],
                        help="DiT: fractions of blocks removed (kept blocks: the uniform map).")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds-at-max", type=int, default=3, help="Seeds at the highest ratio.")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    root = args.output
    started = time.time()

    teacher = args.teacher
    teacher_row = fid_of([teacher], root / "teacher-eval", args, 0)[0]
    settings = [(f"{r}", {"ratio": r}) for r in args.ratios]
    blocks = load_model(teacher).model.config.num_layers if args.depth_ratios else None
    for r in args.depth_ratios:
        settings.append((f"depth {r}", {"ratio": 0.0, "depth": max(1, round(blocks * (1 - r)))}))
    rows = []
    for label, prune_args in settings:
        pruned = root / f"pruned-{label.replace(' ', '-')}"
        if not stage_complete("prune", pruned):
            prune(PruneConfig(model=teacher, output=pruned, seed=0, device=args.device, **prune_args))
        seeds = range(args.seeds_at_max) if label == str(max(args.ratios)) else range(1)
        for loss in args.objectives:
            fids, kids, size = [], [], None
            for seed in seeds:
                run = root / f"r{label.replace(' ', '-')}-{loss}-s{seed}"
                if not stage_complete("distill", run):
                    run_stage("distill", DistillConfig(
                        student=str(pruned), output=run, teacher=teacher, loss=loss, data="digits", steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, seed=seed,
                        checkpoint_every=500, device=args.device))
                row = fid_of([str(run)], run / "eval", args, seed)[0]
                fids.append(row["fid"])
                kids.append(row["kid"])
                size = (row["params"], row["macs"])
            rows.append({"ratio": label, "loss": loss, "seeds": len(fids), "fid": fids, "kid": kids,
                         "fid_mean": statistics.mean(fids), "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                         "params": size[0], "macs": size[1]})
            print(f"ratio {label} {loss:8s} FID {rows[-1]['fid_mean']:.2f} +- {rows[-1]['fid_std']:.2f}", flush=True)

    result = {"teacher": {"fid": teacher_row["fid"], "params": teacher_row["params"], "macs": teacher_row["macs"]},
              "rows": rows, "settings": vars(args) | {"output": str(root)},
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
              "wall_seconds": time.time() - started}
    (root / "results.json").write_text(json.dumps(result, indent=2))
    print(markdown_table(result))


def markdown_table(result) -> str:
    rows = result["rows"]
    ratios = list(dict.fromkeys(r["ratio"] for r in rows))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    by_key = {(r["ratio"], r["loss"]): r for r in rows}
    lines = [f"Teacher digits-FID (floor): {result['teacher']['fid']:.2f}, "
             f"{result['teacher']['params'] / 1e6:.2f}M params, {result['teacher']['macs'] / 1e6:.1f}M MACs", "",
             "| ratio | params / MACs | " + " | ".join(losses) + " |",
             "|---|---|" + "---|" * len(losses)]
    for ratio in ratios:
        any_row = next(r for r in rows if r["ratio"] == ratio)
        cells = []
        for loss in losses:
            r = by_key.get((ratio, loss))
            cells.append("" if r is None else (f"{r['fid_mean']:.2f} ± {r['fid_std']:.2f}" if r["seeds"] > 1
                                               else f"{r['fid_mean']:.2f}"))
        lines.append(f"| {ratio} | {any_row['params'] / 1e3:.1f}K / {any_row['macs'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
