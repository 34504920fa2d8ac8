"""`difcompress export`: a clean diffusers pipeline folder with a model card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from difcompress.artifacts.folders import (
    EVAL_FILE,
    MANIFEST,
    check_output_folder,
    pruning_report,
    save_model_folder,
)
from difcompress.artifacts.gguf_file import ARCHITECTURES, gguf_package, write_gguf
from difcompress.artifacts.quantize import (
    BACKEND,
    QTYPES,
    backend_version,
    check_backend,
    quantize_denoiser,
    refuse_quantized,
)
from difcompress.artifacts.single_file import (
    FP8,
    SINGLE_FILE_LAYOUTS,
    write_fp8_single_file,
)
from difcompress.commands.model_card import model_card, teacher_license
from difcompress.config import ExportConfig
from difcompress.core.console import human, quiet_diffusers, warn
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
    write_text,
)
from difcompress.data.latents import Autoencoder
from difcompress.diffusion.inputs import cast_floating
from difcompress.loading.models import LoadedModel, load_model, load_model_folder
from difcompress.metrics.cost import (
    InferencePart,
    denoiser_inputs,
    inference_memory,
    model_size,
)


def export(config: ExportConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Write `config.model` as a clean pipeline folder with a model card (and push it to the
    Hub when asked); returns what was written."""
    if config.push_to_hub and hub_offline():
        raise UserError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set; export without it and "
                        "upload the folder later (hf upload REPO_ID FOLDER)", exit_code=2)
    if config.quantize and config.dtype == "fp32":
        raise UserError(f"--quantize {config.quantize} needs --dtype fp16 or bf16 (the weights it leaves "
                        "unquantized are stored in that dtype)", exit_code=2)
    if config.quantize and FORMATS[config.format].layouts:
        raise UserError(f"--format {config.format} stores its own low-bit weights; --quantize is for diffusers "
                        "folders: drop one of them", exit_code=2)
    if FORMATS[config.format].needs:
        FORMATS[config.format].needs()
    if config.quantize_text_encoders and not config.quantize:
        raise UserError("--quantize-text-encoders needs --quantize SCHEME (the scheme the encoders take)", exit_code=2)
    if config.quantize:
        check_backend(config.quantize)
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
    layouts: tuple[str, ...] = ()  # a single-file format: the family single_file_layouts it writes
    needs: Callable[[], Any] | None = None  # checks its optional package, before anything is written


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
        before = folder_size_bytes(folder / family.component, "*.safetensors")
        after = info["quantize"]["denoiser_weight_bytes"] = quantize_denoiser(
            folder / family.component, family.model_class, config.quantize, DTYPES[config.dtype], config.dtype)
        if after >= before:  # quanto's scales and the extra tensor names outweigh tiny linear layers
            warn(f"--quantize {config.quantize} made the {family.component} larger ({human(before, 'B')} in "
                 f"{config.dtype}, {human(after, 'B')} quantized): its linear layers are too small to gain")
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


def _write_fp8_single_file(folder: Path, job: ExportJob) -> None:
    """ComfyUI / Forge: the denoiser alone in one float8_e4m3fn file under the LDM names those
    UIs read, its config.json beside it (diffusers' from_single_file(file, config=folder)
    needs it: a pruned layout is no model it knows), a README and the manifest."""
    config, family, info = job.config, job.loaded.family, job.info
    name = f"{Path(config.output).name}.fp8_e4m3fn.safetensors"
    clamped = write_fp8_single_file(folder / name, job.net, family.single_file_layout, DTYPES[config.dtype],
                                    {"difcompress_source": str(info["source"]), "difcompress_family": family.name})
    _finish_single_file(folder, job, {"file": name, "layout": family.single_file_layout,
                                      "weights": str(FP8).split(".")[-1], "vectors": config.dtype,
                                      "clamped_values": clamped})
    write_text(folder / "README.md", "\n".join([
        f"# {Path(config.output).name}", "",
        f"The {family.denoiser_kind} of a difcompress student of {info.get('teacher') or info['source']}, alone, "
        f"in one file: matrices and kernels in float8_e4m3fn, biases and norms in {config.dtype}, under the "
        "original LDM key names (`model.diffusion_model.*`).", "",
        f"- ComfyUI: put `{name}` in `models/diffusion_models/` and load it with *Load Diffusion Model* beside the "
        "teacher's VAE and text encoders.",
        f"- diffusers: `UNet2DConditionModel.from_single_file('{name}', config='.', torch_dtype=torch.float16)` "
        "in this folder (the config.json here describes the pruned layout).", ""]))


def _finish_single_file(folder: Path, job: ExportJob, written: dict[str, Any]) -> None:
    """The config.json from_single_file(file, config=folder) reads (a pruned layout is no model
    diffusers knows) and the manifest, beside a single-file checkpoint."""
    job.net.save_config(folder)
    job.info["single_file"] = written
    job.info["weight_bytes"] = (folder / written["file"]).stat().st_size
    write_json(folder / MANIFEST, {"stage": "export", "family": job.loaded.family.name, "teacher": job.info["teacher"],
                                   "versions": versions(), "export": job.info})


def _write_gguf(folder: Path, job: ExportJob) -> None:
    """ComfyUI-GGUF / diffusers' GGUF loader: the transformer alone under its original names."""
    config, family = job.config, job.loaded.family
    name = f"{Path(config.output).name}.{config.format.removeprefix('gguf-').upper()}.gguf"
    layout = family.single_file_layout
    types = write_gguf(folder / name, SINGLE_FILE_LAYOUTS[layout](job.net), layout, config.format)
    _finish_single_file(folder, job, {"file": name, "layout": layout, "architecture": ARCHITECTURES[layout],
                                      "tensor_types": types})
    write_text(folder / "README.md", "\n".join([
        f"# {Path(config.output).name}", "",
        f"The {family.denoiser_kind} of a difcompress student, alone, in GGUF ({types}), under its original "
        f"tensor names (architecture {ARCHITECTURES[layout]}).", "",
        f"- ComfyUI: put `{name}` in `models/unet/` and load it with ComfyUI-GGUF's *Unet Loader (GGUF)*.",
        f"- diffusers: `{family.model_class.__name__}.from_single_file('{name}', config='.', quantization_config="
        "GGUFQuantizationConfig(compute_dtype=torch.bfloat16))` in this folder.", ""]))


# Every format `export --format` writes (config.ExportFormatName lists the same names).
FORMATS: dict[str, ExportFormat] = {
    "diffusers": ExportFormat(_write_diffusers, "a diffusers pipeline folder with a model card"),
    "comfyui-fp8": ExportFormat(_write_fp8_single_file, "one fp8 denoiser file under the LDM names ComfyUI and "
                                "Forge read", layouts=("ldm-unet",)),
    **{name: ExportFormat(_write_gguf, f"one {name.removeprefix('gguf-').upper()} GGUF transformer file "
                          "(ComfyUI-GGUF)", layouts=tuple(ARCHITECTURES), needs=gguf_package)
       for name in ("gguf-q8_0", "gguf-q4_0")},
}


def _export(config: ExportConfig, output: Path) -> dict[str, Any]:
    loaded = load_model(config.model, "cpu")
    if config.quantize and loaded.structure is not None:
        raise UserError(f"--quantize: {config.model} is globally pruned, and stock diffusers (which quantizes it) "
                        "cannot build its widths; quantize a uniformly pruned student", exit_code=2)
    written = FORMATS[config.format]
    if written.layouts and loaded.family.single_file_layout not in written.layouts:
        raise UserError(f"--format {config.format}: {config.model} is a {loaded.family.model_class.__name__}, and "
                        f"this single file is written for {_layout_names(written.layouts)}; export it as a "
                        "diffusers folder", exit_code=2)
    if config.quantize_text_encoders and loaded.text is None:
        raise UserError(f"--quantize-text-encoders: {config.model} has no text encoders", exit_code=2)
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
                     "quantized": f"{family.component} (its nn.Linear weights)",
                     "text_encoders": _text_encoders_at_load(loaded) if config.quantize_text_encoders else None}
        if config.quantize else None,
        "inference_memory": pipeline_memory(loaded, DTYPES[config.dtype], config.quantize,
                                            config.quantize_text_encoders),
        "eval": evaluation[0], "eval_protocol": evaluation[1], "stock_diffusers_loadable": loaded.structure is None,
        "autoencoder": type(loaded.autoencoder.model).__name__ if loaded.autoencoder else None,
        "num_classes": family.num_classes(net), "license": teacher_license(_local_folder(manifest.get("teacher"))),
        "datasets": [data.removeprefix("hf:").split("@")[0]] if isinstance(data, str) and data.startswith("hf:")
        else None,
        **family.card_facts(net, loaded.text),
    }


def inference_parts(family, denoiser: nn.Module, autoencoder: nn.Module | None,
                    encoders: dict[str, tuple[nn.Module, int]], text_tokens: int | None,
                    quantize_text_encoders: bool = False) -> list[InferencePart]:
    """A pipeline's components for the inference estimate: the denoiser's step (a doubled
    batch under classifier-free guidance, text of `text_tokens`), each text encoder on one
    prompt of its own window (`encoders`: name -> (encoder, tokens)), the autoencoder decoding
    one sample at the model's resolution."""
    batch = 2 if family.default_guidance > 1 else 1
    channels, height, width = family.sample_shape(denoiser)

    def step(meta):
        return meta(**cast_floating(denoiser_inputs(family, meta, batch, text_tokens), next(meta.parameters()).dtype))

    def encoding(tokens):
        return lambda meta: meta(input_ids=torch.zeros(1, tokens, dtype=torch.long, device="meta"))

    def decode(meta):
        return meta.decode(torch.empty(1, channels, height, width, device="meta", dtype=next(meta.parameters()).dtype))

    parts = [InferencePart(family.component, denoiser, step, quantized=True)]
    parts += [InferencePart(name, encoder, encoding(tokens), quantize_text_encoders)
              for name, (encoder, tokens) in encoders.items()]
    if autoencoder is not None:
        parts.append(InferencePart("vae", autoencoder, decode))
    return parts


def pipeline_memory(loaded: LoadedModel, dtype: torch.dtype, exported: str | None,
                    quantize_text_encoders: bool = False) -> dict[str, Any]:
    """The estimated peak inference memory of the exported pipeline in its dtype and with each
    --quantize scheme (metrics/cost.py), and which of them this export is."""
    text = loaded.text
    components = text.components() if text else {}
    # Each encoder reads its own tokenizer's window (Flux: CLIP's 77, T5's up to 512), at most the pipeline's.
    encoders = {n: (m, min(int(components[n.replace("text_encoder", "tokenizer")].model_max_length), text.max_length))
                for n, m in components.items() if n.startswith("text_encoder")}
    parts = inference_parts(loaded.family, loaded.model, loaded.autoencoder.model if loaded.autoencoder else None,
                            encoders, text.max_length if text else None, quantize_text_encoders)
    _, height, width = loaded.image_shape()
    return {"exported": exported, "resolution": [height, width], "images": 1,
            "quantized": "denoiser and text encoders" if quantize_text_encoders else "denoiser",
            "rows": [inference_memory(parts, dtype, scheme) for scheme in (None, *QTYPES)]}


def _text_encoders_at_load(loaded: LoadedModel) -> dict[str, Any]:
    """How --quantize-text-encoders reaches the encoders: transformers' quanto integration at
    load time (its QuantoHfQuantizer is not serializable, so no folder holds them quantized)."""
    names = [n for n in loaded.text.components() if n.startswith("text_encoder")]
    return {"components": names, "when": "at load (diffusers PipelineQuantizationConfig, transformers QuantoConfig)",
            "transformers_version": transformers.__version__}


LAYOUT_NAMES = {"ldm-unet": "SD / SDXL U-Nets (UNet2DConditionModel)",
                "bfl-flux": "Flux transformers (FluxTransformer2DModel)"}


def _layout_names(layouts: tuple[str, ...]) -> str:
    return " and ".join(LAYOUT_NAMES[layout] for layout in layouts)


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
