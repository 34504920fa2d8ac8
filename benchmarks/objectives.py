"""The objectives benchmark on an embedded digits teacher.

Prunes the teacher at each ratio, distills every student with every objective under the
same steps, lr, batch and seeds, evaluates digits-FID, and writes results.json (one row per
run), curves.json and place_curves.png (w, slope and intercept over the steps of every
PLACE/LIFT run), fid_by_ratio.png and the markdown table. Runs go to parallel worker
processes; a finished run folder is skipped, so the benchmark resumes after an interruption
(and `--budget-s` stops starting new runs). `--global-pruning` ranks channels across layers,
for students between the sizes uniform pruning can give (its own `-o` folder).

Every objective is trained as the LIFT/PLACE authors train theirs (their code, commit
839a663, Diff_Pruning_EXP; see recipes/ddpm-cifar10-place.yaml for the citations): the sum
form (loss_reduction sum) with gradient clipping 1, antithetic timesteps, PLACE G = 16, and
for the feature term their FitNet (every block hooked, bias-free adapters at every pair,
summed): weight 1e-6 beside an output objective (`mse+feat`, `place+feat`), weight 1 as
the only KD term (`feature`). For the DiT teacher (`--teacher digits-dit`) their TinyFusion
weights: task/KD 0.1/0.9 in mean form, feature 1e-2 decayed per epoch, masks 2 std by each
model's own statistics; `--ratios` then removes attention heads. For the text-to-image
teacher (`--teacher digits-t2i`) the student is BK-SDM's bk-small (then `--ratios` of every
width; 0 keeps them) and the objectives are the authors' SD settings: BK-SDM's KD (`mse+feat`:
output and feature MSE, features summed, weights 1/1/1) against PLACE + feature with the L1
coarse term and eps 1e-8 (`place+feat`); eval adds prompt accuracy (one prompt per digit).
For the Flux-layout teacher (`--teacher digits-flux`) the student has its depth halved (2 of
4 double-stream and 4 of 8 single-stream blocks, uniform), then `--ratios` of its heads (0
keeps them); the objectives act on the velocity in mean form, the feature term is the MSE
of every kept block's image and text streams against the teacher block it came from
(weight 1, mean over pairs); eval adds prompt accuracy, sampled unguided (no guidance input).

    .venv/bin/python benchmarks/objectives.py -o runs/objectives --ratios 0.9 0.95 --seeds 3
    .venv/bin/python benchmarks/objectives.py -o runs/objectives-unet-global --ratios 0.9 --global-pruning \\
        --objectives task mse mse+feat lift place place+feat
    .venv/bin/python benchmarks/objectives.py --teacher digits-dit --ratios 0.5 0.75 \\
        --objectives mse place place+feat -o runs/objectives-dit
    .venv/bin/python benchmarks/objectives.py --teacher digits-t2i --ratios 0 \\
        --objectives mse+feat place+feat -o runs/objectives-t2i
    .venv/bin/python benchmarks/objectives.py --teacher digits-flux --ratios 0 \
        --objectives mse place place+feat -o runs/objectives-flux
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from difcompress.artifacts.folders import pruning_report, read_manifest
from difcompress.builtin import (
    DIT_TEACHER_NAME,
    FLUX_TEACHER_NAME,
    T2I_TEACHER_NAME,
    TEACHER_NAME,
    TEACHERS,
)
from difcompress.commands.demo import write_digit_prompts
from difcompress.commands.evaluate import evaluate
from difcompress.commands.prune import prune
from difcompress.commands.run import run_stage, stage_complete
from difcompress.config import DistillConfig, EvalConfig, PruneConfig
from difcompress.loading.models import load_model
from difcompress.metrics.cost import model_size
from difcompress.reports.plots import plot_by_ratio, plot_runs

UNET_OBJECTIVES = ("task", "mse", "feature", "mse+feat", "lift", "place", "place+feat")
PLACE_FIT_KEYS = ("w", "slope", "intercept")  # PLACE's per-position fit, the figure's three panels
CURVE_KEYS = (*PLACE_FIT_KEYS, "coarse", "fine", "kd", "task")
# What prune adds for a teacher beside --ratios: BK-SDM's block removal, Flux's depth halved.
PRUNE_SETTINGS = {T2I_TEACHER_NAME: {"preset": "bk-small"}, FLUX_TEACHER_NAME: {"depth": 2, "single_depth": 4}}
PROMPTED = (T2I_TEACHER_NAME, FLUX_TEACHER_NAME)


def objective_settings(teacher: str, loss: str) -> dict:
    """The authors' composition of `loss` for this teacher (see the module docstring)."""
    if teacher == T2I_TEACHER_NAME:
        return {"coarse_norm": "l1", "fit_eps": 1e-8, "feature_reduction": "sum",
                "w_feat": 1.0 if loss.endswith("+feat") else None}
    if teacher == FLUX_TEACHER_NAME:
        return {"feature_reduction": "mean", "w_feat": 1.0 if loss.endswith("+feat") else None}
    if teacher == DIT_TEACHER_NAME:
        return {"w_task": 0.1, "w_kd": 0.9, "w_feat": 1e-2 if loss.endswith("feat") or loss == "feature" else None,
                "w_feat_schedule": "epoch-linear", "feature_mask_std": 2.0, "feature_mask_by": "own"}
    feature = {"w_feat": 1.0 if loss == "feature" else 1e-6, "feature_hooks": "blocks", "feature_reduction": "sum",
               "feature_adapter_bias": False, "feature_adapter_init": 0.005, "feature_adapter_always": True}
    uses_features = loss == "feature" or loss.endswith("+feat")
    return {"loss_reduction": "sum", "antithetic": True, "fit_eps": 1.6e-6, **(feature if uses_features else {})}


def run_one(job: dict) -> dict:
    """Distill and evaluate one (ratio, objective, seed); a finished run is read back."""
    torch.set_num_threads(job["threads"])
    run, args = Path(job["run"]), job["args"]
    started, worked = time.time(), False
    if not stage_complete("distill", run):
        worked = True
        config = DistillConfig(student=job["pruned"], output=run, teacher=args["teacher"], loss=job["loss"],
                               data="digits", steps=args["steps"], batch_size=args["batch_size"], lr=args["lr"],
                               ema_decay=args["ema_decay"], seed=job["seed"], checkpoint_every=500,
                               device=args["device"], **{k: v for k, v in job["settings"].items() if v is not None})
        run_stage("distill", config)
    if not (run / "eval" / "eval.json").is_file():
        worked = True
        evaluate(EvalConfig(models=[str(run)], fid=True, num_samples=args["fid_samples"],
                            sampler_steps=args["sampler_steps"], seed=job["seed"], output=run / "eval",
                            device=args["device"], grid_size=8, **job.get("eval", {})))
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    row = evaluation["models"][0]
    seconds = time.time() - started if worked else None  # None: a finished run read back
    curve = [{k: r[k] for k in ("step", *CURVE_KEYS) if k in r}
             for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    return {"ratio": job["label"], "loss": job["loss"], "seed": job["seed"], "fid": row["fid"], "kid": row["kid"],
            **job["size"], "seconds": seconds, "device": evaluation["device"],
            "prompt_accuracy": row.get("prompt_accuracy"),
            "curve": curve if job["loss"] in ("lift", "place", "place+feat") else None}


def eval_settings(args) -> dict:
    """What eval adds for the text-to-image teachers: one prompt per digit, guidance 2 where
    it is classifier-free (digits-t2i; digits-flux has no guidance)."""
    if args.teacher not in PROMPTED:
        return {}
    guidance = {"guidance_scale": 2.0} if args.teacher == T2I_TEACHER_NAME else {}
    return {"prompts": str(write_digit_prompts(args.output / "prompts.txt")), **guidance}


def architecture_size(reference: str | Path) -> dict[str, int]:
    """Params and MACs counted here and now, not read from eval.json: older eval.json files
    written on CPU left out the attention matmuls (see metrics.cost.count_macs)."""
    loaded = load_model(reference)
    return model_size(loaded.model, loaded.family)


def plan(args) -> tuple[list[dict], dict]:
    root = args.output
    extra = eval_settings(args)
    teacher_row = evaluate(EvalConfig(models=[args.teacher], fid=True, num_samples=args.fid_samples,
                                      sampler_steps=args.sampler_steps, output=root / "teacher-eval",
                                      device=args.device, grid_size=8, **extra))["models"][0] \
        if not (root / "teacher-eval" / "eval.json").is_file() else \
        json.loads((root / "teacher-eval" / "eval.json").read_text())["models"][0]
    teacher_row |= architecture_size(args.teacher)
    jobs = []
    for ratio in args.ratios:
        pruned = root / f"pruned-{ratio}"
        if not stage_complete("prune", pruned):
            prune(PruneConfig(model=args.teacher, ratio=ratio, output=pruned, seed=0, device=args.device,
                              global_pruning=args.global_pruning, **PRUNE_SETTINGS.get(args.teacher, {})))
        mode = pruning_report(read_manifest(pruned))["mode"]
        if mode != ("global" if args.global_pruning else "uniform"):  # a finished student is reused, never redone
            raise SystemExit(f"{pruned} holds a {mode}ly pruned student; --global-pruning needs its own -o folder")
        size = architecture_size(pruned)
        for seed in range(args.seeds):  # seed-major: a budget cut leaves whole seeds of every objective
            for loss in args.objectives:
                jobs.append({"label": str(ratio), "loss": loss, "seed": seed, "pruned": str(pruned), "size": size,
                             "run": str(root / f"r{ratio}-{loss}-s{seed}"), "threads": args.threads,
                             "settings": objective_settings(args.teacher, loss), "eval": extra,
                             "args": vars(args) | {"output": str(root)}})
    return jobs, teacher_row


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["ratio"], row["loss"]), []).append(row)
    out = []
    for (ratio, loss), runs in groups.items():
        fids = [r["fid"] for r in sorted(runs, key=lambda r: r["seed"])]
        hits = [r["prompt_accuracy"] for r in runs if r.get("prompt_accuracy") is not None]
        out.append({"ratio": ratio, "loss": loss, "seeds": len(fids), "fid": fids, "fid_mean": statistics.mean(fids),
                    "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0, "params": runs[0]["params"],
                    "macs": runs[0]["macs"], "prompt_accuracy": statistics.mean(hits) if hits else None})
    return out


def write_results(args, teacher_row: dict, rows: list[dict], planned: int, started: float) -> dict:
    """results.json (rows, runs, settings, machine) and curves.json, as they stand."""
    result = {"teacher": {k: teacher_row.get(k) for k in ("fid", "params", "macs", "prompt_accuracy")},
              "rows": summarise(rows),
              "runs": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
              "settings": vars(args) | {"output": str(args.output), "results": str(args.results)},
              "composition": {loss: objective_settings(args.teacher, loss) for loss in args.objectives},
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
              "wall_seconds": time.time() - started, "unfinished": planned - len(rows)}
    target = args.results or args.output
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(result, indent=2))
    if result["rows"]:
        plot_by_ratio(result["rows"], target / "fid_by_ratio.png", floor=result["teacher"]["fid"],
                      title=f"{args.teacher}: {args.steps} steps, digits-FID of {args.fid_samples} samples")
    curves = {f"{r['ratio']}-{r['loss']}-s{r['seed']}": r["curve"] for r in rows if r["curve"]}
    (target / "curves.json").write_text(json.dumps(curves))
    if curves:
        plot_runs(curves, target / "place_curves.png", PLACE_FIT_KEYS,
                  title=f"{args.teacher}: PLACE/LIFT per-position fit over training")
    return result


def markdown_table(result) -> str:
    rows = result["rows"]
    ratios = list(dict.fromkeys(r["ratio"] for r in rows))
    losses = [loss for loss in result["settings"]["objectives"] if any(r["loss"] == loss for r in rows)]
    by_key = {(r["ratio"], r["loss"]): r for r in rows}
    lines = [f"Teacher digits-FID (floor): {result['teacher']['fid']:.2f}, "
             f"{result['teacher']['params'] / 1e6:.2f}M params, {result['teacher']['macs'] / 1e6:.1f}M MACs"
             + (f", prompt accuracy {result['teacher']['prompt_accuracy']:.0%}"
                if result["teacher"].get("prompt_accuracy") is not None else ""), "",
             "| ratio | params / MACs | " + " | ".join(losses) + " |", "|---|---|" + "---|" * len(losses)]
    for ratio in ratios:
        any_row = next(r for r in rows if r["ratio"] == ratio)
        cells = []
        for loss in losses:
            r = by_key.get((ratio, loss))
            cell = "" if r is None else f"{r['fid_mean']:.2f} ± {r['fid_std']:.2f} (n={r['seeds']})" \
                if r["seeds"] > 1 else f"{r['fid_mean']:.2f} (n=1)"
            cells.append(cell + (f", prompts {r['prompt_accuracy']:.0%}" if r and r["prompt_accuracy"] is not None
                                 else ""))
        lines.append(f"| {ratio} | {any_row['params'] / 1e3:.1f}K / {any_row['macs'] / 1e6:.2f}M | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--teacher", default=TEACHER_NAME, choices=sorted(TEACHERS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--objectives", nargs="+", default=list(UNET_OBJECTIVES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--global-pruning", action="store_true",
                        help="rank channels across layers (U-Net): students between the uniform ratios' sizes")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
    parser.add_argument("--results", type=Path, default=None, help="where results.json goes (default: -o)")
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs; train nothing")
    args = parser.parse_args()
    started = time.time()
    args.output.mkdir(parents=True, exist_ok=True)
    jobs, teacher_row = plan(args)
    if args.report_only:  # a partial grid, honestly counted: unfinished runs stay out
        rows = [run_one(job) for job in jobs if (Path(job["run"]) / "eval" / "eval.json").is_file()]
        print(markdown_table(write_results(args, teacher_row, rows, len(jobs), started)))
        return
    rows: list[dict] = []
    result = write_results(args, teacher_row, rows, len(jobs), started)
    # spawn: workers start clean (a forked child cannot use CUDA once the parent has).
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < args.workers and (args.budget_s is None
                                                             or time.time() - started < args.budget_s):
                job = queue.pop(0)
                pending[pool.submit(run_one, job)] = job
            if not pending:
                break
            done = next(as_completed(pending))
            job = pending.pop(done)
            rows.append(done.result())
            took = "read back" if rows[-1]["seconds"] is None else f"{rows[-1]['seconds']:.0f} s"
            print(f"{job['label']} {job['loss']:10s} seed {job['seed']}: FID {rows[-1]['fid']:.2f} ({took})",
                  flush=True)
            result = write_results(args, teacher_row, rows, len(jobs), started)  # after every run: kill-safe
    print(markdown_table(result))


if __name__ == "__main__":
    main()
