"""Data-parallel distillation on two CPU processes (gloo), started by torchrun: on a machine
without GPUs `accelerate launch --cpu --num_processes 2` starts ONE process, so each test
also checks that the run saw two."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_prune


def two_processes(*args: str) -> list[str]:
    """`difcompress distill ARGS` on two processes (torchrun sets WORLD_SIZE; accelerate reads it)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nproc_per_node", "2", "-m", "difcompress", "distill", *map(str, args)]


def ran_on_two(out: Path) -> bool:
    return json.loads((out / "difcompress.json").read_text())["sharding"]["processes"] == 2


def test_two_process_distill_runs_and_checkpoints(tmp_path):
    pruned = tmp_path / "pruned"
    run_prune("digits", 0.9, pruned, device="cpu")
    out = tmp_path / "run"
    cmd = two_processes(
           "--student", str(pruned), "--loss", "place", "--data", "digits", "--steps", "4", "--batch-size", "8",
           "--checkpoint-every", "2", "-o", str(out), "--json", "--log-every", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "difcompress.json").read_text())["status"] == "complete" and ran_on_two(out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # only the main process logs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_two_process_latent_dit_distill_encodes_once(tiny_dit_dir, tmp_path):
    """The main process fills the latent cache; the other waits and reads the same shards."""
    pruned = tmp_path / "pruned"
    run_prune(str(tiny_dit_dir), 0.5, pruned, depth=2, device="cpu")
    out = tmp_path / "run"
    cmd = two_processes(
           "--student", str(pruned), "--loss", "place", "--w-feat", "0.1", "--data", "digits", "--steps", "2",
           "--batch-size", "8", "--checkpoint-every", "0", "-o", str(out),
           "--latent-cache", str(tmp_path / "cache"), "--json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "difcompress.json").read_text())["status"] == "complete" and ran_on_two(out)
    indexes = list((tmp_path / "cache" / "latents").glob("*/index.json"))
    assert len(indexes) == 1 and json.loads(indexes[0].read_text())["items"] == 1797


def test_one_and_two_processes_train_the_same_student(tmp_path):
    """Each process takes its rows of the same global batch, noise and timesteps, so the run
    does not depend on how many processes share it."""
    import torch
    from conftest import run_distill
    from safetensors.torch import load_file

    pruned = tmp_path / "pruned"
    run_prune("digits", 0.9, pruned, device="cpu")
    settings = ["--loss", "mse", "--data", "digits", "--steps", "3", "--batch-size", "8", "--ema-decay", "0",
                "--checkpoint-every", "0", "--log-every", "1", "--json"]
    two = tmp_path / "two"
    cmd = two_processes("--student", str(pruned), "-o", str(two), *settings)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ran_on_two(two)
    one = tmp_path / "one"
    run_distill(pruned, one, loss="mse", data="digits", steps=3, batch_size=8, ema_decay=0.0, checkpoint_every=0,
                log_every=1, device="cpu")
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert len(logs[0]) == len(logs[1]) == 3  # every step compared
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                   rel=1e-4)
    a, b = (load_file(run / "unet" / "diffusion_pytorch_model.safetensors") for run in (one, two))
    differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert differences.max() < 1e-4  # Adam's first steps amplify float-order noise in near-zero gradients ...
    assert (differences < 1e-6).float().mean() > 0.99  # ... of a few elements only


def test_two_process_text_to_image_distill_with_bk_sdm_feature_hooks(tiny_sd_dir, tmp_path):
    """BK-SDM's hooked modules are found inside the DDP-wrapped student (its users hit
    KeyError on `module.`-prefixed names); the feature term is logged from both ranks' work."""
    from conftest import write_captioned_digits

    pruned = tmp_path / "pruned"
    run_prune(str(tiny_sd_dir), 0.0, pruned, preset="bk-small", device="cpu")
    captions = write_captioned_digits(tmp_path / "captioned")
    out = tmp_path / "run"
    cmd = two_processes(
           "--student", str(pruned), "--loss", "place", "--w-feat", "1", "--feature-reduction", "sum",
           "--data", str(captions), "--steps", "2", "--batch-size", "4", "--checkpoint-every", "0",
           "--log-every", "1", "-o", str(out), "--latent-cache", str(tmp_path / "cache"), "--json")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "difcompress.json").read_text())
    assert manifest["status"] == "complete" and ran_on_two(out)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["feature"] > 0 for r in logs)


# sitecustomize: the loss of rank 1 alone becomes NaN at step 3 (rank 0's is still finite there).
RANK_1_NAN = """
import os
if os.environ.get("RANK") == "1":
    from difcompress.training.trainer import Trainer
    _real = Trainer.compute_losses
    def compute_losses(self, batch, step):
        total, terms = _real(self, batch, step)
        return (total * float("nan") if step == 3 else total), terms
    Trainer.compute_losses = compute_losses
"""


def test_a_nan_loss_on_one_process_stops_every_process_at_that_step(tmp_path):
    """The processes agree on the first non-finite step, so the main one reports it (not one
    process stopping while the others wait in the next all-reduce)."""
    pruned = tmp_path / "pruned"
    run_prune("digits", 0.9, pruned, device="cpu")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RANK_1_NAN)
    out = tmp_path / "run"
    cmd = two_processes("--student", str(pruned), "--loss", "place", "--data", "digits", "--steps", "6",
                        "--batch-size", "8", "--checkpoint-every", "2", "--log-every", "1", "-o", str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]  # printed by the main process
    assert "at step 3" in errors[0] and "step-0000002" in errors[0], errors[0]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
