"""Built-in offline data: scikit-learn's handwritten digits (1,797 real 8x8 scans)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difcompress.data import TensorImageDataset

BUILTIN_DATA = ("digits",)


def digits_images(size: int = 16, channels: int = 1) -> torch.Tensor:
    """All 1,797 digits as (N, channels, size, size) in [-1, 1], bilinearly upsampled."""
    from sklearn.datasets import load_digits

    pixels = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # values 0..16
    images = pixels.unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).repeat(1, channels, 1, 1)
    return images


def builtin_data(name: str, size: int, channels: int) -> TensorImageDataset | None:
    """The dataset a built-in name stands for, or None for anything else."""
    if name == "digits":
        return TensorImageDataset(digits_images(size, channels))
    return None
