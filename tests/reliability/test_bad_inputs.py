"""Every user mistake ends in one `error:` line (exit 1, or 2 for a bad option), before any
work starts and with nothing written; hostile files are refused; inputs are never replaced."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_distill, run_prune
from PIL import Image

from difcompress.core.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")

DISTILL = ("distill", "--data", "digits", "--steps", "2", "--batch-size", "4", "--device", "cpu")
BAD_DISTILL = [
    ("--grad-clip", "-1"), ("--checkpoint-every", "-5"), ("--w-kd", "-1"), ("--w-task", "-0.5"),
    ("--w-feat", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1e-3"), ("--w-task", "nan"),
    ("--ema-decay", "1"), ("--ema-decay", "-0.1"), ("--steps", "0"), ("--batch-size", "0"),
    ("--group-size", "0"), ("--class-dropout", "1"), ("--feature-mask-std", "-1"), ("--mixed-precision", "foo"),
    ("--loss", "l3"), ("--device", "foo"), ("--gradient-accumulation-steps", "0"), ("--lr-warmup-steps", "-1"),
    ("--optimizer", "sgd"), ("--checkpoints-total-limit", "0"), ("--fit-eps", "0"), ("--teacher-samples", "0"),
]
BAD_EVAL = [("--batch-size", "0"), ("--sampler-steps", "0"), ("--latency-batch-size", "0"), ("--num-samples", "1"),
            ("--grid-size", "0"), ("--guidance-scale", "0.5"), ("--sampler", "euler"), ("--class-label", "a,b")]
BAD_PRUNE = [("--ratio", "1"), ("--ratio", "-0.1"), ("--ratio", "nan"), ("--importance", "l1"),
             ("--batch-size", "0"), ("--diff-threshold", "2"), ("--depth", "0"), ("--timesteps-per-pass", "0"),
             ("--round-to", "0"), ("--blocks", "1,x")]
# Options a plain U-Net refuses for another reason (depth pruning, class labels, guidance):
# tried on the class-conditional DiT teacher, so the error is the value's own check.
DIT_OPTIONS = {"--depth", "--blocks", "--guidance-scale", "--class-label"}


@pytest.mark.parametrize("option,value", BAD_DISTILL, ids=lambda v: str(v))
def test_bad_distill_values_are_one_line_before_any_work(option, value, pruned_dir, tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(*DISTILL, "--student", pruned_dir, "-o", out, option, value)
    line = assert_one_line_error(code, err, 2)
    assert option in line or value in line, line
    assert not out.exists()


@pytest.mark.parametrize("option,value", BAD_EVAL, ids=lambda v: str(v))
def test_bad_eval_values_are_one_line_before_any_work(option, value, tmp_path, run_cli):
    out = tmp_path / "eval"
    model = "digits-dit" if option in DIT_OPTIONS else "digits"
    code, _, err = run_cli("eval", model, "--fid", "-o", out, "--device", "cpu", option, value)
    line = assert_one_line_error(code, err, 2)
    assert option in line or value in line, line
    assert not out.exists()


@pytest.mark.parametrize("option,value", BAD_PRUNE, ids=lambda v: str(v))
def test_bad_prune_values_are_one_line_before_any_work(option, value, tmp_path, run_cli):
    out = tmp_path / "pruned"
    model = "digits-dit" if option in DIT_OPTIONS else "digits"
    code, _, err = run_cli("prune", model, "-o", out, "--device", "cpu", option, value)
    line = assert_one_line_error(code, err, 2)
    assert option in line or value in line, line
    assert not out.exists()


def test_a_run_with_no_term_to_train_is_refused(pruned_dir, tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(*DISTILL, "--student", pruned_dir, "-o", out, "--loss", "task", "--w-task", "0")
    assert "nothing to train" in assert_one_line_error(code, err, 2)
    assert not out.exists()


def test_eval_into_an_existing_file_is_refused_before_sampling(tmp_path, run_cli):
    target = tmp_path / "results.json"
    target.write_text("mine")
    code, _, err = run_cli("eval", "digits", "--fid", "--num-samples", "4", "-o", target, "--device", "cpu")
    assert str(target) in assert_one_line_error(code, err, 2)
    assert target.read_text() == "mine"


def test_a_gpu_that_is_not_there_is_an_error_not_a_cpu_run(pruned_dir, tmp_path, run_cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    for device in ("cuda", "cuda:1"):
        out = tmp_path / device.replace(":", "")
        code, _, err = run_cli("distill", "--student", pruned_dir, "-o", out, "--data", "digits", "--steps", "1",
                               "--device", device)
        assert "no CUDA GPU" in assert_one_line_error(code, err, 1)
        assert not (out / "metrics.jsonl").exists()


# ---- inputs are never replaced -------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "parent"])
def test_prune_and_export_refuse_to_replace_their_input(spelling, pruned_dir, tmp_path, run_cli):
    model = tmp_path / "models" / "student"
    shutil.copytree(pruned_dir, model)
    before = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    outputs = {"same": model, "dotdot": model / ".." / "student", "parent": model.parent}
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(model)
        outputs["symlink"] = tmp_path / "link"
    for command in (("prune", model, "--ratio", "0.5"), ("export", model)):
        code, _, err = run_cli(*command, "-o", outputs[spelling], "--device", "cpu") if command[0] == "prune" \
            else run_cli(*command, "-o", outputs[spelling])
        assert "would replace the input" in assert_one_line_error(code, err, 2)
    assert {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_distill_refuses_an_output_that_is_its_student(pruned_dir, tmp_path, run_cli):
    student = tmp_path / "student"
    shutil.copytree(pruned_dir, student)
    code, _, err = run_cli(*DISTILL, "--student", student, "-o", student)
    assert "would replace the input" in assert_one_line_error(code, err, 2)


# ---- hostile files ---------------------------------------------------------------------------------

def test_a_scheduler_config_naming_a_model_class_is_refused(pruned_dir, tmp_path, run_cli):
    hostile = tmp_path / "hostile"
    shutil.copytree(pruned_dir, hostile)
    config = hostile / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "UNet2DModel"}))
    for command in (("export", hostile, "-o", tmp_path / "out"), ("eval", hostile, "-o", tmp_path / "eval")):
        code, _, err = run_cli(*command)
        assert "not a diffusers scheduler class" in assert_one_line_error(code, err, 1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["os.system", "../../etc", 7])
def test_other_hostile_class_names_are_refused(name, pruned_dir, tmp_path, run_cli):
    hostile = tmp_path / "hostile"
    shutil.copytree(pruned_dir, hostile)
    config = hostile / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": name}))
    index = hostile / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "unet": ["diffusers", name]}))
    code, _, err = run_cli("export", hostile, "-o", tmp_path / "out")
    assert "unsupported model class" in assert_one_line_error(code, err, 1)


# ---- models and data users bring -------------------------------------------------------------------

def test_a_unet_with_dropout_prunes_at_every_ratio(tmp_path):
    from conftest import build_tiny_unet, save_pipeline

    from difcompress.loading.models import load_model

    teacher = save_pipeline(build_tiny_unet(seed=3, dropout=0.1), tmp_path / "dropout-teacher")
    for ratio in (0.25, 0.5, 0.75):
        report = run_prune(teacher, ratio, tmp_path / f"p{ratio}", device="cpu")
        assert report["params"][1] < report["params"][0]
        assert load_model(tmp_path / f"p{ratio}").model.config.dropout == 0.1


def test_a_rebuild_that_differs_names_the_layer(tmp_path, monkeypatch):
    from conftest import build_tiny_unet

    from difcompress.families.registry import family_for_model

    model = build_tiny_unet(seed=4)
    family = family_for_model(model)
    real = family.pruned_config

    def wrong_config(m):
        return {**real(m), "act_fn": "mish"}  # a rebuild that computes something else

    monkeypatch.setattr(type(family), "pruned_config", lambda self, m: wrong_config(m))
    with pytest.raises(UserError, match="differs first at layer"):
        family.check_config_rebuild(model)


def test_unreadable_images_are_skipped_with_one_warning_and_counted(pruned_dir, tmp_path, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(data / f"{i}.png")
    full = (data / "0.png").read_bytes()
    (data / "0.png").write_bytes(full[: len(full) // 2])  # truncated
    (data / "captions.txt").write_text("not an image, not a warning")
    capsys.readouterr()
    summary = run_distill(pruned_dir, tmp_path / "run", data=data, steps=1, batch_size=2, checkpoint_every=0,
                          device="cpu")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "1 unreadable image" in err and "0.png" in err
    assert summary["data"]["unreadable_skipped"] == 1 and summary["data"]["items"] == 5


def test_outputs_follow_the_umask_not_private_temporary_modes(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "pruned"
        run_prune("digits", 0.5, out, device="cpu")
    finally:
        os.umask(old)
    for path in [out, *out.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_files_that_are_not_text_or_are_damaged_are_one_error_line(pruned_dir, tmp_path, run_cli):
    from difcompress.data.datasets import ImageFolderDataset
    from difcompress.data.text import read_prompts
    from difcompress.metrics.fid import read_reference_stats

    latin1 = "chiffre \xe9crit".encode("latin-1")  # not UTF-8
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"prune:\n  model: " + latin1 + b"\n")
    code, _, err = run_cli("run", recipe)
    assert "not UTF-8" in assert_one_line_error(code, err, 1)
    (tmp_path / "prompts.txt").write_bytes(latin1)
    with pytest.raises(UserError, match="prompts.txt is not UTF-8"):
        read_prompts(tmp_path / "prompts.txt")
    images = tmp_path / "captioned"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    (images / "a.txt").write_bytes(latin1)
    with pytest.raises(UserError, match="a.txt is not UTF-8"):
        ImageFolderDataset(images, size=16, channels=3)
    # A damaged evaluation beside a model, and a damaged KID companion beside clean-fid stats.
    model = tmp_path / "model"
    shutil.copytree(pruned_dir, model)
    (model / "eval").mkdir()
    (model / "eval" / "eval.json").write_text('{"models": ')
    code, _, err = run_cli("export", model, "-o", tmp_path / "exported")
    assert "eval.json is not valid JSON" in assert_one_line_error(code, err, 1)
    (model / "eval" / "eval.json").write_text('{"rows": []}')
    code, _, err = run_cli("export", model, "-o", tmp_path / "exported")
    assert "eval.json" in assert_one_line_error(code, err, 1)
    assert not (tmp_path / "exported").exists()
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    (tmp_path / "ref_kid.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="ref_kid.npz"):
        read_reference_stats(tmp_path / "ref.npz")


def test_a_batch_that_does_not_split_is_refused_by_the_dry_run_too(pruned_dir, tmp_path, run_cli):
    code, _, err = run_cli(*DISTILL, "--student", pruned_dir, "-o", tmp_path / "run", "--batch-size", "6",
                           "--gradient-accumulation-steps", "4", "--dry-run")
    assert "split evenly" in assert_one_line_error(code, err, 2)


def test_a_file_where_an_output_folder_would_go_is_one_error_line(tmp_path, run_cli):
    blocking = tmp_path / "notes.txt"
    blocking.write_text("a file, not a folder")
    code, _, err = run_cli("prune", "digits", "-o", blocking / "pruned", "--ratio", "0.5", "--device", "cpu")
    assert "notes.txt is a file" in assert_one_line_error(code, err, 1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: blocked\noutput_dir: {blocking}\nprune:\n  model: digits\n  ratio: 0.5\n")
    code, _, err = run_cli("run", recipe, "--dry-run")
    assert "prune.output" in assert_one_line_error(code, err, 1)
    assert blocking.read_text() == "a file, not a folder"


def test_recipe_mistakes_a_yaml_reader_would_let_through(tmp_path, run_cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nprune:\n  model: digits\n  ratio: 0.3\n  ratio: 0.5\n")
    code, _, err = run_cli("run", recipe, "--dry-run")
    assert "'ratio' is given twice (line 5)" in assert_one_line_error(code, err, 1)
    code, _, err = run_cli("run", tmp_path, "--dry-run")
    assert "is a folder" in assert_one_line_error(code, err, 1)


def test_a_run_refused_while_setting_up_leaves_no_folder_and_resume_from_is_checked_first(pruned_dir, tmp_path,
                                                                                          run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(*DISTILL, "--student", pruned_dir, "-o", out, "--teacher", "digits-dit")
    assert "same family" in assert_one_line_error(code, err, 1)
    assert not out.exists()  # no folder claiming a run that never started
    code, _, err = run_cli(*DISTILL, "--student", pruned_dir, "-o", out, "--resume-from", tmp_path)
    assert "--resume-from" in assert_one_line_error(code, err, 2)
    assert not out.exists()


def _metadata_folder(tmp_path, metadata_name: str, content: bytes):
    data = tmp_path / "meta"
    data.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (90 * i, 0, 0)).save(data / f"{i}.png")
    for name in ("metadata.jsonl", "metadata.csv"):
        (data / name).unlink(missing_ok=True)
    (data / metadata_name).write_bytes(content)
    return data


METADATA_MISTAKES = [
    ("metadata.jsonl", b"", "holds no rows"),
    ("metadata.jsonl", b'{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png", "text": "\xe9t\xe9"}\n',
     "metadata.jsonl is not UTF-8 text (line 2"),
    ("metadata.jsonl", b'{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png", "text": \n', "line 2 is not valid JSON"),
    ("metadata.csv", b"file_name,text\n0.png,a\n1.png,b,c\n", "metadata.csv line 3 has 3 fields"),
    ("metadata.csv", b'file_name,text\n0.png,a\n1.png,"b\n', "metadata.csv line 3 is not valid CSV"),
    ("metadata.csv", b"file_name,text\n0.png,\xe9\n", "metadata.csv is not UTF-8 text (line 2"),
    ("metadata.jsonl", b'{"file_name": "../../etc/passwd", "text": "a"}\n', "'../../etc/passwd' leads outside"),
    ("metadata.jsonl", b'{"file_name": "/etc/passwd", "text": "a"}\n', "'/etc/passwd' leads outside"),
    ("metadata.jsonl", b'{"file_name": "link.png", "text": "a"}\n', "'link.png' leads outside"),
]


@pytest.mark.parametrize("name,content,expected", METADATA_MISTAKES, ids=[m[2] for m in METADATA_MISTAKES])
def test_metadata_mistakes_name_the_file_and_line_before_any_reading(name, content, expected, pruned_dir, tmp_path,
                                                                     run_cli, monkeypatch):
    import datasets

    from difcompress.data.datasets import open_image_data

    data = _metadata_folder(tmp_path, name, content)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (16, 16)).save(outside)
    (data / "link.png").symlink_to(outside)
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        open_image_data(data, 16, 3)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("read before the metadata check"))
    code, _, err = run_cli(*DISTILL[:1], "--student", pruned_dir, "-o", tmp_path / "run", "--data", data,
                           "--steps", "1", "--device", "cpu")
    assert expected in assert_one_line_error(code, err, 1)


def test_prompts_that_are_not_a_regular_file_or_hold_nothing_say_so(tmp_path):
    from difcompress.data.text import read_prompts

    with pytest.raises(UserError, match="/dev/zero is not a regular file"):
        read_prompts("/dev/zero")
    with pytest.raises(UserError, match="is not a regular file"):
        read_prompts(tmp_path)
    (tmp_path / "p.jsonl").write_text("\n")
    with pytest.raises(UserError, match="p.jsonl holds no rows"):
        read_prompts(tmp_path / "p.jsonl")


def test_converted_and_upscaled_images_are_one_warning_and_tiny_ones_are_refused(pruned_dir, tmp_path, capsys,
                                                                               run_cli):
    from conftest import TINY_SIZE

    data = tmp_path / "mixed"
    data.mkdir()
    side = TINY_SIZE
    for i in range(3):
        Image.new("RGB", (side, side), (60 * i, 0, 0)).save(data / f"rgb{i}.png")
    Image.new("RGBA", (side, side), (0, 200, 0, 100)).save(data / "alpha.png")
    Image.new("CMYK", (side, side), (0, 50, 100, 0)).save(data / "print.jpg")
    Image.fromarray(np.full((side, side), 40000, dtype=np.uint16)).save(data / "deep.png")
    Image.new("RGB", (side // 2, side // 2)).save(data / "half.png")
    capsys.readouterr()
    summary = run_distill(pruned_dir, tmp_path / "run", data=data, steps=1, batch_size=2, checkpoint_every=0,
                          device="cpu")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert "converted 3 image(s) to RGB (1 16-bit, 1 CMYK, 1 RGBA)" in err and "upscaled 1 image(s)" in err, err
    assert summary["data"]["converted"] == {"16-bit": 1, "CMYK": 1, "RGBA": 1} and summary["data"]["upscaled"] == 1
    Image.new("RGB", (1, 1)).save(data / "dot.png")
    code, _, err = run_cli(*DISTILL[:1], "--student", pruned_dir, "-o", tmp_path / "refused", "--data", data,
                           "--steps", "1", "--device", "cpu")
    line = assert_one_line_error(code, err, 1)
    assert "dot.png, 1x1" in line and "at least" in line, line
