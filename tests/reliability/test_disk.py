"""A full disk is one clear line, never a traceback: the folder, the space needed and free;
temporaries removed; a distill run left resumable from its last good checkpoint.

Every writer is tested with an injected ENOSPC (always runs); a real full disk on a small
tmpfs runs where the tests may mount one (as root)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_distill, run_prune

pytestmark = pytest.mark.usefixtures("single_thread")

FULL = OSError(errno.ENOSPC, "No space left on device")
DISTILL = ["--data", "digits", "--batch-size", "8", "--loss", "place", "--device", "cpu", "--json"]


def no_space(*args, **kwargs):
    raise FULL


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "digits-090"
    run_prune("digits", 0.9, out, device="cpu")
    return out


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def test_checkpoint_write_fails_cleanly_and_the_run_resumes(student, tmp_path, monkeypatch, run_cli):
    import difcompress.artifacts.checkpoint as checkpoint

    run = tmp_path / "run"
    real = checkpoint.save_file

    def full_at_the_second_checkpoint(tensors, path, *args, **kwargs):
        if ".step-0000004." in str(path):
            raise FULL
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_at_the_second_checkpoint)
    code, _, err = run_cli("distill", "--student", student, "-o", run, "--steps", "6", "--checkpoint-every", "2",
                           *DISTILL)
    line = assert_one_line_error(code, err, 1)
    assert "No space left on device" in line and "checkpoints" in line and "needed" in line and "free" in line
    assert hidden(run) == [] and [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert json.loads((run / "difcompress.json").read_text())["status"] == "running"
    monkeypatch.setattr(checkpoint, "save_file", real)
    code, _, err = run_cli("distill", "--student", student, "-o", run, "--steps", "6", "--checkpoint-every", "2",
                           *DISTILL, "--resume")
    assert code == 0, err


def test_final_student_write_fails_cleanly(student, tmp_path, monkeypatch):
    import difcompress.training.run_folder as run_folder
    from difcompress.core.errors import UserError

    run = tmp_path / "run"
    monkeypatch.setattr(run_folder, "save_model_folder", no_space)
    with pytest.raises(UserError, match="No space left") as info:
        run_distill(student, run, data="digits", steps=2, batch_size=8, checkpoint_every=2, device="cpu")
    assert str(run) in str(info.value)
    assert not (run / ".student.tmp").exists()
    assert json.loads((run / "difcompress.json").read_text())["status"] == "running"
    monkeypatch.undo()
    run_distill(student, run, data="digits", steps=2, batch_size=8, checkpoint_every=2, device="cpu", resume=True)
    assert json.loads((run / "difcompress.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("writer", ["metrics", "teacher samples", "curves"])
def test_other_run_files_fail_cleanly(writer, student, tmp_path, monkeypatch):
    import matplotlib.figure

    import difcompress.training.run_folder as run_folder
    from difcompress.core.errors import UserError

    data = "teacher" if writer == "teacher samples" else "digits"
    if writer == "metrics":
        monkeypatch.setattr(run_folder, "json", type("J", (), {"dumps": staticmethod(no_space),
                                                               "loads": json.loads}))
    elif writer == "teacher samples":
        import difcompress.core.files as folders
        monkeypatch.setattr(folders, "save_file", no_space)
    else:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    with pytest.raises(UserError, match="No space left"):
        run_distill(student, tmp_path / "run", data=data, teacher_samples=8, teacher_sampler_steps=2, steps=2,
                    batch_size=4, checkpoint_every=0, device="cpu")
    assert hidden(tmp_path / "run") == []


@pytest.mark.parametrize("command", ["prune", "export", "eval"])
def test_prune_export_and_eval_fail_cleanly(command, student, tmp_path, monkeypatch, run_cli):
    import matplotlib.figure

    import difcompress.commands.export as export_module
    import difcompress.commands.prune as prune_module

    out = tmp_path / "out"
    if command == "prune":
        monkeypatch.setattr(prune_module, "save_model_folder", no_space)
        args = ("prune", "digits", "--ratio", "0.5", "-o", out, "--device", "cpu")
    elif command == "export":
        monkeypatch.setattr(export_module, "save_model_folder", no_space)
        args = ("export", student, "-o", out)
    else:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
        args = ("eval", student, "-o", out, "--grid-size", "2", "--sampler-steps", "2", "--device", "cpu")
    code, _, err = run_cli(*args)
    assert "No space left on device" in assert_one_line_error(code, err, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if command == "eval" else [])
    assert hidden(tmp_path) == []


# ---- a real full disk -------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 320 KB tmpfs: room for a pruned digits student (about 100 KB), not for a checkpoint."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk(student, tiny_disk, run_cli):
    run = tiny_disk / "run"
    code, _, err = run_cli("distill", "--student", student, "-o", run, "--steps", "6", "--checkpoint-every", "2",
                           *DISTILL)
    line = assert_one_line_error(code, err, 1)
    assert "No space left on device" in line and str(tiny_disk) in line
    assert hidden(tiny_disk) == []
    assert json.loads((run / "difcompress.json").read_text())["status"] == "running"
    shutil.rmtree(run)
    big = tiny_disk / "pruned"
    code, _, err = run_cli("prune", "digits", "--ratio", "0.3", "-o", big, "--device", "cpu")
    assert "No space left on device" in assert_one_line_error(code, err, 1)
    assert list(tiny_disk.iterdir()) == []
