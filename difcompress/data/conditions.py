"""Conditions: what a denoiser reads besides its noisy sample and timestep, as named tensors.

A family names them as its denoiser's forward does (``class_labels`` for a DiT,
``encoder_hidden_states`` for Stable Diffusion; SDXL adds pooled text and time ids). Each
tensor has one row per sample. The data layer batches and caches them without knowing the
names; a family's *null* conditions hold only the names that classifier-free guidance drops
(one row each), so a condition that never drops (SDXL's time ids) is simply absent there.
"""

from __future__ import annotations

import torch

Conditions = dict[str, torch.Tensor]


def take(conditions: Conditions | None, index: torch.Tensor | slice) -> Conditions | None:
    """The rows at `index` of every condition."""
    return None if conditions is None else {name: value[index] for name, value in conditions.items()}


def concat(first: Conditions | None, second: Conditions | None) -> Conditions | None:
    """Two batches of conditions, one after the other."""
    return None if first is None else {name: torch.cat([value, second[name]]) for name, value in first.items()}


def repeat(conditions: Conditions | None, times: int) -> Conditions | None:
    """Every row `times` times over, whole batch after whole batch."""
    return None if conditions is None else {n: v.repeat(times, *([1] * (v.dim() - 1))) for n, v in conditions.items()}


def drop(conditions: Conditions | None, null: Conditions | None, dropped: torch.Tensor) -> Conditions | None:
    """Rows where `dropped` is true take the null condition of every name the null holds
    (the one function that drops a condition, for guidance training and for sampling). The
    result takes the wider dtype of the two: fp16-cached encodings with an fp32 null stay exact."""
    if conditions is None or not null:
        return conditions
    out = dict(conditions)
    for name, empty in null.items():
        value = conditions[name]
        mask = dropped.to(value.device).view(-1, *([1] * (value.dim() - 1)))
        out[name] = torch.where(mask, empty.to(value.device), value)
    return out


def to(conditions: Conditions | None, device: torch.device | str, dtype: torch.dtype | None = None
       ) -> Conditions | None:
    """On `device`; floating-point conditions (text encodings) in `dtype` when given."""
    if conditions is None:
        return None
    return {n: v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for n, v in conditions.items()}
