"""The objectives LIFT and PLACE are compared against: the denoising task loss, output MSE
and DIST (Pearson-correlation KD). Same conventions as core.py: pure, teacher detached."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difcompress.objectives.core import KDTerms, as_rows, compute_dtype, no_autocast


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error in at least float32, outside any autocast region."""
    dtype = compute_dtype(x, y)
    with no_autocast(x.device.type):
        return F.mse_loss(x.to(dtype), y.to(dtype))


def task_loss(prediction: Tensor, target: Tensor) -> KDTerms:
    """Denoising loss against the true target (noise / v / x0): plain MSE, no teacher.

    This is how Diff-Pruning fine-tunes; ``target`` carries no gradient by nature.
    """
    loss = mse(prediction, target.detach())
    return KDTerms(loss=loss, logs={"loss": loss.detach()})


def mse_loss(student: Tensor, teacher: Tensor) -> KDTerms:
    """Output KD: mean squared error between student and (detached) teacher outputs."""
    loss = mse(student, teacher.detach())
    return KDTerms(loss=loss, logs={"loss": loss.detach()})


def _pearson(x: Tensor, y: Tensor, dim: int, eps: float) -> Tensor:
    xc = x - x.mean(dim, keepdim=True)
    yc = y - y.mean(dim, keepdim=True)
    return (xc * yc).sum(dim) / (xc.norm(dim=dim) * yc.norm(dim=dim) + eps)


def dist_loss(student: Tensor, teacher: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
              eps: float = 1e-8) -> KDTerms:
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
    s, t = as_rows(student, teacher)
    s = s.flatten(1)
    t = t.flatten(1)
    with no_autocast(s.device.type):
        inter = (1.0 - _pearson(s, t, dim=1, eps=eps)).mean()
        if s.shape[0] >= 2:
            intra = (1.0 - _pearson(s, t, dim=0, eps=eps)).mean()
        else:
            intra = torch.zeros((), dtype=s.dtype, device=s.device)
        loss = beta * inter + gamma * intra
    return KDTerms(loss=loss, logs={"loss": loss.detach(), "inter": inter.detach(), "intra": intra.detach()})
