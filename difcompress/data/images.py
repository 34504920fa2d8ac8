"""The one image reader: find image files in a folder, open them, and turn them into tensors.

Training data (data/datasets.py) and FID reference folders (metrics/) both read images
here, so they agree on which files count: image suffixes, no hidden files or folders
(``.DS_Store``, ``__MACOSX``), and only files PIL can verify.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from difcompress.core.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".pgm", ".ppm"})
# Training refuses an image whose shorter side is under this fraction of the training size:
# upscaled that far it holds nothing to learn from (docs/families.md, "Training images").
MIN_SIDE_FRACTION = 4


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says about itself before it is decoded."""

    mode: str
    size: tuple[int, int]
    sixteen_bit: bool  # 16 bits per channel, reduced to 8 on reading


def read_header(img: Image.Image) -> ImageHeader:
    raw_modes = [t.args if isinstance(t.args, str) else (t.args or ("",))[0] for t in (img.tile or [])]
    sixteen = img.mode.startswith("I;16") or any(";16" in str(m) for m in raw_modes)
    return ImageHeader(img.mode, img.size, sixteen)


@dataclass
class ImageScan:
    """What a folder holds: readable images (sorted by relative path), image-suffixed files
    PIL cannot read (truncated, corrupt), and everything else that was passed over."""

    root: Path
    images: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)
    headers: dict[Path, ImageHeader] = field(default_factory=dict)  # each readable image's

    def unreadable_note(self) -> str | None:
        """One line for the user when images were skipped, else None."""
        if not self.unreadable:
            return None
        return (f"skipped {len(self.unreadable)} unreadable image(s) in {self.root} "
                f"(first: {self.unreadable[0]})")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def _verified_header(path: Path) -> ImageHeader | None:
    """Cheap check at scan time: PIL recognises the file and its structure verifies."""
    try:
        with Image.open(path) as img:
            header = read_header(img)
            img.verify()
        return header
    except Exception:
        return None


def scan_image_folder(root: str | Path) -> ImageScan:
    """Every image file under ``root`` (recursively), sorted by relative path."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data not found: {root} does not exist; pass a folder of images")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass a folder of images")
    scan = ImageScan(root)
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    for path in files:
        if _hidden(path.relative_to(root)) or path.suffix.lower() not in IMAGE_SUFFIXES:
            scan.other.append(path)
        elif (header := _verified_header(path)) is not None:
            scan.images.append(path)
            scan.headers[path] = header
        else:
            scan.unreadable.append(path)
    return scan


@dataclass(frozen=True)
class ImageSurvey:
    """What reading a set of images at one training size changes: modes converted (alpha
    dropped, CMYK, 16 bits reduced to 8, grayscale widened) and images upscaled."""

    where: str
    target: str
    converted: dict[str, int]
    upscaled: int
    size: int

    def note(self) -> str | None:
        """One line for the user when anything is converted or upscaled, else None."""
        parts = []
        if self.converted:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.converted.items()))
            parts.append(f"converted {sum(self.converted.values())} image(s) to {self.target} ({kinds})")
        if self.upscaled:
            parts.append(f"upscaled {self.upscaled} image(s) smaller than {self.size} px")
        return f"{'; '.join(parts)} in {self.where}" if parts else None


def survey_images(headers: dict, size: int, channels: int, where) -> ImageSurvey:
    """Survey images (source -> header) for training at `size`; one error naming the first
    image whose shorter side is under 1/MIN_SIDE_FRACTION of it."""
    target = "RGB" if channels == 3 else "L"
    minimum = max(1, -(-size // MIN_SIDE_FRACTION))
    too_small = [(src, h) for src, h in headers.items() if min(h.size) < minimum]
    if too_small:
        src, h = too_small[0]
        raise UserError(f"{len(too_small)} image(s) in {where} are too small to train at {size} px (first: {src}, "
                        f"{h.size[0]}x{h.size[1]}); the shorter side must be at least {minimum} px (a quarter of "
                        "the training size): remove them or lower --resolution")
    converted = Counter("16-bit" if h.sixteen_bit else h.mode for h in headers.values()
                        if h.sixteen_bit or h.mode != target)
    upscaled = sum(min(h.size) < size for h in headers.values())
    return ImageSurvey(str(where), target, dict(converted), upscaled, size)


def read_image(path: str | Path, *, apply_exif: bool = True, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode one image file. ``apply_exif`` turns photos upright (training
    data); FID reference images are read as clean-fid reads them, without it.
    ``draft_size`` lets big JPEGs decode at a reduced scale that is still at least that size."""
    try:
        with Image.open(path) as img:
            if draft_size and img.format == "JPEG":
                try:
                    img.draft(img.mode, (draft_size, draft_size))
                except Exception:  # draft is an optimisation only
                    pass
            out = ImageOps.exif_transpose(img) if apply_exif else img
            out.load()
            return out.copy() if out is img else out
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; delete or replace that file") from e


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to RGB (channels=3) or L (channels=1) without surprises."""
    target = "RGB" if channels == 3 else "L"
    if img.mode == target:
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # High bit depth grayscale: PIL's convert("L") clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
        return img if target == "L" else img.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's "palette with transparency" warning
    return img.convert(target)


def image_to_tensor(img: Image.Image, size: int, channels: int,
                    crop_at: tuple[float, float] | None = None) -> torch.Tensor:
    """PIL image -> float32 ``(channels, size, size)`` in [-1, 1].

    Shorter side resized to ``size`` (bicubic, antialiased), then cropped: centred, or at
    ``crop_at`` = (top, left) as fractions of the room the crop has.
    """
    t = TF.pil_to_tensor(to_mode(img, channels))  # uint8 (C, H, W)
    if t.shape[-2:] != (size, size):
        if min(t.shape[-2:]) != size:
            t = TF.resize(t, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        if crop_at is None:
            t = TF.center_crop(t, [size, size])
        else:
            h, w = t.shape[-2:]
            t = TF.crop(t, round(crop_at[0] * (h - size)), round(crop_at[1] * (w - size)), size, size)
    return t.to(torch.float32).div_(127.5).sub_(1.0).clamp_(-1.0, 1.0).contiguous()


def crop_geometry(height: int, width: int, size: int, crop_at: tuple[float, float] | None = None
                  ) -> tuple[int, int, int, int]:
    """(original height, original width, crop top, crop left) of the crop `image_to_tensor`
    takes from an image of that size: what SDXL's U-Net is told about each training image
    (its "micro-conditioning"; the crop corner is in the resized image, as SDXL's training
    script computes it)."""
    resized = (height, width)
    if min(height, width) != size:  # torchvision's resize: the shorter side to `size`
        long = int(size * max(height, width) / min(height, width))
        resized = (size, long) if height <= width else (long, size)
    if crop_at is None:
        return height, width, int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))
    return height, width, round(crop_at[0] * (resized[0] - size)), round(crop_at[1] * (resized[1] - size))


def frame_rows(geometry: torch.Tensor | None, count: int, height: int, width: int) -> torch.Tensor:
    """(N, 6) rows of (original height, width, crop top, left, target height, width): the
    images' `geometry` (N, 4) at this target, or, without it, the full frame at the target
    (what SDXL's pipeline asks for at generation)."""
    if geometry is None:
        geometry = torch.tensor([[height, width, 0, 0]]).repeat(count, 1)
    return torch.cat([geometry, torch.tensor([[height, width]]).repeat(len(geometry), 1)], 1)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as read_image returns it (EXIF rotation applied),
    read from its header only."""
    with Image.open(path) as img:
        width, height = img.size
        rotated = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
    return (width, height) if rotated else (height, width)


def load_image(path: str | Path, size: int, channels: int, crop_at: tuple[float, float] | None = None
               ) -> torch.Tensor:
    """Read one image file into a float32 ``(channels, size, size)`` tensor in [-1, 1]."""
    return image_to_tensor(read_image(path, draft_size=size), size, channels, crop_at)


def crop_position(crop_seed: int | None, index: int) -> tuple[float, float] | None:
    """Where image `index` is cropped: centred (no seed), else a position drawn once from
    (seed, index), so an image keeps its crop across epochs, processes and resumes."""
    if crop_seed is None:
        return None
    top, left = torch.rand(2, generator=torch.Generator().manual_seed(crop_seed * 1_000_003 + index)).tolist()
    return top, left


def load_rgb_uint8(path: str | Path) -> torch.Tensor:
    """Read one image at its own size as ``uint8 (3, H, W)``, as clean-fid reads FID images."""
    arr = np.asarray(read_image(path, apply_exif=False).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
