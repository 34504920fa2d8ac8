"""The rich tables each command prints: the prune report, the distill plan, the evaluation."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from difcompress.core.console import console, err_console, human


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
    console.print(
        f"requested {report['pruned_unit']} reduction {report['requested_channel_reduction']:.0%}; "
        f"achieved params -{report['params_reduction']:.1%}, MACs -{report['macs_reduction']:.1%}"
    )
    if "kept_blocks" in report:
        kept, blocks = report["kept_blocks"], report["blocks"]
        # one list of blocks (DiT), or one per block list by name (Flux, SD3, Z-Image)
        lists = kept.items() if isinstance(kept, dict) else [("blocks", kept)]
        counts = blocks if isinstance(blocks, dict) else {"blocks": blocks}
        for name, indices in lists:
            if indices != list(range(counts[name])):
                console.print(f"kept {name} ({report['depth_criterion']}): {indices} of {counts[name]}")
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
    sharded = memory.get("per_process_sharded")
    if sharded:
        counts = list(next(iter(sharded.values())))
        table = Table(title="estimated peak per process under sharding (weights, gradients, optimizer state and EMA "
                            "divided by the processes; activations not)")
        table.add_column("--shard")
        for n in counts:
            table.add_column(f"{n} GPU{'s' if n != '1' else ''}", justify="right")
        for layout, totals in sharded.items():
            table.add_row(layout, *(human(totals[n], "B") for n in counts))
        console.print(table)
    console.print("An estimate: allocator fragmentation and kernel workspaces come on top (README: Will it fit?).")
    if memory.get("fit"):
        console.print(f"[yellow]{memory['fit']}[/]")


def print_inference_memory(memory: dict[str, Any], dtype: str) -> None:
    """`export`: weight bytes and estimated peak inference memory per weight scheme."""
    height, width = memory["resolution"]
    table = Table(title=f"estimated peak inference memory, one {height}x{width} image, every component on the GPU")
    for column in ("weights", "weight bytes", "peak", "fits (GB)"):
        table.add_column(column, justify="left" if column == "weights" else "right")
    for row in memory["rows"]:
        name = f"{row['scheme']} {memory['quantized']}" if row["scheme"] else dtype
        mark = " (exported)" if row["scheme"] == memory["exported"] else ""
        table.add_row(name + mark, human(row["weight_bytes"], "B"), human(row["peak_bytes"], "B"),
                      ", ".join(str(g) for g in row["fits_gb"]) or "none of 8-24")
    console.print(table)


DIFFERENCE_LABELS = {"fid": ("FID vs 1st", "{:+.2f}"), "clip_score": ("CLIP score vs 1st", "{:+.4f}"),
                     "prompt_accuracy": ("prompt accuracy vs 1st", "{:+.1%}"),
                     "pipeline_s_per_image": ("whole pipeline / image vs 1st", "{:+.1%}")}


def _differences(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Rows of each model's difference from the first (quality in its units, latency relative)."""
    if len(rows) < 2:
        return []
    lines = []
    for metric, (label, fmt) in DIFFERENCE_LABELS.items():
        if not any(metric in r.get("difference_vs_first", {}) for r in rows):
            continue
        relative = metric.endswith("_per_image")

        def cell(r, metric=metric, fmt=fmt, relative=relative):
            change = r.get("difference_vs_first", {}).get(metric)
            if change is None:
                return "-"
            return fmt.format(change / rows[0][metric] if relative else change)
        lines.append((label, cell))
    return lines


def print_eval_report(result: dict[str, Any]) -> None:
    rows = result["models"]
    table = Table(title=f"difcompress eval ({result['sampler']}, {result['sampler_steps']} steps, {result['device']})")
    table.add_column("metric")
    for row in rows:
        step = f" (checkpoint step {row['checkpoint_step']})" if "checkpoint_step" in row else ""
        table.add_column(row["model"] + step, justify="right")
    first = rows[0]
    denoiser = first["denoiser_kind"]
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
    lines += _differences(rows)
    if any("weights" in r for r in rows):
        lines.insert(0, ("weights (export)", lambda r: r.get("weights", "-")))
    for label, fmt in lines:
        table.add_row(label, *[fmt(r) for r in rows])
    console.print(table)
    if result["protocol"]:
        p = result["protocol"]
        console.print(f"FID/KID: {p['feature_extractor']} features, {p['num_samples']} samples, {p['sampler']} "
                      f"{p['steps']} steps, seed {p['seed']}, reference {p['reference']}")
    console.print(f"sample grid: {result['grid']}")
