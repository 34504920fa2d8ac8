"""Image-quality metrics: pluggable feature extractors, reference statistics, FID and KID.

The math and the image resize are clean-fid's own (``cleanfid.fid.frechet_distance`` /
``fid_from_feats``, ``cleanfid.fid.kernel_distance``, ``cleanfid.resize.make_resizer``), so a
number computed here matches ``cleanfid.fid.compute_fid(..., mode="clean")`` on the same images.
What differs is loading: clean-fid downloads its Inception network on first use; this module
never downloads anything and only loads a local file (see :func:`inception_extractor`).

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

import json
import os
import platform
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from cleanfid.downloads_helper import inception_url as _CLEANFID_INCEPTION_URL
from cleanfid.fid import frechet_distance, kernel_distance
from cleanfid.resize import make_resizer
from cleanfid.utils import EXTENSIONS as _CLEANFID_EXTENSIONS
from PIL import Image

from difcompress.errors import UserError

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "INCEPTION_ENV_VAR",
    "FeatureExtractor",
    "InceptionExtractor",
    "cleanfid_inception_cache_path",
    "resolve_inception_path",
    "inception_extractor",
    "register_feature_extractor",
    "get_feature_extractor",
    "known_feature_extractors",
    "clean_resize",
    "to_uint8",
    "features_of_images",
    "features_of_folder",
    "list_image_files",
    "save_reference_stats",
    "read_reference_stats",
    "load_reference",
    "fid_kid",
]

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

_IMAGE_EXTENSIONS = frozenset(e.lower() for e in _CLEANFID_EXTENSIONS) - {"npy"}


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


def resolve_inception_path(weights_path: str | os.PathLike | None = None) -> Path:
    """Find the local Inception file: ``weights_path``, then ``$DIFCOMPRESS_INCEPTION``, then
    clean-fid's cache. Never downloads; raises :class:`UserError` if nothing is found."""
    if weights_path is not None and str(weights_path) != "":
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise UserError(
                f"Inception weights not found at {p}: download {INCEPTION_URL} and pass its path "
                f"with --inception PATH."
            )
        return p
    env = os.environ.get(INCEPTION_ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise UserError(
                f"{INCEPTION_ENV_VAR}={env} is not a file: download {INCEPTION_URL} there, or "
                f"pass --inception PATH."
            )
        return p
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


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by relative path)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of images.")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in _IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class _FolderImages(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], input_size: int | None):
        self.files = list(files)
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)  # grayscale -> 3 channels
        except (OSError, ValueError) as e:
            raise UserError(f"Cannot read image {path}: {e}") from None
        x = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        if self.input_size is not None:
            # Always float here so a batch mixes no dtypes; same-size PIL resize is the identity.
            return _prepare(x[None], self.input_size)[0].float()
        return x


def features_of_folder(
    folder: str | os.PathLike,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    num_workers: int = 0,
) -> np.ndarray:
    """Features ``[N, D]`` of every image under ``folder`` (recursive, sorted)."""
    files = list_image_files(folder)
    if not files:
        raise UserError(
            f"No images found in {folder} (looked for {', '.join(sorted(_IMAGE_EXTENSIONS))})."
        )
    ds = _FolderImages(files, extractor.input_size)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=max(1, int(batch_size)), shuffle=False, num_workers=max(0, int(num_workers))
    )
    out = []
    try:
        for batch in loader:
            out.append(_run(extractor, batch))
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" in str(e):
            raise UserError(
                f"Images in {folder} have different sizes and extractor {extractor.name!r} does "
                f"not resize: make them one size."
            ) from None
        raise
    return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------------------------
# Reference statistics (.npz, no pickles)
# ----------------------------------------------------------------------------------------------

_STATS_FORMAT = "difcompress-reference-stats/1"


def save_reference_stats(path: str | os.PathLike, feats: np.ndarray, protocol: dict) -> Path:
    """Write ``mu``, ``sigma``, the raw ``feats`` (for KID) and ``protocol`` (JSON) to ``path``.

    ``protocol`` must name the extractor under ``"extractor"``; anything else JSON-serializable
    (dataset, split, image size, count...) is stored as is.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"Reference stats file must end in .npz, got {path}.")
    if "extractor" not in protocol or not isinstance(protocol["extractor"], str):
        raise ValueError("protocol must contain the extractor name under 'extractor'")
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise UserError(f"Need features [N >= 2, D] to save reference stats, got {feats.shape}.")
    feats64 = feats.astype(np.float64)
    mu = feats64.mean(axis=0)
    sigma = np.cov(feats64, rowvar=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez must not append another ".npz"
        np.savez(
            f,
            format=np.array(_STATS_FORMAT),
            protocol=np.array(json.dumps(protocol, sort_keys=True)),
            mu=mu,
            sigma=sigma,
            feats=feats.astype(np.float32),
        )
    return path


def read_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a file written by :func:`save_reference_stats`: ``(feats, protocol)``."""
    path = Path(path)
    bad = (
        f"{path} is not a difcompress reference stats file: pass a folder of reference images "
        f"or a .npz written by difcompress."
    )
    if not path.is_file():
        raise UserError(f"Reference {path} does not exist: pass a folder of images or a stats .npz.")
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != _STATS_FORMAT:
                raise UserError(bad)
            protocol = json.loads(str(z["protocol"]))
            feats = np.array(z["feats"])
            mu = np.array(z["mu"])
    except UserError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        raise UserError(bad) from None
    if (
        not isinstance(protocol, dict)
        or not isinstance(protocol.get("extractor"), str)
        or feats.ndim != 2
        or mu.shape != (feats.shape[1],)
    ):
        raise UserError(bad)
    return feats, protocol


def load_reference(
    path_or_folder: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
) -> np.ndarray:
    """Reference features from a folder of images or from a stats ``.npz`` made with the same
    extractor."""
    p = Path(path_or_folder)
    if p.is_dir():
        return features_of_folder(p, extractor, batch_size=batch_size, num_workers=num_workers)
    feats, protocol = read_reference_stats(p)
    if protocol["extractor"] != extractor.name:
        raise UserError(
            f"{p} holds {protocol['extractor']!r} features but the metric uses {extractor.name!r}: "
            f"recompute the reference stats with {extractor.name!r} or pick that extractor."
        )
    return feats


# ----------------------------------------------------------------------------------------------
# FID / KID (clean-fid's math)
# ----------------------------------------------------------------------------------------------


def _frechet(mu1, sig1, mu2, sig2) -> float:
    with warnings.catch_warnings():
        # clean-fid calls scipy's sqrtm(..., disp=False), deprecated in recent SciPy.
        warnings.filterwarnings("ignore", message=r".*`disp` argument is deprecated", category=DeprecationWarning)
        return float(frechet_distance(mu1, sig1, mu2, sig2))


def _fid(gen: np.ndarray, ref: np.ndarray) -> float:
    # == cleanfid.fid.fid_from_feats(gen, ref), with a fallback for rank-deficient covariances.
    mu1, sig1 = np.mean(gen, axis=0), np.cov(gen, rowvar=False)
    mu2, sig2 = np.mean(ref, axis=0), np.cov(ref, rowvar=False)
    try:
        return _frechet(mu1, sig1, mu2, sig2)
    except ValueError:
        # clean-fid refuses a sqrtm with a large imaginary part, which rank-deficient covariances
        # (few samples, N < D) can produce; regularize the diagonal as it does for singular ones.
        eps = 1e-6 * max(1.0, float(np.trace(sig1) + np.trace(sig2)) / len(mu1))
        off = np.eye(len(mu1)) * eps
        try:
            return _frechet(mu1, sig1 + off, mu2, sig2 + off)
        except ValueError:
            raise UserError(
                f"FID is numerically unstable with {len(gen)} vs {len(ref)} samples of "
                f"{len(mu1)}-d features: use more images."
            ) from None


def fid_kid(
    gen_feats: np.ndarray,
    ref_feats: np.ndarray,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """``{"fid": ..., "kid": ...}`` between two feature sets, with clean-fid's math.

    KID is clean-fid's ``kernel_distance`` (unbiased polynomial-kernel MMD averaged over random
    subsets); the subset size is clamped to the smaller set, and the subsets are drawn with a
    fixed ``seed`` so the number is reproducible (the global NumPy RNG is left as it was).
    """
    gen = np.asarray(gen_feats, dtype=np.float64)
    ref = np.asarray(ref_feats, dtype=np.float64)
    if gen.ndim != 2 or ref.ndim != 2:
        raise UserError(f"Features must be [N, D] arrays, got {gen.shape} and {ref.shape}.")
    if gen.shape[1] != ref.shape[1]:
        raise UserError(
            f"Generated features are {gen.shape[1]}-d but reference features are {ref.shape[1]}-d: "
            f"use the same feature extractor for both."
        )
    if min(len(gen), len(ref)) < 2:
        raise UserError(
            f"FID/KID need at least 2 images per set, got {len(gen)} generated and {len(ref)} "
            f"reference: generate more samples."
        )
    if not (np.isfinite(gen).all() and np.isfinite(ref).all()):
        raise UserError("Features contain NaN/inf: the model produced invalid images.")

    fid = _fid(gen, ref)

    m = min(len(gen), len(ref), int(kid_subset_size))
    m = max(m, 2)
    # With both sets used whole, every "random subset" is the same set: one pass suffices.
    subsets = 1 if m == len(gen) == len(ref) else max(1, int(kid_subsets))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        kid = kernel_distance(gen, ref, num_subsets=subsets, max_subset_size=m)
    finally:
        np.random.set_state(state)
    return {"fid": float(fid), "kid": float(kid)}
