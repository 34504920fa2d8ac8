"""PNG figures: sample grids (one labelled row per model) and training-metric curves.

Rendering uses matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never pyplot,
so nothing opens a window, no global backend is switched and figures are not leaked.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from difcompress.core.errors import UserError
from difcompress.core.files import disk_errors
from difcompress.metrics.extractors import to_uint8

__all__ = ["save_sample_grid", "plot_metrics", "plot_by_ratio", "plot_runs", "LOSS_KEYS"]

#: Keys smoothed with a moving average (plus any key containing "loss").
LOSS_KEYS = frozenset({"loss", "task", "kd", "coarse", "fine", "feature", "total"})
_MIN_DISPLAY_PX = 64
_PAD_PX = 2
_DPI = 100


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with disk_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        FigureCanvasAgg(fig)
        fig.savefig(path, format="png", dpi=_DPI)
    return path


def _to_hwc_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``uint8 [N, H, W, 3]`` (the same conversion FID uses)."""
    if not isinstance(images, torch.Tensor):
        raise UserError(f"Sample images must be [N, C, H, W] tensors, got {type(images).__name__}.")
    x = images if images.dtype == torch.uint8 else images.float().nan_to_num(0.0)
    return to_uint8(x).permute(0, 2, 3, 1).contiguous().numpy()


def _upscale(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``[H, W, 3]`` image to ``[h, w, 3]``."""
    rows = (np.arange(h) * img.shape[0] // h).clip(0, img.shape[0] - 1)
    cols = (np.arange(w) * img.shape[1] // w).clip(0, img.shape[1] - 1)
    return img[rows][:, cols]


def save_sample_grid(
    path: str | os.PathLike,
    rows: Sequence[tuple[str, torch.Tensor]],
    ncols: int | None = None,
    caption: str | None = None,
) -> Path:
    """Write one PNG with a labelled row of samples per model.

    ``rows`` is ``[(label, images[N, C, H, W] in [-1, 1]), ...]``; column ``j`` of every row is
    sample ``j`` (so the same seeds line up). ``ncols`` defaults to the longest row; shorter rows
    leave blank cells. Images smaller than 64 px are upscaled with nearest neighbour, and rows of
    different resolutions are shown at one common cell size.
    """
    if not rows:
        raise UserError("No samples to draw: the grid needs at least one (label, images) row.")
    arrays = [(str(label), _to_hwc_uint8(imgs)) for label, imgs in rows]
    longest = max(a.shape[0] for _, a in arrays)
    ncols = longest if ncols is None else int(ncols)
    if ncols < 1 or longest == 0:
        raise UserError("No samples to draw: every row is empty or ncols < 1.")

    cell_h = max(a.shape[1] for _, a in arrays)
    cell_w = max(a.shape[2] for _, a in arrays)
    if min(cell_h, cell_w) < _MIN_DISPLAY_PX:
        k = math.ceil(_MIN_DISPLAY_PX / min(cell_h, cell_w))
        cell_h, cell_w = cell_h * k, cell_w * k

    strip_w = ncols * cell_w + (ncols + 1) * _PAD_PX
    strip_h = cell_h + 2 * _PAD_PX
    strips = []
    for _, a in arrays:
        strip = np.full((strip_h, strip_w, 3), 255, dtype=np.uint8)
        for j in range(min(ncols, a.shape[0])):
            x0 = _PAD_PX + j * (cell_w + _PAD_PX)
            strip[_PAD_PX : _PAD_PX + cell_h, x0 : x0 + cell_w] = _upscale(a[j], cell_h, cell_w)
        strips.append(strip)

    label_px = 12 + 7 * max(len(label) for label, _ in arrays)
    title_px = 8
    caption_px = 18 * (caption.count("\n") + 1) if caption else 0
    fig_w_px = max(label_px + strip_w, 7 * max((len(line) for line in (caption or "").splitlines()), default=0))
    fig_h_px = title_px + len(strips) * (strip_h + 4) + caption_px
    fig = Figure(figsize=(fig_w_px / _DPI, fig_h_px / _DPI), dpi=_DPI)
    for i, ((label, _), strip) in enumerate(zip(arrays, strips)):
        bottom = 1.0 - (title_px + (i + 1) * (strip_h + 4)) / fig_h_px
        ax = fig.add_axes((label_px / fig_w_px, bottom, strip_w / fig_w_px, strip_h / fig_h_px))
        ax.imshow(strip, interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        fig.text(
            (label_px - 6) / fig_w_px, bottom + 0.5 * strip_h / fig_h_px, label,
            ha="right", va="center", fontsize=9,
        )
    if caption:
        fig.text(0.01, (caption_px - 4) / fig_h_px, caption, ha="left", va="top", fontsize=8)
    return _save(fig, path)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centered mean over ``window`` neighbouring finite values (shrinks at the ends; NaNs are
    ignored and stay NaN), so the smoothed curve does not lag behind the raw one."""
    out = np.full(y.shape, np.nan, dtype=np.float64)
    finite = np.isfinite(y)
    vals = y[finite].astype(np.float64)
    if vals.size == 0:
        return out
    c = np.concatenate([[0.0], np.cumsum(vals)])
    idx = np.arange(vals.size)
    lo = np.maximum(0, idx - window // 2)
    hi = np.minimum(vals.size, idx + (window - window // 2))
    # A mean lies within [min, max]; clipping removes cumsum round-off (flat curves stay flat).
    out[finite] = np.clip((c[hi] - c[lo]) / (hi - lo), vals.min(), vals.max())
    return out


def _smoothed(key: str) -> bool:
    k = key.lower()
    return k in LOSS_KEYS or "loss" in k


def _read_series(src: Path, keys: Sequence[str] | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, steps, values) per numeric field of a JSONL log (torn or non-object lines skipped)."""
    if not src.is_file():
        raise UserError(f"Metrics log {src} does not exist.")
    records: list[dict] = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and _is_number(rec.get("step")):
                records.append(rec)
    if not records:
        raise UserError(f"{src} has no JSON lines with a numeric 'step'.")
    records.sort(key=lambda r: r["step"])  # stable: resumed runs keep their order per step
    wanted = [k for k in keys if k != "step"] if keys is not None else list(dict.fromkeys(
        k for rec in records for k, v in rec.items() if k != "step" and _is_number(v)))
    series = []
    for k in wanted:
        pts = [(r["step"], r[k]) for r in records if _is_number(r.get(k))]
        if pts:
            arr = np.asarray(pts, dtype=np.float64)
            series.append((k, arr[:, 0], arr[:, 1]))
    if not series:
        which = ", ".join(keys) if keys is not None else "numeric fields"
        raise UserError(f"Nothing to plot in {src}: no values for {which}.")
    return series


def plot_metrics(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot numeric fields of a JSONL metrics log against ``step``, one small subplot each.

    Every line is a JSON object with ``step``; all other numeric fields (or only ``keys``) are
    plotted, non-numeric fields and keys with no values are skipped, loss-like keys get a light
    moving average over the raw curve and a log scale when they fall over a decade. Lines that
    are not JSON objects (e.g. a half-written last line) or have no numeric ``step`` are skipped.
    """
    series = _read_series(Path(jsonl_path), keys)
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.4 * nrows + (0.4 if title else 0)), dpi=_DPI)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10)
    for ax, (k, x, y) in zip(axes.flat, series):
        if _smoothed(k) and len(y) >= 10:
            window = max(2, min(50, len(y) // 10))
            ax.plot(x, y, lw=0.8, alpha=0.35, color="C0")
            ax.plot(x, _moving_average(y, window), lw=1.4, color="C0")
        else:
            ax.plot(x, y, lw=1.2, color="C0", marker="." if len(y) < 30 else None)
        ax.set_title(k, fontsize=9)
        ax.set_ylabel(k, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.ticklabel_format(axis="y", useOffset=False)  # no "1e-13+1e-1" on flat curves
        finite = y[np.isfinite(y)]
        spread = finite.max() / finite.min() if finite.size and (finite > 0).all() else 0
        if (k.lower() == "lr" and spread > 50) or (_smoothed(k) and spread > 10):
            ax.set_yscale("log")  # losses fall over decades
            ax.tick_params(which="both", labelsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    for i, ax in enumerate(list(axes.flat)[: len(series)]):
        if i + ncols >= len(series):  # bottom-most visible plot of its column
            ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    return _save(fig, png_path)


def plot_by_ratio(rows: Sequence[dict], png_path: str | os.PathLike, *, floor: float | None = None,
                  title: str | None = None) -> Path:
    """FID against pruning ratio, one line per objective (mean, with the seeds' standard
    deviation as error bars), on a log scale; `floor` (the teacher's FID) as a dashed line.
    Each row: ratio, loss, fid_mean, fid_std, seeds."""
    fig = Figure(figsize=(5.2, 3.6), dpi=_DPI)
    ax = fig.subplots()
    for i, loss in enumerate(dict.fromkeys(r["loss"] for r in rows)):
        points = sorted((float(r["ratio"]), r["fid_mean"], r["fid_std"], r["seeds"]) for r in rows
                        if r["loss"] == loss)
        x, y, err, seeds = zip(*points)
        ax.errorbar(x, y, yerr=err, label=f"{loss} (n={min(seeds)}-{max(seeds)})" if min(seeds) != max(seeds)
                    else f"{loss} (n={seeds[0]})", marker="o", ms=4, lw=1.2, capsize=3, color=f"C{i}")
    if floor is not None:
        ax.axhline(floor, ls="--", lw=0.8, color="grey", label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (channels removed)", fontsize=8)
    ax.set_ylabel("FID (lower is better)", fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, png_path)


def plot_runs(curves: dict[str, Sequence[dict]], png_path: str | os.PathLike, keys: Sequence[str], *,
              title: str | None = None) -> Path:
    """Several runs' logged values against ``step``, one subplot per key and one line per run
    (e.g. PLACE's ``w``, slope and intercept across objectives and seeds). `curves` maps a
    run's label to its log rows; a row missing a key leaves a gap."""
    fig = Figure(figsize=(3.6 * len(keys), 3.0 + (0.3 if title else 0)), dpi=_DPI)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    if title:
        fig.suptitle(title, fontsize=10)
    for ax, key in zip(axes, keys):
        for i, (label, rows) in enumerate(curves.items()):
            points = [(r["step"], r[key]) for r in rows if _is_number(r.get(key))]
            ax.plot(*zip(*points) if points else ([], []), lw=1.0, color=f"C{i % 10}", label=label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_xscale("symlog", linthresh=100)  # the early steps are where these move
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, png_path)
