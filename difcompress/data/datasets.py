"""Image datasets for training: all yield float32 tensors ``(C, size, size)`` in ``[-1, 1]``.

* :class:`ImageFolderDataset` - a folder tree of image files (class labels from subfolders);
* :class:`HFDataset` - a Hugging Face ``datasets`` dataset: ``save_to_disk`` folders, parquet
  files, imagefolder trees, or ``hf:NAME`` from the Hub;
* :class:`TensorImageDataset` - images already in memory (teacher samples, built-in data, latents).

:func:`open_image_data` picks the right one for a user-given path.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from difcompress.core.environment import hub_offline
from difcompress.core.errors import UserError
from difcompress.core.files import read_text
from difcompress.data.conditions import Conditions
from difcompress.data.images import (
    crop_geometry,
    crop_position,
    image_size,
    image_to_tensor,
    load_image,
    read_header,
    scan_image_folder,
    survey_images,
)
from difcompress.data.metadata import check_metadata

# Files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top level.
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _check_size_channels(size: int, channels: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"image size must be a positive integer, got {size!r}; pass e.g. --size 32")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def check_class_data(dataset, num_classes: int, where: str) -> None:
    """Class-conditional training data: labels present, in range, and class folders that
    map one to one onto the model's classes (ids come from sorted folder names)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise UserError(f"the model is class-conditional ({num_classes} classes) but {where} has no class labels "
                        "(use class subfolders, a saved dataset with a label column, or --data teacher)")
    names = getattr(dataset, "class_names", None)
    if names is not None and len(names) != num_classes:
        raise UserError(f"{where} has {len(names)} class folders but the model has {num_classes} classes; class ids "
                        "come from the sorted folder names, so every class needs its folder (ImageNet: the train/ folder)")
    check_labels(labels, num_classes, where)


def check_labels(labels, num_classes: int, where: str):
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"class label {int(labels.max())} in {where} is out of range: the model has "
                        f"{num_classes} classes (0..{num_classes - 1})", exit_code=2)
    return labels



class ImageFolderDataset(Dataset):
    """All readable images under ``root`` (recursively), in sorted path order.

    ``scan`` says what was passed over: image-suffixed files PIL cannot read (``unreadable``,
    reported to the user) and files that are not images.
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3, crop_seed: int | None = None):
        _check_size_channels(size, channels)
        self.size = size
        self.channels = channels
        self.crop_seed = crop_seed  # None: centre crops
        self.scan = scan_image_folder(root)
        self.root = self.scan.root
        self.paths = self.scan.images
        if not self.paths:
            raise UserError(f"no images found in {self.root} ({len(self.scan.unreadable) + len(self.scan.other)} "
                            "other files skipped); put png/jpg/webp/... files there")
        self.survey = survey_images(self.scan.headers, size, channels, self.root)
        self.class_names, self.labels = _folder_classes(self.root, self.paths)
        # Same-stem .txt files caption the images (when every image has one).
        texts = [p.with_suffix(".txt") for p in self.paths]
        self.captions = [read_text(t).strip() for t in texts] if all(t.is_file() for t in texts) else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.paths[index], self.size, self.channels, crop_position(self.crop_seed, index))

    def geometry(self) -> torch.Tensor:
        """(N, 4): each image's original height and width and its crop's top-left corner."""
        return torch.tensor([crop_geometry(*image_size(p), self.size, crop_position(self.crop_seed, i))
                             for i, p in enumerate(self.paths)])

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, size={self.size}, channels={self.channels}, "
                f"items={len(self)}, unreadable={len(self.scan.unreadable)})")


def _folder_classes(root: Path, paths: list[Path]) -> tuple[list[str] | None, torch.Tensor | None]:
    """Class labels from one level of subfolders (root/<class>/img.png), as torchvision's
    ImageFolder does: the sorted names of the (non-hidden) subfolders that hold images are
    classes 0..K-1, so stray folders (__MACOSX, metadata) shift nothing. None when any image
    sits directly in root. Callers check the class count against the model's."""
    parents = [p.relative_to(root).parts for p in paths]
    if not paths or any(len(parts) < 2 for parts in parents):
        return None, None
    names = sorted({parts[0] for parts in parents})
    index = {n: i for i, n in enumerate(names)}
    return names, torch.tensor([index[parts[0]] for parts in parents], dtype=torch.long)


def is_hf_disk_dataset(path: str | Path) -> bool:
    """True if ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    p = Path(path).expanduser()
    return p.is_dir() and any((p / m).is_file() for m in HF_DISK_MARKERS)


def _import_datasets():
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as e:
        raise UserError(
            "reading a saved Hugging Face dataset needs the 'datasets' package: "
            "pip install datasets"
        ) from e
    datasets.disable_progress_bars()  # ours show progress; theirs would interleave with it
    return datasets


HF_PREFIX = "hf:"
IMAGEFOLDER_SPLITS = ("train", "validation", "valid", "val", "test")


def _load_hf(spec: str | Path, split: str | None) -> tuple[Any, str]:
    """A `datasets.Dataset` for `spec` and the split used: a save_to_disk folder, parquet
    file(s), an imagefolder tree (metadata file or split subfolders), or hf:NAME[:CONFIG] from
    the Hub (read from the datasets cache when offline)."""
    datasets = _import_datasets()
    path = Path(str(spec)).expanduser()
    if not str(spec).startswith(HF_PREFIX) and is_imagefolder_tree(path) and not is_hf_disk_dataset(path):
        check_metadata(path)  # the datasets library would say only "An error occurred"
    try:
        if str(spec).startswith(HF_PREFIX):
            name, _, config = str(spec)[len(HF_PREFIX):].partition(":")
            ds = datasets.load_dataset(name, config or None, split=split or "train")
        elif is_hf_disk_dataset(path):
            ds = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
            files = [str(path)] if path.is_file() else sorted(str(f) for f in path.glob("*.parquet"))
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split or "train")
    except Exception as e:  # missing, corrupt, offline and uncached, ... : say so in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load dataset {spec}: {reason}{_download_hint(spec, e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise UserError(f"dataset {spec} has no splits; save one with a 'train' split")
        chosen = split if split in ds else ("train" if "train" in ds else next(iter(ds)))
        if split and split not in ds:
            raise UserError(f"dataset {spec} has no split {split!r} (it has {', '.join(ds)})", exit_code=2)
        return ds[chosen], chosen
    return ds, split or "train"


def _download_hint(spec, err: Exception) -> str:
    """How to get a Hub dataset that cannot be reached, as loading/models.py says for models."""
    unreachable = hub_offline() or isinstance(err, ConnectionError) or "reach" in str(err) or "ffline" in str(err)
    if not str(spec).startswith(HF_PREFIX) or not unreachable:
        return ""
    name = str(spec)[len(HF_PREFIX):].partition(":")[0]
    return (f"; run `hf download {name} --repo-type dataset --local-dir DIR` where there is network "
            "and pass --data DIR instead")


class HFDataset(Dataset):
    """A Hugging Face ``datasets`` dataset (see :func:`_load_hf` for the sources); its image
    column is ``image_column``, else the first ``datasets.Image`` column, else one named
    ``image`` or ``img``. Class labels come from a ClassLabel column or one named label."""

    def __init__(self, spec: str | Path, size: int, channels: int = 3, *, split: str | None = None,
                 image_column: str | None = None, caption_column: str | None = None, crop_seed: int | None = None):
        _check_size_channels(size, channels)
        datasets = _import_datasets()
        self.source, self.size, self.channels, self.crop_seed = str(spec), size, channels, crop_seed
        ds, self.split = _load_hf(spec, split)
        self.captions = _caption_column(ds, caption_column, spec)
        self.column = image_column or _pick_image_column(ds, datasets)
        if self.column is None or self.column not in ds.column_names:
            named = f" {self.column!r}" if self.column else ""
            raise UserError(f"no image column{named} in {spec} (columns: "
                            f"{', '.join(ds.column_names) or 'none'}); pass --image-column", exit_code=2)
        self.labels = _label_column(ds, datasets)
        self.caption_gaps = _caption_gaps(self.captions, ds, self.column, spec)
        ds = ds.select_columns([self.column]).with_format(None)
        feat = ds.features[self.column]
        if isinstance(feat, datasets.Image) and not feat.decode:
            ds = ds.cast_column(self.column, datasets.Image(decode=True))
        if len(ds) == 0:
            raise UserError(f"dataset {spec} has no rows; give a dataset with images")
        self.survey = survey_images(_file_headers(ds, self.column, datasets), size, channels, spec)
        self.dataset = ds

    def __len__(self) -> int:
        return len(self.dataset)

    def pil(self, index: int) -> Image.Image:
        """Row `index`'s image, decoded, at its own size."""
        value = self.dataset[int(index)][self.column]
        try:
            return _coerce_pil(value)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"row {index} of {self.source} column {self.column!r} is not a readable image: {e}") from e

    def __getitem__(self, index: int) -> torch.Tensor:
        return image_to_tensor(self.pil(index), self.size, self.channels, crop_position(self.crop_seed, index))

    def geometry(self) -> torch.Tensor:
        """(N, 4): each image's original height and width and its crop's top-left corner."""
        sizes = [self.pil(i).size for i in range(len(self))]  # (width, height)
        return torch.tensor([crop_geometry(h, w, self.size, crop_position(self.crop_seed, i))
                             for i, (w, h) in enumerate(sizes)])

    def __repr__(self) -> str:
        return (f"HFDataset({self.source!r}, split={self.split!r}, column={self.column!r}, size={self.size}, "
                f"channels={self.channels}, items={len(self)})")


def _file_headers(ds: Any, column: str, datasets: Any) -> dict[str, Any]:
    """The headers of the images a dataset reads from files (an imagefolder tree): cheap, a
    few bytes each. Images held inside the dataset are not surveyed: that would read all of
    them once more."""
    if not isinstance(ds.features[column], datasets.Image):
        return {}
    headers = {}
    for value in ds.cast_column(column, datasets.Image(decode=False))[column]:
        path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else None
        if path:
            with contextlib.suppress(Exception), Image.open(path) as img:  # unreadable: reported when read
                headers[path] = read_header(img)
    return headers


CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")


def _caption_column(ds: Any, column: str | None, spec) -> list[str] | None:
    """Captions from `column`, else from a column named text/caption/prompt (a list of
    captions per image takes its first)."""
    if column is not None and column not in ds.column_names:
        raise UserError(f"no caption column {column!r} in {spec} (columns: {', '.join(ds.column_names)})", 2)
    column = column or next((c for c in CAPTION_COLUMNS if c in ds.column_names), None)
    if column is None:
        return None
    return [_caption(v[0] if isinstance(v, (list, tuple)) and v else v) for v in ds[column]]


def _caption(value: Any) -> str:
    """A caption cell as text; a missing one (None, NaN, an empty list) is the empty prompt."""
    if value is None or value != value or isinstance(value, (list, tuple)):
        return ""
    return str(value).strip()


@dataclass(frozen=True)
class CaptionGaps:
    """Rows that have no caption: they train as the empty prompt (as caption dropout does)."""

    where: str
    missing: int
    total: int
    first: str

    def note(self) -> str:
        return (f"{self.missing} of {self.total} rows of {self.where} have no caption (first: {self.first}); "
                "they train as the empty prompt")


def _caption_gaps(captions: list[str] | None, ds: Any, column: str, spec) -> CaptionGaps | None:
    missing = [i for i, c in enumerate(captions or []) if not c]
    if not missing:
        return None
    first = f"row {missing[0]}"
    with contextlib.suppress(Exception):  # the image's own file names it best, when it has one
        datasets = _import_datasets()
        value = ds.cast_column(column, datasets.Image(decode=False))[missing[0]][column]
        first = value.get("path") or first
    return CaptionGaps(str(spec), len(missing), len(captions), first)


def _label_column(ds: Any, datasets: Any) -> torch.Tensor | None:
    """Integer class labels from a ClassLabel column, or a column named label/labels."""
    names = [n for n, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    names += [n for n in ("label", "labels") if n in ds.column_names and n not in names]
    if not names:
        return None
    values = ds[names[0]]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return torch.tensor(values, dtype=torch.long)


def _pick_image_column(ds: Any, datasets: Any) -> str | None:
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            return name
    for name in ("image", "img"):
        if name in ds.column_names:
            return name
    return None


def _coerce_pil(value: Any) -> Image.Image:
    """A value from an image column (PIL image, {bytes, path} dict, array) -> PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
            img.load()
            return img
        if value.get("path"):
            with Image.open(value["path"]) as img:
                img.load()
                return img.copy()
        raise ValueError("image entry has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
        img.load()
        return img
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, (np.ndarray, list)):
        arr = np.asarray(value)
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(arr)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


@dataclass(frozen=True)
class Framing:
    """How training images are framed (diffusers' --resolution, --center-crop, --random-flip)."""

    resolution: int | None = None  # the short side images are resized to; None: the model's own size
    center_crop: bool = True  # else a crop position drawn once per image from the run's seed
    random_flip: bool = False

    @property
    def is_default(self) -> bool:
        return self == Framing()


class MirroredDataset(Dataset):
    """Every image, then every image mirrored left-right (items N..2N-1), labels and captions
    repeated: `--random-flip` as data. Latents of both are encoded once and stay exact, and
    a shuffled epoch shows each image both ways, a flip with probability 1/2 per draw."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        labels, captions = getattr(dataset, "labels", None), getattr(dataset, "captions", None)
        self.labels = None if labels is None else torch.cat([labels, labels])
        self.captions = None if captions is None else captions + captions
        self.class_names = getattr(dataset, "class_names", None)
        self.split = getattr(dataset, "split", None)
        self.scan = getattr(dataset, "scan", None)  # unreadable files the image folder passed over
        self.caption_gaps = getattr(dataset, "caption_gaps", None)
        self.survey = getattr(dataset, "survey", None)

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.dataset[index % len(self.dataset)]
        return image.flip(-1) if index >= len(self.dataset) else image

    def geometry(self) -> torch.Tensor:
        first = self.dataset.geometry()
        return torch.cat([first, first])

    def __repr__(self) -> str:
        return f"MirroredDataset({self.dataset!r})"


class TensorImageDataset(Dataset):
    """Images (or latents) already in memory: a ``(N, C, H, W)`` float tensor, with optional
    class labels ``(N,)`` and captions."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, captions: list[str] | None = None):
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"TensorImageDataset needs an (N, C, H, W) tensor, got {got}")
        if not images.is_floating_point():
            raise ValueError(
                f"TensorImageDataset needs a float tensor in [-1, 1], got {images.dtype}"
            )
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have {images.shape[0]} rows, got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels  # class ids (N,)
        self.captions = captions  # text-to-image training text, one per image

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"TensorImageDataset(shape={tuple(self.images.shape)}, dtype={self.images.dtype})"


@dataclass
class TrainingSet:
    """What distillation trains on: items in the denoiser's space, the named conditions of
    each item (data/conditions.py), and what guidance training drops a condition to."""

    images: Dataset
    conditions: Conditions | None = None
    null: Conditions | None = None

    def __len__(self) -> int:
        return len(self.images)


def is_imagefolder_tree(path: Path) -> bool:
    """A folder laid out for datasets' imagefolder loader: a metadata file, or split subfolders."""
    return path.is_dir() and (any((path / f"metadata.{ext}").is_file() for ext in ("jsonl", "csv"))
                              or any((path / split).is_dir() for split in IMAGEFOLDER_SPLITS))


def is_hf_source(spec: str | Path) -> bool:
    """Whether `spec` is read with the datasets library (hf:NAME, save_to_disk, parquet,
    imagefolder) rather than as a plain folder of image files."""
    path = Path(str(spec)).expanduser()
    return (str(spec).startswith(HF_PREFIX) or is_hf_disk_dataset(path) or path.suffix == ".parquet"
            or (path.is_dir() and any(path.glob("*.parquet"))) or is_imagefolder_tree(path))


def open_image_data(spec: str | Path, size: int, channels: int, *, split: str | None = None,
                    image_column: str | None = None, caption_column: str | None = None,
                    crop_seed: int | None = None) -> Dataset:
    """Open user-given image data: a folder of image files (class labels from subfolders),
    a save_to_disk folder, parquet file(s), an imagefolder tree, or hf:NAME[:CONFIG].

    (The special values "teacher" and "digits" are resolved by the caller.)
    """
    _check_size_channels(size, channels)
    path = Path(str(spec)).expanduser()
    if is_hf_source(spec):
        return HFDataset(spec, size, channels, split=split, image_column=image_column, caption_column=caption_column,
                         crop_seed=crop_seed)
    if path.is_dir():
        return ImageFolderDataset(path, size, channels, crop_seed)
    if path.exists():
        raise UserError(f"data must be a folder of images, a dataset folder or a parquet file, got the file {path}")
    raise UserError(f"data not found: {spec}; pass a folder of images, a save_to_disk or imagefolder dataset, "
                    "parquet files, hf:NAME, 'teacher' or 'digits'")
