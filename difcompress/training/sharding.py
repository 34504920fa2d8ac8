"""Sharded training: FSDP2 and DeepSpeed ZeRO-2, through accelerate's own plugins.

difcompress shards nothing itself. It builds accelerate's ``FullyShardedDataParallelPlugin``
(``fsdp_version=2``; the family names the blocks, each one FSDP unit) or its
``DeepSpeedPlugin`` (ZeRO stage 2) and hands it to the ``Accelerator``, so that
``torchrun --nproc_per_node N -m difcompress distill ... --shard fsdp`` shards the same way
on GPUs and on CPUs. accelerate itself only turns FSDP on for GPU-like devices (its launcher
refuses ``--cpu --use_fsdp``), so on a CPU process group the state it built is switched to
FSDP here (``engage_on_cpu``); torch's FSDP2 runs on gloo.

What each engine shards of the student (weights, gradients, optimizer state, EMA):
fsdp all four, 1/N per process; zero2 the gradients and the optimizer state (weights and
EMA replicated). The frozen teacher is replicated by default, or sharded per block with
``--shard-teacher`` (fsdp only). Sharded checkpoints are written with torch distributed
checkpoint (artifacts/checkpoint.py); the final student is gathered once into full tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from difcompress.artifacts.checkpoint import flatten_optimizer, unflatten_optimizer
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
    refused = [why for name, why in FSDP_REFUSES.items() if shard == "fsdp"
               and (getattr(config, name) == "adamw-8bit" if name == "optimizer" else getattr(config, name))]
    if refused:
        raise UserError(f"--shard {shard} cannot run with {refused[0]}", exit_code=2)


def check_zero2_adapters(adapters: nn.Module) -> None:
    """DeepSpeed's optimizer takes only the prepared model's named parameters, and clips them
    alone: feature adapters (student and teacher widths differ) cannot train beside it."""
    if any(True for _ in adapters.parameters()):
        raise UserError("--shard zero2 cannot train feature adapters (the student's features are narrower than the "
                        "teacher's: pruned widths); use --shard fsdp, or feature KD at equal widths (depth pruning)", 2)


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

    # gradient_clipping 0.0, not None: None means "auto", which accelerate fills with 1.0.
    return DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=config.gradient_accumulation_steps,
                           gradient_clipping=float(config.grad_clip), offload_optimizer_device="none",
                           offload_param_device="none")


def engage_on_cpu(accelerator: Accelerator, plugins: dict[str, Any]) -> None:
    """Start the engine `plugins` (from accelerator_plugins) asks for where accelerate itself
    would not: on CPU processes (gloo)."""
    if "fsdp_plugin" in plugins:
        _engage_fsdp_on_cpu(accelerator, plugins["fsdp_plugin"])
    if "deepspeed_plugin" in plugins:
        _engage_zero2_on_cpu(accelerator, plugins["deepspeed_plugin"])


def _engage_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """accelerate enables FSDP only on accelerator devices; on a CPU (gloo) process group it
    leaves MULTI_CPU. FSDP2 itself runs there: switch the shared state to it."""
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    _set_distributed_type(state, DistributedType.FSDP)
    state.fsdp_plugin = plugin
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)


def _engage_zero2_on_cpu(accelerator: Accelerator, plugin) -> None:
    """The same for DeepSpeed: accelerate starts it only on accelerator devices; on a CPU
    process group (gloo; DeepSpeed's CPU mode, DS_ACCELERATOR=cpu) switch the state to it."""
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return
    plugin.set_mixed_precision(accelerator.mixed_precision)  # DeepSpeed casts itself, as accelerate has it
    state._mixed_precision = "no"
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    _set_distributed_type(state, DistributedType.DEEPSPEED)


def _set_distributed_type(state, kind: DistributedType) -> None:
    """Set it where accelerate keeps it: AcceleratorState copies PartialState's shared state
    each time one is built (accelerate builds them inside prepare and elsewhere), so a value
    set on the AcceleratorState alone reverts to MULTI_CPU; accelerate's own init writes both."""
    state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind


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


def prepare_zero2(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, per_process: int
                  ) -> tuple[nn.Module, Any]:
    """accelerate's prepare under DeepSpeed ZeRO-2. DeepSpeed's config names the batch it
    steps on (difcompress has no dataloader for accelerate to read it from). Under mixed
    precision DeepSpeed casts the student to bf16/fp16 and makes its fp32 master weights
    from that copy; they are set from the fp32 student instead, so training starts from the
    student's own weights, as unsharded."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = per_process // config["gradient_accumulation_steps"]
    config["train_batch_size"] = per_process * accelerator.num_processes
    low_precision = any(config.get(kind, {}).get("enabled") is True for kind in ("bf16", "fp16"))
    fp32 = {name: p.detach().clone() for name, p in model.named_parameters()} if low_precision else {}
    engine, optimizer = accelerator.prepare(model, optimizer)
    if fp32:
        from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415 - optional extra, only under zero2

        for name, p in accelerator.unwrap_model(engine).named_parameters():
            safe_set_full_fp32_param(p, fp32.pop(name).to(p.device))
    return engine, optimizer


# DeepSpeed ZeRO optimizer state_dict keys that are not plain JSON: the fp32 master
# partitions and the base optimizer's moments (tensors), its loss scaler (an object, of
# which the numbers are kept), and the fragment map for its "universal" checkpoint
# conversion (not used: difcompress checkpoints resume on as many processes).
ZERO_TENSORS, ZERO_BASE, ZERO_SCALER, ZERO_UNUSED = ("single_partition_of_fp32_groups", "base_optimizer_state",
                                                     "loss_scaler", "param_slice_mappings")


def zero2_optimizer_state(optimizer) -> dict[str, Any]:
    """This process's part of DeepSpeed's ZeRO-2 optimizer (behind accelerate's wrapper) as
    {"tensors", "meta"}: safetensors and JSON, no pickle."""
    state = dict(optimizer.optimizer.state_dict())
    state.pop(ZERO_UNUSED, None)
    scaler = state.pop(ZERO_SCALER)
    base_tensors, base_meta = flatten_optimizer(state.pop(ZERO_BASE), move=False)
    tensors = {f"fp32.{i}": t for i, t in enumerate(state.pop(ZERO_TENSORS))}
    tensors |= {f"base.{name}": t for name, t in base_tensors.items()}
    numbers = {k: float(v) if torch.is_tensor(v) else v for k, v in vars(scaler).items()
               if isinstance(v, (bool, int, float)) or (torch.is_tensor(v) and v.dim() == 0)}
    return {"tensors": tensors, "meta": {**state, "base": base_meta, "scaler": numbers}}


def zero2_optimizer_bytes(optimizer) -> int:
    """Bytes of optimizer state this process holds under ZeRO-2: its fp32 master partitions
    and the moments over them."""
    zero = optimizer.optimizer
    moments = [t for slots in zero.optimizer.state.values() for t in slots.values() if torch.is_tensor(t) and t.dim()]
    return local_bytes([*zero.single_partition_of_fp32_groups, *moments])


def load_zero2_optimizer_state(optimizer, part: dict[str, Any]) -> None:
    """Read `part` (zero2_optimizer_state on this process, as many processes ago) back in,
    the fp32 master partitions included (exact under mixed precision too)."""
    zero, meta, tensors = optimizer.optimizer, dict(part["meta"]), part["tensors"]
    for name, value in meta.pop("scaler").items():
        current = getattr(zero.loss_scaler, name)
        setattr(zero.loss_scaler, name, torch.tensor(value, dtype=current.dtype, device=current.device)
                if torch.is_tensor(current) else value)
    groups = sorted((k for k in tensors if k.startswith("fp32.")), key=lambda k: int(k.split(".")[1]))
    base = unflatten_optimizer({k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")},
                               meta.pop("base"))
    state = {**meta, ZERO_SCALER: zero.loss_scaler, ZERO_BASE: base, ZERO_TENSORS: [tensors[k] for k in groups]}
    per_rank = [None] * dist.get_world_size()
    per_rank[dist.get_rank()] = state  # DeepSpeed reads its own rank's entry of a same-size checkpoint
    zero.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)


def zero2_master_weights(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The fp32 master weights DeepSpeed keeps in per-process partitions when it trains a
    bf16/fp16 copy of the student, whole on the CPU where `keep` (the main process; empty on
    the others, which never hold them whole). A collective: one all-reduce per weight."""
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415 - optional extra, only under zero2

    out = {}
    for name, p in model.named_parameters():
        whole = safe_get_full_fp32_param(p)
        if keep:
            out[name] = whole.detach().cpu()
    return out


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
