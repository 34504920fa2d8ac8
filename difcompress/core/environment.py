"""The process's environment: which device, whether a launcher started it, seeding, and
the version stamp every output folder records."""

from __future__ import annotations

import os
import random
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from difcompress.core.errors import UserError

# The dtype names the options take (--dtype, --teacher-dtype), as torch dtypes.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """auto (the GPU when there is one), cpu, cuda, cuda:N or mps; a device this machine does
    not have is one clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N", exit_code=2) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N", exit_code=2)
    return dev


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started: its WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True under `accelerate launch` / torchrun with more than one process (a lone RANK, as
    some job pods set, is not a launch)."""
    return launched_processes() > 1


def launch_shard_request() -> str | None:
    """The sharding accelerate launch asks for (--use_fsdp / --use_deepspeed, or the same keys
    of an `accelerate config` file, which the launcher turns into these variables)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    return None


def deepspeed_on_the_cpu_quietly() -> None:
    """Where DeepSpeed is installed, accelerate imports it on every run; on a machine without
    a GPU its device detection then prints a warning on stdout (breaking --json). Naming the
    CPU, as DeepSpeed's CPU mode needs anyway, skips the detection."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def is_main_process() -> bool:
    """Whether this process writes shared outputs (rank 0, or no launcher)."""
    return not launched() or int(os.environ.get("RANK", "0")) == 0


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set: nothing may be downloaded or uploaded."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("difcompress", "torch", "diffusers", "torch-pruning", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
