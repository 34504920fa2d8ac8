"""Sharded distillation (issue 26): `torchrun --nproc_per_node 2 -m difcompress distill
--shard fsdp` on two CPU processes (gloo), FSDP2 through accelerate's plugin.

One sharded run of the digits student (PLACE + feature KD with adapters, FSDP's activation
checkpointing, the teacher sharded too, EMA, checkpoints) is the yardstick: it equals the
1-process unsharded run, holds half the weights per process, gathers into a stock
diffusers folder, resumes exactly after a kill -9 mid-checkpoint, and on one process.
`--shard zero2` (DeepSpeed ZeRO-2 through accelerate, DS_ACCELERATOR=cpu) is held to the
same: the 1-process run's weights, half the optimizer state per process, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import assert_one_line_error, run_distill, run_export, run_prune
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = dict(loss="place", w_feat=0.1, gradient_checkpointing=True, data="digits", batch_size=8, steps=4,
                checkpoint_every=2, log_every=1, seed=0)
CLI = ["--loss", "place", "--w-feat", "0.1", "--gradient-checkpointing", "--data", "digits", "--batch-size", "8",
       "--steps", "4", "--checkpoint-every", "2", "--log-every", "1", "--seed", "0", "--json"]
# sitecustomize for the killed run: the second sharded checkpoint write lingers after its
# shards are on disk, before the folder is renamed, so the kill lands mid-write every time.
SLOW_WRITES = """
import time
import torch.distributed.checkpoint as dcp
_save = dcp.save
def _slow_save(*args, **kwargs):
    result = _save(*args, **kwargs)
    if "step-0000004" in str(kwargs["storage_writer"].path):
        time.sleep(2)
    return result
dcp.save = _slow_save
"""


def _env(extra_path: Path | None = None) -> dict[str, str]:
    paths = [str(extra_path)] if extra_path else []
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(paths)}


def torchrun(student: Path, out: Path, *extra: str, engine: list[str] = ("--shard", "fsdp", "--shard-teacher"),
             settings: list[str] = CLI) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "difcompress",
            "distill", "--student", str(student), "-o", str(out), *engine, *settings, *extra]


def run_sharded(student: Path, out: Path, *extra: str, **how) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun(student, out, *extra, **how), capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ZeRO-2: the feature adapters of a width-pruned student cannot train beside DeepSpeed's
# optimizer (refused below), so its yardstick is PLACE with accumulation, warm-up and clipping.
ZERO2_SETTINGS = dict(loss="place", gradient_accumulation_steps=2, lr_warmup_steps=2, lr_scheduler="linear",
                      data="digits", batch_size=8, steps=4, checkpoint_every=2, log_every=1, seed=0)
ZERO2_CLI = ["--loss", "place", "--gradient-accumulation-steps", "2", "--lr-warmup-steps", "2", "--lr-scheduler",
             "linear", "--data", "digits", "--batch-size", "8", "--steps", "4", "--checkpoint-every", "2",
             "--log-every", "1", "--seed", "0", "--json"]
ZERO2 = dict(engine=["--shard", "zero2"], settings=ZERO2_CLI)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "digits-090"
    run_prune("digits", 0.9, out, device="cpu")
    return out


@pytest.fixture(scope="module")
def sharded(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "run"
    run_sharded(student, out)
    return out


@pytest.fixture(scope="module")
def unsharded(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded") / "run"
    run_distill(student, out, device="cpu", **SETTINGS)
    return out


@pytest.fixture(scope="module")
def zero2(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "run"
    run_sharded(student, out, **ZERO2)
    return out


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_two_sharded_processes_train_the_one_process_student(sharded, unsharded):
    manifest = json.loads((sharded / "difcompress.json").read_text())
    assert manifest["status"] == "complete"
    report = manifest["sharding"]
    assert report["engine"] == "fsdp" and report["processes"] == 2 and report["teacher"] == "sharded"
    assert report["checkpointed_blocks"] > 0  # FSDP's activation checkpointing, not the model's
    a, b = metrics(unsharded), metrics(sharded)
    assert [r["step"] for r in b] == list(range(1, 5))
    for one, two in zip(a, b):  # the logged values are the global batch's
        for key in ("loss", "kd", "feature", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert_close(weights(sharded), weights(unsharded), atol=1e-5)


def test_each_process_holds_half_the_student(sharded):
    report = json.loads((sharded / "difcompress.json").read_text())["sharding"]
    full = report["parameter_bytes_unsharded"]
    assert len(report["parameter_bytes_per_process"]) == 2
    for held in report["parameter_bytes_per_process"]:  # measured on each rank's local shards
        assert 0.45 * full < held < 0.56 * full, (held, full)
    assert sum(report["parameter_bytes_per_process"]) == pytest.approx(full, rel=0.02)  # shard padding only


def test_the_gathered_student_is_a_stock_diffusers_folder_that_exports(sharded, tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel.from_pretrained(sharded / "unet")
    assert all(type(p) is torch.nn.Parameter for p in unet.parameters())  # whole tensors, not shards
    pipeline = DDPMPipeline.from_pretrained(sharded)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 1
    run_export(sharded, tmp_path / "export")
    assert_close(weights(tmp_path / "export"), weights(sharded), atol=0)
    checkpoint = sharded / "checkpoints" / "step-0000004"
    shards = sorted((checkpoint / "shards").iterdir())  # a safetensors file per rank, nothing pickled
    assert len(shards) == 2 and all(f.suffix == ".safetensors" for f in shards)
    assert not list(checkpoint.rglob("*.distcp")) and not list(checkpoint.rglob(".metadata"))


def test_a_sharded_checkpoint_is_a_model_reference_for_eval_and_export(sharded, tmp_path):
    """RUN/checkpoints/step-N of an FSDP run: its EMA read whole from DCP's shards, by one process."""
    from difcompress.loading.models import load_model

    checkpoint = sharded / "checkpoints" / "step-0000004"
    loaded = load_model(str(checkpoint), torch.device("cpu"))
    assert loaded.manifest["checkpoint"] == {"step": 4, "weights": "ema", "run": str(sharded)}
    assert_close(loaded.model.state_dict(), weights(sharded), atol=0)  # the final EMA
    run_export(checkpoint, tmp_path / "export")
    assert_close(weights(tmp_path / "export"), weights(sharded), atol=0)


def test_a_sharded_checkpoint_resumes_on_one_unsharded_process(student, sharded, unsharded, tmp_path):
    """2 -> 1: DCP reads the shards of step 2 back as whole tensors."""
    run = tmp_path / "run"
    shutil.copytree(sharded, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    summary = run_distill(student, run, device="cpu", resume=True, **SETTINGS)
    assert summary["resumed_from_step"] == 2 and summary["sharding"] == {"engine": "none", "processes": 1}
    assert_close(weights(run), weights(unsharded), atol=1e-5)


def test_a_damaged_sharded_checkpoint_is_one_line_not_a_traceback(student, sharded, tmp_path):
    """DCP raises a shard's read failure as a CheckpointException, which no OSError handler sees."""
    from difcompress.core.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(sharded, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    shard = sorted((run / "checkpoints" / "step-0000002" / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:-64])  # cut short, as by a copy that ran out of space
    with pytest.raises(UserError, match="step-0000002 cannot be resumed"):
        run_distill(student, run, device="cpu", resume=True, **SETTINGS)


def kill_9_mid_checkpoint_then_resume(student: Path, straight: Path, tmp_path: Path, slow_writes: str, **how) -> None:
    """Kill both ranks while the second checkpoint is being written, resume: the straight run's weights."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(slow_writes)
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    proc = subprocess.Popen(torchrun(student, run, **how), env=_env(slow), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    caught = False
    while proc.poll() is None and time.monotonic() < deadline and not caught:
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        caught = "step-0000002" in names and any(n.startswith(".step-0000004.tmp-") for n in names)
        time.sleep(0.05)
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)  # both ranks (in sessions of their own) and torchrun
    proc.wait()
    assert caught, "the run ended before it was caught writing its second checkpoint"
    assert json.loads((run / "difcompress.json").read_text())["status"] == "running"
    assert [p.name for p in checkpoints.glob("step-*")] == ["step-0000002"]  # the half-written one is not
    proc = run_sharded(student, run, "--resume", **how)
    assert json.loads(proc.stdout)["resumed_from_step"] == 2
    assert_close(weights(run), weights(straight), atol=0)  # identical to the uninterrupted run
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []


def test_kill_9_during_a_sharded_checkpoint_write_then_resume_equals_the_straight_run(student, sharded, tmp_path):
    kill_9_mid_checkpoint_then_resume(student, sharded, tmp_path, SLOW_WRITES)


# sitecustomize for a full disk on one process only, at the first checkpoint: rank 1 cannot
# write its DCP shards, or the main process cannot write the RNG states beside them.
DISK_FULL = """
import errno, os
import safetensors.torch
import torch.distributed.checkpoint as dcp

def _full(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

if os.environ.get("RANK") == "1" and os.environ.get("FULL_AT") == "shards":
    _write_data = dcp.HuggingFaceStorageWriter.write_data
    def write_data(self, *args, **kwargs):
        _full(self.path)
    dcp.HuggingFaceStorageWriter.write_data = write_data
if os.environ.get("RANK") == "0" and os.environ.get("FULL_AT") == "rng":
    _save = safetensors.torch.save_file
    def save_file(tensors, filename, *args, **kwargs):
        if str(filename).endswith("rng.safetensors"):
            _full(filename)
        return _save(tensors, filename, *args, **kwargs)
    safetensors.torch.save_file = save_file
"""


@pytest.mark.parametrize("where", ["shards", "rng"])
def test_a_full_disk_on_one_process_during_a_sharded_checkpoint_is_one_line_on_all(student, tmp_path, where):
    """DCP's CheckpointException (a BaseException) or the main process's own files: every
    process stops on the one line (printed once, by the main process), none waits at a
    collective, no checkpoint is left."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "sitecustomize.py").write_text(DISK_FULL)
    run = tmp_path / "run"
    proc = subprocess.run(torchrun(student, run), capture_output=True, text=True,
                          env={**_env(full), "FULL_AT": where}, timeout=300)
    assert proc.returncode == 1
    assert "error: cannot write" in proc.stderr and "No space left on device" in proc.stderr, proc.stderr[-3000:]
    assert "]: Traceback" not in proc.stderr and "CheckpointException" not in proc.stderr
    assert os.listdir(run / "checkpoints") == []  # the half-written checkpoint is gone
    assert json.loads((run / "difcompress.json").read_text())["status"] == "running"  # not complete


# ---- DeepSpeed ZeRO-2 -------------------------------------------------------------------------------

# sitecustomize for the killed ZeRO-2 run: the last optimizer part of the second checkpoint
# lingers, so the kill lands while the folder is still a temporary one.
SLOW_PART_WRITES = """
import time
import safetensors.torch
_save = safetensors.torch.save_file
def _slow_save(tensors, filename, *args, **kwargs):
    result = _save(tensors, filename, *args, **kwargs)
    if ".step-0000004.tmp-" in str(filename) and str(filename).endswith("optimizer-1.safetensors"):
        time.sleep(3)
    return result
safetensors.torch.save_file = _slow_save
"""


# sitecustomize for a full disk on one rank only: its optimizer part cannot be written.
RANK_1_DISK_FULL = """
import errno, os
import safetensors.torch
_save = safetensors.torch.save_file
def _full(tensors, filename, *args, **kwargs):
    if str(filename).endswith("optimizer-1.safetensors"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
    return _save(tensors, filename, *args, **kwargs)
safetensors.torch.save_file = _full
"""


def test_zero2_a_full_disk_on_one_process_is_one_line_on_all(student, tmp_path):
    """Not a hang: the other process must not wait at a barrier for a part that never comes."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "sitecustomize.py").write_text(RANK_1_DISK_FULL)
    run = tmp_path / "run"
    proc = subprocess.run(torchrun(student, run, **ZERO2), capture_output=True, text=True, env=_env(full),
                          timeout=300)
    assert proc.returncode == 1
    assert "No space left on device" in proc.stderr and "]: Traceback" not in proc.stderr
    assert os.listdir(run / "checkpoints") == []  # the half-written checkpoint is gone
    assert json.loads((run / "difcompress.json").read_text())["status"] == "running"  # not complete


def test_zero2_processes_train_the_one_process_student(student, zero2, tmp_path):
    unsharded = tmp_path / "unsharded"
    run_distill(student, unsharded, device="cpu", **ZERO2_SETTINGS)
    manifest = json.loads((zero2 / "difcompress.json").read_text())
    report = manifest["sharding"]
    assert manifest["status"] == "complete" and report["engine"] == "zero2" and report["processes"] == 2
    a, b = metrics(unsharded), metrics(zero2)
    for one, two in zip(a, b):  # DeepSpeed clipped, stepped and scheduled as the single process did
        for key in ("loss", "kd", "grad_norm", "lr"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert_close(weights(zero2), weights(unsharded), atol=1e-5)
    moved = max((weights(zero2)[k] - weights(student)[k]).abs().max().item() for k in weights(student))
    assert moved > 1e-4  # the weights did train (they once did not: DeepSpeed never stepped)


def test_zero2_splits_the_optimizer_state_and_checkpoints_it_per_process(zero2):
    report = json.loads((zero2 / "difcompress.json").read_text())["sharding"]
    params = report["parameter_bytes_unsharded"]
    assert report["parameter_bytes_per_process"] == [params, params]  # weights stay whole
    for held in report["optimizer_bytes_per_process"]:  # fp32 masters + two moments, half each
        assert 1.4 * params < held < 1.6 * params, (held, params)
    checkpoint = zero2 / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in checkpoint.glob("optimizer-*")) == ["optimizer-0.safetensors",
                                                                      "optimizer-1.safetensors"]
    assert all(p.suffix in (".safetensors", ".json") for p in checkpoint.iterdir())  # nothing pickled


def test_zero2_kill_9_during_a_checkpoint_write_then_resume_equals_the_straight_run(student, zero2, tmp_path):
    kill_9_mid_checkpoint_then_resume(student, zero2, tmp_path, SLOW_PART_WRITES, **ZERO2)


def test_zero2_refuses_what_it_cannot_run_in_one_line(student, zero2, tmp_path):
    from difcompress.core.errors import UserError

    proc = subprocess.run(torchrun(student, tmp_path / "feat", engine=["--shard", "zero2"],
                                   settings=[*ZERO2_CLI, "--loss", "place+feat"]),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0 and "cannot train feature adapters" in proc.stderr
    assert "]: Traceback" not in proc.stderr  # the ranks' one line (torchrun adds its own report)
    run = tmp_path / "copy"  # ZeRO-2's optimizer parts resume only on as many processes
    shutil.copytree(zero2, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    with pytest.raises(UserError, match="cannot resume with --shard none"):
        run_distill(student, run, device="cpu", resume=True, **ZERO2_SETTINGS)


# ---- bad input: one line ----------------------------------------------------------------------------

def test_sharding_that_cannot_run_is_one_line(student, unsharded, tmp_path, run_cli, monkeypatch):
    base = ["distill", "--student", student, "--data", "digits", "--steps", "2", "--batch-size", "8"]
    code, _, err = run_cli(*base, "-o", tmp_path / "a", "--shard", "fsdp")
    assert "2 or more processes" in assert_one_line_error(code, err, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before any process group forms
    code, _, err = run_cli(*base, "-o", tmp_path / "b", "--shard", "fsdp", "--compile")
    assert "--compile" in assert_one_line_error(code, err, 2)
    code, _, err = run_cli(*base, "-o", tmp_path / "c", "--shard", "fsdp", "--ema-offload")
    assert "--ema-offload" in assert_one_line_error(code, err, 2)
    before = sorted((p.relative_to(unsharded), p.stat().st_mtime_ns) for p in unsharded.rglob("*"))
    code, _, err = run_cli("distill", "--student", student, "-o", unsharded, "--shard", "fsdp", "--resume",
                           *[str(a) for a in CLI])
    line = assert_one_line_error(code, err, 2)
    assert "written unsharded" in line and "nothing was changed" in line
    assert sorted((p.relative_to(unsharded), p.stat().st_mtime_ns) for p in unsharded.rglob("*")) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_launcher_whose_processes_accelerate_does_not_see_is_refused(monkeypatch):
    """`accelerate launch --use_fsdp` without GPUs once started N lone copies of one run."""
    from difcompress.commands.distill import check_process_count
    from difcompress.core.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="started 2 processes but accelerate sees 1"):
        check_process_count(SimpleNamespace(num_processes=1))
    check_process_count(SimpleNamespace(num_processes=2))


def test_the_dry_run_divides_the_state_by_the_processes(student, run_cli, tmp_path):
    code, out, err = run_cli("distill", "--student", student, "--data", "digits", "-o", tmp_path / "plan", "--dry-run",
                             "--json")
    assert code == 0, err
    memory = json.loads(out)["memory"]
    sharded, parts = memory["per_process_sharded"], list(memory["parts"].values())
    state = parts[0] + parts[1] + parts[2] + memory["student_params"] * 4  # weights, optimizer, EMA, gradients
    assert sharded["none"]["8"] == sharded["none"]["1"] == memory["total_bytes"]
    assert sharded["fsdp"]["1"] - sharded["fsdp"]["8"] == pytest.approx(state * 7 / 8, abs=8)
    assert sharded["fsdp"]["16"] < sharded["fsdp"]["8"] < sharded["zero2"]["8"] < sharded["none"]["8"]
    params = memory["student_params"]  # ZeRO-2: gradients and optimizer split, plus its split fp32 masters (fp32 run)
    assert sharded["none"]["8"] - sharded["zero2"]["8"] == pytest.approx((params * 4 + parts[1]) * 7 / 8
                                                                        - params * 4 / 8, abs=8)
