"""The difcompress output folder: a diffusers pipeline folder plus a manifest.

    OUT/
      difcompress.json                 what made it: stage, source, settings, versions, report
      model_index.json                 DDPMPipeline / LDMPipeline / DiTPipeline.from_pretrained(OUT)
      unet/ or transformer/            the denoiser: config.json, diffusion_pytorch_model.safetensors
      vae/ or vqvae/                   latent pipelines: the original autoencoder, unchanged
      scheduler/scheduler_config.json
      config.json, diffusion_pytorch_model.safetensors
                                       the denoiser's class loads OUT directly too (hard links)
      unet/difcompress_structure.json  only when the widths cannot be expressed in the
                                       stock config (global pruning): base config + the
                                       torch-pruning history that rebuilds the exact model

Folders are written under a temporary name and renamed when complete, so a crash never
leaves something that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from difcompress.errors import UserError

MANIFEST = "difcompress.json"
STRUCTURE = "difcompress_structure.json"


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); the folder is damaged") from None


def pruning_report(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The prune report a folder carries: "report" in a pruned folder, "pruning" in a
    distilled or exported one."""
    manifest = manifest or {}
    return manifest.get("report") if manifest.get("stage") == "prune" else manifest.get("pruning")


def check_output_folder(out: str | Path) -> Path:
    """An output may be new, empty, or an earlier difcompress folder (replaced)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is a file; choose another -o")
        if any(out.iterdir()) and read_manifest(out) is None:
            raise UserError(f"output folder {out} exists and is not a difcompress folder; choose another -o")
    return out


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` in one rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_model_folder(folder: Path, model, scheduler, family, manifest: dict[str, Any],
                      structure: dict[str, Any] | None = None, *, autoencoder=None,
                      pipeline_settings: dict[str, Any] | None = None, top_level_model: bool = True) -> None:
    """Write pipeline (with a latent model's autoencoder, unchanged) + manifest into `folder`
    (normally the temp folder of atomic_folder)."""
    from diffusers.utils import logging as diffusers_logging

    pipeline = family.pipeline(model, scheduler, autoencoder)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # a pixel DiT's absent VAE is intended, not worth a warning
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    if pipeline_settings:  # e.g. DiT's id2label (ImageNet class names), which the pipeline takes as an argument
        index = json.loads((folder / "model_index.json").read_text())
        write_json(folder / "model_index.json", {**index, **pipeline_settings})
    component = folder / family.component
    if structure is not None:
        write_json(component / STRUCTURE, structure)
    if top_level_model:
        for item in component.iterdir():
            _link_or_copy(item, folder / item.name)
    write_json(folder / MANIFEST, manifest)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def folder_size_bytes(folder: str | Path) -> int:
    seen, total = set(), 0
    for path in Path(folder).rglob("*"):
        if path.is_file():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
