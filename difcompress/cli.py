"""The `difcompress` command line: one thin command per stage module."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from difcompress.errors import UserError
from difcompress.report import err_console, print_json

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune, distill (LIFT/PLACE), evaluate and export diffusers models.",
)



@app.callback()
def root():
    """Prune, distill (LIFT/PLACE), evaluate and export diffusers models."""


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
LatentCache = Annotated[Optional[Path], typer.Option(help="Latent models: where encoded datasets are cached (default $DIFCOMPRESS_CACHE or ~/.cache/difcompress).")]


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, e.g. 1,3,5 (got {text!r})", exit_code=2) from None


@app.command("prune")
def prune_command(
    model: Annotated[str, typer.Argument(help="Hub id, diffusers pipeline/model folder, or difcompress folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    ratio: Annotated[float, typer.Option(help="Fraction of channels (U-Net) or attention heads (DiT) removed from every layer; 0 with --depth for depth only.")] = 0.3,
    importance: Annotated[str, typer.Option(help="random, magnitude, taylor or diff-pruning.")] = "magnitude",
    data: Annotated[Optional[str], typer.Option(help="Images for gradient criteria: folder, saved dataset, 'digits', or 'teacher' (its own samples).")] = None,
    global_pruning: Annotated[bool, typer.Option("--global", help="Rank channels across layers (widths recorded in JSON, not in the stock config).")] = False,
    depth: Annotated[Optional[int], typer.Option(help="DiT: transformer blocks to keep.")] = None,
    blocks: Annotated[Optional[str], typer.Option(help="DiT: blocks to keep, as indices (e.g. 1,3,5).")] = None,
    depth_criterion: Annotated[str, typer.Option(help="DiT --depth: uniform (TinyFusion's i -> 2i+1 when halving) or output-change (keep the blocks whose removal changes the output most, on a --data batch).")] = "uniform",
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(help="Images for gradient criteria and output-change scoring.")] = 16,
    diff_threshold: Annotated[float, typer.Option(help="diff-pruning: stop once the loss falls below this fraction of its maximum.")] = 0.05,
    importance_timesteps: Annotated[Optional[int], typer.Option(help="Cap on timesteps visited by gradient criteria.")] = None,
    device: Device = "auto",
    json_output: JsonFlag = False,
):
    """Prune channels (U-Net: torch-pruning; DiT: heads, width and blocks); writes a folder stock diffusers loads."""
    from difcompress.prune import prune
    from difcompress.report import print_prune_report

    with err_console.status("pruning...", spinner="dots") if not json_output else nullcontext():
        report = prune(
            model, ratio, output, importance=importance, data=data, global_pruning=global_pruning, seed=seed,
            device=device, batch_size=batch_size, diff_threshold=diff_threshold,
            importance_timesteps=importance_timesteps, depth=depth, blocks=_int_list(blocks, "--blocks"),
            depth_criterion=depth_criterion,
        )
    print_json(report) if json_output else print_prune_report(report)


@app.command("distill")
def distill_command(
    student: Annotated[str, typer.Option(help="Pruned student (difcompress folder or any diffusers model).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder (checkpoints, logs, final student).")],
    data: Annotated[str, typer.Option(help="Image folder, saved dataset, 'digits', or 'teacher' (data-free).")] = "teacher",
    teacher: Annotated[Optional[str], typer.Option(help="Defaults to the model the student was pruned from.")] = None,
    loss: Annotated[str, typer.Option(help="task, mse, feature, dist, lift or place.")] = "place",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-4,
    w_task: float = 1.0,
    w_kd: float = 1.0,
    w_feat: Annotated[Optional[float], typer.Option(help="Feature KD weight (default 1 for --loss feature, else 0).")] = None,
    group_size: Annotated[int, typer.Option(help="PLACE group size G.")] = 16,
    coarse_norm: Annotated[str, typer.Option(help="l2 or l1 for the coarse term.")] = "l2",
    ema_decay: float = 0.9999,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm (0 disables).")] = 1.0,
    seed: int = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0 disables).")] = 500,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUTPUT from its last checkpoint.")] = False,
    antithetic: Annotated[bool, typer.Option(help="Antithetic timestep pairs (t, T-1-t).")] = False,
    feature_layer: Annotated[Optional[list[str]], typer.Option(help="Module for feature KD, NAME or STUDENT=TEACHER (repeatable; default: stage outputs, or DiT blocks mapped to the teacher blocks they came from).")] = None,
    feature_mask_std: Annotated[float, typer.Option(help="Zero teacher activations beyond this many std from the mean in feature KD (TinyFusion: 2; 0 disables).")] = 0.0,
    w_feat_schedule: Annotated[str, typer.Option(help="constant, or linear (decays the feature weight to 0 by the last step).")] = "constant",
    class_dropout: Annotated[float, typer.Option(help="Class-conditional models: label dropout for classifier-free guidance.")] = 0.1,
    teacher_samples: Annotated[int, typer.Option(help="Images the teacher generates for --data teacher.")] = 512,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16.")] = "no",
    latent_cache: LatentCache = None,
    device: Device = "auto",
    json_output: JsonFlag = False,
):
    """Distill the student from its teacher with LIFT, PLACE or a baseline objective."""
    from difcompress.distill import distill

    summary = distill(
        student, output, teacher=teacher, loss=loss, data=data, steps=steps, batch_size=batch_size, lr=lr,
        w_task=w_task, w_kd=w_kd, w_feat=w_feat, group_size=group_size, coarse_norm=coarse_norm,
        ema_decay=ema_decay, grad_clip=grad_clip or None, seed=seed, checkpoint_every=checkpoint_every,
        resume=resume, antithetic=antithetic, feature_layers=feature_layer, teacher_samples=teacher_samples,
        device=device, mixed_precision=mixed_precision, show_progress=not json_output,
        feature_mask_std=feature_mask_std, w_feat_schedule=w_feat_schedule, class_dropout=class_dropout, latent_cache=latent_cache,
    )
    if json_output:
        print_json(summary)
    else:
        from difcompress.report import console

        final = summary["final"]
        console.print(f"distilled {summary['steps']} steps; final loss {final.get('loss', float('nan')):.4f}; "
                      f"student, metrics.jsonl and curves.png in {summary['output']}")


@app.command("eval")
def eval_command(
    models: Annotated[list[str], typer.Argument(help="Models to compare (folders or hub ids).")],
    fid: Annotated[bool, typer.Option("--fid", help="Sample and compute FID and KID.")] = False,
    num_samples: int = 1000,
    sampler: Annotated[str, typer.Option(help="ddim or ddpm.")] = "ddim",
    sampler_steps: int = 100,
    ref: Annotated[Optional[str], typer.Option(help="Reference images folder, stats .npz, or 'digits' (default for the embedded teacher).")] = None,
    inception: Annotated[Optional[str], typer.Option(help="Local clean-fid Inception weights file.")] = None,
    feature_extractor: Annotated[Optional[str], typer.Option(help="inception or digits (default: digits for the embedded teacher, else inception).")] = None,
    seed: int = 0,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Class-conditional models: classifier-free guidance scale (default 1.5; 1 disables).")] = None,
    class_label: Annotated[Optional[str], typer.Option(help="Class-conditional models: labels to sample, e.g. 3,7 (default: uniform over classes).")] = None,
    batch_size: int = 64,
    latency_batch_size: int = 16,
    grid_size: Annotated[int, typer.Option(help="Samples per model in the grid.")] = 8,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where eval.json and samples.png go.")] = None,
    device: Device = "auto",
    json_output: JsonFlag = False,
):
    """Compare models side by side: params, MACs, latency, memory, FID/KID, a sample grid."""
    from difcompress.evaluate import evaluate
    from difcompress.report import print_eval_report

    result = evaluate(
        models, fid=fid, num_samples=num_samples, sampler=sampler, sampler_steps=sampler_steps, ref=ref,
        inception=inception, feature_extractor=feature_extractor, seed=seed, guidance_scale=guidance_scale,
        class_labels=_int_list(class_label, "--class-label"), batch_size=batch_size,
        latency_batch_size=latency_batch_size, grid_size=grid_size, output=output, device=device,
        show_progress=not json_output,
    )
    print_json(result) if json_output else print_eval_report(result)


@app.command("export")
def export_command(
    model: Annotated[str, typer.Argument(help="A difcompress folder (or any diffusers model).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Pipeline folder to write.")],
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    json_output: JsonFlag = False,
):
    """Write a safetensors diffusers pipeline folder with a model card."""
    from difcompress.export import export
    from difcompress.report import console, human

    info = export(model, output, dtype=dtype)
    if json_output:
        print_json(info)
        return
    console.print(f"exported {human(info['params'])} params ({info['dtype']}) to {info['output']}: "
                  f"{human(info['size_on_disk_bytes'], 'B')} on disk")
    if not info["stock_diffusers_loadable"]:
        err_console.print("[yellow]warning:[/] globally pruned widths: stock diffusers cannot load this folder; "
                          "difcompress can (see its README.md)")


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved stages; run nothing.")] = False,
    json_output: JsonFlag = False,
):
    """Run the stages a recipe lists; completed stages are skipped, so a re-run resumes."""
    from rich.markup import escape

    from difcompress.report import console
    from difcompress.run import run_recipe

    def announce(entry):
        if not json_output:
            console.print(f"[bold]{entry['stage']}[/] -> {escape(entry['output'])} ({entry['status']})")
            if dry_run:
                for key, value in entry["settings"].items():
                    console.print(f"    {key}: {value}")

    results = run_recipe(recipe, dry_run=dry_run, on_stage=announce)
    if json_output:
        print_json(results)


@app.command("demo")
def demo_command(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for every stage's output.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A 1-2 minute smoke version.")] = False,
    ratio: float = 0.9,
    seed: int = 0,
    device: Device = "auto",
    json_output: JsonFlag = False,
):
    """Offline demo on real digits: prune the embedded teacher 90%, distill with PLACE, compare, export."""
    from difcompress.demo import demo
    from difcompress.report import console, print_eval_report

    result = demo(output, quick=quick, ratio=ratio, seed=seed, device=device, show_progress=not json_output,
                  announce=(lambda msg: None) if json_output else (lambda msg: err_console.print(f"[bold]demo[/] {msg}")))
    if json_output:
        print_json(result)
        return
    print_eval_report(result["eval"])
    console.print(f"student exported to {Path(result['output']) / 'export'}; loss curves in "
                  f"{Path(result['output']) / 'student' / 'curves.png'}")


@app.command("build-digits")
def build_digits_command(
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Default: the package's assets folder.")] = None,
    family: Annotated[str, typer.Option(help="unet2d (the 'digits' teacher, plus the classifier) or dit (the 'digits-dit' teacher).")] = "unet2d",
    teacher_steps: int = 5000,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    work_dir: Annotated[Path, typer.Option(help="Run folder for the teacher's training (resumable).")] = Path("runs/build-digits"),
    device: Device = "auto",
):
    """Train the embedded digits teacher and digits classifier shipped with difcompress."""
    from difcompress.builtin import ASSETS, build_digits_assets
    from difcompress.report import console

    report = build_digits_assets(output or ASSETS, family=family, teacher_steps=teacher_steps, batch_size=batch_size, lr=lr,
                                 seed=seed, device=device, work_dir=work_dir)
    if report["classifier"]:
        console.print(f"classifier held-out accuracy {report['classifier']['held_out_accuracy']:.2%}")
    console.print(f"teacher trained {report['teacher_steps']} steps (final loss {report['final_loss']:.4f}) "
                  f"-> {report['output']}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one red line and exit code 1 or 2, never a traceback."""
    # Typer reports usage mistakes itself (exit 2); our own mistakes pass through it.
    try:
        app(args=argv)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
