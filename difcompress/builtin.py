"""The embedded default: real handwritten digits, teachers trained on them, and a digits
feature extractor for FID, all shipped in the package so everything runs offline.

Data: scikit-learn's `load_digits` (1,797 real 8x8 scans inside the scikit-learn wheel),
upsampled to 16x16 and scaled to [-1, 1]. `difcompress build-digits`
(difcompress/commands/build_assets.py) trains the classifier and the teachers (seeded) and
writes them to `difcompress/assets/digits/`. This module is a leaf: it reads the assets and
imports no stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn

from difcompress.core.errors import UserError
from difcompress.data.datasets import TensorImageDataset
from difcompress.layouts import DIGITS_TEACHER_CONFIG
from difcompress.metrics.extractors import (
    known_feature_extractors,
    register_feature_extractor,
)

ASSETS = Path(__file__).parent / "assets" / "digits"
# Short name -> (asset folder, family): the pixel U-Net, pixel DiT and text-to-image digits teachers.
TEACHER_NAME, DIT_TEACHER_NAME, T2I_TEACHER_NAME = "digits", "digits-dit", "digits-t2i"
FLUX_TEACHER_NAME = "digits-flux"
TEACHERS = {TEACHER_NAME: ("teacher", "unet2d"), DIT_TEACHER_NAME: ("dit-teacher", "dit"),
            T2I_TEACHER_NAME: ("t2i-teacher", "t2i"), FLUX_TEACHER_NAME: ("flux-teacher", "flux")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The captions of the digits: image i gets template i mod 4 (deterministic, both wordings).
CAPTION_TEMPLATES = ("a handwritten {word}", "the digit {digit}", "handwritten digit {digit}", "a drawn {word}")
DIGITS_SIZE = DIGITS_TEACHER_CONFIG["sample_size"]

def digits_images(size: int = DIGITS_SIZE, channels: int = 1) -> torch.Tensor:
    """All 1,797 digits as (N, channels, size, size) in [-1, 1], bilinearly upsampled."""
    pixels = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # values 0..16
    images = pixels.unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).repeat(1, channels, 1, 1)


def digits_labels() -> torch.Tensor:
    """The digit (0-9) each image shows."""
    return torch.tensor(load_digits().target, dtype=torch.long)


def digits_captions() -> list[str]:
    """A caption per digit image ("a handwritten seven", "the digit 7", ...)."""
    return [CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(word=NUMBER_WORDS[d], digit=d)
            for i, d in enumerate(digits_labels().tolist())]


def digit_in_prompt(prompt: str) -> int | None:
    """The one digit a prompt asks for (as a numeral or a word), or None."""
    found = {int(c) for c in prompt if c.isdigit()}
    found |= {NUMBER_WORDS.index(w) for w in prompt.lower().replace(",", " ").split() if w in NUMBER_WORDS}
    return found.pop() if len(found) == 1 else None


def builtin_data(name: str, size: int, channels: int) -> TensorImageDataset | None:
    """The dataset a built-in name stands for (with labels and captions), or None."""
    if name == "digits":
        return TensorImageDataset(digits_images(size, channels), digits_labels(), captions=digits_captions())
    return None


def builtin_model_path(name: str) -> Path | None:
    """Folder of a built-in model short name, or None when `name` is not one."""
    if name not in TEACHERS:
        return None
    folder_name, family = TEACHERS[name]
    folder = ASSETS / folder_name
    if not (folder / "model_index.json").is_file():
        raise UserError(f"the embedded {name} teacher is missing from the package; rebuild it with "
                        f"`difcompress build-digits --family {family}`")
    return folder


# ---- the digits classifier (feature extractor for digits-FID) -----------------------------

class DigitsClassifier(nn.Module):
    """A small CNN on 16x16 digits; its 128-d penultimate features serve FID."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digits_classifier(seed: int = 0, epochs: int = 40) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train on a seeded 80% split; report accuracy on the held-out 20%."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = digits_images(), digits_labels()
    order = torch.randperm(len(images), generator=gen)
    cut = int(0.8 * len(images))
    train, test = order[:cut], order[cut:]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train), generator=gen).split(64):
            idx = train[batch]
            # One-pixel random shifts: generated digits are not perfectly centred either.
            x = torch.roll(images[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    return model, {"held_out_accuracy": accuracy, "train_images": cut, "held_out_images": len(test),
                   "epochs": epochs, "seed": seed}


class DigitsFeatureExtractor:
    """FeatureExtractor protocol for difcompress.metrics: 0..255 images in, 128-d features out."""

    name = "digits"
    input_size = DIGITS_SIZE

    def __init__(self, model: DigitsClassifier, device: torch.device):
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device).float().mean(1, keepdim=True) / 127.5 - 1  # grey, [-1, 1]
        with torch.no_grad():
            return self.model.features(x)


def load_digits_classifier(weights_path=None, device="cpu") -> DigitsClassifier:
    path = Path(weights_path) if weights_path else ASSETS / "classifier.safetensors"
    if not path.is_file():
        raise UserError(f"digits classifier weights not found at {path}; rebuild with `difcompress build-digits`")
    model = DigitsClassifier()
    model.load_state_dict(load_file(path))
    return model.to(device).eval()


def digits_extractor(weights_path=None, device="cpu") -> DigitsFeatureExtractor:
    return DigitsFeatureExtractor(load_digits_classifier(weights_path), torch.device(device))


@torch.no_grad()
def prompt_hits(classifier: DigitsClassifier, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Prompt accuracy per image, CLIP score's analogue for digits-t2i: 1 where the digits
    classifier reads the digit the prompt asked for. Images in [-1, 1], any channels."""
    wanted = torch.tensor([digit_in_prompt(p) for p in prompts])
    grey = images.float().mean(1, keepdim=True)
    if grey.shape[-1] != DIGITS_SIZE:
        grey = F.interpolate(grey, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    device = next(classifier.parameters()).device
    return (classifier(grey.to(device)).argmax(1).cpu() == wanted).float()


def register_digits_extractor() -> None:
    """Make "digits" a feature extractor name (--feature-extractor digits)."""
    if "digits" not in known_feature_extractors():
        register_feature_extractor("digits", digits_extractor)


def is_digits_model(loaded) -> bool:
    """True for the embedded teacher, anything pruned or distilled from it, and their exports."""
    manifest = loaded.manifest or {}
    exported = (manifest.get("export") or {}).get("source") or ""  # e.g. the teacher itself, exported
    refs = [loaded.source, str(loaded.path), manifest.get("teacher") or "", exported]
    folders = {(ASSETS / folder).resolve() for folder, _ in TEACHERS.values()}
    return any(r in TEACHERS or Path(r).resolve() in folders for r in refs if r)
