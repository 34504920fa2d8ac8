"""What people and scripts see on the terminal: warnings, progress bars with ETA, and JSON
for scripts (`--json`)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager, redirect_stdout
from typing import Any, Callable, Iterator

from diffusers.utils import logging as diffusers_logging
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

console = Console()


err_console = Console(stderr=True)


def human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


SCHEMA_VERSION = 1  # of every --json output (docs/output-format.md); raise it when a field changes meaning


_RESULT_STREAMS: list[Any] = []  # the real stdout while a --json command runs (innermost last)


@contextmanager
def stdout_for_results_only() -> Iterator[None]:
    """While a --json command runs, anything else written to stdout (a library logger that
    prints there, as deepspeed's does when accelerate imports it) goes to stderr, so stdout
    holds only the JSON `print_json` writes."""
    _RESULT_STREAMS.append(sys.stdout)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _RESULT_STREAMS.pop()


def print_json(data: dict[str, Any]) -> None:
    """A command's result on stdout, stamped with the schema version."""
    stream = _RESULT_STREAMS[-1] if _RESULT_STREAMS else sys.stdout
    stream.write(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2, default=str) + "\n")


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


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' warnings off for a call whose warnings are about things done on purpose."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)

