"""What people and scripts see: rich tables, progress bars and warnings on the terminal,
JSON for scripts (`--json`)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


SCHEMA_VERSION = 1  # of every --json output (docs/output-format.md); raise it when a field changes meaning


def print_json(data: dict[str, Any]) -> None:
    """A command's result on stdout, stamped with the schema version."""
    sys.stdout.write(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2, default=str) + "\n")


def print_prune_report(report: dict[str, Any]) -> None:
    table = Table(title=f"Pruned {report['source']} ({report['mode']}, {report['importance']}, ratio {report['ratio']})")
    table.add_column("stage")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for stage, (before, after) in report["widths"].items():
        table.add_row(stage, str(before), str(after))
    table.add_section()
    for key in ("params", "macs"):
        before, after = report[key]
        table.add_row(key, human(before), f"{human(after)} ({after / before:.1%})")
    console.print(table)
    unit = "head" if report["family"] == "dit" else "channel"
    console.print(
        f"requested {unit} reduction {report['requested_channel_reduction']:.0%}; "
        f"achieved params -{report['params_reduction']:.1%}, MACs -{report['macs_reduction']:.1%}"
    )
    if "kept_blocks" in report and report["kept_blocks"] != list(range(report["blocks"])):
        console.print(f"kept blocks ({report['depth_criterion']}): {report['kept_blocks']}")
    for warning in report["warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"saved to {report['output']}")


def print_distill_plan(plan: dict[str, Any]) -> None:
    """`distill --dry-run`: the resolved settings, then the peak-memory estimate by part."""
    for key, value in plan["settings"].items():
        console.print(f"    {key}: {value}")
    memory = plan["memory"]
    table = Table(title=f"estimated peak memory per process (micro-batch {memory['micro_batch']}, mixed precision "
                        f"{memory['mixed_precision']}, gradient checkpointing "
                        f"{'on' if memory['gradient_checkpointing'] else 'off'})")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for part, size in memory["parts"].items():
        table.add_row(part, human(size, "B"))
    table.add_row("[bold]total[/]", f"[bold]{human(memory['total_bytes'], 'B')}[/]")
    console.print(table)
    console.print("An estimate: allocator fragmentation and kernel workspaces come on top (README: Will it fit?).")


def print_eval_report(result: dict[str, Any]) -> None:
    rows = result["models"]
    table = Table(title=f"difcompress eval ({result['sampler']}, {result['sampler_steps']} steps, {result['device']})")
    table.add_column("metric")
    for row in rows:
        table.add_column(row["model"], justify="right")
    first = rows[0]
    denoiser = "U-Net" if first["family"] != "dit" else "transformer"
    lines = [
        ("params", lambda r: human(r["params"])),
        ("MACs / call", lambda r: human(r["macs"])),
        (f"latency / image ({denoiser} alone, batch {first['batch_size']})",
         lambda r: f"{r['latency_s_per_image'] * 1000:.1f} ms"),
        (f"whole pipeline / image (batch {first['pipeline_batch_size']})",
         lambda r: f"{r['pipeline_s_per_image'] * 1000:.1f} ms"),
        (f"throughput (batch {first['batch_size']})", lambda r: f"{r['throughput_img_s']:.2f} img/s"),
        (f"peak memory ({first['peak_memory_kind']})", lambda r: human(r["peak_memory_bytes"], "B")),
    ]
    if len(rows) > 1:
        lines.append(("MACs reduction vs 1st", lambda r: f"{r.get('macs_reduction_vs_first', 1):.1f}x"))
        lines.append(("measured speed-up vs 1st", lambda r: f"{r.get('speedup_vs_first', 1):.1f}x"))
    if any("clip_score" in r for r in rows):
        lines.append(("CLIP score", lambda r: f"{r['clip_score']:.4f}" if "clip_score" in r else "-"))
    if any("prompt_accuracy" in r for r in rows):
        lines.append(("prompt accuracy (digits)", lambda r: f"{r['prompt_accuracy']:.1%}" if "prompt_accuracy" in r
                      else "-"))
    if any("guidance_scale" in r for r in rows):
        lines.append(("guidance scale", lambda r: f"{r['guidance_scale']:g}" if "guidance_scale" in r else "-"))
    if "fid" in first:
        lines += [("FID", lambda r: f"{r['fid']:.2f}"),
                  ("KID", lambda r: "n/a (no reference features)" if r["kid"] is None else f"{r['kid']:.4f}"),
                  ("FID/KID samples", lambda r: str(r["num_samples"]))]
    for label, fmt in lines:
        table.add_row(label, *[fmt(r) for r in rows])
    console.print(table)
    if result["protocol"]:
        p = result["protocol"]
        console.print(f"FID/KID: {p['feature_extractor']} features, {p['num_samples']} samples, {p['sampler']} "
                      f"{p['steps']} steps, seed {p['seed']}, reference {p['reference']}")
    console.print(f"sample grid: {result['grid']}")


def warn(message: str) -> None:
    """One yellow warning line on stderr (stdout stays clean for --json)."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def progress_bar(enabled: bool = True, *extra_columns) -> Progress:
    """A rich progress bar on stderr (stdout stays clean for --json) with ETA."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), *extra_columns, console=err_console, disable=not enabled,
    )


def _stats_text(line: dict[str, Any]) -> str:
    parts = [f"loss {line['loss']:.4f}"]
    parts += [f"{key} {line[key]:.3f}" for key in ("task", "kd", "feature", "w", "slope", "intercept") if key in line]
    return " ".join(parts)


@contextmanager
def distill_progress(enabled: bool, loss: str, total: int, start: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over distill steps; the callable it yields takes each log line."""
    with progress_bar(enabled, TextColumn("{task.fields[stats]}")) as progress:
        task = progress.add_task(f"distill ({loss})", total=total, completed=start, stats="")

        def advance(line: dict[str, Any]) -> None:
            progress.update(task, completed=line["step"], stats=_stats_text(line))

        yield advance
