"""Low-bit weights for an exported denoiser, through diffusers' optimum-quanto backend
(`export --quantize int8|int4`; docs/quantization.md says why this backend).

The export writes its fp16/bf16 folder first; the denoiser is then reloaded from it by stock
diffusers with a `QuantoConfig` (quanto swaps every `nn.Linear` for a `QLinear` holding int8
or packed int4 weights) and saved back as safetensors, which stock
`from_pretrained(folder)` reloads with no setting of its own: the scheme is in the
denoiser's config.json (`quantization_config`).
"""

from __future__ import annotations

import importlib
import logging
import shutil
import warnings
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import QuantoConfig
from diffusers.utils import is_optimum_quanto_version

from difcompress.artifacts.folders import add_variant_names
from difcompress.core.console import quiet_diffusers
from difcompress.core.errors import UserError
from difcompress.core.files import folder_size_bytes, read_json

BACKEND = "optimum-quanto"  # the distribution; diffusers' quant_method is "quanto"
INSTALL_HINT = "pip install 'difcompress[quantize]'"
# The oldest optimum-quanto diffusers 0.42.1's quanto quantizer accepts (validate_environment).
MIN_BACKEND = "0.2.6"
# Each scheme (QuantoConfig's weights_dtype) -> the quanto qtype it becomes (optimum.quanto.qtypes).
QTYPES = {"int8": "qint8", "int4": "qint4"}


def backend_version() -> str:
    """The installed optimum-quanto's version; one line saying how to install it when absent."""
    try:
        return version(BACKEND)
    except PackageNotFoundError:
        raise UserError(f"--quantize needs the optimum-quanto backend, which is not installed: {INSTALL_HINT}",
                        exit_code=2) from None


def int4_group_size(in_features: int) -> int:
    """Input features per int4 scale: quanto's QLinear takes 128, else the largest of 96, 64,
    32 dividing the row, else the whole row (optimum/quanto/nn/qmodule.py)."""
    if in_features > 128:
        for size in (128, 96, 64, 32):
            if in_features % size == 0:
                return size
    return in_features


def stored_linear_bytes(out_features: int, in_features: int, scheme: str, element_bytes: int) -> int:
    """Bytes of one nn.Linear weight as `scheme` stores it: int8 values and a scale per output
    row; int4 two values a byte, a scale and a zero point per group (scales in the export dtype);
    both with the QLinear's input and output scale scalars."""
    values, scalars = out_features * in_features, 2 * element_bytes
    if scheme == "int8":
        return values + out_features * element_bytes + scalars
    groups = values // int4_group_size(in_features)
    return values // 2 + 2 * groups * element_bytes + scalars


def installed_qtypes() -> set[str]:
    """The qtype names the installed optimum-quanto defines."""
    return set(importlib.import_module("optimum.quanto").qtypes)


def check_backend(scheme: str) -> str:
    """The installed backend's version, after checking that diffusers accepts it and that it
    has `scheme`: one line naming the upgrade otherwise, before anything is written."""
    installed = backend_version()
    if not is_optimum_quanto_version(">=", MIN_BACKEND):
        raise UserError(f"--quantize {scheme}: optimum-quanto {installed} is installed and diffusers needs "
                        f">= {MIN_BACKEND}: pip install -U {BACKEND}", exit_code=2)
    if QTYPES[scheme] not in installed_qtypes():
        raise UserError(f"--quantize {scheme}: the installed optimum-quanto {installed} has no {QTYPES[scheme]} "
                        f"weights (it has {', '.join(sorted(installed_qtypes()))}): pip install -U {BACKEND}",
                        exit_code=2)
    return installed


def quantized_components(folder: Path) -> dict[str, dict[str, Any]]:
    """The components of a model or pipeline folder whose config.json records a quantization
    (component name, "." for a bare model folder -> its quantization_config)."""
    found = {}
    for config in [folder / "config.json", *sorted(folder.glob("*/config.json"))]:
        settings = read_json(config) if config.is_file() else None
        if isinstance(settings, dict) and settings.get("quantization_config"):
            found["." if config.parent == folder else config.parent.name] = settings["quantization_config"]
    return found


def refuse_quantized(folder: Path, source: str,
                     why: str = "export --quantize from the unquantized folder it came from") -> None:
    """One line when `folder` already holds quantized weights (quantizing twice loses more;
    quantized weights do not train), naming the folder it was exported from when known."""
    found = quantized_components(folder)
    if not found:
        return
    parts = ", ".join(f"{name} ({q.get('quant_method', '?')} {q.get('weights_dtype', q.get('quant_type', ''))})"
                      .replace(" )", ")") for name, q in found.items())
    manifest = read_json(folder / "difcompress.json") if (folder / "difcompress.json").is_file() else {}
    origin = ((manifest or {}).get("export") or {}).get("source") if isinstance(manifest, dict) else None
    raise UserError(f"{source} is already quantized ({parts}); {why}" + (f" ({origin})" if origin else ""),
                    exit_code=2)


@contextmanager
def quiet_backend() -> Iterator[None]:
    """diffusers' deprecation notice for its quanto quantizer and torch's "no CUDA runtime"
    note when quanto imports its extension builder: neither is about this export."""
    cpp = logging.getLogger("torch.utils.cpp_extension")
    level = cpp.level
    cpp.setLevel(logging.ERROR)
    try:
        with quiet_diffusers(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        cpp.setLevel(level)


def quantize_denoiser(component: Path, model_class: type, scheme: str, dtype: torch.dtype,
                      variant: str | None = None) -> int:
    """Replace the weights in the denoiser folder `component` (written in `dtype`) by their
    `scheme` quantization, saved by diffusers as safetensors; returns its weight bytes. With
    `variant`, the variant's names link to the new files, as the fp16 export's do."""
    staged = component.with_name(f".{component.name}.quantized")
    with quiet_backend():
        model = model_class.from_pretrained(component, quantization_config=QuantoConfig(weights_dtype=scheme),
                                            torch_dtype=dtype, use_safetensors=True)
        model.save_pretrained(staged, safe_serialization=True)
    shutil.rmtree(component)
    staged.rename(component)
    if variant:
        add_variant_names(component, variant, pattern="*")
    return folder_size_bytes(component, "*.safetensors")
