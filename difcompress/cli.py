"""The `difcompress` command line: one thin command per stage module.

Every command's options are generated from its config model (config.py), so names,
defaults, choices, bounds and help live in one place. A command validates its options
into the config (a bad value is one `error:` line, exit code 2), calls the stage
function, and prints a table, or JSON with `--json`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
import types
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Callable,
    Optional,
    Union,
    get_args,
    get_origin,
)

import annotated_types
import typer
from pydantic.fields import FieldInfo
from rich.markup import escape

# Typer >= 0.20 vendors click; older releases use click itself.
try:
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import NoArgsIsHelpError, UsageError

from difcompress import __version__
from difcompress.config import (
    BuildDigitsConfig,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    PruneConfig,
    StageConfig,
    StatsConfig,
)
from difcompress.core.console import (
    console,
    err_console,
    human,
    print_json,
    stdout_for_results_only,
)
from difcompress.core.environment import deepspeed_on_the_cpu_quietly, is_main_process
from difcompress.core.errors import UserError
from difcompress.reports.tables import (
    print_distill_plan,
    print_eval_report,
    print_inference_memory,
    print_prune_report,
)

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Prune, distill (LIFT/PLACE), evaluate and export diffusers models.",
)

JSON_PARAM = inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
    bool, typer.Option("--json", metavar="", help="Print the result as JSON instead of a table.")])
DRY_RUN_PARAM = inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
    bool, typer.Option("--dry-run", metavar="", help="Print the resolved settings and the estimated peak memory "
                       "per process; train nothing, write nothing.")])


def _version(value: bool) -> None:
    if value:
        console.print(f"difcompress {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """Prune, distill (LIFT/PLACE), evaluate and export diffusers models."""


# ---- options generated from config models ------------------------------------------------------
def _bounds(field: FieldInfo) -> str:
    words = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("<=", "le"),
             annotated_types.Lt: ("<", "lt")}
    parts = [f"{words[type(m)][0]} {getattr(m, words[type(m)][1])}" for m in field.metadata if type(m) in words]
    return f" [{', '.join(parts)}]" if parts else ""


def _cli_type(annotation: Any) -> tuple[Any, bool]:
    """(the type Typer parses, whether it is a comma-separated integer list)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
        if annotation == list[int]:  # IntList: the config parses "1,3,5"
            return str, True
    if get_origin(annotation) is list:
        element = get_args(annotation)[0]
        return list[get_args(element)[0] if get_origin(element) is Annotated else element], False
    return annotation, False


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    extra = field.json_schema_extra or {}
    cli_type, comma_list = _cli_type(field.annotation)
    help_text = (field.description or "") + _bounds(field)
    metavar = extra.get("metavar")
    if cli_type is bool:
        metavar = ""  # a flag takes no value
    if extra.get("argument"):
        info = typer.Argument(help=help_text, show_default=False, metavar=name.upper().rstrip("S"))
    else:
        flags = extra.get("flags") or [f"--{name.replace('_', '-')}"]
        if cli_type is bool and field.default is True:  # on by default: also offer --no-NAME
            flags = [f"{flags[0]}/--no-{flags[0][2:]}"]
        info = typer.Option(*flags, help=help_text, metavar=metavar)
    default = inspect.Parameter.empty if field.is_required() else field.default
    if default is not inspect.Parameter.empty and comma_list and default is not None:
        default = ",".join(map(str, default))
    optional = default is None
    annotation = Annotated[Optional[cli_type] if optional else cli_type, info]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def config_command(name: str, config_cls: type[StageConfig], run: Callable[[StageConfig, bool], None],
                   extra: tuple[inspect.Parameter, ...] = (JSON_PARAM,)) -> None:
    """Register `difcompress NAME` with one option per config field (plus `extra`);
    `run(config, **extra values)` does the work."""
    params = [_parameter(n, f) for n, f in config_cls.model_fields.items()]
    params = sorted(params, key=lambda p: p.default is not inspect.Parameter.empty) + list(extra)

    def command(**values):
        flags = {p.name: values.pop(p.name, p.default) for p in extra}  # command-line only, not settings
        with stdout_for_results_only() if flags.get("json_output") else contextlib.nullcontext():
            run(config_cls.build({k: v for k, v in values.items() if v is not None}), **flags)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    summary = config_cls.__doc__.split(": ", 1)[-1]
    command.__doc__ = summary[0].upper() + summary[1:]
    app.command(name)(command)


# ---- what each command prints --------------------------------------------------------------------
# Stage modules are imported when their command runs, not at start-up: `--help` and a
# mistyped option answer without loading diffusers and the models' code. That import takes
# seconds, so a status line shows at once.
@contextlib.contextmanager
def starting(command: str):
    with err_console.status(f"difcompress {command}: starting ...", spinner="dots"):
        yield


def _prune(config: PruneConfig, json_output: bool) -> None:
    with starting("prune"):
        from difcompress.commands.prune import prune  # start-up time

    report = prune(config, show_progress=not json_output)
    print_json(report) if json_output else print_prune_report(report)


def _distill(config: DistillConfig, json_output: bool, dry_run: bool = False) -> None:
    with starting("distill"):
        from difcompress.commands.distill import distill, plan_distill  # start-up time

    if dry_run:
        plan = plan_distill(config)
        print_json(plan) if json_output else print_distill_plan(plan)
        return
    summary = distill(config, show_progress=not json_output)
    if not is_main_process():  # one report per run, not one per process
        return
    if json_output:
        print_json(summary)
        return
    final = summary["final"]
    if summary["resumed_from_step"] is not None:
        console.print(f"resumed from the checkpoint of step {summary['resumed_from_step']}")
    sharding = summary.get("sharding") or {}
    if sharding.get("engine", "none") != "none":
        console.print(_sharding_line(sharding))
    console.print(f"distilled {summary['steps']} steps; final loss {final.get('loss', float('nan')):.4f}; "
                  f"student, metrics.jsonl and curves.png in {summary['output']}")


def _sharding_line(sharding: dict) -> str:
    """What the run sharded, measured on each process."""
    each = lambda sizes: ", ".join(human(b, "B") for b in sizes)  # noqa: E731
    head = f"sharded with {sharding['engine']} over {sharding['processes']} processes: "
    weights = human(sharding["parameter_bytes_unsharded"], "B")
    if "optimizer_bytes_per_process" in sharding:  # zero2: the weights stay whole on every process
        held = sharding["optimizer_bytes_per_process"]
        return (head + f"optimizer state {each(held)} per process of {human(sum(held), 'B')}; "
                f"student weights {weights} whole on each")
    return head + f"student weights {each(sharding['parameter_bytes_per_process'])} per process of {weights}"


def _eval(config: EvalConfig, json_output: bool) -> None:
    with starting("eval"):
        from difcompress.commands.evaluate import evaluate  # start-up time

    result = evaluate(config, show_progress=not json_output)
    print_json(result) if json_output else print_eval_report(result)


def _export(config: ExportConfig, json_output: bool) -> None:
    with starting("export"):
        from difcompress.commands.export import export  # start-up time

    info = export(config)
    if json_output:
        print_json(info)
        return
    quantize = info["quantize"]
    scheme = f", {quantize['scheme']} denoiser weights via {quantize['backend']} {quantize['backend_version']}" \
        if quantize else ""
    denoiser = f" ({human(quantize['denoiser_weight_bytes'], 'B')} the denoiser's)" if quantize else ""
    console.print(f"exported {human(info['params'])} params ({info['dtype']}{scheme}) to {info['output']}: "
                  f"{human(info['weight_bytes'], 'B')} of weights{denoiser}, "
                  f"{human(info['size_on_disk_bytes'], 'B')} on disk")
    if "single_file" in info:  # the memory table's rows are diffusers folders' weights choices
        console.print(f"single file for ComfyUI / Forge: {info['single_file']['file']}")  # its README says how
    else:
        print_inference_memory(info["inference_memory"], info["dtype"])
    if not info["stock_diffusers_loadable"]:
        err_console.print("[yellow]warning:[/] globally pruned widths: stock diffusers cannot load this folder; "
                          "difcompress can (see its README.md)")


def _stats(config: StatsConfig, json_output: bool) -> None:
    with starting("stats"):
        from difcompress.commands.stats import stats  # start-up time

    result = stats(config, show_progress=not json_output)
    if json_output:
        print_json(result)
        return
    console.print(f"{result['count']} images ({result['kind']}), {result['extractor']} features "
                  f"({result['feature_dim']}-d) -> {result['output']}")


def _demo(config: DemoConfig, json_output: bool) -> None:
    with starting("demo"):
        from difcompress.commands.demo import demo  # start-up time

    announce = (lambda msg: None) if json_output else (lambda msg: err_console.print(f"[bold]demo[/] {msg}"))
    result = demo(config, announce=announce, show_progress=not json_output)
    if json_output:
        print_json(result)
        return
    print_eval_report(result["eval"])
    output = Path(result["output"])
    console.print(f"student exported to {output / 'export'}; loss curves in {output / 'student' / 'curves.png'}")


def _build_digits(config: BuildDigitsConfig, json_output: bool) -> None:
    with starting("build-digits"):
        from difcompress.commands.build_assets import (
            build_digits_assets,  # start-up time
        )

    report = build_digits_assets(config, show_progress=not json_output)
    if json_output:
        print_json(report)
        return
    if report["classifier"]:
        console.print(f"classifier held-out accuracy {report['classifier']['held_out_accuracy']:.2%}")
    console.print(f"teacher trained {report['teacher_steps']} steps (final loss {report['final_loss']:.4f}) "
                  f"-> {report['output']}")


config_command("prune", PruneConfig, _prune)
config_command("distill", DistillConfig, _distill, extra=(DRY_RUN_PARAM, JSON_PARAM))
config_command("eval", EvalConfig, _eval)
config_command("export", ExportConfig, _export)
config_command("stats", StatsConfig, _stats)
config_command("demo", DemoConfig, _demo)
config_command("build-digits", BuildDigitsConfig, _build_digits)


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="Validate and print the resolved stages; "
                                          "run nothing.")] = False,
    json_output: Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON instead of a "
                                              "table.")] = False,
):
    """Run the stages a recipe lists; completed stages are skipped, so a re-run resumes."""
    with starting("run"):
        from difcompress.commands.run import run_recipe  # start-up time

    def announce(entry):
        if not json_output:
            console.print(f"[bold]{entry['stage']}[/] -> {escape(entry['output'])} ({entry['status']})")
            if dry_run:
                for key, value in entry["settings"].items():
                    console.print(f"    {key}: {value}")
                memory = entry.get("memory")
                if memory:
                    said = memory if isinstance(memory, str) else f"{human(memory['total_bytes'], 'B')} (estimate)"
                    console.print(f"    peak memory per process: {escape(said)}")

    results = run_recipe(recipe, dry_run=dry_run, on_stage=announce, show_progress=not json_output)
    if json_output:
        print_json({"recipe": str(recipe.resolve()), "stages": results})


OTHER_RANKS_ERROR_WAIT_S = 5


def _error(message: str, code: int) -> None:
    if not is_main_process():
        # Under a launcher every process usually stops on the same line: the main process
        # prints it, and the launcher ends the others meanwhile. A line only this process
        # met is printed after the wait, with its rank.
        time.sleep(OTHER_RANKS_ERROR_WAIT_S)
        message = f"[rank {os.environ.get('RANK')}] {message}"
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one red line and exit code 1 or 2, never a traceback."""
    deepspeed_on_the_cpu_quietly()  # every command: accelerate imports DeepSpeed where it is installed
    try:
        code = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as err:  # bare `difcompress` or `difcompress CMD`: the help was wanted
        err_console.print(err.ctx.get_help() if err.ctx else "", highlight=False)
        code = 0
    except UsageError as err:  # bad or missing option, unknown command
        where = err.ctx.command_path if err.ctx else "difcompress"
        _error(f"{err.format_message()} (see {where} --help)".replace("\n", " "), 2)
    except typer.Abort:  # Ctrl-C outside a stage (a stage says itself what it kept)
        _error("interrupted", 130)
    except UserError as err:
        _error(str(err), err.exit_code)
    except KeyboardInterrupt:
        _error("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
