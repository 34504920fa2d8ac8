"""Interrupted runs lose nothing and never look finished: kill -9 while a checkpoint or the
final student is being written, Ctrl-C, a crash while an extension republishes, and the
exactness of extending a finished run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_distill, run_prune
from safetensors.torch import load_file

from difcompress.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = dict(data="digits", batch_size=8, lr=1e-3, loss="place", seed=0, device="cpu")
CLI_SETTINGS = ["--data", "digits", "--batch-size", "8", "--lr", "1e-3", "--loss", "place", "--seed", "0",
                "--device", "cpu"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The embedded digits teacher pruned at 0.9: an 18K-parameter student, fast to train."""
    out = tmp_path_factory.mktemp("students") / "digits-090"
    run_prune("digits", 0.9, out, device="cpu")
    return out


def manifest(run: Path) -> dict:
    return json.loads((run / "difcompress.json").read_text())


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], what


@pytest.fixture(scope="module")
def reference(student, tmp_path_factory):
    """Straight runs of 12 and 24 steps, the yardstick every interrupted run must meet."""
    root = tmp_path_factory.mktemp("reference")
    for steps in (12, 24):
        run_distill(student, root / f"straight-{steps}", steps=steps, checkpoint_every=3, **SETTINGS)
    return root


def test_extending_a_finished_run_equals_a_straight_run(student, reference, tmp_path):
    run = tmp_path / "run"
    run_distill(student, run, steps=12, checkpoint_every=3, **SETTINGS)
    assert_same(final_weights(run), final_weights(reference / "straight-12"), "12 steps")
    run_distill(student, run, steps=24, checkpoint_every=3, resume=True, **SETTINGS)
    assert manifest(run)["status"] == "complete"
    assert_same(final_weights(run), final_weights(reference / "straight-24"), "extended to 24 steps")
    for name in ("student", "ema", "optimizer"):
        rel = f"checkpoints/step-0000024/{name}.safetensors"
        assert_same(load_file(run / rel), load_file(reference / "straight-24" / rel), rel)
    # A checkpoint holds the training weights, not the EMA the final student is made of.
    last = load_file(run / "checkpoints/step-0000024/student.safetensors")
    assert any(not torch.equal(last[k], v) for k, v in final_weights(run).items())


class Crash(Exception):
    pass


def test_an_extension_says_running_from_its_start_until_the_new_student_is_complete(student, reference, tmp_path,
                                                                                     monkeypatch):
    import difcompress.training.run_folder as run_folder

    run = tmp_path / "run"
    shutil.copytree(reference / "straight-12", run)
    seen = []
    real_fit = Trainer.fit

    def fit(self, *args, **kwargs):
        seen.append(manifest(run)["status"])  # before any step of the extension
        return real_fit(self, *args, **kwargs)

    def save_then_crash(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        raise Crash("killed while the new student is written")

    real_save = run_folder.save_model_folder
    monkeypatch.setattr(Trainer, "fit", fit)
    monkeypatch.setattr(run_folder, "save_model_folder", save_then_crash)
    with pytest.raises(Crash):
        run_distill(student, run, steps=24, checkpoint_every=3, resume=True, **SETTINGS)
    assert seen == ["running"]
    assert manifest(run)["status"] == "running"  # the old student's files are no longer vouched for
    monkeypatch.setattr(run_folder, "save_model_folder", real_save)
    run_distill(student, run, steps=24, checkpoint_every=3, resume=True, **SETTINGS)
    assert_same(final_weights(run), final_weights(reference / "straight-24"), "after the crash")
    assert not (run / ".student.tmp").exists()


def test_ctrl_c_says_where_to_resume_and_resume_finishes_the_run(student, reference, tmp_path, monkeypatch, run_cli):
    from conftest import error_lines

    run = tmp_path / "run"
    real = Trainer.train_step

    def interrupt_at_8(self, batch):
        if self.step == 7:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_8)
    code, _, err = run_cli("distill", "--student", student, "-o", run, "--steps", "12", "--checkpoint-every", "3",
                           *CLI_SETTINGS, "--json")
    assert code == 130
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    assert "interrupted at step 7" in lines[0] and "--resume" in lines[0] and "step-0000006" in lines[0], lines[0]
    monkeypatch.setattr(Trainer, "train_step", real)
    code, stdout, err = run_cli("distill", "--student", student, "-o", run, "--steps", "12", "--checkpoint-every",
                                "3", *CLI_SETTINGS, "--json", "--resume")
    assert code == 0, err
    assert json.loads(stdout)["resumed_from_step"] == 6
    assert_same(final_weights(run), final_weights(reference / "straight-12"), "resumed after Ctrl-C")


# ---- kill -9 ---------------------------------------------------------------------------------------

def _launch(student: Path, run: Path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "difcompress", "distill", "--student", str(student), "-o", str(run),
           "--steps", str(steps), "--checkpoint-every", "3", *CLI_SETTINGS, "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """SIGKILL `proc` the moment `condition()` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
    proc.kill()
    proc.wait()
    return False


def _temporary(folder: Path, prefix: str) -> bool:
    try:
        return any(name.startswith(prefix) for name in os.listdir(folder))
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("moment", ["checkpoint", "final student"])
def test_kill_9_while_writing_leaves_a_truthful_resumable_folder(moment, student, reference, tmp_path):
    run = tmp_path / "run"
    if moment == "checkpoint":  # while writing a checkpoint after the first, so there is one to resume from
        killed = _kill_when(_launch(student, run, 24), lambda: (run / "checkpoints" / "step-0000003").is_dir()
                            and _temporary(run / "checkpoints", ".step-"))
    else:
        killed = _kill_when(_launch(student, run, 12), lambda: _temporary(run, ".student.tmp"))
    assert killed, f"the run ended before it was caught writing its {moment}"
    assert manifest(run)["status"] == "running"  # never "complete" over half-written files
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints, "nothing to resume from: the kill came too early to test a resume"
    for checkpoint in checkpoints:  # complete ones only under final names
        assert {p.name for p in checkpoint.iterdir()} >= {"student.safetensors", "optimizer.safetensors",
                                                          "rng.safetensors", "state.json"}
    steps = 24 if moment == "checkpoint" else 12
    summary = run_distill(student, run, steps=steps, checkpoint_every=3, resume=True, **SETTINGS)
    assert summary["resumed_from_step"] == int(checkpoints[-1].name.removeprefix("step-"))
    assert manifest(run)["status"] == "complete"
    assert_same(final_weights(run), final_weights(reference / f"straight-{steps}"), f"resumed after kill -9 ({moment})")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] + \
        [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == []
