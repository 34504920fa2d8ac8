"""Distillation objectives: LIFT, PLACE and the baselines they are compared against.

Pure tensor functions, no model code and no I/O. The math is
``/work/shared/specs/objectives.md``; names below follow it:

* ``s`` is the student output, ``t`` the teacher output at the same noisy input,
  timestep and conditioning, both shaped ``(B, C, H, W)`` (or ``(B, C, N)``; trailing
  dims are flattened). ``t`` is always detached here, so callers cannot leak gradient
  into the teacher by mistake.
* A *group* is a set of positions of one sample and one channel. Inside a group the
  teacher is regressed on the student in closed form, ``t ~ a_g * s + b_g``. The coarse
  term pushes ``a_g -> 1, b_g -> 0`` (gradient flows through the fit); the fine term is the
  residual the fit cannot explain (fit coefficients stop-gradient). An adaptive weight
  ``w`` shifts training from coarse to fine as the fit approaches the identity.
* LIFT: one group per (sample, channel). PLACE: per (sample, channel), positions ranked
  by squared error and cut into consecutive groups of ``G``.

Every function returns :class:`KDTerms`: a scalar differentiable ``loss`` plus a dict of
plain floats to log (so the coarse-to-fine shift is visible in the training logs).

Precision: fit statistics are computed in float32 (float64 stays float64) whatever the
input dtype, so bf16 autocast outputs do not lose the small covariances the slope is made of.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difcompress.errors import UserError

__all__ = [
    "KDTerms",
    "affine_fit",
    "coarse_term",
    "fine_term",
    "coarse_to_fine_loss",
    "lift_loss",
    "place_loss",
    "task_loss",
    "mse_loss",
    "dist_loss",
    "FeatureAdapters",
    "feature_loss",
    "KD_OBJECTIVES",
    "LOSS_NAMES",
    "kd_loss",
]

COARSE_NORMS = ("l2", "l1")


@dataclass
class KDTerms:
    """One objective's value: ``loss`` to backpropagate, ``logs`` to record."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _compute_dtype(x: Tensor) -> torch.dtype:
    # float32 at least (bf16/fp16 statistics are too coarse), float64 kept for gradcheck.
    return torch.promote_types(x.dtype, torch.float32)


def _as_rows(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, *spatial) -> (B, C, N) in the compute dtype; the teacher is detached."""
    if student.shape != teacher.shape:
        raise UserError(
            f"student output shape {tuple(student.shape)} differs from teacher output "
            f"shape {tuple(teacher.shape)}; distillation needs matching outputs"
        )
    if student.dim() < 3:
        raise UserError(
            f"expected outputs shaped (B, C, H, W) or (B, C, N), got {tuple(student.shape)}"
        )
    dtype = torch.promote_types(_compute_dtype(student), _compute_dtype(teacher))
    s = student.flatten(2).to(dtype)
    t = teacher.detach().flatten(2).to(dtype)
    return s, t


def _check_norm(coarse_norm: str) -> None:
    if coarse_norm not in COARSE_NORMS:
        raise UserError(
            f"unknown coarse_norm {coarse_norm!r}; choose one of {', '.join(COARSE_NORMS)}"
        )


def _no_autocast(device_type: str):
    # The statistics below must not be re-cast to bf16 by an enclosing autocast region.
    return torch.autocast(device_type=device_type, enabled=False)


# --------------------------------------------------------------------------- the fit


def affine_fit(
    student: Tensor, teacher: Tensor, eps: float = 1e-4, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Closed-form least squares of ``teacher`` on ``student`` over the last dim.

    For tensors shaped ``(..., n)`` returns ``(a, b)`` shaped ``(...)`` with::

        a = sum((s - mean s)(t - mean t)) / (sum((s - mean s)^2) + eps)
        b = mean(t) - a * mean(s)

    ``mask`` (bool, broadcastable to the inputs) marks the valid elements of each group;
    invalid ones are ignored in every statistic, which is how groups of unequal size
    share one tensor. ``eps`` keeps ``a`` finite for a constant (or 1-element) group:
    there the numerator is 0 too, so ``a = 0`` and ``b = mean(t)``.

    Gradients flow through ``a`` and ``b`` into ``student`` (the coarse term needs them).
    The teacher is detached. Statistics use float32 (or float64 if given float64).
    """
    dtype = torch.promote_types(_compute_dtype(student), _compute_dtype(teacher))
    s = student.to(dtype)
    t = teacher.detach().to(dtype)
    with _no_autocast(s.device.type):
        if mask is None:
            mean_s = s.mean(-1, keepdim=True)
            mean_t = t.mean(-1, keepdim=True)
            ds = s - mean_s
            dt = t - mean_t
        else:
            m = mask.to(dtype).expand_as(s)
            # A group with no valid element cannot occur from place_loss; clamp anyway so
            # an all-masked group gives a = b = 0 instead of NaN.
            n = m.sum(-1, keepdim=True).clamp_min(1.0)
            mean_s = (s * m).sum(-1, keepdim=True) / n
            mean_t = (t * m).sum(-1, keepdim=True) / n
            ds = (s - mean_s) * m
            dt = (t - mean_t) * m
        a = (ds * dt).sum(-1) / ((ds * ds).sum(-1) + eps)
        b = mean_t.squeeze(-1) - a * mean_s.squeeze(-1)
    return a, b


def coarse_term(a: Tensor, b: Tensor, coarse_norm: str = "l2") -> Tensor:
    """Per-group distance of the fit from the identity: ``(a-1)^2 + b^2`` or ``|a-1| + |b|``.

    Differentiable in ``a`` and ``b``: this is the term that trains the student's
    low-order statistics (scale and offset) on each group.
    """
    _check_norm(coarse_norm)
    if coarse_norm == "l2":
        return (a - 1.0).square() + b.square()
    return (a - 1.0).abs() + b.abs()


def fine_term(student: Tensor, teacher: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per-element residual ``(sg(a) * s + sg(b) - t)^2`` the affine fit cannot explain.

    ``a``, ``b`` are shaped like ``student`` without its last dim and are detached here,
    so this term never pushes on the fit coefficients (spec property 6): it only moves
    the student within the affine family already matched by the coarse term.
    """
    a = a.detach().unsqueeze(-1)
    b = b.detach().unsqueeze(-1)
    return (a * student + b - teacher.detach()).square()


# --------------------------------------------------------------------------- LIFT / PLACE core


def coarse_to_fine_loss(
    student_groups: Tensor,
    teacher_groups: Tensor,
    *,
    mask: Tensor | None = None,
    coarse_norm: str = "l2",
    eps: float = 1e-4,
) -> KDTerms:
    """The shared LIFT/PLACE objective over pre-formed groups.

    ``student_groups`` and ``teacher_groups`` are shaped ``(B, C, num_groups, G)``; each
    slice ``[..., g, :]`` is one group. ``mask`` (bool, broadcastable, e.g.
    ``(num_groups, G)``) marks valid elements when groups have unequal sizes.

    ``L = mean over groups(coarse) + w * mean over valid elements(fine)`` with
    ``w = 1 - min(1, mean_g |a_g - 1| + mean_g |b_g|)`` computed without gradient, one
    scalar per batch. Every group counts once in the group means, whatever its size.

    Logs: ``loss``, ``coarse``, ``fine`` (unweighted), ``w``, ``slope`` (mean a_g),
    ``intercept`` (mean b_g).
    """
    _check_norm(coarse_norm)
    dtype = torch.promote_types(_compute_dtype(student_groups), _compute_dtype(teacher_groups))
    s = student_groups.to(dtype)
    t = teacher_groups.detach().to(dtype)
    with _no_autocast(s.device.type):
        a, b = affine_fit(s, t, eps=eps, mask=mask)
        coarse = coarse_term(a, b, coarse_norm).mean()

        fine_el = fine_term(s, t, a, b)
        if mask is None:
            fine = fine_el.mean()
        else:
            m = mask.to(dtype).expand_as(fine_el)
            fine = (fine_el * m).sum() / m.sum().clamp_min(1.0)

        with torch.no_grad():
            slope_err = (a - 1.0).abs().mean()
            intercept_err = b.abs().mean()
            w = 1.0 - torch.clamp(slope_err + intercept_err, max=1.0)

        loss = coarse + w * fine

    # One host sync for all logged scalars.
    logged = torch.stack(
        [loss.detach(), coarse.detach(), fine.detach(), w, a.detach().mean(), b.detach().mean()]
    ).tolist()
    logs = dict(zip(("loss", "coarse", "fine", "w", "slope", "intercept"), logged))
    return KDTerms(loss=loss, logs=logs)


def lift_loss(
    student: Tensor, teacher: Tensor, *, coarse_norm: str = "l2", eps: float = 1e-4
) -> KDTerms:
    """LIFT: one affine fit per (sample, channel) over all its positions.

    ``student``/``teacher`` are ``(B, C, H, W)`` or ``(B, C, N)``; ``teacher`` is detached.
    """
    s, t = _as_rows(student, teacher)
    return coarse_to_fine_loss(s.unsqueeze(2), t.unsqueeze(2), coarse_norm=coarse_norm, eps=eps)


def place_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    group_size: int = 16,
    coarse_norm: str = "l2",
    eps: float = 1e-4,
) -> KDTerms:
    """PLACE: per (sample, channel), fit separately on groups of similar error.

    Positions of each (sample, channel) row are ranked by ``(t - s)^2`` ascending (one
    batched ``torch.argsort`` over all rows per call, on detached values: no gradient
    through the ranking, which is recomputed every call) and cut into consecutive groups
    of ``group_size`` (``G``). Gradients still reach every student element through the
    gather of its value into its group.

    Last group: when ``N = H*W`` is not a multiple of ``G``, the groups are
    ``ceil(N / G)``; the last one holds the ``N mod G`` largest-error positions and is
    fitted on its own (masked statistics over a zero-padded tail). It counts as one group
    in the coarse mean and in ``w``, like the full ones; its elements count once each in
    the fine mean. ``G >= N`` gives a single group, i.e. exactly LIFT.

    A last group of size 1 (e.g. 7x7 with G=4) is well defined, no NaN: its centered
    student value is 0, so ``a = 0 / (0 + eps) = 0`` and the intercept absorbs the
    difference, ``b = t``; its fine residual is 0 and its coarse value ``1 + t^2`` (L2)
    is a constant with zero gradient. It does not train anything, but it does lower ``w``
    by about ``(1 + |t|) / num_groups``. Choose ``G`` dividing ``H*W`` to avoid this
    (all published settings do: 32x32, 64x64 with G=16).
    """
    if int(group_size) != group_size or group_size < 1:
        raise UserError(f"group_size must be a positive integer, got {group_size!r}")
    group_size = int(group_size)
    s, t = _as_rows(student, teacher)
    B, C, N = s.shape
    G = min(group_size, N)

    with torch.no_grad():
        order = torch.argsort((t - s.detach()).square(), dim=-1)
    s_sorted = torch.gather(s, -1, order)
    t_sorted = torch.gather(t, -1, order)

    num_groups = -(-N // G)
    pad = num_groups * G - N
    mask = None
    if pad:
        s_sorted = F.pad(s_sorted, (0, pad))
        t_sorted = F.pad(t_sorted, (0, pad))
        mask = (torch.arange(num_groups * G, device=s.device) < N).view(num_groups, G)
    return coarse_to_fine_loss(
        s_sorted.view(B, C, num_groups, G),
        t_sorted.view(B, C, num_groups, G),
        mask=mask,
        coarse_norm=coarse_norm,
        eps=eps,
    )


# --------------------------------------------------------------------------- baselines


def _mse(x: Tensor, y: Tensor) -> Tensor:
    dtype = torch.promote_types(_compute_dtype(x), _compute_dtype(y))
    with _no_autocast(x.device.type):
        return F.mse_loss(x.to(dtype), y.to(dtype))


def task_loss(prediction: Tensor, target: Tensor) -> KDTerms:
    """Denoising loss against the true target (noise / v / x0): plain MSE, no teacher.

    This is how Diff-Pruning fine-tunes; ``target`` carries no gradient by nature.
    """
    loss = _mse(prediction, target.detach())
    return KDTerms(loss=loss, logs={"loss": loss.item()})


def mse_loss(student: Tensor, teacher: Tensor) -> KDTerms:
    """Output KD: mean squared error between student and (detached) teacher outputs."""
    loss = _mse(student, teacher.detach())
    return KDTerms(loss=loss, logs={"loss": loss.item()})


def _pearson(x: Tensor, y: Tensor, dim: int, eps: float) -> Tensor:
    xc = x - x.mean(dim, keepdim=True)
    yc = y - y.mean(dim, keepdim=True)
    return (xc * yc).sum(dim) / (xc.norm(dim=dim) * yc.norm(dim=dim) + eps)


def dist_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> KDTerms:
    """DIST (Huang et al., NeurIPS 2022), Pearson-correlation KD, adapted to regression.

    DIST matches class-probability vectors by correlation rather than exact values: an
    *inter* term per sample (over classes) and an *intra* term per class (over the batch).
    Diffusion outputs are regression targets, not logits, so the adaptation is:

    * no softmax and no temperature: correlations are taken on the raw outputs;
    * "classes" become the flattened ``C*H*W`` output elements of each sample;
    * inter = ``1 - Pearson(s_i, t_i)`` over each sample's flattened vector, batch mean;
    * intra = ``1 - Pearson(s[:, j], t[:, j])`` over the batch for every element
      position ``j``, mean over positions; with ``B == 1`` there is no batch to
      correlate over and intra is 0;
    * ``loss = beta * inter + gamma * intra``.

    Both terms are invariant to a positive affine map of the student (the relaxed match
    that is DIST's capacity-gap remedy); ``eps`` guards constant vectors.
    Logs: ``loss``, ``inter``, ``intra``.
    """
    s, t = _as_rows(student, teacher)
    s = s.flatten(1)
    t = t.flatten(1)
    with _no_autocast(s.device.type):
        inter = (1.0 - _pearson(s, t, dim=1, eps=eps)).mean()
        if s.shape[0] >= 2:
            intra = (1.0 - _pearson(s, t, dim=0, eps=eps)).mean()
        else:
            intra = torch.zeros((), dtype=s.dtype, device=s.device)
        loss = beta * inter + gamma * intra
    logged = torch.stack([loss.detach(), inter.detach(), intra.detach()]).tolist()
    return KDTerms(loss=loss, logs=dict(zip(("loss", "inter", "intra"), logged)))


# --------------------------------------------------------------------------- feature KD


class FeatureAdapters(nn.Module):
    """Per hooked block pair, a map from the student's width to the teacher's.

    A 1x1 ``Conv2d`` for 4-D ``(B, C, H, W)`` features (``kind="conv"``) or a ``Linear`` on
    the last dim for 3-D ``(B, N, D)`` token features (``kind="linear"``);
    ``nn.Identity`` where the widths already agree. The adapters are trained with the
    student (FitNet / BK-SDM style) and dropped after distillation.
    """

    def __init__(
        self,
        student_widths: Sequence[int],
        teacher_widths: Sequence[int],
        kind: str = "conv",
    ):
        super().__init__()
        if len(student_widths) != len(teacher_widths):
            raise UserError(
                f"feature KD needs as many student blocks as teacher blocks, got "
                f"{len(student_widths)} student and {len(teacher_widths)} teacher widths"
            )
        if kind not in ("conv", "linear"):
            raise UserError(f"unknown adapter kind {kind!r}; choose one of conv, linear")
        self.kind = kind
        layers: list[nn.Module] = []
        for sw, tw in zip(student_widths, teacher_widths):
            if sw == tw:
                layers.append(nn.Identity())
            elif kind == "conv":
                layers.append(nn.Conv2d(sw, tw, kernel_size=1))
            else:
                layers.append(nn.Linear(sw, tw))
        self.adapters = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.adapters)

    def forward(self, index: int, feature: Tensor) -> Tensor:
        return self.adapters[index](feature)


def massive_activation_mask(feature: Tensor, num_std: float) -> Tensor:
    """True where an element is ordinary: ``|x - mean| < num_std * std``, with mean and std
    taken per sample over all its elements (TinyFusion's masked KD, Fang et al. CVPR 2025:
    DiT hidden states carry a few massive activations that would dominate an MSE)."""
    flat = feature.detach().flatten(1)
    mean = flat.mean(1).view(-1, *([1] * (feature.dim() - 1)))
    std = flat.std(1).view(-1, *([1] * (feature.dim() - 1)))
    return (feature.detach() - mean).abs() < num_std * std


def feature_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    adapters: FeatureAdapters,
    mask_std: float = 0.0,
) -> KDTerms:
    """Feature KD: mean over block pairs of ``MSE(adapter(s), t.detach())``.

    Each pair's MSE is a mean over its own elements, so blocks of different resolution
    weigh equally. Gradient reaches both the student and the adapters. With ``mask_std > 0``
    the teacher's massive activations (see ``massive_activation_mask``) are zeroed in both
    features before the MSE, so they pull on nothing.
    """
    n = len(adapters)
    if len(student_features) != n or len(teacher_features) != n:
        raise UserError(
            f"feature KD got {len(student_features)} student and {len(teacher_features)} "
            f"teacher features for {n} adapters; they must match"
        )
    if n == 0:
        raise UserError("feature KD needs at least one hooked block")
    terms = []
    for i, (sf, tf) in enumerate(zip(student_features, teacher_features)):
        mapped = adapters(i, sf)
        if mapped.shape != tf.shape:
            raise UserError(
                f"feature pair {i}: adapted student feature {tuple(mapped.shape)} does not "
                f"match teacher feature {tuple(tf.shape)}; pick blocks of equal resolution"
            )
        tf = tf.detach()
        if mask_std > 0:
            keep = massive_activation_mask(tf, mask_std)
            mapped, tf = mapped * keep, tf * keep
        terms.append(_mse(mapped, tf))
    per_pair = torch.stack(terms)
    loss = per_pair.mean()
    logs = {"loss": loss.item()}
    logs.update({f"pair{i}": v for i, v in enumerate(per_pair.detach().tolist())})
    return KDTerms(loss=loss, logs=logs)


# --------------------------------------------------------------------------- registry

KD_OBJECTIVES: dict[str, Callable[..., KDTerms]] = {
    "mse": mse_loss,
    "dist": dist_loss,
    "lift": lift_loss,
    "place": place_loss,
}

# Every loss the CLI offers; "task" and "feature" need other inputs than (student, teacher)
# outputs and are called directly (task_loss, feature_loss).
LOSS_NAMES = ("task", "mse", "feature", "dist", "lift", "place")


def _keyword_options(fn: Callable[..., KDTerms]) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def kd_loss(name: str, student: Tensor, teacher: Tensor, **options) -> KDTerms:
    """Output-KD objective ``name`` on (student, teacher) outputs.

    Options an objective does not take (e.g. ``group_size`` for ``mse``) are ignored, so a
    recipe can carry one option set across objectives.
    """
    fn = KD_OBJECTIVES.get(name)
    if fn is None:
        raise UserError(
            f"unknown loss {name!r} for output distillation; "
            f"choose one of {', '.join(KD_OBJECTIVES)}"
        )
    accepted = _keyword_options(fn)
    return fn(student, teacher, **{k: v for k, v in options.items() if k in accepted})
