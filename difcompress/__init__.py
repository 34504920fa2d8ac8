"""difcompress: make diffusers models small enough for consumer GPUs.

The Python API mirrors the CLI, one function per command, each taking its config:

    from difcompress import DistillConfig, PruneConfig, distill, prune
    prune(PruneConfig(model="google/ddpm-cifar10-32", ratio=0.9, output="runs/p"))
    summary = distill(DistillConfig(student="runs/p", output="runs/s", loss="place", data="imgs/"))

The names below are loaded on first use (PEP 562), so that `difcompress --help` does not
import torch's and diffusers' model code.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "prune": "difcompress.commands.prune",
    "distill": "difcompress.commands.distill",
    "evaluate": "difcompress.commands.evaluate",
    "export": "difcompress.commands.export",
    "stats": "difcompress.commands.stats",
    "run_recipe": "difcompress.commands.run",
    "demo": "difcompress.commands.demo",
    "load_model": "difcompress.loading.models",
    **{name: "difcompress.config" for name in (
        "PruneConfig", "DistillConfig", "EvalConfig", "ExportConfig", "StatsConfig", "DemoConfig", "Recipe")},
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'difcompress' has no attribute {name!r}")
    return getattr(import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
