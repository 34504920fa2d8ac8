"""The house rules of docs/architecture.md, checked on the source: layers import only
downwards, no import circles, short functions, and one source for every option."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from difcompress import config as config_module
from difcompress.cli import app

PACKAGE = Path(__file__).resolve().parents[1] / "difcompress"

# Lowest first: packages (and the few top-level modules). A module may import its own
# package or the layers below, never above; docs/architecture.md is this list in words.
LAYERS = [
    ["core"],
    ["objectives"],
    ["config"],
    ["layouts"],
    ["artifacts"],
    ["data"],
    ["metrics"],
    ["diffusion"],
    ["pruning"],
    ["families"],
    ["builtin"],
    ["loading"],
    ["reports"],
    ["training"],
    ["commands"],
    ["cli", "__main__", ""],
]
# Where a function may import the package's own modules, and why: start-up time.
LAZY_IMPORTS_ALLOWED = {"cli"}
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name.removesuffix("__init__").rstrip(".")] = path
    return out


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")) or (not prefix and not module):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"difcompress.{module} has no layer in LAYERS (add it, and to docs/architecture.md)"
    return best[0]


def test_imports_are_absolute():
    """The layer, circle and lazy-import checks read absolute imports; a relative one would
    slip past all three."""
    relative = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


def _imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(imported difcompress module, node, inside a function) for every import in a file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    modules = _modules()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difcompress"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("difcompress")]
        else:
            continue
        targets = {n.removeprefix("difcompress").lstrip(".") for n in names}
        targets = {t for t in targets if t in modules}
        ancestor, in_function = node, False
        while ancestor in parents:
            ancestor = parents[ancestor]
            in_function |= isinstance(ancestor, (ast.FunctionDef, ast.AsyncFunctionDef))
        found += [(t, node, in_function) for t in targets]
    return found


def test_layers_import_only_downwards():
    upward = []
    for module, path in _modules().items():
        for target, node, _ in _imports(path):
            if _layer(target) > _layer(module):
                upward.append(f"difcompress.{module}:{node.lineno} imports difcompress.{target}")
    assert upward == []


def test_no_import_circles():
    graph = {m: {t for t, _, _ in _imports(p)} - {m} for m, p in _modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module)


def test_function_level_imports_only_where_allowed():
    lazy = [f"difcompress.{module}:{node.lineno}" for module, path in _modules().items()
            for _, node, in_function in _imports(path) if in_function and module not in LAZY_IMPORTS_ALLOWED]
    assert lazy == []


def test_functions_are_short_enough_to_read_at_once():
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"difcompress.{module}.{node.name}: {length} lines")
    assert long == []


# ---- one source for every option ----------------------------------------------------------------
COMMANDS = {"prune": config_module.PruneConfig, "distill": config_module.DistillConfig,
            "eval": config_module.EvalConfig, "export": config_module.ExportConfig,
            "stats": config_module.StatsConfig, "demo": config_module.DemoConfig, "build-digits": config_module.BuildDigitsConfig}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_options_are_the_config_fields_with_the_same_defaults(command):
    config_cls = COMMANDS[command]
    callback = next(c.callback for c in app.registered_commands if c.name == command)
    params = inspect.signature(callback).parameters
    # --json and --dry-run choose what the command prints or whether it runs, not a setting of it.
    assert set(params) - {"json_output", "dry_run"} == set(config_cls.model_fields)
    for name, field in config_cls.model_fields.items():
        default = params[name].default
        if field.is_required():
            assert default is inspect.Parameter.empty, name
        elif isinstance(field.default, list):
            assert default == ",".join(map(str, field.default)), name
        else:
            assert default == field.default, name


@pytest.mark.parametrize("stage", sorted(config_module.STAGE_CONFIGS))
def test_recipe_stages_are_validated_by_the_same_configs(stage, tmp_path):
    from difcompress.commands.run import resolve_stages

    values = {"prune": {"model": "m", "ratio": 0.5}, "distill": {"student": "s"}, "eval": {"models": ["a"]},
              "export": {"model": "m"}}[stage]
    recipe = config_module.Recipe(name="r", output_dir=tmp_path, **{stage: values})
    (_, config), = resolve_stages(recipe)
    assert type(config) is config_module.STAGE_CONFIGS[stage]
    defaults = {n: f.default for n, f in type(config).model_fields.items() if not f.is_required()}
    assert {n: getattr(config, n) for n in defaults if n not in values and n not in ("output", "seed", "device")} \
        == {n: d for n, d in defaults.items() if n not in values and n not in ("output", "seed", "device")}


@pytest.mark.parametrize("name, config", [("prune", "PruneConfig"), ("distill", "DistillConfig"),
                                          ("evaluate", "EvalConfig"), ("export", "ExportConfig"),
                                          ("stats", "StatsConfig")])
def test_the_python_api_takes_the_config_objects(name, config):
    import difcompress

    function = getattr(difcompress, name)
    first = next(iter(inspect.signature(function).parameters.values()))
    assert first.annotation == config and hasattr(difcompress, config)
    assert function.__doc__


def test_bad_values_are_refused_the_same_way_everywhere(tmp_path, run_cli):
    from conftest import assert_one_line_error

    from difcompress.core.errors import UserError

    with pytest.raises(UserError) as info:
        config_module.DistillConfig(student="s", output=tmp_path, grad_clip=-1)
    assert info.value.exit_code == 2 and "--grad-clip" in str(info.value)
    code, _, err = run_cli("distill", "--student", "s", "-o", tmp_path / "x", "--grad-clip", "-1")
    assert "--grad-clip" in assert_one_line_error(code, err, 2)
    assert not (tmp_path / "x").exists()


def test_no_pickles_are_read_or_written():
    """No torch.load / torch.save / pickle anywhere; np.load only with allow_pickle=False; the
    one TorchScript read (clean-fid's Inception, documented) only in metrics/extractors.py."""
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "joblib") for n in names):
                    found.append(f"{module}:{node.lineno} imports a pickle library")
            if not isinstance(node, ast.Call):
                continue
            call = ast.unparse(node.func)
            if call in ("torch.load", "torch.save") or call.startswith("pickle."):
                found.append(f"{module}:{node.lineno} {call}")
            if call == "torch.jit.load" and module != "metrics.extractors":
                found.append(f"{module}:{node.lineno} {call}")
            if call in ("np.load", "numpy.load") and not any(
                    k.arg == "allow_pickle" and ast.unparse(k.value) == "False" for k in node.keywords):
                found.append(f"{module}:{node.lineno} {call} without allow_pickle=False")
    assert found == []


# ---- packages and families ------------------------------------------------------------------------
def _structure():
    """benchmarks/structure.py: the counts the renovation's closing note quotes."""
    import importlib.util

    path = PACKAGE.parent / "benchmarks" / "structure.py"
    spec = importlib.util.spec_from_file_location("structure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packages_form_layers_without_circles():
    """No import runs back up between packages (an arrow on a circle of packages)."""
    structure = _structure()
    assert structure.back_arrows(structure.package_graph(PACKAGE)) == []


def test_no_branch_on_a_family_name_outside_the_families():
    """What differs per family is asked of the family (families/base.py), never tested by name."""
    assert _structure().family_branches(PACKAGE) == []


def test_the_family_branch_count_sees_a_branch():
    """The counter finds what it counts (so the test above can fail)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "commands").mkdir()
        (Path(folder) / "commands" / "x.py").write_text('def f(loaded):\n    return loaded.family.name == "dit"\n')
        assert _structure().family_branches(Path(folder)) == ["commands.x:2"]


def test_every_export_format_the_config_names_has_a_writer():
    import typing

    from difcompress.commands.export import FORMATS

    assert set(typing.get_args(config_module.ExportFormatName)) == set(FORMATS)


def test_families_are_found_by_pipeline_and_denoiser_together():
    from difcompress.core.errors import UserError
    from difcompress.families.registry import FAMILIES, family_for

    assert family_for("UNet2DConditionModel", "StableDiffusionPipeline") is FAMILIES["t2i"]
    assert family_for("UNet2DModel", "LDMPipeline") is FAMILIES["unet2d"]
    assert family_for("UNet2DModel") is FAMILIES["unet2d"]  # a bare model folder
    assert family_for("UNet2DConditionModel", "StableDiffusionXLPipeline") is FAMILIES["sdxl"]
    with pytest.raises(UserError, match="StableDiffusionXLImg2ImgPipeline with a UNet2DConditionModel"):
        family_for("UNet2DConditionModel", "StableDiffusionXLImg2ImgPipeline")  # the refiner
    with pytest.raises(UserError, match="pass its pipeline folder"):
        family_for("UNet2DConditionModel")


def test_the_preset_choices_are_the_families_presets():
    import typing

    from difcompress.families.registry import FAMILIES

    offered = {p for family in FAMILIES.values() for p in family.presets}
    assert set(typing.get_args(config_module.Preset)) == offered
