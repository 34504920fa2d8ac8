"""Low-bit weights for an exported denoiser, through diffusers' optimum-quanto backend
(`export --quantize int8|int4`; docs/quantization.md says why this backend).

The export writes its fp16/bf16 folder first; the denoiser is then reloaded from it by stock
diffusers with a `QuantoConfig` (quanto swaps every `nn.Linear` for a `QLinear` holding int8
or packed int4 weights) and saved back as safetensors, which stock
`from_pretrained(folder)` reloads with no setting of its own: the scheme is in the
denoiser's config.json (`quantization_config`).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import QuantoConfig

from difcompress.artifacts.folders import add_variant_names
from difcompress.core.console import quiet_diffusers
from difcompress.core.errors import UserError
from difcompress.core.files import folder_size_bytes, read_json

BACKEND = "optimum-quanto"  # the distribution; diffusers' quant_method is "quanto"
INSTALL_HINT = "pip install 'difcompress[quantize]'"


def backend_version() -> str:
    """The installed optimum-quanto's version; one line saying how to install it when absent."""
    try:
        return version(BACKEND)
    except PackageNotFoundError:
        raise UserError(f"--quantize needs the optimum-quanto backend, which is not installed: {INSTALL_HINT}",
                        exit_code=2) from None


def quantized_components(folder: Path) -> dict[str, dict[str, Any]]:
    """The components of a model or pipeline folder whose config.json records a quantization
    (component name, "." for a bare model folder -> its quantization_config)."""
    found = {}
    for config in [folder / "config.json", *sorted(folder.glob("*/config.json"))]:
        settings = read_json(config) if config.is_file() else None
        if isinstance(settings, dict) and settings.get("quantization_config"):
            found["." if config.parent == folder else config.parent.name] = settings["quantization_config"]
    return found


def refuse_quantized(folder: Path, source: str) -> None:
    """One line when `folder` already holds quantized weights: quantizing twice loses more."""
    found = quantized_components(folder)
    if found:
        parts = ", ".join(f"{name} ({q.get('quant_method', '?')} {q.get('weights_dtype', q.get('quant_type', ''))})"
                          .replace(" )", ")") for name, q in found.items())
        raise UserError(f"{source} is already quantized ({parts}); export --quantize from the unquantized "
                        "folder it came from", exit_code=2)


@contextmanager
def _quiet_backend() -> Iterator[None]:
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
    with _quiet_backend():
        model = model_class.from_pretrained(component, quantization_config=QuantoConfig(weights_dtype=scheme),
                                            torch_dtype=dtype, use_safetensors=True)
        model.save_pretrained(staged, safe_serialization=True)
    shutil.rmtree(component)
    staged.rename(component)
    if variant:
        add_variant_names(component, variant, pattern="*")
    return folder_size_bytes(component, "*.safetensors")
