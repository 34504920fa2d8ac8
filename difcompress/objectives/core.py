"""LIFT and PLACE: the coarse-to-fine objective and its two groupings.

Pure tensor functions, no model code and no I/O. The math is the project's objectives
spec (docs/method.md says it in words); names follow it:

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

Precision: fit statistics are computed in float32 (float64 stays float64) whatever the
input dtype, so bf16 autocast outputs do not lose the small covariances the slope is made of.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from difcompress.core.errors import UserError

# The published defaults: G = 16 in every table of the paper, eps = 1e-4 in the fit, L2 coarse term.
PLACE_GROUP_SIZE = 16
FIT_EPS = 1e-4
COARSE_NORMS = ("l2", "l1")


@dataclass
class KDTerms:
    """One objective's value: ``loss`` to backpropagate, ``logs`` to record.

    Logged values are detached 0-d tensors on the loss's device, so computing them never
    waits for the GPU; the trainer reads them only when it writes a log line.
    """

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)

    def floats(self) -> dict[str, float]:
        """The logged values as Python floats (one device sync)."""
        names = list(self.logs)
        values = torch.stack([self.logs[n].double() for n in names]).tolist() if names else []
        return dict(zip(names, values))


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 statistics are too coarse), float64 kept for gradcheck."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def no_autocast(device_type: str):
    """The statistics must not be re-cast to bf16 by an enclosing autocast region."""
    return torch.autocast(device_type=device_type, enabled=False)


def as_rows(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, *spatial) -> (B, C, N) in the compute dtype; the teacher is detached."""
    if student.shape != teacher.shape:
        raise UserError(
            f"student output shape {tuple(student.shape)} differs from teacher output "
            f"shape {tuple(teacher.shape)}; distillation needs matching outputs"
        )
    if student.dim() < 3:
        raise UserError(f"expected outputs shaped (B, C, H, W) or (B, C, N), got {tuple(student.shape)}")
    dtype = compute_dtype(student, teacher)
    return student.flatten(2).to(dtype), teacher.detach().flatten(2).to(dtype)


def _check_norm(coarse_norm: str) -> None:
    if coarse_norm not in COARSE_NORMS:
        raise UserError(f"unknown coarse_norm {coarse_norm!r}; choose one of {', '.join(COARSE_NORMS)}")


def affine_fit(student: Tensor, teacher: Tensor, eps: float = FIT_EPS,
               mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Closed-form least squares of ``teacher`` on ``student`` over the last dim.

    For tensors shaped ``(..., n)`` returns ``(a, b)`` shaped ``(...)`` with::

        a = sum((s - mean s)(t - mean t)) / (sum((s - mean s)^2) + eps)
        b = mean(t) - a * mean(s)

    ``mask`` (bool, broadcastable to the inputs) marks the valid elements of each group;
    invalid ones are ignored in every statistic, which is how groups of unequal size
    share one tensor. ``eps`` keeps ``a`` finite for a constant group: there the numerator
    is 0 too, so ``a = 0`` and ``b = mean(t)``.

    Gradients flow through ``a`` and ``b`` into ``student`` (the coarse term needs them).
    """
    dtype = compute_dtype(student, teacher)
    s = student.to(dtype)
    t = teacher.detach().to(dtype)
    with no_autocast(s.device.type):
        if mask is None:
            mean_s = s.mean(-1, keepdim=True)
            mean_t = t.mean(-1, keepdim=True)
            ds = s - mean_s
            dt = t - mean_t
        else:
            m = mask.to(dtype).expand_as(s)
            # An all-masked group cannot come from place_loss; the clamp keeps it at a = b = 0, not NaN.
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

    ``a``, ``b`` are detached here, so this term never pushes on the fit coefficients:
    it only moves the student within the affine family already matched by the coarse term.
    """
    return (a.detach().unsqueeze(-1) * student + b.detach().unsqueeze(-1) - teacher.detach()).square()


def coarse_to_fine_loss(student_groups: Tensor, teacher_groups: Tensor, *, mask: Tensor | None = None,
                        coarse_norm: str = "l2", eps: float = FIT_EPS) -> KDTerms:
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
    dtype = compute_dtype(student_groups, teacher_groups)
    s = student_groups.to(dtype)
    t = teacher_groups.detach().to(dtype)
    with no_autocast(s.device.type):
        a, b = affine_fit(s, t, eps=eps, mask=mask)
        coarse = coarse_term(a, b, coarse_norm).mean()
        fine_el = fine_term(s, t, a, b)
        if mask is None:
            fine = fine_el.mean()
        else:
            m = mask.to(dtype).expand_as(fine_el)
            fine = (fine_el * m).sum() / m.sum().clamp_min(1.0)
        with torch.no_grad():
            w = 1.0 - torch.clamp((a - 1.0).abs().mean() + b.abs().mean(), max=1.0)
        loss = coarse + w * fine
    logs = {"loss": loss.detach(), "coarse": coarse.detach(), "fine": fine.detach(), "w": w,
            "slope": a.detach().mean(), "intercept": b.detach().mean()}
    return KDTerms(loss=loss, logs=logs)


def lift_loss(student: Tensor, teacher: Tensor, *, coarse_norm: str = "l2", eps: float = FIT_EPS) -> KDTerms:
    """LIFT: one affine fit per (sample, channel) over all its positions."""
    s, t = as_rows(student, teacher)
    return coarse_to_fine_loss(s.unsqueeze(2), t.unsqueeze(2), coarse_norm=coarse_norm, eps=eps)


def group_sizes(num_positions: int, group_size: int) -> list[int]:
    """How PLACE cuts a ranking of ``num_positions`` into groups of ``group_size``.

    Consecutive groups of G; when N is not a multiple of G the last group holds the
    remainder, except that a remainder of one position joins the group before it (a
    one-element group has no slope to fit: ``a = 0, b = t``, so ``s == t`` would not give a
    zero loss). ``G >= N`` gives a single group, i.e. exactly LIFT.
    """
    g = min(group_size, num_positions)
    full, rest = divmod(num_positions, g)
    if rest == 1 and full >= 1:
        return [g] * (full - 1) + [g + 1]
    return [g] * full + ([rest] if rest else [])


def _grouped(x: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor | None]:
    """(B, C, N) sorted rows -> (B, C, num_groups, max size) and the validity mask."""
    b, c, n = x.shape
    width = max(sizes)
    if all(size == width for size in sizes):
        return x.view(b, c, len(sizes), width), None
    counts = torch.tensor(sizes, device=x.device)
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(width, device=x.device)
    mask = offsets[None, :] < counts[:, None]
    index = (starts[:, None] + offsets[None, :]).clamp(max=n - 1)  # padded slots read any valid element
    return x[..., index], mask


def place_loss(student: Tensor, teacher: Tensor, *, group_size: int = PLACE_GROUP_SIZE, coarse_norm: str = "l2",
               eps: float = FIT_EPS) -> KDTerms:
    """PLACE: per (sample, channel), fit separately on groups of similar error.

    Positions of each (sample, channel) row are ranked by ``(t - s)^2`` ascending (one
    batched ``torch.argsort`` over all rows per call, on detached values: no gradient
    through the ranking, which is recomputed every call) and cut into consecutive groups
    (see :func:`group_sizes`). Gradients still reach every student element through the
    gather of its value into its group. Groups of unequal size share one padded tensor
    with a mask; each counts once in the coarse mean and in ``w``.
    """
    if int(group_size) != group_size or group_size < 1:
        raise UserError(f"group_size must be a positive integer, got {group_size!r}")
    s, t = as_rows(student, teacher)
    with torch.no_grad():
        order = torch.argsort((t - s.detach()).square(), dim=-1)
    sizes = group_sizes(s.shape[-1], int(group_size))
    s_groups, mask = _grouped(torch.gather(s, -1, order), sizes)
    t_groups, _ = _grouped(torch.gather(t, -1, order), sizes)
    return coarse_to_fine_loss(s_groups, t_groups, mask=mask, coarse_norm=coarse_norm, eps=eps)
