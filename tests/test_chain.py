"""The chain end to end: recipes, run (and its resume), eval, export, demo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_prune
from safetensors import safe_open

from difcompress.cli import main
from difcompress.commands.build_assets import create_untrained_teacher

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain") / "teacher"
    create_untrained_teacher(folder, seed=0)
    return folder


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(recipe, capsys, monkeypatch):
    """Every setting is valid (no exit code 2); the plan is printed whole; the data, models and
    Inception weights the recipes need are not on this machine, and the dry run names them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli("run", recipe, "--dry-run") == 1
    captured = capsys.readouterr()
    for stage in yaml.safe_load(recipe.read_text()):
        if stage in ("prune", "distill", "eval", "export"):
            assert f"{stage} ->" in captured.out
    assert "are missing or blocked:" in captured.err and ".data" in captured.err and len(captured.err.splitlines()) == 1


def test_a_dry_run_calls_a_model_path_that_is_not_there_a_missing_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli("run", REPO / "recipes" / "ddpm-celeba64-place.yaml", "--dry-run") == 1
    assert "prune.model models/ddim-celeba64: no such folder" in capsys.readouterr().err
    for path in ("./models/x", "../models/x", "/nowhere/x", "~/nowhere/x", "a/b/c"):
        recipe = tmp_path / "local.yaml"
        recipe.write_text(f"name: x\noutput_dir: {tmp_path / 'out'}\nprune:\n  model: {path}\n  ratio: 0.5\n")
        assert cli("run", recipe, "--dry-run") == 1
        assert f"prune.model {path}: no such folder;" in capsys.readouterr().err.strip() + ";"


def test_recipe_with_unknown_setting_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noutput_dir: out\nprune:\n  model: m\n  ratio: 0.5\n  ratoi: 3\n")
    assert cli("run", bad, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "prune.ratoi" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def finished_run(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": str(root / "out"), "seed": 0, "device": "cpu",
        "prune": {"model": str(teacher), "ratio": 0.5},
        "distill": {"loss": "place", "data": "digits", "steps": 4, "batch_size": 4, "checkpoint_every": 2},
        "eval": {"sampler_steps": 2, "grid_size": 2, "latency_batch_size": 2},
        "export": {"dtype": "fp16"},
    }))
    assert cli("run", recipe) == 0
    return recipe, root / "out"


def test_run_chains_every_stage(finished_run):
    _, out = finished_run
    assert json.loads((out / "distill" / "difcompress.json").read_text())["status"] == "complete"
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert [Path(m["model"]).name for m in result["models"]] == ["teacher", "distill"]
    assert result["models"][1]["params"] < result["models"][0]["params"]
    assert (out / "eval" / "samples.png").stat().st_size > 0
    assert "place" in (out / "export" / "README.md").read_text()


def test_rerun_skips_complete_stages(finished_run, capsys):
    recipe, out = finished_run
    before = (out / "export" / "unet" / "diffusion_pytorch_model.fp16.safetensors").stat().st_mtime_ns
    assert cli("run", recipe, "--json") == 0
    statuses = [entry["status"] for entry in json.loads(capsys.readouterr().out)["stages"]]
    assert statuses == ["complete (skipped)"] * 4
    assert (out / "export" / "unet" / "diffusion_pytorch_model.fp16.safetensors").stat().st_mtime_ns == before


def test_export_loads_in_stock_diffusers_with_its_dtype(finished_run):
    _, out = finished_run
    weights = out / "export" / "unet" / "diffusion_pytorch_model.fp16.safetensors"  # the diffusers variant
    with safe_open(weights, "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype.is_floating_point
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.float16"
    code = (
        "import torch, diffusers\n"
        f"pipe = diffusers.DDPMPipeline.from_pretrained({str(out / 'export')!r}, variant='fp16', "
        "torch_dtype=torch.float32)\n"
        "img = pipe(batch_size=1, num_inference_steps=2, output_type='np').images\n"
        "assert img.shape == (1, 16, 16, 1), img.shape\n"
        "import sys; assert 'difcompress' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_eval_json_has_side_by_side_numbers(finished_run, capsys):
    _, out = finished_run
    assert cli("eval", out / "prune", out / "distill", "--sampler-steps", "2", "--grid-size", "2",
               "--latency-batch-size", "2", "-o", out / "eval2", "--device", "cpu", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    for row in result["models"]:
        for key in ("params", "macs", "latency_s_per_image", "throughput_img_s", "peak_memory_bytes"):
            assert row[key] > 0
    assert (out / "eval2" / "samples.png").is_file()


def test_eval_fid_without_reference_is_a_usage_error(finished_run, capsys):
    _, out = finished_run
    assert cli("eval", out / "distill", "--fid", "-o", out / "eval3", "--device", "cpu") == 2
    assert "--ref" in capsys.readouterr().err


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert cli("demo", "--quick", "-o", tmp_path / "demo", "--device", "cpu", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    teacher_row, student_row = result["eval"]["models"]
    assert student_row["params"] < 0.05 * teacher_row["params"]
    for part in ("student/curves.png", "student/eval/samples.png", "export/model_index.json", "export/README.md"):
        assert (tmp_path / "demo" / part).is_file(), part
    # The evaluation sits beside the student, so the exported card carries its FID.
    assert f"{student_row['fid']:.2f}" in (tmp_path / "demo" / "export" / "README.md").read_text()
    # Drift made visible: the quick demo's loss trajectory and FIDs as recorded on CPU (torch
    # 2.14.1; student weights sha256 b6a8cdf3... at 4aadd28, the same as before the renovation).
    # A change of numerics fails here, not in a document.
    losses = [json.loads(line)["loss"] for line in (tmp_path / "demo" / "student" / "metrics.jsonl").open()]
    assert losses == pytest.approx([3.16484, 1.41999], rel=1e-4)
    assert (teacher_row["fid"], student_row["fid"]) == pytest.approx((1.368, 75.76), abs=0.05)


def test_cli_reference_is_current(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "-m", "typer", "difcompress.cli", "utils", "docs", "--name", "difcompress",
                    "--output", str(out)], check=True, capture_output=True)
    assert out.read_text() == (REPO / "docs" / "cli.md").read_text(), "regenerate docs/cli.md (see docs/README)"


def test_under_a_launcher_only_the_main_process_runs_non_distill_stages(teacher, tmp_path, monkeypatch):
    """Rank 1 does not prune itself: it waits until the main process's folder is complete."""
    import threading

    import difcompress.commands.run as run_module

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "output_dir": str(tmp_path / "out"), "device": "cpu",
                                      "prune": {"model": str(teacher), "ratio": 0.5}}))
    calls = []
    monkeypatch.setattr(run_module, "run_stage", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    main_process = threading.Timer(0.2, lambda: run_prune(str(teacher), 0.5, tmp_path / "out" / "prune", device="cpu"))
    main_process.start()
    results = run_module.run_recipe(recipe)
    main_process.join()
    assert calls == [] and results[0]["status"] == "ran"
    assert run_module.stage_complete("prune", tmp_path / "out" / "prune")
