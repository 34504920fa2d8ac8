"""Two runs never share one folder: the second stops at once naming the holder, and the
first finishes untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_prune

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "digits-090"
    run_prune("digits", 0.9, out, device="cpu")
    return out


def distill_command(student: Path, run: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "difcompress", "distill", "--student", str(student), "-o", str(run),
            "--data", "digits", "--steps", str(steps), "--batch-size", "8", "--checkpoint-every", "20",
            "--device", "cpu", "--json", "--log-every", "1"]


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_second_run_or_resume_into_a_live_run_is_refused(student, tmp_path, run_cli):
    run = tmp_path / "run"
    first = launch(distill_command(student, run, 200))
    deadline = time.monotonic() + 120
    while not steps_logged(run) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the test could race it"
    for extra in ((), ("--resume",)):
        code, _, err = run_cli("distill", "--student", student, "-o", run, "--data", "digits", "--steps", "200",
                               "--batch-size", "8", "--checkpoint-every", "20", "--device", "cpu", *extra)
        line = assert_one_line_error(code, err, 1)
        assert "in use by another difcompress run" in line and f"pid {first.pid}" in line, line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert steps_logged(run) == list(range(1, 201))  # one writer: no interleaved log
    assert json.loads((run / "difcompress.json").read_text())["status"] == "complete"


def test_two_runs_racing_into_one_new_folder(student, tmp_path):
    run = tmp_path / "run"
    procs = [launch(distill_command(student, run, 60)) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], [r[1][-500:] for r in results]
    loser = next(err for p, (_, err) in zip(procs, results) if p.returncode == 1)
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1
    assert "in use by another difcompress run" in loser or "already holds a distill run" in loser
    assert steps_logged(run) == list(range(1, 61))
    assert json.loads((run / "difcompress.json").read_text())["status"] == "complete"
