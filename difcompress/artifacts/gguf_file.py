"""GGUF files of transformer denoisers for ComfyUI-GGUF and diffusers' GGUF loader (`export
--format gguf-q8_0 | gguf-q4_0`), written with the `gguf` package (the quantize extra).

ComfyUI-GGUF's conventions (city96/ComfyUI-GGUF tools/convert.py, read): the architecture
("flux") in `general.architecture`, the original (BFL) tensor names with no prefix, vectors and
tensors of at most 1024 values in F32, the rest quantized; a row that the block size does not
divide falls back to F16. diffusers reads the same files with `from_single_file(...,
quantization_config=GGUFQuantizationConfig(...))` (docs/quantization.md says what was checked).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

from difcompress.artifacts.quantize import INSTALL_HINT
from difcompress.core.errors import UserError

SMALL_TENSOR = 1024  # values: kept in F32, as ComfyUI-GGUF does
SCHEMES = {"gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0"}  # export --format -> GGML quantization type
ARCHITECTURES = {"bfl-flux": "flux"}  # single-file layout -> general.architecture


def gguf_package() -> ModuleType:
    """The `gguf` package; one line saying how to install it when absent."""
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise UserError(f"GGUF export needs the gguf package, which is not installed: {INSTALL_HINT}",
                        exit_code=2) from None


def tensor_type(gguf: ModuleType, tensor: torch.Tensor, scheme: str):
    """The GGML type a tensor is stored in: F32 for vectors and tiny tensors, else `scheme`
    where its rows split into whole blocks, else F16."""
    types = gguf.GGMLQuantizationType
    if tensor.dim() == 1 or tensor.numel() <= SMALL_TENSOR:
        return types.F32
    wanted = types[SCHEMES[scheme]]
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if tensor.shape[-1] % block == 0 else types.F16


def write_gguf(path: Path, state: dict[str, torch.Tensor], layout: str, scheme: str) -> dict[str, int]:
    """Write `state` (already under the layout's names) as a GGUF file; returns how many
    tensors went into each GGML type."""
    gguf = gguf_package()
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURES[layout])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{SCHEMES[scheme]}"))
    counts: dict[str, int] = {}
    for name, tensor in state.items():
        kind = tensor_type(gguf, tensor, scheme)
        values = tensor.detach().float().cpu().numpy()
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
