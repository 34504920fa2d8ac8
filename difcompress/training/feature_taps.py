"""Forward hooks that keep the outputs of paired student and teacher blocks for feature KD.

Hooks are attached to module objects found by name before any wrapping, and outputs are
kept by pair index, so wrappers that rename modules (DDP's `module.` prefix,
torch.compile's `_orig_mod.`) cannot break the pairing.

A name may end in `[k]`: the k-th output of a module that returns a tuple (Flux's blocks
return (text stream, image stream)); without it a tuple's first output is kept.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from difcompress.core.errors import UserError
from difcompress.diffusion.inputs import cast_floating
from difcompress.objectives.feature import FeatureAdapters


def parse_feature_layers(layers: list[str] | None) -> list[tuple[str, str]] | None:
    """'name' (same module in both) or 'student_name=teacher_name'."""
    if not layers:
        return None
    return [tuple(item.split("=", 1)) if "=" in item else (item, item) for item in layers]


def tap_point(name: str) -> tuple[str, int | None]:
    """'module' or 'module[k]' -> (module name, which output of a tuple, or None)."""
    found = re.fullmatch(r"(.*)\[(\d+)\]", name)
    return (found.group(1), int(found.group(2))) if found else (name, None)


def tapped(output, index: int | None):
    """The kept output: the `index`-th of a tuple, else a tuple's first, else the output."""
    if isinstance(output, tuple):
        return output[index or 0]
    return output


class FeatureTaps:
    """The outputs of each (student block, teacher block) pair of the last forward passes."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]):
        self.pairs = pairs
        self._student: dict[int, torch.Tensor] = {}
        self._teacher: dict[int, torch.Tensor] = {}
        for model, store, side in ((student, self._student, 0), (teacher, self._teacher, 1)):
            modules = dict(model.named_modules())
            for i, pair in enumerate(pairs):
                name, which = tap_point(pair[side])
                if name not in modules:
                    raise UserError(f"feature layer '{pair[side]}' not found in the {('student', 'teacher')[side]}",
                                    exit_code=2)
                modules[name].register_forward_hook(self._hook(store, i, which))

    @staticmethod
    def _hook(store, index, which):
        def hook(_module, _inputs, output):
            store[index] = tapped(output, which)

        return hook

    def student_outputs(self) -> list[torch.Tensor]:
        return [self._student[i] for i in range(len(self.pairs))]

    def teacher_outputs(self) -> list[torch.Tensor]:
        return [self._teacher[i].detach() for i in range(len(self.pairs))]

    def clear(self) -> None:
        """Drop the kept outputs (they hold activation memory until the next forward)."""
        self._student.clear()
        self._teacher.clear()

    @torch.no_grad()
    def build_adapters(self, family, student: nn.Module, teacher: nn.Module, device, **options) -> FeatureAdapters:
        """Adapters from student to teacher widths (1x1 conv on maps, linear on tokens),
        read off one dry forward pass; `options` go to FeatureAdapters (bias, init_range, always)."""
        inputs = family.example_inputs(student, 1)
        student(**inputs)
        teacher(**cast_floating(inputs, next(teacher.parameters()).dtype))
        conv = self._student[0].dim() == 4
        width = (lambda x: x.shape[1]) if conv else (lambda x: x.shape[-1])
        adapters = FeatureAdapters([width(t) for t in self.student_outputs()],
                                   [width(t) for t in self.teacher_outputs()], kind="conv" if conv else "linear",
                                   **options)
        self.clear()
        return adapters.to(device)
