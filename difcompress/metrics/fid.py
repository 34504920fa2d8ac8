"""FID and KID with clean-fid's math, and reference statistics (.npz, no pickles).

``fid_kid`` is ``cleanfid.fid.fid_from_feats`` / ``kernel_distance`` on features from
difcompress.metrics.extractors, so a number here matches clean-fid's on the same images.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cleanfid
import numpy as np
from cleanfid.fid import kernel_distance
from scipy import linalg

from difcompress.core.errors import UserError
from difcompress.core.files import disk_errors
from difcompress.metrics.extractors import FeatureExtractor, features_of_folder

# ---- Reference statistics (.npz, no pickles)

_STATS_FORMAT = "difcompress-reference-stats/1"
#: Where clean-fid keeps the statistics it downloads (cleanfid/features.py); tests point it elsewhere.
CLEANFID_STATS_DIR = Path(cleanfid.__file__).parent / "stats"


@dataclass
class Reference:
    """What FID and KID compare against: the Gaussian (mu, sigma) of the reference features,
    the features themselves when known (KID needs them), and the network that made them."""

    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None
    extractor: str | None  # None: a clean-fid file, which is always its Inception
    source: str
    protocol: dict = field(default_factory=dict)  # how a difcompress statistics file was made (stats)

    @classmethod
    def of_features(cls, feats: np.ndarray, extractor: str | None, source: str) -> Reference:
        feats64 = np.asarray(feats, dtype=np.float64)
        return cls(feats64.mean(axis=0), np.cov(feats64, rowvar=False), np.asarray(feats), extractor, source)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]


def save_reference_stats(path: str | os.PathLike, feats: np.ndarray, protocol: dict) -> Path:
    """Write ``mu``, ``sigma`` (clean-fid's keys: clean-fid reads the file as it is), the raw
    ``feats`` (for KID) and ``protocol`` (JSON) to ``path``.

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
    reference = Reference.of_features(feats, protocol["extractor"], str(path))
    with disk_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez must not append another ".npz"
            np.savez(f, format=np.array(_STATS_FORMAT), protocol=np.array(json.dumps(protocol, sort_keys=True)),
                     mu=reference.mu, sigma=reference.sigma, feats=feats.astype(np.float32))
    return path


def read_reference_stats(path: str | os.PathLike) -> Reference:
    """A statistics file: difcompress's own (mu, sigma, feats, protocol), or clean-fid's
    (mu and sigma; its ``*_kid.npz`` companion with ``feats`` is read when it sits beside it)."""
    path = Path(path)
    bad = (f"{path} is neither a difcompress nor a clean-fid statistics file: pass a folder of reference images "
           "or a .npz with mu and sigma.")
    if not path.is_file():
        raise UserError(f"Reference {path} does not exist: pass a folder of images or a stats .npz.")
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.array(z["mu"]), np.array(z["sigma"])
            ours = "format" in z.files and str(z["format"]) == _STATS_FORMAT
            protocol = json.loads(str(z["protocol"])) if ours else {}
            feats = np.array(z["feats"]) if "feats" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        raise UserError(bad) from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or (ours and not isinstance(protocol, dict)):
        raise UserError(bad)
    companion = path.with_name(path.stem + "_kid.npz")
    if feats is None and companion.is_file():
        try:
            with np.load(companion, allow_pickle=False) as z:
                feats = np.array(z["feats"]) if "feats" in z.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            raise UserError(f"{companion} (the KID features beside {path.name}) is damaged: remove it to compute "
                            "FID without KID, or fetch it again") from None
    return Reference(mu, sigma, feats, protocol.get("extractor") if ours else None, str(path), protocol)


def cleanfid_named_stats(name: str) -> Path | None:
    """clean-fid's cached statistics for NAME-SPLIT-RES (cifar10-train-32: its clean-mode
    CIFAR-10 train statistics at 32 px) or a custom NAME, when the file is on this machine."""
    parts = name.rsplit("-", 2)
    candidates = [f"{name}_clean_custom_na.npz"]
    if len(parts) == 3:
        candidates.insert(0, f"{parts[0]}_clean_{parts[1]}_{parts[2]}.npz")
    return next((CLEANFID_STATS_DIR / c.lower() for c in candidates if (CLEANFID_STATS_DIR / c.lower()).is_file()),
                None)


def load_reference(spec: str | os.PathLike, extractor: FeatureExtractor, *, batch_size: int = 64,
                   show_progress: bool = False, image_size: int | None = None) -> Reference:
    """The reference a ``--ref`` names: a folder of images (featurised now), a statistics
    file made with the same extractor (and, when it records one, at `image_size`, the size
    the evaluated model generates), or a clean-fid dataset name found in its cache."""
    p = Path(spec)
    if p.is_dir():
        feats = features_of_folder(p, extractor, batch_size, show_progress)
        return Reference.of_features(feats, extractor.name, str(p.resolve()))
    if not p.exists() and p.suffix != ".npz":
        named = cleanfid_named_stats(str(spec))
        if named is None:
            raise UserError(f"--ref {spec}: no such folder or file, and not a clean-fid dataset name in its cache "
                            f"({CLEANFID_STATS_DIR}); where there is network, fetch it with clean-fid "
                            "(fid.get_reference_statistics) or give a folder of real images")
        p = named
    reference = read_reference_stats(p)
    made_by = reference.extractor or "inception"  # clean-fid's files hold its Inception's features
    if made_by != extractor.name:
        raise UserError(f"{p} holds {made_by!r} features but the metric uses {extractor.name!r}: recompute the "
                        f"reference stats with {extractor.name!r} or pick that extractor.")
    check_protocol(reference, image_size)
    return reference


def check_protocol(reference: Reference, image_size: int | None) -> None:
    """Statistics made another way than this evaluation measures are refused: another mode
    than clean, or resized to another size than the model generates."""
    protocol, where = reference.protocol, reference.source
    if protocol.get("mode", "clean") != "clean":
        raise UserError(f"--ref {where} was made in {protocol['mode']!r} mode; difcompress measures clean FID: "
                        "recompute it with difcompress stats", exit_code=2)
    made_at = protocol.get("size")
    if made_at is not None and image_size is not None and made_at != image_size:
        raise UserError(f"--ref {where} holds statistics of {made_at} px images (stats --size {made_at}) but the "
                        f"model generates {image_size} px: recompute them with difcompress stats --size {image_size}",
                        exit_code=2)


# ---- FID / KID (clean-fid's math)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # sqrtm's API moved across SciPy releases
        root = linalg.sqrtm(matrix)
    return root[0] if isinstance(root, tuple) else root


def _frechet(mu1, sig1, mu2, sig2, eps: float = 1e-6) -> float:
    """The Frechet distance of two Gaussians, as clean-fid computes it (the same matrix square
    root, the same regularisation of a singular product, the same test on imaginary parts).
    Written here because clean-fid 0.1.35 passes SciPy's sqrtm an argument newer SciPy dropped."""
    diff = mu1 - mu2
    covmean = _sqrtm(sig1.dot(sig2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sig1.shape[0]) * eps
        covmean = _sqrtm((sig1 + offset).dot(sig2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sig1) + np.trace(sig2) - 2 * np.trace(covmean))


def _fid(gen: np.ndarray, reference: Reference) -> float:
    # == cleanfid.fid.fid_from_feats(gen, ref), with a fallback for rank-deficient covariances.
    mu1, sig1 = np.mean(gen, axis=0), np.cov(gen, rowvar=False)
    mu2, sig2 = reference.mu, reference.sigma
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
            raise UserError(f"FID is numerically unstable with {len(gen)} samples of {len(mu1)}-d features: "
                            "use more images.") from None


def fid_kid(gen_feats: np.ndarray, reference: Reference | np.ndarray, *, kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float | None]:
    """``{"fid": ..., "kid": ...}`` of generated features against a reference (or reference
    features), with clean-fid's math. KID is None when the reference has no features (a
    clean-fid statistics file without its ``_kid`` companion).

    KID is clean-fid's ``kernel_distance`` (unbiased polynomial-kernel MMD averaged over random
    subsets); the subset size is clamped to the smaller set, and the subsets are drawn with a
    fixed ``seed`` so the number is reproducible (the global NumPy RNG is left as it was).
    """
    if not isinstance(reference, Reference):
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim != 2 or len(ref) < 2:
            raise UserError(f"Reference features must be [N >= 2, D], got {ref.shape}.")
        reference = Reference.of_features(ref, None, "features")
    gen = np.asarray(gen_feats, dtype=np.float64)
    if gen.ndim != 2:
        raise UserError(f"Features must be [N, D] arrays, got {gen.shape}.")
    if gen.shape[1] != reference.dim:
        raise UserError(f"Generated features are {gen.shape[1]}-d but reference features are {reference.dim}-d: "
                        "use the same feature extractor for both.")
    if len(gen) < 2:
        raise UserError(f"FID/KID need at least 2 images per set, got {len(gen)} generated: generate more samples.")
    if not np.isfinite(gen).all():
        raise UserError("Features contain NaN/inf: the model produced invalid images.")
    fid = _fid(gen, reference)
    if reference.feats is None:
        return {"fid": float(fid), "kid": None}
    ref = np.asarray(reference.feats, dtype=np.float64)
    m = max(min(len(gen), len(ref), int(kid_subset_size)), 2)
    # With both sets used whole, every "random subset" is the same set: one pass suffices.
    subsets = 1 if m == len(gen) == len(ref) else max(1, int(kid_subsets))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        kid = kernel_distance(gen, ref, num_subsets=subsets, max_subset_size=m)
    finally:
        np.random.set_state(state)
    return {"fid": float(fid), "kid": float(kid)}
