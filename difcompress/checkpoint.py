"""Training checkpoints without pickles: safetensors for tensors, JSON for the rest.

A checkpoint is a folder `checkpoints/step-XXXXXXX` written under a temporary name and
renamed when complete. It holds the student, its EMA, the optimizer moments, the RNG
states and the data-stream position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difcompress.errors import UserError
from difcompress.folders import atomic_folder

KEEP_LAST = 2


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    student: nn.Module,
    ema: dict[str, torch.Tensor] | None,
    extra_modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    info: dict[str, Any],
) -> Path:
    root = run_dir / "checkpoints"
    target = root / f"step-{step:07d}"
    with atomic_folder(target) as tmp:
        save_file(_cpu(student.state_dict()), tmp / "student.safetensors")
        if ema is not None:
            save_file(_cpu(ema), tmp / "ema.safetensors")
        for name, module in extra_modules.items():
            save_file(_cpu(module.state_dict()), tmp / f"{name}.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**info, "step": step, "optimizer": opt_meta}, indent=2))
    for old in sorted(root.glob("step-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    *,
    student: nn.Module,
    extra_modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    try:
        info = json.loads((path / "state.json").read_text())
        student.load_state_dict(load_file(path / "student.safetensors"))
        for name, module in extra_modules.items():
            module.load_state_dict(load_file(path / f"{name}.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), info["optimizer"]))
        rng = load_file(path / "rng.safetensors")
        ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    except (OSError, KeyError, RuntimeError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {path} cannot be resumed: {str(err).splitlines()[0]}") from None
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    return info, ema


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
