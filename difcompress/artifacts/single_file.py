"""Single-file denoiser checkpoints for the consumer UIs (ComfyUI, Forge): `export --format
comfyui-fp8` (the weights in float8_e4m3fn) and the GGUF formats (artifacts/gguf_file.py),
under the key names those UIs read.

Stable Diffusion and SDXL U-Nets are read there under the original LDM / SGM names
(`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`, ...): the inverse of the
conversion diffusers ships for reading such files (`loaders/single_file_utils.py`,
`convert_ldm_unet_checkpoint`, whose fixed names `DIFFUSERS_TO_LDM_MAPPING` we reuse), so
`UNet2DConditionModel.from_single_file(file, config=folder)` reads the file back
(docs/quantization.md). Flux transformers take Black Forest Labs' names (`double_blocks.*`,
fused qkv), the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`.
The U-Net block indices follow the config's `layers_per_block`, as that
conversion does, so block-removed students (BK-SDM, KOALA) keep their own layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: larger magnitudes are clamped, not turned into NaN
# Inside a resnet, diffusers' names -> LDM's (ResBlock: in_layers = norm, act, conv; out_layers
# = norm, act, dropout, conv).
RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)")


def _resnet(rest: str) -> str:
    for diffusers_name, ldm_name in RESNET_NAMES:
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name):]
    return rest


def _fixed_names(config: dict[str, Any]) -> dict[str, str]:
    names = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        names.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        names.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    return names


def ldm_unet_name(key: str, config: dict[str, Any], up_attentions: set[int]) -> str:
    """The LDM name of a diffusers UNet2DConditionModel weight (`up_attentions`: the up blocks
    that have attentions, whose upsampler sits one place later)."""
    fixed = _fixed_names(config)
    if key in fixed:
        return fixed[key]
    per_level = config["layers_per_block"] + 1
    match = _BLOCK.fullmatch(key)
    if match:
        side, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if side == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
            slot = 1 + level * per_level + int(index)
            return f"input_blocks.{slot}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}"
        if kind == "upsamplers":
            return f"output_blocks.{level * per_level + per_level - 1}.{2 if level in up_attentions else 1}.{rest}"
        slot = level * per_level + int(index)
        return f"output_blocks.{slot}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}"
    match = _MID.fullmatch(key)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        return f"middle_block.{2 * index}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    raise ValueError(f"no LDM name for the U-Net weight {key}")


def ldm_unet_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under the LDM names, with the `model.diffusion_model.` prefix that
    full checkpoints carry (ComfyUI's diffusion-model loader strips it, diffusers' needs it)."""
    config = dict(model.config)
    state = model.state_dict()
    up_attentions = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    return {LDM_UNET_KEY + ldm_unet_name(k, config, up_attentions): v for k, v in state.items()}




def fp8_weights(state: dict[str, torch.Tensor], keep: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """Matrices and kernels (2-D and up) in float8_e4m3fn, clamped to its range; vectors
    (biases, norms) in `keep`, as ComfyUI's own fp8 files keep them small and exact. Returns
    the tensors and how many values were clamped."""
    out, clamped = {}, 0
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dim() >= 2:
            clamped += int((tensor.abs() > FP8_MAX).sum())
            out[key] = tensor.float().clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
        else:
            out[key] = tensor.to(keep).contiguous() if tensor.is_floating_point() else tensor.contiguous()
    return out, clamped


def write_fp8_single_file(path: Path, model: torch.nn.Module, layout: str, keep: torch.dtype,
                          metadata: dict[str, str]) -> int:
    """Write `model` as one fp8 safetensors file in `layout`'s key names; returns the values
    clamped to fp8's range."""
    tensors, clamped = fp8_weights(SINGLE_FILE_LAYOUTS[layout](model), keep)
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    return clamped


# ---- Flux transformers under Black Forest Labs' names (ComfyUI, Forge, ComfyUI-GGUF) ----------
# diffusers name -> BFL name, for the weights that only change name (with .weight / .bias);
# diffusers' convert_flux_transformer_checkpoint_to_diffusers is the inverse we check against.
FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
               "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
               "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
               "proj_out": "linear2"}
# Fused in BFL's layout: (BFL name, the diffusers parts concatenated along the output rows).
FLUX_DOUBLE_FUSED = (("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                     ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")))
FLUX_SINGLE_FUSED = (("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),)


def _renamed(state: dict[str, torch.Tensor], prefix: str, names: dict[str, str], bfl_prefix: str) -> dict:
    out = {}
    for old, new in names.items():
        for suffix in ("weight", "bias"):
            key = f"{prefix}{old}.{suffix}"
            if key in state:  # RMSNorm scales have no bias; BFL calls them "scale"
                out[f"{bfl_prefix}{new}.{'scale' if new.endswith('_norm') else suffix}"] = state[key]
    return out


def _fused(state, prefix: str, fused, bfl_prefix: str) -> dict:
    return {f"{bfl_prefix}{new}.{suffix}": torch.cat([state[f"{prefix}{part}.{suffix}"] for part in parts])
            for new, parts in fused for suffix in ("weight", "bias")}


def bfl_flux_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel's weights under BFL's names: double_blocks / single_blocks, the
    fused qkv (and qkv + mlp) projections, and the final modulation's (shift, scale) order."""
    state = model.state_dict()
    out = _renamed(state, "", FLUX_TOP, "")
    for i in range(len(model.transformer_blocks)):
        out |= _renamed(state, f"transformer_blocks.{i}.", FLUX_DOUBLE, f"double_blocks.{i}.")
        out |= _fused(state, f"transformer_blocks.{i}.", FLUX_DOUBLE_FUSED, f"double_blocks.{i}.")
    for i in range(len(model.single_transformer_blocks)):
        out |= _renamed(state, f"single_transformer_blocks.{i}.", FLUX_SINGLE, f"single_blocks.{i}.")
        out |= _fused(state, f"single_transformer_blocks.{i}.", FLUX_SINGLE_FUSED, f"single_blocks.{i}.")
    for suffix in ("weight", "bias"):  # diffusers keeps (scale, shift), BFL (shift, scale)
        scale, shift = state[f"norm_out.linear.{suffix}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
    return out


# Each layout the families name (ModelFamily.single_file_layout) -> its key conversion.
SINGLE_FILE_LAYOUTS = {"ldm-unet": ldm_unet_state_dict, "bfl-flux": bfl_flux_state_dict}
