"""FID and KID with clean-fid's math, and reference statistics (.npz, no pickles).

``fid_kid`` is ``cleanfid.fid.fid_from_feats`` / ``kernel_distance`` on features from
difcompress.metrics.extractors, so a number here matches clean-fid's on the same images.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
from cleanfid.fid import frechet_distance, kernel_distance

from difcompress.errors import UserError
from difcompress.metrics.extractors import FeatureExtractor, features_of_folder

# ---- Reference statistics (.npz, no pickles)

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


# ---- FID / KID (clean-fid's math)


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
