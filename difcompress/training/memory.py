"""An estimate of a distill run's peak accelerator memory, made before the run.

Counted from parameter counts: the student's fp32 weights, its optimizer state (Adam/AdamW
two fp32 moments; 8-bit AdamW two bytes), the EMA copy (none when offloaded to the CPU),
the teacher's weights in its dtype. Measured: everything one training step allocates
(activations kept for the backward pass, gradients, the teacher's forward, the features KD
compares), by running the step on the meta device (no memory, no compute) under a dispatch
mode that adds each new storage when it is made and subtracts it when it is freed, at
micro-batches 1 and 2, extrapolated linearly to the real micro-batch. Mixed precision
halves the per-sample part, which under-counts a little (autocast keeps norms and softmax in
fp32). Not counted: the allocator's fragmentation and kernel workspaces.

Checked against BK-SDM's published figures (SD-1.4 U-Net teacher in fp16, BK-SDM-Base
student, fp16, gradient checkpointing, EMA, AdamW; their README): micro-batch 16, 28 GB
published, 25.1 GiB estimated; micro-batch 64, 53 GB published, 63.4 GiB estimated. (Up
to the flow-transformer issue a view of a weight, such as a linear layer's transposed
weight, counted as a new allocation of the whole weight: 27.9 and 65.3 GiB then.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from difcompress.config import DistillConfig
from difcompress.core.environment import DTYPES
from difcompress.diffusion.inputs import cast_floating
from difcompress.metrics.cost import LiveStorageBytes, denoiser_inputs, meta_copy
from difcompress.training.feature_taps import tap_point, tapped

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adam": 8, "adamw-8bit": 2}
LARGEST_GPU_BYTES = 80 * 10**9  # an 80 GB card (A100 / H100), the largest one process commonly has


def fit_note(total_bytes: int) -> str | None:
    """One line when the estimate cannot fit one 80 GB GPU unsharded: where to go instead."""
    if total_bytes <= LARGEST_GPU_BYTES:
        return None
    return (f"about {total_bytes / 10**9:.0f} GB per process does not fit one 80 GB GPU unsharded: shard the "
            "student, its optimizer state and the teacher over several GPUs with --shard fsdp (FSDP2 through "
            "accelerate)")


def _step_bytes(family, student: nn.Module, teacher: nn.Module | None, batch: int, text_tokens: int | None,
                feature_pairs: list[tuple[str, str]]) -> int:
    """Peak bytes one training step allocates at `batch` (student and teacher on meta)."""
    inputs = denoiser_inputs(family, student, batch, text_tokens)
    kept: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    hooks = []
    for role, model, names in (("student", student, [s for s, _ in feature_pairs]),
                               ("teacher", teacher, [t for _, t in feature_pairs])):
        for name in names if model is not None else []:
            module, which = tap_point(name)
            hooks.append(model.get_submodule(module).register_forward_hook(
                lambda _m, _i, out, role=role, which=which: kept[role].append(tapped(out, which))))
    existing = [t for model in (student, teacher) if model is not None
                for t in (*model.parameters(), *model.buffers())] + tree_leaves(inputs)
    tracker = LiveStorageBytes(t for t in existing if isinstance(t, torch.Tensor))
    try:
        with tracker:
            target = 0.0
            if teacher is not None:
                dtype = next(teacher.parameters()).dtype
                with torch.no_grad():
                    target = _prediction(teacher(**cast_floating(inputs, dtype))).float()
            loss = (_prediction(student(**inputs)) - target).pow(2).mean()
            for s, t in zip(kept["student"], kept["teacher"]):
                loss = loss + s.float().pow(2).mean() + t.float().mean()  # the taps stay alive until backward
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    student.zero_grad(set_to_none=True)
    return tracker.peak


def _prediction(output) -> torch.Tensor:
    """A denoiser's output sample; Z-Image's is a list of per-sample tensors."""
    sample = output.sample
    return torch.stack(sample) if isinstance(sample, list) else sample


def estimate_distill_memory(config: DistillConfig, family, student: nn.Module, teacher: nn.Module | None, *,
                            micro_batch: int, feature_pairs: list[tuple[str, str]], text_tokens: int | None = None
                            ) -> dict[str, Any]:
    """Peak memory of one process of the distill run `config` describes, in bytes per part
    (see the module note)."""
    mixed_precision, gradient_checkpointing = config.mixed_precision, config.gradient_checkpointing
    teacher_dtype, optimizer = config.teacher_dtype, config.optimizer
    ema, ema_offload = config.ema_decay > 0, config.ema_offload
    params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    student_meta = meta_copy(student).train()
    teacher_meta = None if teacher is None else meta_copy(teacher, DTYPES[teacher_dtype or "fp32"]).eval()
    if gradient_checkpointing:
        student_meta.enable_gradient_checkpointing()
    one, two = (_step_bytes(family, student_meta, teacher_meta, b, text_tokens, feature_pairs) for b in (1, 2))
    per_sample = (two - one) * (0.5 if mixed_precision in ("fp16", "bf16") else 1.0)
    parts = {
        "student weights (fp32)": params * 4,
        f"optimizer state ({optimizer})": params * OPTIMIZER_BYTES_PER_PARAM[optimizer],
        "EMA weights": params * 4 if ema and not ema_offload else 0,
        f"teacher weights ({teacher_dtype or 'fp32'})": teacher_params * DTYPES[teacher_dtype or "fp32"].itemsize,
        f"one step at micro-batch {micro_batch} (activations, gradients, teacher forward)":
            int(one - (two - one) + per_sample * micro_batch),
    }
    total = sum(parts.values())
    return {"parts": parts, "total_bytes": total, "micro_batch": micro_batch, "fit": fit_note(total),
            "gradient_checkpointing": gradient_checkpointing, "mixed_precision": mixed_precision or "no",
            "student_params": params}


# What each layout divides by the process count: (student weights, gradients, optimizer
# state, EMA, teacher weights).
SHARDED_PARTS = {"none": (0, 0, 0, 0, 0), "zero2": (0, 1, 1, 0, 0), "fsdp": (1, 1, 1, 1, 0),
                 "fsdp --shard-teacher": (1, 1, 1, 1, 1)}
PROCESS_COUNTS = (1, 8, 16)


def per_process_under_sharding(memory: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The estimate's per-process total under each sharding at 1, 8 and 16 processes: the
    student's fp32 weights, gradients, optimizer state and EMA (and with --shard-teacher the
    teacher) divided by the process count where the engine shards them, activations never.
    ZeRO-2 (more than one process) also keeps fp32 master weights, split like the optimizer
    state, beside whole weights in the training precision (bf16/fp16 under mixed precision).
    Not counted: the one block FSDP holds gathered at a time, communication buffers."""
    weights, optimizer, ema, teacher, step = memory["parts"].values()
    params = memory["student_params"]
    gradients = params * 4  # fp32, inside the measured step
    activations = step - gradients
    low_precision = memory["mixed_precision"] in ("fp16", "bf16")

    def total(layout: str, divided: tuple[int, ...], n: int) -> int:
        whole = weights
        if layout == "zero2" and n > 1:
            whole = params * (2 if low_precision else 4) + params * 4 / n
        parts = (whole, gradients, optimizer, ema, teacher)
        return int(activations + sum(part / n if split else part for part, split in zip(parts, divided)))

    return {layout: {str(n): total(layout, divided, n) for n in PROCESS_COUNTS}
            for layout, divided in SHARDED_PARTS.items()}
