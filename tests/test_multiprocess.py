"""Data-parallel distillation through `accelerate launch` (two CPU processes, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_prune


def test_two_process_distill_runs_and_checkpoints(tmp_path):
    pruned = tmp_path / "pruned"
    run_prune("digits", 0.9, pruned, device="cpu")
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "difcompress", "distill",
           "--student", str(pruned), "--loss", "place", "--data", "digits", "--steps", "4", "--batch-size", "8",
           "--checkpoint-every", "2", "-o", str(out), "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "difcompress.json").read_text())["status"] == "complete"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # only the main process logs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_two_process_latent_dit_distill_encodes_once(tiny_dit_dir, tmp_path):
    """The main process fills the latent cache; the other waits and reads the same shards."""
    pruned = tmp_path / "pruned"
    run_prune(str(tiny_dit_dir), 0.5, pruned, depth=2, device="cpu")
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "difcompress", "distill",
           "--student", str(pruned), "--loss", "place", "--w-feat", "0.1", "--data", "digits", "--steps", "2",
           "--batch-size", "8", "--checkpoint-every", "0", "-o", str(out), "--device", "cpu",
           "--latent-cache", str(tmp_path / "cache"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "difcompress.json").read_text())["status"] == "complete"
    indexes = list((tmp_path / "cache" / "latents").glob("*/index.json"))
    assert len(indexes) == 1 and json.loads(indexes[0].read_text())["items"] == 1797
