"""Size and cost of a denoiser: parameters, MACs, latency, throughput, peak memory."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, family) -> int:
    """Multiply-accumulates of one denoiser call on one sample.

    torch's FlopCounterMode sees convolutions, linears and the attention matmuls, which
    torch-pruning's counter misses. Attention runs on the math kernel while counting: the
    fused CPU kernel has no FLOP formula in torch, so the count would lose the attention
    matmuls on CPU and keep them on CUDA; the math kernel is two counted bmm's everywhere.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**family.example_inputs(model, 1))
    return counter.get_total_flops() // 2


def model_size(model: nn.Module, family) -> dict[str, int]:
    return {"params": count_params(model), "macs": count_macs(model, family)}


def sampling_cost(model: nn.Module, family, *, batch_size: int, steps: int, calls: int = 3,
                  calls_per_step: int = 1) -> dict[str, float]:
    """Sampling latency per image and throughput at `batch_size`, from timed denoiser calls
    (`calls_per_step` = 2 under classifier-free guidance: each step runs a doubled batch).

    A sampler's cost is `steps` denoiser calls (the scheduler update is negligible), so we
    time `calls` calls after a warm-up and scale to `steps`. Peak memory is the CUDA
    allocator's peak on GPU; on CPU, weights plus every activation of one call (an upper bound).
    """
    device = next(model.parameters()).device
    evaluated = batch_size * calls_per_step  # what one sampling step really feeds the denoiser
    inputs = family.example_inputs(model, evaluated)
    with torch.no_grad():
        model(**inputs)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(calls):
            model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_call = (time.perf_counter() - start) / calls
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else peak_activation_bytes_estimate(model, family, evaluated))
    return {
        "latency_s_per_image": per_call * steps / batch_size,
        "throughput_img_s": batch_size / (per_call * steps),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda allocator" if device.type == "cuda" else "cpu estimate",
        "batch_size": batch_size,
        "steps": steps,
        "denoiser_calls_per_step": calls_per_step,
    }


def peak_activation_bytes_estimate(model: nn.Module, family, batch_size: int) -> int:
    """On CPU there is no allocator counter: weights plus the largest live activations of one
    denoiser call, measured by summing module output sizes along the forward pass."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(**family.example_inputs(model, batch_size))
    finally:
        for h in handles:
            h.remove()
    # U-Net skips keep the down path alive; the sum of leaf outputs is an upper bound.
    return weights + sum(sizes)
