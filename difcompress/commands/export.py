"""`difcompress export`: a clean diffusers pipeline folder with a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from difcompress.config import ExportConfig
from difcompress.data.latents import Autoencoder
from difcompress.environment import versions
from difcompress.io.folders import (
    EVAL_FILE,
    atomic_folder,
    check_output_folder,
    folder_lock,
    folder_size_bytes,
    pruning_report,
    remove_temporaries,
    save_model_folder,
)
from difcompress.io.loading import load_model
from difcompress.io.report import human
from difcompress.metrics.cost import model_size, peak_activation_bytes_estimate

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export(config: ExportConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Write `config.model` as a clean pipeline folder with a model card; returns what was written."""
    output = check_output_folder(config.output, inputs=[config.model])
    model, dtype = config.model, config.dtype
    with folder_lock(output):
        remove_temporaries(output)
        return _export(model, output, dtype)


def _export(model: str, output: Path, dtype: str) -> dict[str, Any]:
    loaded = load_model(model, "cpu")
    family, net = loaded.family, loaded.model
    manifest = loaded.manifest or {}
    size = model_size(net, family)
    element = torch.finfo(DTYPES[dtype]).bits // 8
    # Activations scale with the dtype the same way the weights do.
    memory = {b: peak_activation_bytes_estimate(net, family, b) * element // 4 for b in (1, 16)}
    structure = loaded.structure
    info = {
        "source": model,
        "teacher": manifest.get("teacher"),
        "family": family.name,
        "pruning": pruning_report(manifest),
        "distill": (manifest.get("distill") or {}).get("settings"),
        "distill_steps": (manifest.get("distill") or {}).get("steps"),
        "params": size["params"],
        "macs": size["macs"],
        "dtype": dtype,
        "sampling_memory_bytes": memory,
        "eval": _eval_numbers(loaded.path),
        "stock_diffusers_loadable": structure is None,
        "autoencoder": type(loaded.autoencoder.model).__name__ if loaded.autoencoder else None,
        "num_classes": family.num_classes(net),
    }
    needed = size["params"] * element
    with atomic_folder(output, needed_bytes=needed) as tmp:
        save_model_folder(
            tmp, net if dtype == "fp32" else net.to(DTYPES[dtype]), loaded.scheduler, family,
            {"stage": "export", "family": family.name, "teacher": manifest.get("teacher"), "versions": versions(),
             "export": info},
            structure, autoencoder=_in_dtype(loaded.autoencoder, DTYPES[dtype]),
            pipeline_settings=loaded.pipeline_settings,
        )
        (tmp / "README.md").write_text(model_card(info, family))
    info["output"] = str(output)
    info["size_on_disk_bytes"] = folder_size_bytes(output)
    return info


def _in_dtype(autoencoder, dtype):
    """The pipeline's autoencoder in the export dtype, so stock pipelines see one dtype."""
    if autoencoder is None or dtype == torch.float32:
        return autoencoder
    return Autoencoder(autoencoder.component, autoencoder.model.to(dtype))


def _eval_numbers(folder: Path) -> dict[str, Any] | None:
    path = folder / "eval" / EVAL_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return next((r for r in result["models"] if Path(r["model"]).resolve() == folder.resolve()), result["models"][0])


def model_card(info: dict[str, Any], family) -> str:
    pruning = info["pruning"] or {}
    distill = info["distill"] or {}
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [difcompress, pruned, distilled]",
        "---",
        f"# Compressed {family.model_class.__name__}",
        "",
        f"Made with difcompress from **{info['teacher'] or info['source']}**.",
        "",
        "| | |",
        "|---|---|",
        f"| base model (teacher) | {info['teacher'] or 'unknown'} |",
        f"| pruning | ratio {pruning.get('ratio', 'n/a')}, {pruning.get('importance', 'n/a')} importance, {pruning.get('mode', 'n/a')} |",
        f"| distillation objective | {distill.get('loss', 'none')} |",
        f"| distillation steps | {info['distill_steps'] or 0} |",
        f"| params | {human(info['params'])} |",
        f"| MACs per denoiser call | {human(info['macs'])} |",
        f"| weights dtype | {info['dtype']} |",
        f"| memory to sample, batch 1 | {human(info['sampling_memory_bytes'][1], 'B')} (weights + activations, upper bound) |",
        f"| memory to sample, batch 16 | {human(info['sampling_memory_bytes'][16], 'B')} |",
    ]
    if info["eval"] and "fid" in info["eval"]:
        p = info["eval"]["protocol"]
        lines.append(f"| FID / KID | {info['eval']['fid']:.2f} / {info['eval']['kid']:.4f} "
                     f"({p['feature_extractor']}, {p['num_samples']} samples, {p['sampler']} {p['steps']} steps) |")
    lines += ["", "## Use", ""]
    if info["stock_diffusers_loadable"]:
        lines += usage_snippet(info, family)
    else:
        lines += ["Pruned with `--global`: per-layer widths are not expressible in the stock config.",
                  "Load with `difcompress.loading.load_model('PATH')`, which replays the recorded pruning."]
    return "\n".join(lines) + "\n"


def usage_snippet(info: dict[str, Any], family) -> list[str]:
    """How stock diffusers loads and samples this folder."""
    if family.name == "dit":
        if info["autoencoder"] is None:
            return ["A pixel-space DiT: the folder has no VAE, so load it with `vae=None` and sample with",
                    "`difcompress eval PATH` (DiTPipeline's own sampling loop decodes through a VAE).", "",
                    "```python", "from diffusers import DiTPipeline",
                    "pipe = DiTPipeline.from_pretrained('PATH', vae=None)", "```"]
        guidance = "4.0" if info["num_classes"] == 1000 else "1.0"  # DiTPipeline's null class id is 1000
        return ["```python", "from diffusers import DiTPipeline", "pipe = DiTPipeline.from_pretrained('PATH')",
                f"images = pipe(class_labels=[0, 1, 2, 3], guidance_scale={guidance}).images", "```"]
    name = "LDMPipeline" if info["autoencoder"] else "DDPMPipeline"
    return ["```python", f"from diffusers import {name}", f"pipe = {name}.from_pretrained('PATH')",
            "images = pipe(batch_size=4).images", "```"]
