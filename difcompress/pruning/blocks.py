"""Block removal for Stable Diffusion U-Nets: BK-SDM's Base, Small and Tiny students.

BK-SDM (Kim et al., ECCV 2024; code github.com/Nota-NetsPresso/BK-SDM, commit e13670c,
src/kd_train_text_to_image.py:78-123 and src/unet_config*) removes whole blocks from SD's
U-Net and copies every student weight from the teacher weight of the same name, except the
renamed prefixes below:

* base: ``layers_per_block`` 2 -> 1. Each down block keeps its first resnet (+ attention);
  each up block keeps its first and last (the last takes the skip from the stage input,
  so the teacher's ``resnets.2``/``attentions.2`` become the student's ``.1``).
* small: base without the mid block (``mid_block_type: null``).
* tiny: small without the innermost stage: the teacher's ``down_blocks.3`` and
  ``up_blocks.0`` go, and student ``up_blocks.j`` takes teacher ``up_blocks.j+1``.

The rules need SD's block pattern (four levels, two layers per block, cross-attention in
the first three down and last three up blocks), not SD's widths.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difcompress.core.errors import UserError

PRESETS = ("bk-base", "bk-small", "bk-tiny")
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def check_sd_pattern(config: dict[str, Any]) -> None:
    """BK-SDM's removals are defined on SD's block pattern; refuse anything else."""
    found = (tuple(config.get("down_block_types", ())), tuple(config.get("up_block_types", ())),
             config.get("layers_per_block"), config.get("mid_block_type", "UNetMidBlock2DCrossAttn"))
    wanted = (SD_DOWN, SD_UP, 2, "UNetMidBlock2DCrossAttn")
    if found != wanted:
        raise UserError(f"--preset needs Stable Diffusion's U-Net block pattern (down {list(SD_DOWN)}, up "
                        f"{list(SD_UP)}, layers_per_block 2, a cross-attention mid block); this U-Net has down "
                        f"{list(found[0])}, up {list(found[1])}, layers_per_block {found[2]}, mid {found[3]}",
                        exit_code=2)


def student_config(config: dict[str, Any], preset: str) -> dict[str, Any]:
    """The student's stock config: the teacher's with BK-SDM's deltas."""
    check_sd_pattern(config)
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    out["layers_per_block"] = 1
    if preset in ("bk-small", "bk-tiny"):
        out["mid_block_type"] = None
    if preset == "bk-tiny":
        out["block_out_channels"] = list(config["block_out_channels"])[:3]
        out["down_block_types"] = list(SD_DOWN[:3])
        out["up_block_types"] = list(SD_UP[1:])
        for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "cross_attention_dim"):
            if isinstance(out.get(key), (list, tuple)):
                out[key] = list(out[key])[:3]
    return out


def renamed_prefixes(preset: str) -> list[tuple[str, str]]:
    """(student prefix, teacher prefix) pairs; everything else keeps its name."""
    if preset == "bk-tiny":
        pairs = []
        for j in range(3):
            i = j + 1
            pairs += [(f"up_blocks.{j}.resnets.0.", f"up_blocks.{i}.resnets.0."),
                      (f"up_blocks.{j}.attentions.0.", f"up_blocks.{i}.attentions.0."),
                      (f"up_blocks.{j}.resnets.1.", f"up_blocks.{i}.resnets.2."),
                      (f"up_blocks.{j}.attentions.1.", f"up_blocks.{i}.attentions.2.")]
        return pairs + [("up_blocks.0.upsamplers.", "up_blocks.1.upsamplers."),
                        ("up_blocks.1.upsamplers.", "up_blocks.2.upsamplers.")]
    pairs = [("up_blocks.0.resnets.1.", "up_blocks.0.resnets.2.")]
    for i in (1, 2, 3):
        pairs += [(f"up_blocks.{i}.resnets.1.", f"up_blocks.{i}.resnets.2."),
                  (f"up_blocks.{i}.attentions.1.", f"up_blocks.{i}.attentions.2.")]
    return pairs


def teacher_key(student_key: str, preset: str) -> str:
    """The teacher weight a student weight is copied from."""
    for student_prefix, teacher_prefix in renamed_prefixes(preset):
        if student_key.startswith(student_prefix):
            return teacher_prefix + student_key[len(student_prefix):]
    return student_key


@torch.no_grad()
def student_from_teacher(teacher: nn.Module, config: dict[str, Any], source_key, what: str) -> nn.Module:
    """The stock model of `config`, every weight copied from the teacher weight that
    `source_key(student_key)` names (block-removal presets: BK-SDM's, the SDXL students')."""
    student = type(teacher).from_config(config).to(next(teacher.parameters()).device)
    source = teacher.state_dict()
    for key, target in student.state_dict().items():
        name = source_key(key)
        if name not in source or source[name].shape != target.shape:
            got = tuple(source[name].shape) if name in source else "nothing"
            raise RuntimeError(f"{what}: {key} has shape {tuple(target.shape)} but its teacher weight {name} has {got}")
        target.copy_(source[name])
    return student


def remove_blocks(teacher: nn.Module, preset: str) -> nn.Module:
    """The BK-SDM student of `teacher`, built from its stock config, every weight copied."""
    if preset not in PRESETS:
        raise UserError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}", exit_code=2)
    config = student_config(dict(teacher.config), preset)
    return student_from_teacher(teacher, config, lambda key: teacher_key(key, preset), preset)


def feature_pairs(preset: str | None) -> list[tuple[str, str]] | None:
    """BK-SDM's hooked (student, teacher) modules for a preset (kd_train_text_to_image.py:699-721)."""
    if preset in ("bk-base", "bk-small"):
        names = [f"up_blocks.{i}" for i in range(4)] + [f"down_blocks.{i}" for i in range(4)]
        return [(n, n) for n in names]
    if preset == "bk-tiny":
        return [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
                ("down_blocks.2.attentions.0.proj_out", "down_blocks.2.attentions.1.proj_out"),
                ("up_blocks.0", "up_blocks.1"), ("up_blocks.1", "up_blocks.2"), ("up_blocks.2", "up_blocks.3")]
    return None
