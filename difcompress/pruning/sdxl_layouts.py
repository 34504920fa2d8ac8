"""Block removal for SDXL U-Nets: the published KOALA, SSD-1B and Segmind-Vega students.

Layouts (docs/published-layouts.md gives every source):

* koala-1b, koala-700m (KOALA, arXiv 2312.04005; etri-vilab/koala-1b and koala-700m): one
  resnet per down level (``layers_per_block`` 1, so two per up level), transformer depths
  [-, 2, 6] (1B, whose mid block keeps depth 6) and [-, 2, 5] (700M, no mid block). Read from
  ComfyUI's layout table (comfy/model_detection.py), which matches the published sizes:
  1,161,184,324 and 782,822,724 parameters counted on the meta device (1,161M and 782M published).
* ssd-1b (Segmind SSD-1B, github segmind/SSD-1B; arXiv 2401.02677): per-level depths
  [[1,1],[2,2],[4,4]] down and [[4,4,10],[2,1,1],[1,1,1]] up (diffusers'
  ``reverse_transformer_layers_per_block``), a mid block of one resnet; 1,331,334,404
  parameters ("1.3B").
* vega (Segmind-Vega): [[1,1],[1,1],[2,2]] down, [[2,2,2],[1,1,1],[1,1,1]] up, mid one
  resnet; 745,225,604 parameters ("0.74B").

Weight initialisation: KOALA's and Segmind's rules are not published (not found: see the
layouts doc). difcompress copies every student weight from the teacher weight of the same
name, BK-SDM's rule: a level keeps its first resnets and attentions and each attention its
first transformer blocks; when an up block has fewer layers, its last one takes the
teacher's last (both read the skip from the stage input, so their shapes agree).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from difcompress.core.errors import UserError
from difcompress.pruning.blocks import student_from_teacher

SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SDXL_PRESETS: dict[str, dict[str, Any]] = {
    "koala-1b": {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 6],
                 "mid_block_type": "UNetMidBlock2DCrossAttn"},
    "koala-700m": {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5], "mid_block_type": None},
    "ssd-1b": {"layers_per_block": 2, "transformer_layers_per_block": [[1, 1], [2, 2], [4, 4]],
               "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]],
               "mid_block_type": "UNetMidBlock2D"},
    "vega": {"layers_per_block": 2, "transformer_layers_per_block": [[1, 1], [1, 1], [2, 2]],
             "reverse_transformer_layers_per_block": [[2, 2, 2], [1, 1, 1], [1, 1, 1]],
             "mid_block_type": "UNetMidBlock2D"},
}


def _depths(value: Any, levels: int, layers: int) -> list[list[int]]:
    """Per level, per layer transformer depths from a config entry (an int, a list per level,
    or a list of lists)."""
    per_level = value if isinstance(value, (list, tuple)) else [value] * levels
    return [list(d) if isinstance(d, (list, tuple)) else [d] * layers for d in per_level]


def check_sdxl_pattern(config: dict[str, Any], preset: str) -> None:
    """The presets need SDXL's block pattern (three levels, two layers per block, attention
    on the two inner levels) and at least the student's depth at every attention."""
    found = (tuple(config.get("down_block_types", ())), tuple(config.get("up_block_types", ())),
             config.get("layers_per_block"))
    if found != (SDXL_DOWN, SDXL_UP, 2) or config.get("reverse_transformer_layers_per_block") is not None:
        raise UserError(f"--preset {preset} needs SDXL's U-Net pattern (down {', '.join(SDXL_DOWN)}; up "
                        f"{', '.join(SDXL_UP)}; 2 layers per block); this U-Net has down {', '.join(found[0])}, "
                        f"{found[2]} layers per block", exit_code=2)
    teacher_down = _depths(config.get("transformer_layers_per_block", 1), 3, 2)
    student = SDXL_PRESETS[preset]
    student_down = _depths(student["transformer_layers_per_block"], 3, student["layers_per_block"])
    student_up = _depths(student.get("reverse_transformer_layers_per_block")
                         or student["transformer_layers_per_block"][::-1], 3, student["layers_per_block"] + 1)
    for where, wanted, have in (("down", student_down[1:], teacher_down[1:]),
                                ("up", student_up[:2], teacher_down[1:][::-1])):
        for level, (need, got) in enumerate(zip(wanted, have)):
            if max(need) > min(got):
                raise UserError(f"--preset {preset} keeps {max(need)} transformer blocks in an attention of "
                                f"{where} level {level}, but this U-Net has only {min(got)} there; nothing to copy "
                                "them from", exit_code=2)


def sdxl_student_config(config: dict[str, Any], preset: str) -> dict[str, Any]:
    """The preset's stock config: the teacher's, with the published layout's entries."""
    check_sdxl_pattern(config, preset)
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    out.update(SDXL_PRESETS[preset])
    return out


def teacher_key(student_key: str, student_layers: int, teacher_layers: int) -> str:
    """The teacher weight a student weight starts from (same name; an up block's last layer
    takes the teacher's last)."""
    found = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", student_key)
    if found and student_layers < teacher_layers and int(found[3]) == student_layers:
        return f"up_blocks.{found[1]}.{found[2]}.{teacher_layers}.{found[4]}"
    return student_key


def remove_sdxl_blocks(teacher: nn.Module, preset: str) -> nn.Module:
    """The preset's student of `teacher`, built from its stock config, every weight copied."""
    if preset not in SDXL_PRESETS:
        raise UserError(f"unknown --preset {preset!r}; choose one of {', '.join(SDXL_PRESETS)}", exit_code=2)
    config = sdxl_student_config(dict(teacher.config), preset)
    layers = (config["layers_per_block"], teacher.config.layers_per_block)
    return student_from_teacher(teacher, config, lambda key: teacher_key(key, *layers), preset)


def removed_blocks(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Teacher resnets, attentions and transformer blocks with no student counterpart."""
    def blocks(model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_modules()
                if re.fullmatch(r"(down|up)_blocks\.\d+\.(resnets|attentions)\.\d+(\.transformer_blocks\.\d+)?"
                                r"|mid_block(\.(resnets|attentions)\.\d+(\.transformer_blocks\.\d+)?)?", n)}
    student_layers, teacher_layers = student.config.layers_per_block, teacher.config.layers_per_block
    kept = {teacher_key(n + ".", student_layers, teacher_layers)[:-1] for n in blocks(student)}
    return sorted(blocks(teacher) - kept)
