"""Image data for training and distillation: datasets plus a resumable batch stream.

Three dataset kinds all yield float32 tensors ``(C, size, size)`` scaled to ``[-1, 1]``:

* :class:`ImageFolderDataset` - a folder tree of image files (png/jpg/webp/...);
* :class:`HFDiskDataset` - a Hugging Face ``datasets`` dataset written by ``save_to_disk``;
* :class:`TensorImageDataset` - images already in memory (teacher samples, built-in data).

:func:`open_image_data` picks the right one for a user-given path.

Why :class:`BatchStream` is hand-written instead of using ``torch.utils.data.DataLoader``:
a compression run is long and gets interrupted, and a resumed run must continue with
*exactly* the batches the uninterrupted run would have seen, otherwise "resume" silently
changes the result. A DataLoader's sampler keeps its position in an iterator that cannot be
saved, and its shuffling draws from torch's global RNG, which model code also consumes.
The stream here is a pure function of ``(seed, epoch, position)``: each epoch's order is
``torch.randperm`` from ``torch.Generator().manual_seed(seed + epoch)``, its state is a few
plain ints that go into a checkpoint, and sharding for multi-process training takes every
``num_shards``-th batch of that same global stream, so the number of processes does not
change which batches the run as a whole sees. Items are loaded in the main process (no
worker processes) and decoded items are cached in memory for datasets of moderate size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from difcompress.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "HF_DISK_MARKERS",
    "ImageFolderDataset",
    "HFDiskDataset",
    "TensorImageDataset",
    "open_image_data",
    "is_hf_disk_dataset",
    "load_image",
    "image_to_tensor",
    "BatchStream",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# Files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top level.
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# BatchStream caches decoded items only up to this many items ...
CACHE_MAX_ITEMS = 50_000
# ... and only while the cache stays under this many bytes (50k 256px RGB floats are 39 GB).
CACHE_MAX_BYTES = 4 * 1024**3


def _check_size_channels(size: int, channels: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"image size must be a positive integer, got {size!r}; pass e.g. --size 32")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


# ----------------------------------------------------------------------------- transform


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
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


def image_to_tensor(img: Image.Image, size: int, channels: int) -> torch.Tensor:
    """PIL image -> float32 ``(channels, size, size)`` in [-1, 1].

    Shorter side resized to ``size`` (bicubic, antialiased), then center-cropped.
    """
    img = _to_mode(img, channels)
    t = TF.pil_to_tensor(img)  # uint8 (C, H, W)
    if t.shape[-2:] != (size, size):
        if min(t.shape[-2:]) != size:
            t = TF.resize(t, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        t = TF.center_crop(t, [size, size])
    return t.to(torch.float32).div_(127.5).sub_(1.0).clamp_(-1.0, 1.0).contiguous()


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """Read one image file into a float32 ``(channels, size, size)`` tensor in [-1, 1]."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                try:  # decode big JPEGs at a reduced scale that is still >= size
                    img.draft(img.mode, (size, size))
                except Exception:
                    pass
            img = ImageOps.exif_transpose(img)
            img.load()
            return image_to_tensor(img, size, channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; delete or replace that file") from e


# ----------------------------------------------------------------------------- datasets


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

    Files without an image suffix, and image-suffixed files PIL cannot open, are skipped;
    ``skipped`` counts them and ``skipped_paths`` lists them.
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3):
        _check_size_channels(size, channels)
        self.root = Path(root).expanduser()
        self.size = size
        self.channels = channels
        if not self.root.exists():
            raise UserError(f"data not found: {self.root} does not exist; pass a folder of images")
        if not self.root.is_dir():
            raise UserError(f"{self.root} is not a folder; pass a folder of images")
        files = sorted(
            (p for p in self.root.rglob("*") if p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        self.paths: list[Path] = []
        self.skipped_paths: list[Path] = []
        for p in files:
            hidden = any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(self.root).parts)
            if not hidden and p.suffix.lower() in IMAGE_SUFFIXES and _readable_image(p):
                self.paths.append(p)
            else:
                self.skipped_paths.append(p)
        self.skipped: int = len(self.skipped_paths)
        self.class_names, self.labels = _folder_classes(self.root, self.paths)
        if not self.paths:
            raise UserError(
                f"no images found in {self.root} ({self.skipped} other files skipped); "
                f"put {'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} files there"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.paths[index], self.size, self.channels)

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset({str(self.root)!r}, size={self.size}, channels={self.channels}, "
            f"items={len(self)}, skipped={self.skipped})"
        )


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


def _readable_image(path: Path) -> bool:
    """Cheap check at scan time: PIL recognises the file and its structure verifies."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


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
    return datasets


class HFDiskDataset(Dataset):
    """A ``datasets`` dataset saved with ``save_to_disk``; uses its image column.

    For a saved ``DatasetDict`` the "train" split is used, else the first split.
    The image column is the first column of feature type ``datasets.Image``, else a
    column named ``image`` or ``img``.
    """

    def __init__(self, path: str | Path, size: int, channels: int = 3):
        _check_size_channels(size, channels)
        self.path = Path(path).expanduser()
        self.size = size
        self.channels = channels
        if not self.path.is_dir():
            raise UserError(f"data not found: {self.path} is not a folder")
        datasets = _import_datasets()
        try:
            ds = datasets.load_from_disk(str(self.path))
        except Exception as e:  # corrupt / foreign folder: tell the user, not a traceback
            raise UserError(
                f"cannot load saved dataset {self.path}: {e}; "
                "re-create it with datasets' save_to_disk"
            ) from e
        self.split: str | None = None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds.keys())
            if not splits:
                raise UserError(
                    f"saved dataset {self.path} has no splits; save one with a 'train' split"
                )
            self.split = "train" if "train" in ds else splits[0]
            ds = ds[self.split]
        self.column = _pick_image_column(ds, datasets)
        if self.column is None:
            raise UserError(
                f"no image column in {self.path} "
                f"(columns: {', '.join(ds.column_names) or 'none'}); "
                "cast one to datasets.Image() or name it 'image'"
            )
        self.labels = _label_column(ds, datasets)
        ds = ds.select_columns([self.column]).with_format(None)
        feat = ds.features[self.column]
        if isinstance(feat, datasets.Image) and not feat.decode:
            ds = ds.cast_column(self.column, datasets.Image(decode=True))
        if len(ds) == 0:
            raise UserError(f"saved dataset {self.path} has no rows; save a dataset with images")
        self.dataset = ds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        value = self.dataset[int(index)][self.column]
        try:
            img = _coerce_pil(value)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(
                f"row {index} of {self.path} column {self.column!r} is not a readable image: {e}"
            ) from e
        return image_to_tensor(img, self.size, self.channels)

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return (
            f"HFDiskDataset({str(self.path)!r}{split}, column={self.column!r}, "
            f"size={self.size}, channels={self.channels}, items={len(self)})"
        )


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
            import io

            img = Image.open(io.BytesIO(value["bytes"]))
            img.load()
            return img
        if value.get("path"):
            with Image.open(value["path"]) as img:
                img.load()
                return img.copy()
        raise ValueError("image entry has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        import io

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


class TensorImageDataset(Dataset):
    """Images (or latents) already in memory: a ``(N, C, H, W)`` float tensor, with optional
    class labels ``(N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"TensorImageDataset needs an (N, C, H, W) tensor, got {got}")
        if not images.is_floating_point():
            raise ValueError(
                f"TensorImageDataset needs a float tensor in [-1, 1], got {images.dtype}"
            )
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"TensorImageDataset(shape={tuple(self.images.shape)}, dtype={self.images.dtype})"


def open_image_data(spec: str | Path, size: int, channels: int) -> Dataset:
    """Open user-given image data: a ``save_to_disk`` folder or a folder of image files.

    (The special values "teacher" and "digits" are resolved by the caller.)
    """
    _check_size_channels(size, channels)
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_hf_disk_dataset(path):
            return HFDiskDataset(path, size, channels)
        return ImageFolderDataset(path, size, channels)
    if path.exists():
        raise UserError(
            f"data must be a folder of images or a save_to_disk dataset folder, got the file {path}"
        )
    raise UserError(
        f"data not found: {spec}; pass a folder of images, a save_to_disk dataset folder, "
        "'teacher' or 'digits'"
    )


# ----------------------------------------------------------------------------- stream


class BatchStream:
    """Infinite, seeded, exactly resumable stream of image batches.

    The *global* stream is: for epoch ``e = 0, 1, ...`` take
    ``perm = randperm(N, generator=Generator().manual_seed(seed + e))`` and cut it into
    consecutive batches of ``batch_size``, dropping an incomplete last batch. If the
    dataset is smaller than one batch, each epoch is a single batch that cycles through
    ``perm`` (``perm[j % N]``) until it is full, so every item appears and the batch is
    always full.

    With ``num_shards > 1``, process ``shard_index`` yields global batches
    ``shard_index, shard_index + num_shards, ...``; all shards together see exactly the
    unsharded stream. The state (``epoch``, ``position``) marks the start of the next
    *round* of ``num_shards`` global batches, so shards that advance in lock-step have
    identical state dicts and any one of them can be saved and restored into all.

    The stream does not touch torch's global RNG.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        num_shards: int = 1,
        shard_index: int = 0,
        cache: bool = True,
    ):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards!r}")
        if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index!r}")
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise UserError("the dataset is empty; give data with at least one image")
        self.dataset = dataset
        self.num_items = n
        self.batch_size = batch_size
        self.seed = int(seed)
        self.num_shards = num_shards
        self.shard_index = shard_index
        # Start of the next round of num_shards global batches.
        self.epoch = 0
        self.position = 0
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None
        # Tensor datasets are already in memory: index them directly, never cache.
        self._tensor_images = dataset.images if isinstance(dataset, TensorImageDataset) else None
        self._cache: dict[int, torch.Tensor] | None = (
            {} if cache and self._tensor_images is None and n <= CACHE_MAX_ITEMS else None
        )
        self._cache_checked = False

    # -- geometry -------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (1 when the dataset is smaller than a batch)."""
        return max(1, self.num_items // self.batch_size)

    def _global_index(self) -> int:
        return self.epoch * self.batches_per_epoch + self.position // self.batch_size

    def _set_global_index(self, g: int) -> None:
        self.epoch, k = divmod(g, self.batches_per_epoch)
        self.position = k * self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_items, generator=gen)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def _indices(self, g: int) -> torch.Tensor:
        """Dataset indices of global batch ``g``."""
        epoch, k = divmod(g, self.batches_per_epoch)
        perm = self._permutation(epoch)
        if self.num_items >= self.batch_size:
            return perm[k * self.batch_size : (k + 1) * self.batch_size]
        return perm[torch.arange(self.batch_size) % self.num_items]

    # -- loading --------------------------------------------------------------------------

    def _item(self, i: int) -> torch.Tensor:
        if self._cache is None:
            return self.dataset[i]
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        x = self.dataset[i]
        if not self._cache_checked:
            self._cache_checked = True
            nbytes = x.numel() * x.element_size() * self.num_items
            if nbytes > CACHE_MAX_BYTES:
                self._cache = None  # would not fit comfortably in memory
                return x
        self._cache[i] = x
        return x

    def next_batch(self) -> torch.Tensor:
        """The next batch of this shard, stacked: ``(batch_size, C, H, W)``."""
        return self.next_labeled_batch()[0]

    def next_labeled_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch and its class labels (None when the dataset has no labels)."""
        idx = self._indices(self._global_index() + self.shard_index)
        if self._tensor_images is not None:
            batch = self._tensor_images[idx]
        else:
            batch = torch.stack([self._item(int(i)) for i in idx.tolist()])
        self._set_global_index(self._global_index() + self.num_shards)
        labels = getattr(self.dataset, "labels", None)
        return batch, (labels[idx] if labels is not None else None)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Plain ints to put in a checkpoint."""
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "batch_size": int(self.batch_size),
            "num_items": int(self.num_items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the stream that produced ``state`` stopped.

        Seed and batch size are taken from ``state``; the dataset must have the same
        number of items as when the state was saved.
        """
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            seed, batch_size = int(state["seed"]), int(state["batch_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"checkpoint has no valid data-stream state ({e!r}); start a fresh run"
            ) from e
        saved_n = state.get("num_items")
        if saved_n is not None and int(saved_n) != self.num_items:
            raise UserError(
                f"the data changed since the checkpoint: it had {int(saved_n)} items, now "
                f"{self.num_items}; resume with the same data or start a fresh run"
            )
        bpe = max(1, self.num_items // batch_size) if batch_size >= 1 else 0
        if (
            batch_size < 1
            or epoch < 0
            or position < 0
            or position % batch_size
            or position // batch_size >= bpe
        ):
            raise UserError(
                f"checkpoint has an invalid data-stream state {dict(state)}; start a fresh run"
            )
        self.seed, self.batch_size = seed, batch_size
        self._perm_epoch, self._perm = None, None
        self.epoch, self.position = epoch, position

    def __repr__(self) -> str:
        shard = f", shard {self.shard_index}/{self.num_shards}" if self.num_shards > 1 else ""
        return (
            f"BatchStream(items={self.num_items}, batch_size={self.batch_size}, seed={self.seed}, "
            f"epoch={self.epoch}, position={self.position}{shard})"
        )
