"""`difcompress stats`: FID/KID reference statistics of real images, in clean-fid's format.

A folder is read the way clean-fid reads it (each image at its own size, clean-fid's
"clean" resize to the extractor's input), so the statistics match clean-fid's own on the
same folder. The file holds ``mu`` and ``sigma`` under clean-fid's names (clean-fid reads
it as it is) plus the features (for KID) and the protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difcompress.builtin import digits_images, register_digits_extractor
from difcompress.config import StatsConfig
from difcompress.core.environment import resolve_device
from difcompress.core.errors import UserError
from difcompress.core.files import folder_lock, resolved_source
from difcompress.data.datasets import is_hf_source, open_image_data
from difcompress.metrics.extractors import (
    features_of_folder,
    features_of_images,
    get_feature_extractor,
)
from difcompress.metrics.fid import save_reference_stats


def stats(config: StatsConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Write the reference statistics of `config.source` to `config.output`."""
    output = Path(config.output)
    if output.suffix != ".npz":
        raise UserError(f"-o {output}: statistics files end in .npz", exit_code=2)
    if output.is_dir():
        raise UserError(f"-o {output} is a folder; name a .npz file", exit_code=2)
    if Path(config.source).exists() and Path(config.source).resolve() == output.resolve():
        raise UserError(f"-o {output} would replace the input {config.source}; choose another output", exit_code=2)
    register_digits_extractor()
    extractor = get_feature_extractor(config.feature_extractor, weights_path=config.inception,
                                      device=resolve_device(config.device))
    with folder_lock(output):
        feats, kind = _features(config, extractor, show_progress)
        protocol = {"extractor": extractor.name, "mode": "clean", "source": resolved_source(config.source),
                    "kind": kind, "count": int(len(feats)), "size": config.size, "split": config.split}
        save_reference_stats(output, feats, protocol)
    return {"output": str(output.resolve()), "feature_dim": int(feats.shape[1]), **protocol}


def _features(config: StatsConfig, extractor, show_progress: bool):
    """Features of every image, and what kind of source they came from."""
    if config.source == "digits":
        return features_of_images(digits_images(), extractor, batch_size=config.batch_size), "digits"
    path = Path(config.source).expanduser()
    if path.is_dir() and not is_hf_source(path):
        return features_of_folder(path, extractor, config.batch_size, show_progress), "folder"
    if not path.exists() and not is_hf_source(config.source):
        raise UserError(f"{config.source} not found: pass a folder of images, a dataset (hf:NAME, parquet, "
                        "save_to_disk) or digits")
    if config.size is None:
        raise UserError(f"{config.source} is a dataset: pass --size (the resolution your model generates)", 2)
    dataset = open_image_data(config.source, config.size, 3, split=config.split, image_column=config.image_column)
    images = torch.stack([dataset[i] for i in range(len(dataset))])
    return features_of_images(images, extractor, batch_size=config.batch_size), "dataset"
