"""Size and cost of a denoiser: parameters, MACs, latency, throughput, peak memory; and the
peak inference memory of a whole pipeline per weight scheme, measured on the meta device."""

from __future__ import annotations

import copy
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from difcompress.artifacts.quantize import stored_linear_bytes
from difcompress.core.console import quiet_diffusers


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


# ---- memory measured on the meta device ------------------------------------------------------
class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the storages ops create that are still alive, and their peak: run a model on
    the meta device under it (no memory, no compute) to measure what it allocates."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for tensor in existing:  # already there (weights): a view of one (a linear's weight.t()) is no allocation
            self._seen[tensor.untyped_storage()] = 0

    def _freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:  # views and in-place results share a storage
                    self._seen[storage] = size = storage.nbytes()
                    self.live += size
                    weakref.finalize(storage, self._freed, size)
        self.peak = max(self.peak, self.live)
        return out


class _FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as the GPU's fused kernels (flash, memory-efficient) run it
    at inference: they allocate the output, never the (tokens x tokens) scores that the math
    kernel the meta device runs would (2 GiB for one head of SDXL's 128 x 128 VAE attention)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            named = {**dict(zip(("query", "key", "value"), args)), **(kwargs or {})}
            query, value = named["query"], named["value"]
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **(kwargs or {}))


def denoiser_inputs(family, model: nn.Module, batch_size: int, text_tokens: int | None = None) -> dict[str, Any]:
    """The family's example inputs at `batch_size`, with prompts of `text_tokens` tokens (the
    text encoder's window) where the denoiser reads encoded text."""
    inputs = family.example_inputs(model, batch_size)
    return family.with_text_tokens(inputs, text_tokens) if text_tokens else inputs


def meta_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `module` on the meta device, in `dtype` when given (shapes only: its tensors
    are never copied, so a full-size model costs nothing)."""
    memo = {id(t): torch.empty_like(t, device="meta") for t in [*module.parameters(), *module.buffers()]}
    memo.update({id(p): nn.Parameter(memo[id(p)], requires_grad=p.requires_grad) for p in module.parameters()})
    copied = copy.deepcopy(module, memo)
    if dtype is None:
        return copied
    with quiet_diffusers():  # diffusers warns about any .to(dtype)
        return copied.to(dtype=dtype)


def forward_peak_bytes(call: Callable[[], Any], existing: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes `call` allocates beyond the `existing` tensors (a forward on meta modules,
    their weights existing, without gradients, attention as the fused kernels allocate it)."""
    tracker = LiveStorageBytes(existing)
    with torch.no_grad(), _FusedAttention(), tracker:
        call()
    return tracker.peak


def stored_weight_bytes(model: nn.Module, element_bytes: int, scheme: str | None = None) -> int:
    """Bytes of `model`'s parameters stored at `element_bytes` each, its nn.Linear weights in
    `scheme`'s layout (artifacts/quantize.py) when one is given."""
    linears = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)} if scheme else {}
    total = 0
    for parameter in model.parameters():
        linear = linears.get(id(parameter))
        total += (stored_linear_bytes(linear.out_features, linear.in_features, scheme, element_bytes) if linear
                  else parameter.numel() * element_bytes)
    return total


def largest_linear_bytes(model: nn.Module, element_bytes: int) -> int:
    """The largest nn.Linear weight at `element_bytes`: what a quantized layer's forward
    dequantizes for a moment where no low-bit kernel runs it."""
    return max((m.weight.numel() * element_bytes for m in model.modules() if isinstance(m, nn.Linear)), default=0)


# Consumer GPU memory sizes the estimate is compared with, and what the CUDA context and
# library workspaces take of a card before any tensor (typical, not measured here).
GPU_SIZES_GB = (8, 12, 16, 24)
RUNTIME_RESERVE_BYTES = 512 * 2**20


@dataclass
class InferencePart:
    """One pipeline component for the inference estimate: its module, the call one generation
    makes of it (on its meta copy; None for weights only) and whether the scheme applies."""

    name: str
    module: nn.Module
    run: Callable[[nn.Module], Any] | None
    quantized: bool = False


def inference_memory(parts: list[InferencePart], dtype: torch.dtype, scheme: str | None = None) -> dict[str, Any]:
    """Estimated peak memory of one generation with every part resident (diffusers' default:
    no offloading): all weights in `dtype` (the quantized parts' linear weights in `scheme`),
    plus the largest peak of one stage (text encoding, one denoiser step, VAE decoding), each
    measured on the meta device; and the consumer GPU sizes (GB, as sold: GiB) it fits."""
    element = dtype.itemsize
    weights = {p.name: stored_weight_bytes(p.module, element, scheme if p.quantized else None) for p in parts}
    stages = {}
    for part in parts:
        if part.run is None:
            continue
        meta = meta_copy(part.module, dtype).eval()
        stages[part.name] = forward_peak_bytes(lambda: part.run(meta), [*meta.parameters(), *meta.buffers()])
        if scheme and part.quantized:
            stages[part.name] += largest_linear_bytes(part.module, element)
    peak = sum(weights.values()) + max(stages.values(), default=0)
    return {"scheme": scheme, "weight_bytes": sum(weights.values()), "weights": weights, "stage_peaks": stages,
            "peak_bytes": peak, "fits_gb": [g for g in GPU_SIZES_GB if peak + RUNTIME_RESERVE_BYTES <= g * 2**30]}
