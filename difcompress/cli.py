"""The `difcompress` command line: one thin command per stage module."""

from __future__ import annotations

import sys
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


@app.command("prune")
def prune_command(
    model: Annotated[str, typer.Argument(help="Hub id, diffusers pipeline/model folder, or difcompress folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    ratio: Annotated[float, typer.Option(help="Fraction of channels removed from every prunable layer.")] = 0.3,
    importance: Annotated[str, typer.Option(help="random, magnitude, taylor or diff-pruning.")] = "magnitude",
    data: Annotated[Optional[str], typer.Option(help="Images for gradient criteria (folder, saved dataset, or 'teacher').")] = None,
    global_pruning: Annotated[bool, typer.Option("--global", help="Rank channels across layers (widths recorded in JSON, not in the stock config).")] = False,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(help="Images for gradient criteria.")] = 16,
    diff_threshold: Annotated[float, typer.Option(help="diff-pruning: stop once the loss falls below this fraction of its maximum.")] = 0.05,
    importance_timesteps: Annotated[Optional[int], typer.Option(help="Cap on timesteps visited by gradient criteria.")] = None,
    device: Device = "auto",
    json_output: JsonFlag = False,
):
    """Prune channels with torch-pruning; writes a diffusers folder stock diffusers loads."""
    from difcompress.prune import prune
    from difcompress.report import print_prune_report

    with err_console.status("pruning...", spinner="dots") if not json_output else _nothing():
        report = prune(
            model, ratio, output, importance=importance, data=data, global_pruning=global_pruning, seed=seed,
            device=device, batch_size=batch_size, diff_threshold=diff_threshold,
            importance_timesteps=importance_timesteps,
        )
    print_json(report) if json_output else print_prune_report(report)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
