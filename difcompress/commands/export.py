"""`difcompress export`: a clean diffusers pipeline folder with a model card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from difcompress.artifacts.folders import (
    EVAL_FILE,
    check_output_folder,
    pruning_report,
    save_model_folder,
)
from difcompress.artifacts.quantize import (
    BACKEND,
    backend_version,
    quantize_denoiser,
    refuse_quantized,
)
from difcompress.commands.model_card import model_card, teacher_license
from difcompress.config import ExportConfig
from difcompress.core.console import quiet_diffusers
from difcompress.core.environment import DTYPES, hub_offline, versions
from difcompress.core.errors import UserError
from difcompress.core.files import (
    atomic_folder,
    folder_lock,
    folder_size_bytes,
    read_json,
    remove_temporaries,
    resolved_source,
    write_json,
)
from difcompress.data.latents import Autoencoder
from difcompress.loading.models import LoadedModel, load_model, load_model_folder
from difcompress.metrics.cost import model_size, peak_activation_bytes_estimate


def export(config: ExportConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Write `config.model` as a clean pipeline folder with a model card (and push it to the
    Hub when asked); returns what was written."""
    if config.push_to_hub and hub_offline():
        raise UserError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set; export without it and "
                        "upload the folder later (hf upload REPO_ID FOLDER)", exit_code=2)
    if config.quantize and config.dtype == "fp32":
        raise UserError(f"--quantize {config.quantize} needs --dtype fp16 or bf16 (the weights it leaves "
                        "unquantized are stored in that dtype)", exit_code=2)
    if config.quantize:
        backend_version()
        refuse_quantized(load_model_folder(config.model), config.model)
    output = check_output_folder(config.output, inputs=[config.model])
    with folder_lock(output):
        remove_temporaries(output)
        info = _export(config, output)
    if config.push_to_hub:
        info["hub_url"] = push_folder(output, config.push_to_hub, config.private)
    return info


@dataclass
class ExportJob:
    """What an export format writes: the loaded model, its parts cast to the export dtype,
    and the facts the card states."""

    config: ExportConfig
    loaded: LoadedModel
    net: nn.Module
    autoencoder: Autoencoder | None
    text: Any  # the text side (data/text.py), or None
    info: dict[str, Any]


@dataclass(frozen=True)
class ExportFormat:
    """One way to write a student (`export --format NAME`) into a fresh folder."""

    write: Callable[[Path, ExportJob], None]
    summary: str


def _write_diffusers(folder: Path, job: ExportJob) -> None:
    """The stock pipeline folder (model_index.json, each component's safetensors) and its card."""
    config, loaded, info = job.config, job.loaded, job.info
    family = loaded.family
    save_model_folder(
        folder, job.net, loaded.scheduler, family,
        {"stage": "export", "family": family.name, "teacher": info["teacher"], "versions": versions(), "export": info},
        loaded.structure, autoencoder=job.autoencoder, pipeline_settings=loaded.pipeline_settings,
        variant=None if config.dtype == "fp32" else config.dtype, text=job.text)
    if job.text is not None and config.dtype != "fp32":
        _encoders_load_like_the_rest(folder, job.text)
    if config.quantize:
        info["quantize"]["denoiser_weight_bytes"] = quantize_denoiser(
            folder / family.component, family.model_class, config.quantize, DTYPES[config.dtype], config.dtype)
    info["weight_bytes"] = folder_size_bytes(folder, "*.safetensors")
    where = config.push_to_hub or str(Path(config.output).resolve())
    model_card(info, where, config.push_to_hub or Path(config.output).name).save(folder / "README.md")


def _encoders_load_like_the_rest(folder: Path, text) -> None:
    """Text encoders' configs say float32, as diffusers' components load by default:
    transformers' automatic dtype reads this field, so a plain from_pretrained(folder) gives
    one dtype throughout (the fp16 weights upcast) and torch_dtype=torch.float16 keeps fp16.
    Without it the encoders came up fp16 beside an fp32 U-Net and sampling failed."""
    for name in text.components():
        config_path = folder / name / "config.json"
        if name.startswith("text_encoder") and config_path.is_file():
            config = read_json(config_path)
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = "float32"
            write_json(config_path, config)


# Every format `export --format` writes (config.ExportFormatName lists the same names).
FORMATS: dict[str, ExportFormat] = {
    "diffusers": ExportFormat(_write_diffusers, "a diffusers pipeline folder with a model card"),
}


def _export(config: ExportConfig, output: Path) -> dict[str, Any]:
    loaded = load_model(config.model, "cpu")
    if config.quantize and loaded.structure is not None:
        raise UserError(f"--quantize: {config.model} is globally pruned, and stock diffusers (which quantizes it) "
                        "cannot build its widths; quantize a uniformly pruned student", exit_code=2)
    info = export_info(config, loaded)
    dtype = DTYPES[config.dtype]
    with quiet_diffusers():  # the cast to fp16 is the export's point; diffusers warns about any .to(dtype)
        job = ExportJob(config, loaded, loaded.model.to(dtype), _in_dtype(loaded.autoencoder, dtype),
                        _text_in_dtype(loaded.text, dtype), info)
    with atomic_folder(output, needed_bytes=info["params"] * torch.finfo(dtype).bits // 8) as tmp:
        FORMATS[config.format].write(tmp, job)
    info["output"] = str(output.resolve())
    info["size_on_disk_bytes"] = folder_size_bytes(output)
    return info


def export_info(config: ExportConfig, loaded) -> dict[str, Any]:
    """What the export writes and its card says: provenance, size, memory, evaluation."""
    family, net, manifest = loaded.family, loaded.model, loaded.manifest or {}
    size = model_size(net, family)
    element = torch.finfo(DTYPES[config.dtype]).bits // 8
    distill = manifest.get("distill") or {}
    settings = distill.get("settings") or {}
    evaluation = _evaluation(loaded.path)
    data = settings.get("data")
    return {
        "source": resolved_source(config.model), "teacher": manifest.get("teacher"), "family": family.name,
        "format": config.format,
        "model_class": family.model_class.__name__,
        "pipeline_tag": family.pipeline_tag,
        "pruning": pruning_report(manifest), "distill": settings or None, "distill_steps": distill.get("steps"),
        "objective": settings.get("objective") or settings.get("loss"), "params": size["params"], "macs": size["macs"],
        "dtype": config.dtype,
        "quantize": {"scheme": config.quantize, "backend": BACKEND, "backend_version": backend_version(),
                     "quantized": f"{family.component} (its nn.Linear weights)"} if config.quantize else None,
        # Activations scale with the dtype the same way the weights do.
        "sampling_memory_bytes": {b: peak_activation_bytes_estimate(net, family, b) * element // 4 for b in (1, 16)},
        "eval": evaluation[0], "eval_protocol": evaluation[1], "stock_diffusers_loadable": loaded.structure is None,
        "autoencoder": type(loaded.autoencoder.model).__name__ if loaded.autoencoder else None,
        "num_classes": family.num_classes(net), "license": teacher_license(_local_folder(manifest.get("teacher"))),
        "datasets": [data.removeprefix("hf:").split("@")[0]] if isinstance(data, str) and data.startswith("hf:")
        else None,
        **family.card_facts(net, loaded.text),
    }


def _local_folder(reference: str | None) -> Path | None:
    """The teacher's folder on this machine (a path, or a hub id in the local cache)."""
    if not reference:
        return None
    if Path(reference).is_dir():
        return Path(reference)
    try:
        return load_model_folder(reference)
    except UserError:
        return None


def _in_dtype(autoencoder, dtype):
    """The pipeline's autoencoder in the export dtype, so stock pipelines see one dtype."""
    if autoencoder is None or dtype == torch.float32:
        return autoencoder
    return Autoencoder(autoencoder.component, autoencoder.model.to(dtype))


def _text_in_dtype(text, dtype):
    """The text encoders in the export dtype (the tokenizers have none)."""
    if text is None or dtype == torch.float32:
        return text
    return text.with_models(lambda encoder: encoder.to(dtype))


def _evaluation(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """This model's row of the eval.json beside it, and that evaluation's protocol."""
    path = folder / "eval" / EVAL_FILE
    if not path.is_file():
        return None, None
    result = read_json(path)
    rows = result.get("models") if isinstance(result, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"{path} holds no \"models\" list; the evaluation is damaged: rerun eval or remove it")
    here = folder.resolve()
    row = next((r for r in rows if _row_folder(r) == here), None)
    return row, result.get("protocol")


def _row_folder(row: Any) -> Path | None:
    where = row.get("path", row.get("model")) if isinstance(row, dict) else None
    return Path(where).resolve() if isinstance(where, str) else None


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Create (or reuse) the Hub repo and upload the exported folder; returns its URL."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload a difcompress student")
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise UserError(f"--push-to-hub {repo_id}: {str(err).splitlines()[0]} (the export in {folder} is complete; "
                        f"upload it later with hf upload {repo_id} {folder})") from None
    return f"https://huggingface.co/{repo_id}"
