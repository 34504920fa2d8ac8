"""Sharded training: FSDP2 and DeepSpeed ZeRO-2, through accelerate's own plugins.

difcompress shards nothing itself. It builds accelerate's ``FullyShardedDataParallelPlugin``
(``fsdp_version=2``; the family names the blocks, each one FSDP unit) or its
``DeepSpeedPlugin`` (ZeRO stage 2) and hands it to the ``Accelerator``, so that
``torchrun --nproc_per_node N -m difcompress distill ... --shard fsdp`` shards the same way
on GPUs and on CPUs. accelerate itself only turns FSDP on for GPU-like devices (its launcher
refuses ``--cpu --use_fsdp``), so on a CPU process group the state it built is switched to
FSDP here (``engage_fsdp_on_cpu``); torch's FSDP2 runs on gloo.

What each engine shards of the student (weights, gradients, optimizer state, EMA):
fsdp all four, 1/N per process; zero2 the gradients and the optimizer state (weights and
EMA replicated). The frozen teacher is replicated by default, or sharded per block with
``--shard-teacher`` (fsdp only). Sharded checkpoints are written with torch distributed
checkpoint (artifacts/checkpoint.py); the final student is gathered once into full tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from difcompress.config import DistillConfig
from difcompress.core.environment import launch_shard_request, launched_processes
from difcompress.core.errors import UserError
from difcompress.families.base import ModelFamily

# Options FSDP cannot run with, and why (one line each).
FSDP_REFUSES = {
    "compile": "--compile (torch.compile around FSDP2's per-block hooks is not supported here)",
    "ema_offload": "--ema-offload (the EMA is already a 1/N shard on each process)",
    "optimizer": "--optimizer adamw-8bit (bitsandbytes' 8-bit state does not shard)",
}


def resolve_shard(config: DistillConfig) -> str:
    """--shard as given, else what accelerate launch (or its config file) asks for, else none."""
    shard = config.shard or launch_shard_request() or "none"
    if shard.startswith("zero") and shard != "zero2":
        raise UserError(f"DeepSpeed ZeRO stage {shard[4:]} was asked for (accelerate launch / config); difcompress "
                        "runs ZeRO-2 (--shard zero2) or FSDP2 (--shard fsdp), which shards the weights too", 2)
    return shard


def check_shard_options(config: DistillConfig, shard: str) -> None:
    """One line for a sharding that cannot run as asked."""
    if shard == "none":
        if config.shard_teacher:
            raise UserError("--shard-teacher needs --shard fsdp", exit_code=2)
        return
    processes = launched_processes()
    if processes < 2:
        raise UserError(f"--shard {shard} needs 2 or more processes: torchrun --nproc_per_node N -m difcompress "
                        f"distill ... --shard {shard} (or accelerate launch on GPUs); one process trains unsharded",
                        exit_code=2)
    if shard == "zero2" and config.shard_teacher:
        raise UserError("--shard-teacher needs --shard fsdp (ZeRO-2 keeps weights whole)", exit_code=2)
    if shard == "zero2":
        _check_zero2(config)
    refused = [why for name, why in FSDP_REFUSES.items() if shard == "fsdp"
               and (getattr(config, name) == "adamw-8bit" if name == "optimizer" else getattr(config, name))]
    if refused:
        raise UserError(f"--shard {shard} cannot run with {refused[0]}", exit_code=2)


def _check_zero2(config: DistillConfig) -> None:
    """What the ZeRO-2 path does not run yet: DeepSpeed steps inside its backward, before
    the feature adapters (outside its engine) have their gradients averaged; it accumulates
    on its own schedule; its partitioned optimizer state is not in difcompress's checkpoints."""
    if config.resolved_w_feat() > 0:
        raise UserError("--shard zero2 cannot run feature KD (--w-feat) yet; use --shard fsdp", exit_code=2)
    if config.gradient_accumulation_steps > 1:
        raise UserError("--shard zero2 cannot run --gradient-accumulation-steps > 1 yet; use --shard fsdp", 2)
    if config.checkpoint_every:
        raise UserError("--shard zero2 writes no checkpoints yet: add --checkpoint-every 0, or use --shard fsdp", 2)


def accelerator_plugins(config: DistillConfig, shard: str) -> dict[str, Any]:
    """The Accelerator keyword arguments that turn the engine on (none: DDP)."""
    if shard == "fsdp":
        # Activation checkpointing is FSDP's own (the model's is not turned on beside it);
        # None leaves accelerate's FSDP_* variables (accelerate config) in charge.
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            activation_checkpointing=config.gradient_checkpointing or None, cpu_ram_efficient_loading=False)}
    if shard == "zero2":
        return {"deepspeed_plugin": _deepspeed_plugin(config)}
    return {}


def _deepspeed_plugin(config: DistillConfig):
    try:
        import deepspeed  # noqa: F401, PLC0415 - optional extra, imported only when asked for
    except ImportError:
        raise UserError("--shard zero2 needs DeepSpeed: pip install 'difcompress[deepspeed]'", 2) from None
    from accelerate.utils import DeepSpeedPlugin  # noqa: PLC0415 - needs deepspeed importable

    return DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1, gradient_clipping=config.grad_clip or None,
                           offload_optimizer_device="none", offload_param_device="none")


def engage_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """accelerate enables FSDP only on accelerator devices; on a CPU (gloo) process group it
    leaves MULTI_CPU. FSDP2 itself runs there: switch the shared state to it."""
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)


def engage_zero2_on_cpu(accelerator: Accelerator, plugin) -> None:
    """The same for DeepSpeed: accelerate starts it only on accelerator devices; on a CPU
    process group (gloo; DeepSpeed's CPU mode, DS_ACCELERATOR=cpu) switch the state to it."""
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return
    plugin.set_mixed_precision(accelerator.mixed_precision)  # DeepSpeed casts itself, as accelerate has it
    state._mixed_precision = "no"
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED


def engine_of(accelerator: Accelerator) -> str:
    """fsdp, zero2 or none: what this accelerator shards with."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "zero2" if accelerator.distributed_type == DistributedType.DEEPSPEED else "none"


def set_fsdp_blocks(accelerator: Accelerator, family: ModelFamily, model: nn.Module) -> bool:
    """Make the family's blocks FSDP units. accelerate's auto-wrap matches classes: where the
    blocks are exactly the modules of their classes it is told those classes (and its
    activation checkpointing follows them). Else (DiT: the first block is read outside its
    forward, so it stays in the root) the named blocks are sharded here, with the plugin's
    settings, and accelerate wraps only the root. Returns whether accelerate's class rule
    (and so its activation checkpointing) applies."""
    plugin = accelerator.state.fsdp_plugin
    blocks = set(family.shard_blocks(model))
    classes = {type(model.get_submodule(name)) for name in blocks}
    if {name for name, m in model.named_modules() if type(m) in classes} == blocks:
        plugin.transformer_cls_names_to_wrap = sorted(c.__name__ for c in classes)
        return True
    plugin.transformer_cls_names_to_wrap = []
    for name in sorted(blocks):
        fully_shard(model.get_submodule(name), reshard_after_forward=plugin.reshard_after_forward,
                    mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
    return False


def set_zero2_batch(accelerator: Accelerator, per_process: int) -> None:
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = per_process
    config["train_batch_size"] = per_process * accelerator.num_processes


def shard_frozen(model: nn.Module, family: ModelFamily) -> None:
    """FSDP2 per block on a frozen model (the teacher): each block all-gathered for its
    forward and freed after, on every process (every process runs every teacher forward)."""
    for name in family.shard_blocks(model):
        fully_shard(model.get_submodule(name))
    fully_shard(model)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (a DTensor counts its local shard)."""
    return sum((t.to_local() if is_sharded(t) else t).numel() * t.element_size() for t in tensors)


def full_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def gather_full(state: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Full tensors of a (sharded) state dict on the CPU, one all-gather per tensor on every
    process; kept only where `keep` (the main process), so the others never hold it whole."""
    out = {}
    for name, tensor in state.items():
        whole = tensor.full_tensor() if is_sharded(tensor) else tensor
        if keep:
            out[name] = whole.detach().to("cpu", copy=True)
    return out


def skeleton_of(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules with every weight on the meta device (no memory), to
    receive the gathered final weights: pruned layouts need not rebuild from a config."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor], live: nn.Module) -> nn.Module:
    """The skeleton on the CPU with `state`'s weights, and the buffers no state dict holds
    (non-persistent ones) copied from the live, sharded model (FSDP leaves buffers whole)."""
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(state, strict=True)
    live_buffers = {name.replace("_checkpoint_wrapped_module.", ""): b for name, b in live.named_buffers()}
    with torch.no_grad():
        for name, buffer in skeleton.named_buffers():
            if name not in state:
                buffer.copy_(live_buffers[name].to("cpu"))
    return skeleton


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's moments (zeros, step 0 after the load) so that a checkpoint
    can be read into them in place: one step with zero gradients and a zero learning rate,
    which leaves the weights unchanged."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr
    for p in params:
        p.grad = None


def unit_count(model: nn.Module) -> int:
    """FSDP units in a sharded model (the blocks plus the root)."""
    return sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))



def checkpointed(model: nn.Module) -> int:
    """Blocks under FSDP's activation checkpointing (wrapped by accelerate)."""
    return sum(1 for m in model.modules() if hasattr(m, "_checkpoint_wrapped_module"))
