"""Training checkpoints without pickles: safetensors for tensors, JSON for the rest.

A checkpoint is a folder `checkpoints/step-XXXXXXX` written under a temporary name and
renamed when complete. It holds the student, its EMA, the feature adapters, the optimizer
moments, the RNG states, the learning-rate schedule and the data-stream position, so a
resumed run continues bit for bit.

Under FSDP the state is in shards: the student, its EMA, the adapters and the optimizer
moments are written by torch distributed checkpoint (DCP), every process its own shards
into the same temporary folder, which the main process renames once all are written (a
kill -9 mid-write leaves the previous checkpoint as it was). DCP reads them back into any
sharding (or into whole tensors), so such a checkpoint resumes on another number of
processes. DCP writes them through its safetensors storage (`shards/`, one file per
process, each tensor's offsets in the file's header): no pickled index, as everywhere else.

Under DeepSpeed ZeRO-2 only the optimizer state is split: the main process writes the
whole student as usual and every process its own part of the optimizer
(`optimizer-<rank>.safetensors`, its JSON in the file's metadata), so such a checkpoint
resumes on as many processes as wrote it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import (
    CheckpointException,
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)

from difcompress.core.environment import is_main_process
from difcompress.core.errors import UserError
from difcompress.core.files import atomic_folder, disk_errors, remove, write_error


@dataclass
class Checkpoint:
    """A distill run's whole state (what `Trainer.state_dict()` returns): named module state
    dicts (student, ema, adapters), the optimizer's state dict, the RNG states, and plain
    values (data-stream position, lr schedule, grad scaler)."""

    step: int
    modules: dict[str, dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    sharded: bool = False  # modules and optimizer hold shards (DTensors): written by DCP on every process
    # The optimizer is this process's part, {"tensors": ..., "meta": ...}: each process writes its own (ZeRO-2).
    optimizer_per_process: bool = False

# DCP's safetensors shards: a checkpoint folder holding them is a sharded checkpoint.
SHARDS = "shards"


def flatten_optimizer(state: dict[str, Any], move: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer tensors by `index.slot` (on the CPU, or left in place when not `move`) and
    the JSON rest."""
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous() if move else value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(run_dir: Path, state: Checkpoint, *, info: dict[str, Any], keep: int | None = None) -> Path:
    """Write `checkpoints/step-XXXXXXX` atomically, with `info` (the run's identity) beside
    the state; `keep` old checkpoints stay (None: all of them). A sharded state: every process calls it."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{state.step:07d}"
    if state.sharded or state.optimizer_per_process:
        (_save_sharded if state.sharded else _save_optimizer_per_process)(target, state, info)
        _remove_old(run_dir, keep)
        return target
    tensors = {name: _cpu(modules) for name, modules in state.modules.items()}
    opt_tensors, opt_meta = flatten_optimizer(state.optimizer)
    with atomic_folder(target, needed_bytes=_bytes(*tensors.values(), opt_tensors)) as tmp:
        _write_modules(tmp, tensors)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        _write_rng_and_state(tmp, state, info, opt_meta)
    _remove_old(run_dir, keep)
    return target


def _bytes(*groups: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for group in groups for t in group.values())


def _write_modules(folder: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, module_state in tensors.items():
        save_file(module_state, folder / f"{name}.safetensors")


def _write_rng_and_state(folder: Path, state: Checkpoint, info: dict[str, Any], optimizer_meta: dict[str, Any]) -> None:
    save_file(_cpu(state.rng), folder / "rng.safetensors")
    (folder / "state.json").write_text(json.dumps({**info, **state.info, "step": state.step,
                                                   "optimizer": optimizer_meta}, indent=2))


def _remove_old(run_dir: Path, keep: int | None) -> None:
    if keep is not None and is_main_process():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _save_sharded(target: Path, state: Checkpoint, info: dict[str, Any]) -> None:
    """DCP on every process (its shards), then the main process adds the RNG states and state.json."""
    opt_tensors, opt_meta = flatten_optimizer(state.optimizer, move=False)
    tensors = {**state.modules, "optimizer": opt_tensors}

    def write(tmp: Path) -> None:
        with _dcp_disk_errors(tmp):
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
        if dist.get_rank() == 0:
            _write_rng_and_state(tmp, state, info, opt_meta)

    _write_on_every_process(target, _bytes(*tensors.values()), write)


def _save_optimizer_per_process(target: Path, state: Checkpoint, info: dict[str, Any]) -> None:
    """Every process its optimizer part; the main process adds the student, EMA, adapters,
    RNG states and state.json."""
    main, rank = dist.get_rank() == 0, dist.get_rank()
    tensors = {name: _cpu(modules) for name, modules in state.modules.items()} if main else {}
    part = _cpu(state.optimizer["tensors"])

    def write(tmp: Path) -> None:
        save_file(part, tmp / f"optimizer-{rank}.safetensors", metadata={"meta": json.dumps(state.optimizer["meta"])})
        if main:
            _write_modules(tmp, tensors)
            _write_rng_and_state(tmp, state, info, {"per_process": dist.get_world_size()})

    _write_on_every_process(target, _bytes(*tensors.values(), part), write)


def _write_on_every_process(target: Path, needed_bytes: int, write: Callable[[Path], None]) -> None:
    """`write(folder)` on every process into the main process's temporary folder for
    `target`, renamed once every process has written its files. If any process cannot (a
    full disk on one of them), every process raises its one error line and the main process
    removes the folder: none is left waiting at a collective for files that never come."""
    main = dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        shared = [None, None]  # the temporary folder, or why the main process could not make one
        if main:
            try:
                shared[0] = str(stack.enter_context(atomic_folder(target, needed_bytes=needed_bytes)))
            except UserError as err:
                shared[1] = str(err)
        dist.broadcast_object_list(shared, src=0)
        if shared[1]:
            raise UserError(shared[1])
        failed = None
        try:
            with disk_errors(Path(shared[0]), needed_bytes):
                write(Path(shared[0]))
        except UserError as err:
            failed = str(err)
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failed)
        reason = next((f for f in failures if f), None)
        if reason:
            raise UserError(reason)
    dist.barrier()  # every process returns once the main one has renamed the folder


def _first_failure(err: CheckpointException) -> BaseException:
    return next(iter(err.failures.values()))[0]


@contextlib.contextmanager
def _dcp_disk_errors(folder: Path) -> Iterator[None]:
    """DCP raises a failure of any process on every process, wrapped in a CheckpointException
    (a BaseException): a full disk among them becomes the one line it is elsewhere."""
    try:
        yield
    except CheckpointException as err:
        converted = write_error(folder, _first_failure(err))
        if converted is None:
            raise
        raise converted from None


def _load_optimizer_part(path: Path) -> dict[str, Any]:
    """This process's optimizer part of a ZeRO-2 checkpoint."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    part = path / f"optimizer-{rank}.safetensors"
    with safe_open(part, framework="pt") as f:
        return {"tensors": {k: f.get_tensor(k) for k in f.keys()}, "meta": json.loads(f.metadata()["meta"])}


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDS).is_dir()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*[0-9]") if p.is_dir())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_checkpoint_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoints (`.step-*.tmp-*`, `.step-*.old-*`) left by a killed
    run; call only while holding the run's lock, so that no live process owns them."""
    for debris in (Path(run_dir) / "checkpoints").glob(".step-*"):
        remove(debris)


def read_checkpoint_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:  # ValueError: damaged JSON or not UTF-8
        raise UserError(f"checkpoint {path} cannot be resumed: {_first_line(err)}") from None


def load_checkpoint(path: Path, like: Checkpoint | None = None) -> Checkpoint:
    """The state a checkpoint folder holds (its info: everything state.json records). A
    sharded one is read into `like`'s tensors in place (sharded or whole: DCP reshards)."""
    info = read_checkpoint_info(path)
    if is_sharded_checkpoint(path):
        return _load_sharded(path, info, like)
    per_process = "per_process" in info["optimizer"]
    try:
        modules = {p.stem: load_file(p) for p in path.glob("*.safetensors")
                   if p.stem != "rng" and not p.stem.startswith("optimizer")}
        optimizer = _load_optimizer_part(path) if per_process else \
            unflatten_optimizer(load_file(path / "optimizer.safetensors"), info["optimizer"])
        rng = load_file(path / "rng.safetensors")
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"checkpoint {path} cannot be resumed: {_first_line(err)}") from None
    return Checkpoint(info["step"], modules, optimizer, rng, info, optimizer_per_process=per_process)


def _load_sharded(path: Path, info: dict[str, Any], like: Checkpoint | None) -> Checkpoint:
    if like is None:
        raise UserError(f"checkpoint {path} is sharded (torch distributed checkpoint): resume it with distill", 2)
    opt_tensors, _ = flatten_optimizer(like.optimizer, move=False)
    tensors = {**{name: dict(module) for name, module in like.modules.items()}, "optimizer": opt_tensors}
    try:
        with warnings.catch_warnings():  # DCP warns that one process reads alone, which is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)),
                     no_dist=not dist.is_initialized())
        rng = load_file(path / "rng.safetensors")
        optimizer = unflatten_optimizer(tensors.pop("optimizer"), info["optimizer"])
    except CheckpointException as err:  # a damaged or mismatched shard, on every process
        raise UserError(f"checkpoint {path} cannot be resumed: {_first_line(_first_failure(err))}") from None
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"checkpoint {path} cannot be resumed: {_first_line(err)}") from None
    return Checkpoint(info["step"], tensors, optimizer, rng, info, sharded=like.sharded)


def load_final_weights(path: Path, model: nn.Module) -> str:
    """Load into `model` the weights a checkpoint's run would publish as its student (its
    EMA where the run keeps one), from whole files or from DCP's shards (read whole, by one
    process); returns which were loaded, "ema" or "student"."""
    try:
        if not is_sharded_checkpoint(path):
            kept = "ema" if (path / "ema.safetensors").is_file() else "student"
            model.load_state_dict(load_file(path / f"{kept}.safetensors"))
            return kept
        stored = HuggingFaceStorageReader(str(path / SHARDS)).read_metadata().state_dict_metadata
        kept = "ema" if any(key.startswith("ema.") for key in stored) else "student"
        state = {kept: model.state_dict()}
        with warnings.catch_warnings():  # DCP warns that one process reads alone, which is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)), no_dist=True)
        model.load_state_dict(state[kept])
        return kept
    except CheckpointException as err:
        reason = _first_line(_first_failure(err))
    except (OSError, RuntimeError, ValueError) as err:  # a damaged file, or weights of another student
        reason = _first_line(err)
    raise UserError(f"cannot read the weights of checkpoint {path}: {reason}")


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
