"""`export --format comfyui-fp8 | gguf-*`: one float8_e4m3fn U-Net file under the LDM key names ComfyUI
and Forge read, which diffusers' own single-file loader reads back (docs/quantization.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_one_line_error, run_export

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_the_fp8_file_loads_back_through_diffusers_single_file_loader(fixture, request, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    source = request.getfixturevalue(fixture)
    info = run_export(source, tmp_path / "ui", format="comfyui-fp8", dtype="fp16")
    path = tmp_path / "ui" / info["single_file"]["file"]
    assert sorted(p.name for p in (tmp_path / "ui").iterdir()) == sorted(
        ["README.md", "config.json", "difcompress.json", path.name])
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("model.diffusion_model.") for k in keys)
        assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in keys
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.diffusion_model.out.2.bias").dtype == torch.float16
    loaded = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path / "ui"), torch_dtype=torch.float16)
    original = UNet2DConditionModel.from_pretrained(source / "unet")
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert set(ours) == set(theirs)
    for key, weight in theirs.items():  # e4m3 keeps 3 mantissa bits: within 1/16 relative, plus subnormals
        assert torch.allclose(ours[key].float(), weight, rtol=1 / 16, atol=2e-3), key
    assert info["single_file"]["clamped_values"] == 0 and info["weight_bytes"] == path.stat().st_size


def test_the_single_file_is_refused_for_other_denoisers_and_with_quantize(tiny_model_dir, tiny_sd_dir, tmp_path,
                                                                           run_cli):
    code, _, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "a", "--format", "comfyui-fp8")
    assert "written for SD / SDXL U-Nets" in assert_one_line_error(code, err, 2)
    code, _, err = run_cli("export", tiny_sd_dir, "-o", tmp_path / "b", "--format", "comfyui-fp8", "--dtype", "fp16",
                           "--quantize", "int8")
    assert "drop one of them" in assert_one_line_error(code, err, 2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_block_removal_layout_converts_back_by_diffusers_own_conversion():
    """The LDM names inverted by diffusers' convert_ldm_unet_checkpoint give back every
    diffusers key, for SD-2.1 and SDXL and the BK-SDM / KOALA / SSD-1B / Vega students."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from difcompress.artifacts.single_file import ldm_unet_state_dict
    from difcompress.layouts import SD21_BASE_UNET, SDXL_BASE_UNET
    from difcompress.pruning.blocks import student_config
    from difcompress.pruning.sdxl_layouts import sdxl_student_config

    with torch.device("meta"):
        sd, sdxl = UNet2DConditionModel(**SD21_BASE_UNET), UNet2DConditionModel(**SDXL_BASE_UNET)
        models = [sd, sdxl, *[UNet2DConditionModel.from_config(student_config(dict(sd.config), p))
                              for p in ("bk-base", "bk-small", "bk-tiny")],
                  *[UNet2DConditionModel.from_config(sdxl_student_config(dict(sdxl.config), p))
                    for p in ("koala-1b", "koala-700m", "ssd-1b", "vega")]]
    for model in models:
        state = model.state_dict()
        back = convert_ldm_unet_checkpoint(ldm_unet_state_dict(model), dict(model.config))
        assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


@pytest.mark.parametrize("scheme, tolerance", [("gguf-q8_0", 2e-3), ("gguf-q4_0", 3e-2)])
def test_a_flux_gguf_file_is_read_by_diffusers_gguf_loader(scheme, tolerance, tmp_path):
    """The GGUF file holds BFL's names (what ComfyUI-GGUF reads), architecture flux, vectors in
    F32, the matrices in the scheme; diffusers' GGUF reader gives back the weights."""
    pytest.importorskip("gguf", reason="the quantize extra: pip install 'difcompress[quantize]'")
    import gguf
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    from difcompress.artifacts.gguf_file import write_gguf
    from difcompress.artifacts.single_file import bfl_flux_state_dict

    state = bfl_flux_state_dict(_tiny_flux())
    path = tmp_path / "t.gguf"
    counts = write_gguf(path, state, "bfl-flux", scheme)
    assert set(counts) == {"F32", scheme.removeprefix("gguf-").upper()}
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "flux"
    read = load_gguf_checkpoint(str(path))
    assert set(read) == set(state) and "double_blocks.0.img_attn.qkv.weight" in read
    for key, value in read.items():
        value = dequantize_gguf_tensor(value) if hasattr(value, "quant_type") else value
        assert torch.allclose(value.float(), state[key], atol=tolerance), key


def test_flux_names_convert_back_by_diffusers_own_conversion():
    """BFL names from FLUX.1-dev's layout and the 8-double (Flux.1-lite, Flex.1) and Flux-Mini
    students, converted back by diffusers' convert_flux_transformer_checkpoint_to_diffusers
    (meta tensors: its single-block split assumes FLUX's 3072 width, so only full-width layouts)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    from difcompress.artifacts.single_file import bfl_flux_state_dict

    dev = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
               axes_dims_rope=(16, 56, 56))  # docs/published-layouts.md
    for layout in (dev, {**dev, "num_layers": 8}, {**dev, "num_layers": 5, "num_single_layers": 10}):
        with torch.device("meta"):
            model = FluxTransformer2DModel(**layout)
        state = model.state_dict()
        back = convert_flux_transformer_checkpoint_to_diffusers(bfl_flux_state_dict(model))
        assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)


def test_gguf_is_refused_for_u_nets(tiny_sd_dir, tmp_path, run_cli):
    code, _, err = run_cli("export", tiny_sd_dir, "-o", tmp_path / "g", "--format", "gguf-q8_0")
    assert "written for Flux transformers" in assert_one_line_error(code, err, 2)
    assert not (tmp_path / "g").exists()


def test_export_writes_a_depth_pruned_flux_student_as_one_gguf_file(tmp_path, run_cli):
    """`export --format gguf-q8_0` on a depth-pruned Flux pipeline: one GGUF file holding the
    student's blocks under BFL's names, read back by diffusers' GGUF reader. (Stock
    from_single_file needs FLUX's full 3072 width, which benchmarks/gguf_flux_check.py loads.)"""
    pytest.importorskip("gguf", reason="the quantize extra: pip install 'difcompress[quantize]'")
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from tiny_flow import build_tiny_flux

    from difcompress.artifacts.single_file import bfl_flux_state_dict
    from difcompress.loading.models import load_model

    teacher = build_tiny_flux(tmp_path / "flux")
    code, _, err = run_cli("prune", teacher, "--ratio", "0", "--depth", "2", "--single-depth", "4", "-o",
                           tmp_path / "p", "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli("export", tmp_path / "p", "-o", tmp_path / "g", "--format", "gguf-q8_0")
    assert code == 0, err
    (file,) = (tmp_path / "g").glob("*.gguf")
    read = load_gguf_checkpoint(str(file))
    expected = bfl_flux_state_dict(load_model(str(tmp_path / "p")).model)
    assert set(read) == set(expected)
    assert {k.split(".")[1] for k in read if k.startswith("double_blocks.")} == {"0", "1"}
    assert {k.split(".")[1] for k in read if k.startswith("single_blocks.")} == {"0", "1", "2", "3"}
