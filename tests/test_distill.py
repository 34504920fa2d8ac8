"""`difcompress distill` on a tiny pruned U-Net: logs, outputs, every loss, resume, refusals, NaN."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NO_DIFCOMPRESS_CHECK, assert_one_line_error, run_distill, run_prune
from safetensors.torch import load_file, save_file

from difcompress.core.errors import UserError
from difcompress.loading.models import load_model
from difcompress.objectives import LOSS_NAMES
from difcompress.training.trainer import Trainer

FAST = dict(data="digits", batch_size=4, device="cpu", show_progress=False, seed=0, log_every=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def manifest(run: Path) -> dict:
    return json.loads((run / "difcompress.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a short run


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, pruned_dir):
    """6 steps of PLACE through the CLI entry point (in-process), with --json."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from difcompress.cli import main

    run = tmp_path_factory.mktemp("distill-short") / "run"
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(["distill", "--student", str(pruned_dir), "-o", str(run), "--data", "digits", "--loss", "place",
                  "--steps", "6", "--batch-size", "4", "--checkpoint-every", "0", "--device", "cpu", "--json",
                  "--log-every", "1"])
        except SystemExit as exc:
            code = exc.code or 0
    assert code == 0, err.getvalue()
    return run, json.loads(out.getvalue())


def test_short_distill_logs_every_step(short_run):
    run, summary = short_run
    assert summary["steps"] == 6
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        for key in ("loss", "task", "kd", "w", "slope", "intercept"):
            assert key in r, (key, r)
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        # w_task = w_kd = 1: the logged total is the sum of its logged terms.
        assert r["loss"] == pytest.approx(r["task"] + r["kd"], rel=1e-5, abs=1e-6)
        assert 0.0 <= r["w"] <= 1.0
    assert summary["final"]["step"] == 6
    assert summary["final"]["loss"] == rows[-1]["loss"]


def test_short_distill_writes_curves_and_a_complete_manifest(short_run, pruned_dir, tiny_model_dir):
    run, _ = short_run
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = manifest(run)
    assert m["stage"] == "distill"
    assert m["status"] == "complete"
    assert Path(m["teacher"]) == tiny_model_dir.resolve()
    assert m["student_source"] == str(pruned_dir)
    assert m["distill"]["settings"]["loss"] == "place"
    assert not (run / ".student.tmp").exists()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    # Training changed the student.
    before = weights(pruned_dir / "unet" / "diffusion_pytorch_model.safetensors")
    after = weights(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_distilled_student_loads_in_stock_diffusers(short_run, tmp_path, run_subprocess):
    run, _ = short_run
    model = load_model(run, "cpu").model.eval()
    g = torch.Generator().manual_seed(5)
    sample, timestep = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([1, 80])
    with torch.no_grad():
        expected = model(sample, timestep).sample
    io = tmp_path / "io.safetensors"
    save_file({"sample": sample, "timestep": timestep, "expected": expected.contiguous()}, io)
    code = f"""
import torch
from safetensors.torch import load_file
from diffusers import DDPMPipeline, UNet2DModel
data = load_file({str(io)!r})
for unet in (UNet2DModel.from_pretrained({str(run)!r}, subfolder="unet"), DDPMPipeline.from_pretrained({str(run)!r}).unet):
    with torch.no_grad():
        got = unet.eval()(data["sample"], data["timestep"]).sample
    err = (got - data["expected"]).abs().max().item()
    assert err <= 1e-5, err
    assert list(unet.config.block_out_channels) == [16, 32, 32, 32], unet.config.block_out_channels
print("stock-ok")
""" + NO_DIFCOMPRESS_CHECK
    proc = run_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stock-ok" in proc.stdout


# ----------------------------------------------------------------------------- every loss


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_runs_and_stays_finite(loss, pruned_dir, tmp_path):
    run = tmp_path / "run"
    summary = run_distill(str(pruned_dir), run, loss=loss, steps=3, checkpoint_every=0, **FAST)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    composite = loss.endswith("+feat")
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["task"])
        if loss in ("task", "feature"):
            assert "kd" not in r
        else:
            assert math.isfinite(r["kd"])
        if loss == "feature" or composite:
            assert math.isfinite(r["feature"]) and r["feature"] > 0
            expected = r["task"] + r["feature"] + (r["kd"] if composite else 0.0)
            assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        else:
            assert "feature" not in r
        if loss.split("+")[0] in ("lift", "place"):
            assert all(k in r for k in ("w", "slope", "intercept"))
        if loss == "task":
            assert r["loss"] == pytest.approx(r["task"], rel=1e-6)
    assert manifest(run)["status"] == "complete"
    assert summary["settings"]["w_feat"] == (1.0 if loss == "feature" or composite else 0.0)
    assert summary["settings"]["objective"] == loss
    if loss == "feature" or composite:
        assert summary["settings"]["feature_layers"]  # the default block outputs were used


def test_distill_a_globally_pruned_student_keeps_its_structure_record(tiny_model_dir, tmp_path):
    student = tmp_path / "global"
    run_prune(str(tiny_model_dir), 0.5, student, importance="magnitude", global_pruning=True, device="cpu")
    run = tmp_path / "run"
    run_distill(str(student), run, loss="place", steps=2, checkpoint_every=0, **FAST)
    assert (run / "unet" / "difcompress_structure.json").is_file()
    loaded = load_model(run, "cpu").model
    original = load_model(student, "cpu").model
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}


# ----------------------------------------------------------------------------- resume


class SimulatedCrash(Exception):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """Make the trainer die right after the optimizer update of `step`, before it is logged.

    On disk this is exactly what a killed process leaves: metrics.jsonl holds steps
    1..step-1, checkpoints/ holds only the checkpoints written before (each written
    atomically), difcompress.json still says 'running', and no final student exists.
    """
    real = Trainer.train_step

    def maybe_crash(self, batch):
        result = real(self, batch)
        if self.step == step:
            raise SimulatedCrash(f"killed at step {step}")
        return result

    monkeypatch.setattr(Trainer, "train_step", maybe_crash)


RESUME = dict(steps=8, checkpoint_every=4, lr=1e-3, **FAST)
_RUNS: dict[str, tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, pruned_dir):
    """Per loss: (uninterrupted 8-step run, run that crashed at step 6 after the step-4 checkpoint)."""

    def get(loss: str) -> tuple[Path, Path]:
        if loss not in _RUNS:
            root = tmp_path_factory.mktemp(f"resume-{loss}")
            full, crashed = root / "full", root / "crashed"
            run_distill(str(pruned_dir), full, loss=loss, **RESUME)
            with pytest.MonkeyPatch.context() as mp:
                crash_at(mp, 6)
                with pytest.raises(SimulatedCrash):
                    run_distill(str(pruned_dir), crashed, loss=loss, **RESUME)
            _RUNS[loss] = (full, crashed)
        return _RUNS[loss]

    yield get
    _RUNS.clear()


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_crash_leaves_a_resumable_running_folder(resume_runs):
    _, crashed = resume_runs("place")
    assert manifest(crashed)["status"] == "running"
    assert [p.name for p in sorted((crashed / "checkpoints").iterdir())] == ["step-0000004"]
    assert [r["step"] for r in read_metrics(crashed)] == [1, 2, 3, 4, 5]
    assert not (crashed / "unet").exists()


@pytest.mark.parametrize("loss", ["place", "feature"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(loss, resume_runs, pruned_dir, tmp_path):
    full, crashed = resume_runs(loss)
    run = copy_run(crashed, tmp_path)
    summary = run_distill(str(pruned_dir), run, loss=loss, resume=True, **RESUME)

    assert summary["resumed_from_step"] == 4  # a resume, not a seeded restart that would end the same
    assert manifest(run)["status"] == "complete"
    rel = "unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(weights(full / rel), weights(run / rel), "final student")
    # The raw (non-EMA) weights, optimizer moments and adapters at the end agree too.
    for name in ("student", "optimizer") + (("adapters",) if loss == "feature" else ()):
        rel = f"checkpoints/step-0000008/{name}.safetensors"
        assert_same_tensors(weights(full / rel), weights(run / rel), rel)

    rows, reference = read_metrics(run), read_metrics(full)
    assert [r["step"] for r in rows] == list(range(1, 9))  # every step exactly once
    keys = ("loss", "task", "kd", "feature", "grad_norm")
    assert [{k: r.get(k) for k in keys} for r in rows] == [{k: r.get(k) for k in keys} for r in reference]


def test_resume_after_a_torn_metrics_line(resume_runs, pruned_dir, tmp_path):
    """A crash in the middle of a log write leaves half a line; resume must still work."""
    full, crashed = resume_runs("place")
    run = copy_run(crashed, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 0.12')
    assert run_distill(str(pruned_dir), run, loss="place", resume=True, **RESUME)["resumed_from_step"] == 4
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))
    assert_same_tensors(weights(full / "unet/diffusion_pytorch_model.safetensors"),
                        weights(run / "unet/diffusion_pytorch_model.safetensors"), "final student")


@pytest.mark.parametrize("change, expected", [({"lr": 5e-4}, "lr"), ({"loss": "lift"}, "loss"),
                                              ({"seed": 1}, "seed"), ({"batch_size": 2}, "batch_size")])
def test_resume_with_other_settings_is_refused(change, expected, resume_runs, pruned_dir, tmp_path):
    _, crashed = resume_runs("place")
    run = copy_run(crashed, tmp_path)
    before = snapshot(run)
    settings = {**RESUME, "loss": "place", **change}
    loss = settings.pop("loss")
    with pytest.raises(UserError) as info:
        run_distill(str(pruned_dir), run, loss=loss, resume=True, **settings)
    message = str(info.value)
    assert expected in message.split("differs in:")[-1], message
    assert "differs in" in message
    assert snapshot(run) == before  # refused before touching anything


def test_resuming_a_finished_run_with_other_data_is_refused_before_any_work(resume_runs, pruned_dir, tmp_path,
                                                                           monkeypatch):
    """The whole identity, data source included, is compared before the teacher samples
    anything and before the finished folder is marked running again."""
    import difcompress.loading.data as data_module

    full, _ = resume_runs("place")
    run = copy_run(full, tmp_path)
    before = snapshot(run)
    monkeypatch.setattr(data_module, "teacher_samples", lambda *a, **k: pytest.fail("sampled the teacher"))
    with pytest.raises(UserError, match=r"differs in: data 'digits' -> 'teacher'"):
        run_distill(str(pruned_dir), run, loss="place", resume=True, **{**RESUME, "data": "teacher"})
    assert snapshot(run) == before
    assert json.loads((run / "difcompress.json").read_text())["status"] == "complete"


def test_a_checkpoint_of_an_unfinished_run_is_evaluated_and_exported_read_only(resume_runs, tmp_path, run_cli):
    """A user watching a long run: eval and export take RUN/checkpoints/step-N without the
    run's lock and without touching the run, and say which step they looked at."""
    _, crashed = resume_runs("place")
    run = copy_run(crashed, tmp_path)
    before = snapshot(run)
    code, _, err = run_cli("eval", run, "--grid-size", "2", "--sampler-steps", "2", "--device", "cpu")
    assert "newest checkpoint" in assert_one_line_error(code, err, 1)
    checkpoint = run / "checkpoints" / "step-0000004"
    code, out, err = run_cli("eval", checkpoint, "--grid-size", "2", "--sampler-steps", "2", "--device", "cpu",
                             "-o", tmp_path / "eval", "--json")
    assert code == 0, err
    assert json.loads(out)["models"][0]["checkpoint_step"] == 4
    assert load_model(run / "checkpoints" / "latest").manifest["checkpoint"]["step"] == 4  # the newest one
    code, _, err = run_cli("export", checkpoint, "-o", tmp_path / "export")
    assert code == 0, err
    ema = load_file(checkpoint / "ema.safetensors")
    exported = load_file(tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in exported)  # the weights a finished run would publish
    assert snapshot(run) == before


def test_a_run_killed_before_its_first_checkpoint_starts_over(resume_runs, pruned_dir, tmp_path, capsys):
    """With no checkpoint and no live owner the folder is restartable, with or without
    --resume (said once), and ends exactly like an uninterrupted run."""
    full, crashed = resume_runs("place")
    for resume in (False, True):
        run = tmp_path / f"run-{resume}"
        shutil.copytree(crashed, run)
        shutil.rmtree(run / "checkpoints")
        capsys.readouterr()
        summary = run_distill(str(pruned_dir), run, loss="place", resume=resume, **RESUME)
        assert "starting it again from step 0" in capsys.readouterr().err and summary["resumed_from_step"] is None
        assert manifest(run)["status"] == "complete"
        assert_same_tensors(weights(full / "unet/diffusion_pytorch_model.safetensors"),
                            weights(run / "unet/diffusion_pytorch_model.safetensors"), "final student")
        assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))


def test_resume_of_a_folder_without_a_run_is_refused(pruned_dir, tmp_path):
    with pytest.raises(UserError, match="no run to resume"):
        run_distill(str(pruned_dir), tmp_path / "nothing-here", loss="place", resume=True, **RESUME)
    assert not (tmp_path / "nothing-here" / "difcompress.json").exists()


def test_running_into_an_existing_run_without_resume_is_refused(resume_runs, pruned_dir, tmp_path, run_cli):
    _, crashed = resume_runs("place")
    run = copy_run(crashed, tmp_path)
    before = snapshot(run)
    with pytest.raises(UserError, match="--resume"):
        run_distill(str(pruned_dir), run, loss="place", **RESUME)
    assert snapshot(run) == before
    code, _, stderr = run_cli("distill", "--student", pruned_dir, "-o", run, "--data", "digits", "--steps", "2",
                              "--batch-size", "4", "--device", "cpu", "--json")
    assert "--resume" in assert_one_line_error(code, stderr)
    assert snapshot(run) == before


def test_output_folder_that_is_not_a_run_is_refused(pruned_dir, tmp_path, run_cli):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me\n")
    code, _, stderr = run_cli("distill", "--student", pruned_dir, "-o", out, "--data", "digits", "--steps", "2",
                              "--batch-size", "4", "--device", "cpu", "--json")
    assert str(out) in assert_one_line_error(code, stderr)
    assert snapshot(out) == {"thesis.tex": b"keep me\n"}
    # A prune result is a difcompress folder, but not a distill run: refused and left alone.
    prune_result = tmp_path / "prune-result"
    shutil.copytree(pruned_dir, prune_result)
    before = snapshot(prune_result)
    with pytest.raises(UserError, match="not a difcompress distill run"):
        run_distill(str(pruned_dir), prune_result, loss="place", steps=2, checkpoint_every=0, **FAST)
    assert snapshot(prune_result) == before


# ----------------------------------------------------------------------------- NaN / inf


def test_huge_learning_rate_stops_with_one_line_via_cli(pruned_dir, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, stderr = run_cli("distill", "--student", pruned_dir, "-o", run, "--data", "digits", "--loss", "place",
                              "--steps", "6", "--batch-size", "4", "--lr", "1e30", "--checkpoint-every", "0",
                              "--device", "cpu", "--json", "--log-every", "1")
    line = assert_one_line_error(code, stderr, expected_code=1)
    assert "nan" in line.lower() or "inf" in line.lower(), line
    # Step 1 is computed with the initial weights; the first update blows them up.
    assert "at step 2" in line, line
    assert manifest(run)["status"] == "running"
    assert not (run / "unet").exists()


def test_nan_loss_names_the_step_and_last_good_checkpoint(pruned_dir, tmp_path, monkeypatch):
    real = Trainer.compute_losses

    def nan_at_step_three(self, batch, step):
        total, terms = real(self, batch, step)
        return (total * float("nan") if step == 3 else total), terms

    monkeypatch.setattr(Trainer, "compute_losses", nan_at_step_three)
    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        run_distill(str(pruned_dir), run, loss="place", steps=6, checkpoint_every=2, **FAST)
    message = str(info.value)
    assert "nan" in message.lower() and "at step 3" in message, message
    assert "step-0000002" in message, message
    assert info.value.exit_code == 1
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert manifest(run)["status"] == "running"


# ----------------------------------------------------------------------------- CLI usage errors


def test_unknown_loss_via_cli(pruned_dir, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, stderr = run_cli("distill", "--student", pruned_dir, "-o", run, "--data", "digits", "--loss", "l3",
                              "--steps", "2", "--device", "cpu")
    line = assert_one_line_error(code, stderr, expected_code=2)
    assert "l3" in line and "place" in line
    assert not run.exists()


def test_teacher_of_another_family_is_refused(pruned_dir, tiny_model_dir, tmp_path, monkeypatch):
    """The teacher is relabelled as another family on load."""
    import difcompress.commands.distill as distill_module
    from difcompress.families.unet2d import PixelUNetFamily

    class OtherFamily(PixelUNetFamily):
        name = "other-family"

    real_load = distill_module.load_model

    def load(source, device):
        loaded = real_load(source, device)
        if Path(source).resolve() == tiny_model_dir.resolve():
            loaded.family = OtherFamily()
        return loaded

    monkeypatch.setattr(distill_module, "load_model", load)
    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        run_distill(str(pruned_dir), run, loss="place", steps=2, checkpoint_every=0, **FAST)
    message = str(info.value)
    assert "other-family" in message and "unet2d" in message
    assert not run.exists()  # refused while setting up: no folder claims a run that never started
