"""The difcompress output folder: its manifest, its model files, and which folders may be written.

    OUT/
      difcompress.json                 what made it: stage, source, settings, versions, report
      model_index.json                 DDPMPipeline / LDMPipeline / DiTPipeline.from_pretrained(OUT)
      unet/ or transformer/            the denoiser: config.json, diffusion_pytorch_model.safetensors
                                       (the one copy of the weights; UNet2DModel.from_pretrained(OUT, subfolder="unet"))
                                       export --dtype fp16 writes it in fp16 and adds
                                       diffusion_pytorch_model.fp16.safetensors, a hard link to it
                                       (model.safetensors / model.fp16.safetensors for text encoders)
      vae/ or vqvae/                   latent pipelines: the original autoencoder, unchanged
      scheduler/scheduler_config.json
      unet/difcompress_structure.json  only when the widths cannot be expressed in the
                                       stock config (global pruning): base config + the
                                       torch-pruning history that rebuilds the exact model
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from difcompress.core.console import quiet_diffusers
from difcompress.core.errors import UserError
from difcompress.core.files import (
    link_or_copy,
    read_json,
    refuse_a_file_in_the_way,
    write_json,
)

MANIFEST = "difcompress.json"
STRUCTURE = "difcompress_structure.json"
EVAL_FILE = "eval.json"


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return read_json(path) if path.is_file() else None


def pruning_report(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The prune report a folder carries: "report" in a pruned folder, "pruning" in a
    distilled or exported one."""
    manifest = manifest or {}
    return manifest.get("report") if manifest.get("stage") == "prune" else manifest.get("pruning")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """An output may be new, empty, or an earlier difcompress folder (replaced), but never one
    of the inputs or a folder holding one (checked through symlinks and `..`)."""
    out = Path(out)
    refuse_a_file_in_the_way(out)
    target = out.expanduser().resolve()
    for source in inputs:
        source_path = Path(source).expanduser()
        if source_path.exists() and _within(source_path.resolve(), target):
            raise UserError(f"output {out} would replace the input {source}; choose another output", exit_code=2)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is a file; choose another output")
        if any(out.iterdir()) and read_manifest(out) is None:
            raise UserError(f"output folder {out} exists and is not a difcompress folder; choose another output")
    return out


def save_model_folder(folder: Path, model, scheduler, family, manifest: dict[str, Any],
                      structure: dict[str, Any] | None = None, *, autoencoder=None,
                      pipeline_settings: dict[str, Any] | None = None, variant: str | None = None, text=None) -> None:
    """Write pipeline (with a latent model's autoencoder, unchanged) + manifest into `folder`
    (normally the temp folder of atomic_folder); with `variant` the weight files also carry
    that diffusers variant's names (see add_variant_names)."""
    pipeline = family.pipeline(model, scheduler, autoencoder, text)
    with quiet_diffusers():  # a pixel DiT's absent VAE is intended, not worth a warning
        pipeline.save_pretrained(folder, safe_serialization=True)
    if variant:
        add_variant_names(folder, variant)
    if pipeline_settings:  # e.g. DiT's id2label (ImageNet class names), which the pipeline takes as an argument
        index = read_json(folder / "model_index.json")
        write_json(folder / "model_index.json", {**index, **pipeline_settings})
    if structure is not None:
        write_json(folder / family.component / STRUCTURE, structure)
    write_json(folder / MANIFEST, manifest)


_WEIGHTS = re.compile(r"(?P<stem>[^.]+?)(?P<shard>-\d+-of-\d+)?\.safetensors")


def variant_name(name: str, variant: str) -> str | None:
    """The name diffusers and transformers give a weight file (or a shard index) of
    `variant`: model.safetensors -> model.fp16.safetensors, X-00001-of-00002.safetensors ->
    X.fp16-00001-of-00002.safetensors, X.safetensors.index.json -> X.safetensors.index.fp16.json;
    None for any other file."""
    if name.endswith(".safetensors.index.json"):
        return f"{name.removesuffix('.json')}.{variant}.json"
    match = _WEIGHTS.fullmatch(name)
    return f"{match['stem']}.{variant}{match['shard'] or ''}.safetensors" if match else None


def add_variant_names(folder: Path, variant: str, pattern: str = "*/*") -> None:
    """Give every component's weights their `variant` names too, as hard links (a copy where
    the file system has none), so that both `from_pretrained(folder)` and
    `from_pretrained(folder, variant=...)` load the same weights, stored once (neither
    diffusers nor transformers finds weights under a name it was not asked for).
    `pattern="*"` does it for one component's folder."""
    for path in sorted(folder.glob(pattern)):
        target = variant_name(path.name, variant) if path.is_file() else None
        if target is None:
            continue
        if path.name.endswith(".json"):  # a shard index: the same map, to the shards' variant names
            index = read_json(path)
            index["weight_map"] = {k: variant_name(v, variant) for k, v in index["weight_map"].items()}
            write_json(path.with_name(target), index)
        else:
            link_or_copy(path, path.with_name(target))
