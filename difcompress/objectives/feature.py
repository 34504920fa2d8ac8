"""Feature KD (FitNet / BK-SDM / TinyFusion style): match hooked intermediate outputs.

Pure: the caller hooks the blocks and hands over their outputs; here are the adapters that
map student widths to teacher widths and the loss over the pairs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from difcompress.core.errors import UserError
from difcompress.objectives.baselines import mse
from difcompress.objectives.core import KDTerms, compute_dtype, no_autocast

ADAPTER_KINDS = ("conv", "linear")
MASK_SOURCES = ("teacher", "own")
REDUCTIONS = ("mean", "sum")


class FeatureAdapters(nn.Module):
    """Per hooked block pair, a map from the student's width to the teacher's.

    A 1x1 ``Conv2d`` for 4-D ``(B, C, H, W)`` features (``kind="conv"``) or a ``Linear`` on
    the last dim for 3-D ``(B, N, D)`` token features (``kind="linear"``). Where the widths
    already agree the adapter is ``nn.Identity`` unless ``always`` (the LIFT/PLACE authors'
    DDPM setting adapts every pair). ``bias=False`` and ``init_range`` (weights drawn
    uniform in +-init_range) reproduce their adapters; the defaults are PyTorch's. The
    adapters train with the student and are dropped after distillation.
    """

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int], kind: str = "conv", *,
                 bias: bool = True, init_range: float | None = None, always: bool = False):
        super().__init__()
        if len(student_widths) != len(teacher_widths):
            raise UserError(f"feature KD needs as many student blocks as teacher blocks, got "
                            f"{len(student_widths)} student and {len(teacher_widths)} teacher widths")
        if kind not in ADAPTER_KINDS:
            raise UserError(f"unknown adapter kind {kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
        self.kind = kind
        self.adapters = nn.ModuleList(
            self._adapter(sw, tw, kind, bias, init_range, always) for sw, tw in zip(student_widths, teacher_widths))

    @staticmethod
    def _adapter(student_width: int, teacher_width: int, kind: str, bias: bool, init_range: float | None,
                 always: bool) -> nn.Module:
        if student_width == teacher_width and not always:
            return nn.Identity()
        if kind == "conv":
            layer = nn.Conv2d(student_width, teacher_width, kernel_size=1, bias=bias)
        else:
            layer = nn.Linear(student_width, teacher_width, bias=bias)
        if init_range is not None:
            nn.init.uniform_(layer.weight, -init_range, init_range)
        return layer

    def __len__(self) -> int:
        return len(self.adapters)

    def forward(self, index: int, feature: Tensor) -> Tensor:
        adapter = self.adapters[index]
        weight = next(adapter.parameters(), None)
        # Under mixed precision the student's features come out of autocast in bf16/fp16 while
        # the adapter (trained, outside autocast) stays fp32: it reads them in its own dtype.
        return adapter(feature if weight is None else feature.to(weight.dtype))


def massive_activation_mask(feature: Tensor, num_std: float) -> Tensor:
    """True where an element is ordinary: ``|x - mean| < num_std * std``, with mean and std
    taken per sample over all its elements (TinyFusion's masked KD, Fang et al. CVPR 2025:
    DiT hidden states carry a few massive activations that would dominate an MSE)."""
    flat = feature.detach().flatten(1)
    shape = (-1, *([1] * (feature.dim() - 1)))
    mean = flat.mean(1).view(shape)
    std = flat.std(1).view(shape)
    return (feature.detach() - mean).abs() < num_std * std


def _pair_error(student: Tensor, teacher: Tensor, element_reduction: str) -> Tensor:
    """mean: the MSE over all elements; sum: squared error summed per sample, batch mean."""
    if element_reduction == "mean":
        return mse(student, teacher)
    dtype = compute_dtype(student, teacher)
    with no_autocast(student.device.type):
        return (student.to(dtype) - teacher.to(dtype)).square().flatten(1).sum(1).mean()


def feature_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor],
                 adapters: FeatureAdapters, *, mask_std: float = 0.0, mask_by: str = "teacher",
                 element_reduction: str = "mean", layer_reduction: str = "mean") -> KDTerms:
    """Feature KD over block pairs: ``error(adapter(s), t.detach())`` combined over pairs.

    ``element_reduction``: ``mean`` is each pair's MSE (blocks of different resolution weigh
    equally); ``sum`` sums each sample's squared errors (the LIFT/PLACE authors' DDPM form).
    ``layer_reduction``: mean over pairs, or their sum (BK-SDM, the authors). Gradient
    reaches the student and the adapters. With ``mask_std > 0`` massive activations
    (see :func:`massive_activation_mask`) are zeroed before the error: by the teacher's
    statistics in both features (``mask_by="teacher"``), or each feature by its own
    (``"own"``, the authors' TinyFusion setting).
    """
    n = len(adapters)
    if len(student_features) != n or len(teacher_features) != n:
        raise UserError(f"feature KD got {len(student_features)} student and {len(teacher_features)} "
                        f"teacher features for {n} adapters; they must match")
    if n == 0:
        raise UserError("feature KD needs at least one hooked block")
    terms = []
    for i, (sf, tf) in enumerate(zip(student_features, teacher_features)):
        mapped = adapters(i, sf)
        if mapped.shape != tf.shape:
            raise UserError(f"feature pair {i}: adapted student feature {tuple(mapped.shape)} does not "
                            f"match teacher feature {tuple(tf.shape)}; pick blocks of equal resolution")
        tf = tf.detach()
        if mask_std > 0:
            keep_t = massive_activation_mask(tf, mask_std)
            keep_s = keep_t if mask_by == "teacher" else massive_activation_mask(mapped, mask_std)
            mapped, tf = mapped * keep_s, tf * keep_t
        terms.append(_pair_error(mapped, tf, element_reduction))
    per_pair = torch.stack(terms)
    loss = per_pair.mean() if layer_reduction == "mean" else per_pair.sum()
    logs = {"loss": loss.detach(), **{f"pair{i}": v for i, v in enumerate(per_pair.detach())}}
    return KDTerms(loss=loss, logs=logs)
