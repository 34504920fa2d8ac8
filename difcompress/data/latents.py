"""Latent pipelines: the frozen autoencoder, and a disk cache of the encoded dataset.

A latent denoiser (a U-Net in `LDMPipeline`, a DiT in `DiTPipeline`) never sees pixels:
its data are `(encode(image) - shift_factor) * scaling_factor`, and its samples are decoded
with `decode(latents / scaling_factor + shift_factor)`, the convention the stock pipelines
use (shift_factor: FLUX.1's and SD3's VAEs; none elsewhere). Only the
denoiser is pruned and distilled; the autoencoder is copied unchanged.

Encoding a dataset through the VAE costs far more than a training step, so it is done once:
the latents (with labels and the scaling factor) are written as safetensors shards under a
folder named by a hash of the autoencoder's weights, the data's identity and the image size,
and every later epoch and run reads the shards back. `AutoencoderKL` contributes its
posterior mean (the cache is deterministic); `VQModel` its pre-quantisation latents, which
`decode` quantises, as LDM trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from difcompress.core.console import progress_bar
from difcompress.core.errors import UserError
from difcompress.core.files import build_once
from difcompress.data.datasets import (
    HFDataset,
    ImageFolderDataset,
    MirroredDataset,
    TensorImageDataset,
)

SHARD_ITEMS = 4096
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")


@dataclass
class Autoencoder:
    component: str  # its folder in the pipeline: "vae" (DiTPipeline) or "vqvae" (LDMPipeline)
    model: nn.Module = field(repr=False)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.model.config, "scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.model.config, "shift_factor", 0.0) or 0.0)

    @property
    def image_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def _device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self._device(), next(self.model.parameters()).dtype)
        out = self.model.encode(x)
        latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return (latents.float().cpu() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        out = []
        for chunk in latents.split(batch_size):
            z = chunk.to(self._device(), next(self.model.parameters()).dtype) / self.scaling_factor + self.shift_factor
            out.append(self.model.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def fingerprint(self) -> str:
        # Private config keys (_name_or_path, _diffusers_version) say where it was loaded from, not what it is.
        config = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def default_cache_root() -> Path:
    root = os.environ.get("DIFCOMPRESS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "difcompress"


def dataset_identity(dataset: Dataset) -> str:
    """What makes two datasets the same data, cheaply: files with sizes and times, the
    saved dataset's fingerprint, or the tensor bytes."""
    digest = hashlib.sha256(type(dataset).__name__.encode())
    if getattr(dataset, "crop_seed", None) is not None:
        digest.update(f"crop_seed:{dataset.crop_seed}".encode())
    if isinstance(dataset, MirroredDataset):
        digest.update(dataset_identity(dataset.dataset).encode())
    elif isinstance(dataset, ImageFolderDataset):
        digest.update(str(dataset.root.resolve()).encode())
        for path in dataset.paths:
            stat = path.stat()
            digest.update(f"{path.relative_to(dataset.root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    elif isinstance(dataset, HFDataset):
        digest.update(f"{dataset.source}:{dataset.split}:{dataset.column}".encode())
        digest.update(str(getattr(dataset.dataset, "_fingerprint", "")).encode())
    elif isinstance(dataset, TensorImageDataset):
        digest.update(dataset.images.contiguous().numpy().tobytes())
    else:
        raise UserError(f"cannot cache latents of a {type(dataset).__name__}")
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_latents(dataset: Dataset, autoencoder: Autoencoder, *, image_size: int, cache_root: Path | None = None,
                   batch_size: int = 32, show_progress: bool = True, encode_here: bool = True,
                   ) -> tuple[TensorImageDataset, dict[str, Any]]:
    """The dataset's latents, encoded once and read back from the cache afterwards.

    Returns the latent dataset and a report (cache folder, whether it was reused). One
    process encodes (core.files.build_once); with `encode_here=False` (the other processes
    of a multi-process run) it waits for the folder to appear instead.
    """
    key = hashlib.sha256(
        f"{autoencoder.fingerprint()}:{dataset_identity(dataset)}:{image_size}".encode()
    ).hexdigest()[:20]
    folder = Path(cache_root or default_cache_root()) / "latents" / key
    index, reused = build_once(folder, lambda tmp: _write_shards(dataset, autoencoder, tmp, batch_size, show_progress),
                               build_here=encode_here)
    shards = [load_file(folder / name) for name in index["shards"]]
    latents = torch.cat([s["latents"] for s in shards])
    labels = torch.cat([s["labels"] for s in shards]) if index["labels"] else None
    report = {"folder": str(folder), "reused": reused, "items": len(latents),
              "scaling_factor": index["scaling_factor"], "shape": list(latents.shape[1:])}
    latent_dataset = TensorImageDataset(latents, labels)
    latent_dataset.class_names = getattr(dataset, "class_names", None)  # for the class-folder check
    return latent_dataset, report


def _write_shards(dataset: Dataset, autoencoder: Autoencoder, folder: Path, batch_size: int,
                  show_progress: bool) -> None:
    labels = getattr(dataset, "labels", None)
    n = len(dataset)
    shards, buffer = [], []

    def flush(end: int) -> None:
        start = end - sum(len(b) for b in buffer)
        tensors = {"latents": torch.cat(buffer).contiguous()}
        if labels is not None:
            tensors["labels"] = labels[start:end].clone()
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"scaling_factor": str(autoencoder.scaling_factor)})
        shards.append(name)
        buffer.clear()

    with progress_bar(show_progress) as progress:
        task = progress.add_task("encoding latents (once)", total=n)
        for start in range(0, n, batch_size):
            images = torch.stack([dataset[i] for i in range(start, min(n, start + batch_size))])
            buffer.append(autoencoder.encode(images))
            progress.advance(task, len(images))
            end = min(n, start + batch_size)
            if sum(len(b) for b in buffer) >= SHARD_ITEMS or end == n:
                flush(end)
    index = {"complete": True, "items": n, "shards": shards, "labels": labels is not None,
             "scaling_factor": autoencoder.scaling_factor, "dataset": repr(dataset),
             "autoencoder": type(autoencoder.model).__name__}
    (folder / "index.json").write_text(json.dumps(index, indent=2) + "\n")


def latent_training_data(dataset: Dataset, autoencoder: Autoencoder | None, image_size: int, *,
                         cache_root: Path | None, is_main: bool = True,
                         show_progress: bool = True) -> tuple[Dataset, dict[str, Any] | None]:
    """Pixel data as is, or its cached latents (encoded by one process per machine, read by all)."""
    if autoencoder is None:
        return dataset, None
    return cached_latents(dataset, autoencoder, image_size=image_size, cache_root=cache_root,
                          show_progress=show_progress and is_main, encode_here=is_main)
