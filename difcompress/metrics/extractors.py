"""Feature extractors for FID/KID: a registry, clean-fid's Inception, and image features.

The image resize is clean-fid's own (``cleanfid.resize.make_resizer``), so features match
``cleanfid.fid.compute_fid(..., mode="clean")`` on the same images. What differs is
loading: clean-fid downloads its Inception network on first use; this module never
downloads anything and only loads a local file (see :func:`inception_extractor`). That file
is TorchScript, which holds pickled data: it must come from a trusted source (clean-fid's
own download), and it is read only from the path the user gives
(``--inception`` / ``$DIFCOMPRESS_INCEPTION``) or clean-fid's own cache location.

Feature extractors
------------------
A :class:`FeatureExtractor` is any object with

* ``name: str`` -- stored in reference-stats files, so features of different networks are never
  compared;
* ``input_size: int | None`` -- the square side it wants; ``None`` means "use images as they are";
* ``device: torch.device`` -- where its inputs must live;
* ``__call__(images) -> Tensor[N, D]`` -- ``images`` is ``Tensor[N, 3, H, W]`` on ``device`` on the
  0..255 scale: ``uint8`` when no resize was needed, ``float32`` when the images were resized with
  clean-fid's "clean" resize (PIL bicubic per channel, *not* re-quantized -- exactly what clean-fid
  feeds its Inception). Extractors should call ``.float()`` on it.

New extractors (e.g. a digits classifier) are added with :func:`register_feature_extractor`;
``"inception"`` is registered by default.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from cleanfid.downloads_helper import inception_url as _CLEANFID_INCEPTION_URL
from cleanfid.resize import make_resizer

from difcompress.core.console import progress_bar, warn
from difcompress.core.errors import UserError
from difcompress.data.images import IMAGE_SUFFIXES, load_rgb_uint8, scan_image_folder

# ----------------------------------------------------------------------------------------------
# Inception (clean-fid's TorchScript network)
# ----------------------------------------------------------------------------------------------

INCEPTION_FILENAME = "inception-2015-12-05.pt"
#: Where clean-fid downloads the network from (cleanfid/downloads_helper.py).
INCEPTION_URL: str = _CLEANFID_INCEPTION_URL
INCEPTION_ENV_VAR = "DIFCOMPRESS_INCEPTION"
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299

#: The folder clean-fid caches the network in: cleanfid/features.py ``feature_extractor`` uses
#: "./" on Windows and "/tmp" elsewhere (a fixed path, not under HOME). Module-level so tests
#: can point it elsewhere.
CLEANFID_CACHE_DIR: str = "./" if platform.system() == "Windows" else "/tmp"


@runtime_checkable
class FeatureExtractor(Protocol):
    """What :func:`features_of_images` needs from a feature network (see the module docstring)."""

    name: str
    input_size: int | None
    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def cleanfid_inception_cache_path() -> Path:
    """The file clean-fid itself would have downloaded (``/tmp/inception-2015-12-05.pt``)."""
    return Path(CLEANFID_CACHE_DIR) / INCEPTION_FILENAME


def _existing_file(path: str | Path, missing: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(missing)
    return p


def resolve_inception_path(weights_path: str | os.PathLike | None = None) -> Path:
    """Find the local Inception file: ``weights_path``, then ``$DIFCOMPRESS_INCEPTION``, then
    clean-fid's cache. Never downloads; raises :class:`UserError` if nothing is found."""
    if weights_path is not None and str(weights_path) != "":
        return _existing_file(weights_path, f"Inception weights not found at {Path(weights_path).expanduser()}: "
                                            f"download {INCEPTION_URL} and pass its path with --inception PATH.")
    env = os.environ.get(INCEPTION_ENV_VAR, "").strip()
    if env:
        return _existing_file(env, f"{INCEPTION_ENV_VAR}={env} is not a file: download {INCEPTION_URL} there, or "
                                   "pass --inception PATH.")
    cached = cleanfid_inception_cache_path()
    if cached.is_file():
        return cached
    raise UserError(
        f"Inception weights not found (nothing downloads here): get {INCEPTION_URL} and pass "
        f"--inception PATH or set {INCEPTION_ENV_VAR}=PATH (clean-fid's cache {cached} is also used)."
    )


class InceptionExtractor:
    """clean-fid's TorchScript Inception-v3 in "clean" mode: 2048-d pool features.

    Mirrors ``cleanfid.inception_torchscript.InceptionV3W.forward`` with ``resize_inside=False``:
    inputs are 299x299 on the 0..255 scale, normalized as ``(x - 128) / 128``.
    """

    input_size: int | None = INCEPTION_SIZE

    def __init__(self, base: torch.jit.ScriptModule, device: torch.device, name: str = "inception"):
        self.name = name
        self.device = torch.device(device)
        self._base = base
        self._layers = base.layers

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            # Called directly with other sizes: same clean resize features_of_images would do.
            x = clean_resize(x.cpu(), INCEPTION_SIZE).to(self.device)
        x = (x.float() - 128.0) / 128.0
        with torch.no_grad():
            return self._layers.forward(x).reshape(x.shape[0], INCEPTION_DIM)


def inception_extractor(
    weights_path: str | os.PathLike | None = None, device: torch.device | str = "cpu"
) -> InceptionExtractor:
    """Load clean-fid's Inception (``inception-2015-12-05.pt``) from a local file.

    Resolution order: ``weights_path``, ``$DIFCOMPRESS_INCEPTION``, clean-fid's own cache
    (:func:`cleanfid_inception_cache_path`). Never downloads.
    """
    path = resolve_inception_path(weights_path)
    device = torch.device(device)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
            base = torch.jit.load(str(path), map_location=device).eval()
        base.layers  # noqa: B018  (clean-fid's network exposes its feature trunk as .layers)
    except (RuntimeError, AttributeError, ValueError, OSError) as e:
        raise UserError(
            f"{path} is not clean-fid's Inception TorchScript file ({type(e).__name__}): "
            f"download {INCEPTION_URL} and pass it with --inception PATH."
        ) from None
    return InceptionExtractor(base, device)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

#: factory(weights_path=..., device=...) -> FeatureExtractor
ExtractorFactory = Callable[..., FeatureExtractor]
_REGISTRY: dict[str, ExtractorFactory] = {}


def register_feature_extractor(name: str, factory: ExtractorFactory, *, replace: bool = False) -> None:
    """Make ``get_feature_extractor(name, ...)`` call ``factory(weights_path=..., device=...)``."""
    if not name or not isinstance(name, str):
        raise ValueError("feature extractor name must be a non-empty string")
    if name in _REGISTRY and _REGISTRY[name] is not factory and not replace:
        raise ValueError(f"feature extractor {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def known_feature_extractors() -> list[str]:
    return sorted(_REGISTRY)


def get_feature_extractor(
    name: str,
    *,
    weights_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """Build the registered extractor ``name``; unknown names raise :class:`UserError`."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise UserError(
            f"Unknown feature extractor {name!r}: choose one of {', '.join(known_feature_extractors())}."
        )
    return factory(weights_path=weights_path, device=torch.device(device))


register_feature_extractor("inception", inception_extractor)


# ----------------------------------------------------------------------------------------------
# Image conversion
# ----------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] (or already ``uint8``) -> ``uint8 [N, 3, H, W]`` on the CPU.

    Rounds and clamps; grayscale is repeated to 3 channels; RGBA drops alpha.
    """
    if images.ndim != 4:
        raise UserError(f"Expected images shaped [N, C, H, W], got {tuple(images.shape)}.")
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    c = x.shape[1]
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c == 4:
        x = x[:, :3]
    elif c != 3:
        raise UserError(f"Images must have 1, 3 or 4 channels, got {c}.")
    return x.contiguous()


def clean_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's "clean" resize (PIL bicubic per channel in float, no re-quantization) of a
    ``[N, 3, H, W]`` batch on the 0..255 scale; returns ``float32 [N, 3, size, size]``."""
    fn = make_resizer("PIL", False, "bicubic", (size, size))
    arr = images.detach().cpu().numpy()
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
    out = np.stack([fn(img.transpose(1, 2, 0)) for img in arr]).astype(np.float32, copy=False)
    return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())


def _prepare(x_uint8: torch.Tensor, input_size: int | None) -> torch.Tensor:
    if input_size is None or tuple(x_uint8.shape[-2:]) == (input_size, input_size):
        return x_uint8  # PIL resize to the same size is the identity: skip it.
    return clean_resize(x_uint8, input_size)


def _run(extractor: FeatureExtractor, batch: torch.Tensor) -> np.ndarray:
    device = getattr(extractor, "device", torch.device("cpu"))
    with torch.no_grad():
        feats = extractor(batch.to(device))
    feats = feats.detach().float().cpu()
    if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
        raise RuntimeError(
            f"feature extractor {extractor.name!r} returned shape {tuple(feats.shape)} for "
            f"{batch.shape[0]} images; expected [N, D]"
        )
    return feats.numpy()


def features_of_images(
    images: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 64
) -> np.ndarray:
    """Features ``[N, D]`` (float32) of images ``[N, C, H, W]`` in [-1, 1]."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise UserError(f"Expected a non-empty batch of images [N, C, H, W], got {tuple(images.shape)}.")
    batch_size = max(1, int(batch_size))
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = _prepare(to_uint8(images[i : i + batch_size]), extractor.input_size)
        out.append(_run(extractor, x))
    return np.concatenate(out, axis=0)


class _FolderImages(torch.utils.data.Dataset):
    """Reference images at their own size (as clean-fid reads them), resized for the extractor."""

    def __init__(self, files: Sequence[Path], input_size: int | None):
        self.files = list(files)
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = load_rgb_uint8(self.files[i])
        if self.input_size is not None:
            # Always float here so a batch mixes no dtypes; same-size PIL resize is the identity.
            return _prepare(x[None], self.input_size)[0].float()
        return x


def features_of_folder(
    folder: str | os.PathLike,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    show_progress: bool = False,
) -> np.ndarray:
    """Features ``[N, D]`` of every readable image under ``folder`` (recursive, sorted; the
    same files training data would take, see difcompress.data.images). Unreadable files are
    skipped with one warning, as training data skips them."""
    scan = scan_image_folder(folder)
    if not scan.images:
        raise UserError(f"No images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    if scan.unreadable:
        warn(scan.unreadable_note())
    ds = _FolderImages(scan.images, extractor.input_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=max(1, int(batch_size)), shuffle=False)
    out = []
    try:
        with progress_bar(show_progress) as progress:
            task = progress.add_task(f"features of {Path(folder).name}", total=len(ds))
            for batch in loader:
                out.append(_run(extractor, batch))
                progress.advance(task, len(batch))
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" in str(e):
            raise UserError(
                f"Images in {folder} have different sizes and extractor {extractor.name!r} does "
                f"not resize: make them one size."
            ) from None
        raise
    return np.concatenate(out, axis=0)


