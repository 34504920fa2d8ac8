"""Rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


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
        f"requested channel reduction {report['requested_channel_reduction']:.0%}; "
        f"achieved params -{report['params_reduction']:.1%}, MACs -{report['macs_reduction']:.1%}"
    )
    for warning in report["warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"saved to {report['output']}")
