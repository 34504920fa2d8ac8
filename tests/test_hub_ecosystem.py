"""Fitting the Hugging Face ecosystem: model cards with Hub metadata, fp16 variants, push to
the Hub, datasets by name / parquet / imagefolder, and clean-fid statistics."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    NO_DIFCOMPRESS_CHECK,
    assert_one_line_error,
    run_distill,
    run_eval,
    run_export,
    run_python,
)
from PIL import Image

from difcompress.core.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- clean-fid statistics ------------------------------------------------------------------------

class _ProjectingInception(torch.nn.Module):
    """clean-fid's TorchScript shape (a `.layers` trunk giving [N, 2048, 1, 1]) with random weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Conv2d(3, 2048, 4))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_ProjectingInception()).save(str(path))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    generator = torch.Generator().manual_seed(1)
    for i in range(24):
        size = (20 + i % 5, 18 + i % 3)  # odd sizes: the clean resize does real work
        pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def test_stats_of_a_folder_equal_clean_fids_on_the_same_folder(fake_inception, image_folder, tmp_path, run_cli):
    from cleanfid.fid import get_folder_features

    from difcompress.metrics.extractors import inception_extractor

    out = tmp_path / "ref.npz"
    code, stdout, err = run_cli("stats", image_folder, "-o", out, "--inception", fake_inception, "--device", "cpu",
                                "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["count"] == 24 and summary["kind"] == "folder" and summary["schema_version"] == 1
    extractor = inception_extractor(fake_inception, "cpu")
    theirs = get_folder_features(str(image_folder), model=extractor, num_workers=0, batch_size=8,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    with np.load(out, allow_pickle=False) as ours:
        np.testing.assert_allclose(ours["mu"], theirs.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours["sigma"], np.cov(theirs, rowvar=False), rtol=1e-4, atol=1e-5)


def test_stats_refuse_a_non_npz_target_and_need_a_size_for_datasets(tmp_path, run_cli):
    code, _, err = run_cli("stats", "digits", "-o", tmp_path / "ref.txt", "--feature-extractor", "digits")
    assert ".npz" in assert_one_line_error(code, err, 2)
    parquet = _parquet(tmp_path, 4)
    code, _, err = run_cli("stats", parquet, "-o", tmp_path / "ref.npz", "--feature-extractor", "digits")
    assert "--size" in assert_one_line_error(code, err, 2)
    code, stdout, err = run_cli("stats", parquet, "-o", tmp_path / "ref.npz", "--feature-extractor", "digits",
                                "--size", "16", "--json")
    assert code == 0, err
    assert json.loads(stdout)["kind"] == "dataset"
    code, _, err = run_cli("stats", tmp_path / "no-such-folder", "-o", tmp_path / "missing.npz",
                           "--feature-extractor", "digits")
    assert "not found" in assert_one_line_error(code, err, 1)


# ---- datasets: parquet, imagefolder, hf:NAME offline -------------------------------------------------

def _rows(n: int, column: str = "img"):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (16, 16), (10 * i, 0, 0)) for i in range(n)]
    features = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    return datasets.Dataset.from_dict({column: images, "label": [i % 10 for i in range(n)]}, features=features)


def _parquet(root, n: int):
    path = root / "data.parquet"
    _rows(n).to_parquet(str(path))
    return path


def test_parquet_files_folders_and_local_hub_style_names_load_offline(tmp_path, monkeypatch):
    from difcompress.data.datasets import HFDataset, open_image_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    single = _parquet(tmp_path, 6)
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(single, folder / "part-0.parquet")
    for spec in (single, folder, f"hf:{folder}"):
        ds = open_image_data(spec, 8, 3, image_column="img")
        assert isinstance(ds, HFDataset) and len(ds) == 6 and ds[5].shape == (3, 8, 8)
        assert ds.labels.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="no image column 'pixels'"):
        open_image_data(single, 8, 3, image_column="pixels")


def test_an_imagefolder_tree_with_splits_and_metadata(tmp_path):
    from difcompress.data.datasets import HFDataset, open_image_data

    for split, n in (("train", 5), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / split / f"{i}.png")
        with (tmp_path / split / "metadata.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({"file_name": f"{i}.png", "text": f"digit {i}"}) + "\n")
    train = open_image_data(tmp_path, 8, 3)
    assert isinstance(train, HFDataset) and train.split == "train" and len(train) == 5
    assert len(open_image_data(tmp_path, 8, 3, split="test")) == 2
    with pytest.raises(UserError):
        open_image_data(tmp_path, 8, 3, split="validation")


def test_distill_reads_a_hub_style_dataset_offline(pruned_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hub-dataset"
    folder.mkdir()
    _rows(8).to_parquet(str(folder / "train.parquet"))
    summary = run_distill(pruned_dir, tmp_path / "run", data=f"hf:{folder}", image_column="img", steps=2,
                          batch_size=4, checkpoint_every=0, device="cpu")
    assert summary["data"]["items"] == 8 and summary["data"]["split"] == "train"


def test_a_hub_dataset_that_cannot_be_reached_offline_says_how_to_get_it(pruned_dir, tmp_path, monkeypatch, run_cli):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-home" / "datasets"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("opened a network connection"))
    code, _, err = run_cli("distill", "--student", pruned_dir, "-o", tmp_path / "run", "--data",
                           "hf:difcompress-tests/not-cached", "--steps", "1", "--device", "cpu")
    line = assert_one_line_error(code, err, 1)
    assert "hf download difcompress-tests/not-cached --repo-type dataset --local-dir DIR" in line, line


# ---- export: model card, fp16 weights and variant, push to the Hub ------------------------------------------------

@pytest.fixture(scope="module")
def evaluated_student(pruned_dir, tmp_path_factory):
    """A distilled student with its evaluation beside it, whose teacher has a licensed card."""
    root = tmp_path_factory.mktemp("card")
    run = root / "student"
    run_distill(pruned_dir, run, data="digits", steps=2, batch_size=4, checkpoint_every=0, device="cpu",
                loss="place+feat")
    teacher = json.loads((run / "difcompress.json").read_text())["teacher"]
    (root / "teacher-readme").write_text("")  # marker: the card below belongs to a copy
    licensed_teacher = root / "teacher"
    shutil.copytree(teacher, licensed_teacher)
    (licensed_teacher / "README.md").write_text("---\nlicense: mit\n---\n# Teacher\n")
    manifest = json.loads((run / "difcompress.json").read_text())
    manifest["teacher"] = str(licensed_teacher)
    (run / "difcompress.json").write_text(json.dumps(manifest))
    run_eval([run], fid=True, num_samples=8, sampler_steps=2, grid_size=2, latency_batch_size=2, ref="digits",
             feature_extractor="digits", device="cpu")
    return run


def test_the_card_carries_hub_metadata_and_the_evaluation(evaluated_student, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "export"
    info = run_export(evaluated_student, out, dtype="fp32")
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    assert data["license"] == "mit"  # inherited from the teacher's card
    assert {"difcompress", "pruned", "distilled", "place+feat"} <= set(data["tags"])
    evaluation = json.loads((evaluated_student / "eval" / "eval.json").read_text())["models"][0]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"fid": evaluation["fid"], "kid": evaluation["kid"]}
    assert str(out.resolve()) in card.content and "'PATH'" not in card.content
    assert "base_model" not in data  # a local teacher has no Hub id
    assert info["objective"] == "place+feat"


def test_a_hub_teacher_is_the_base_model(evaluated_student, tmp_path):
    from huggingface_hub import ModelCard

    student = tmp_path / "student"
    shutil.copytree(evaluated_student, student)
    manifest = json.loads((student / "difcompress.json").read_text())
    manifest["teacher"] = "google/ddpm-cifar10-32"
    (student / "difcompress.json").write_text(json.dumps(manifest))
    run_export(student, tmp_path / "export")
    data = ModelCard.load(tmp_path / "export" / "README.md").data.to_dict()
    assert data["base_model"] == "google/ddpm-cifar10-32" and data["base_model_relation"] == "finetune"


# One interpreter checks every fp16 export (starting one costs more than a tiny model's checks).
_FP16_LOADS = """
import sys, torch, diffusers
from pathlib import Path
from safetensors import safe_open

def check(out, pipeline):
    plain = pipeline.from_pretrained(out)                                        # the stock call, no variant
    variant = pipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    weights = sorted(p for p in out.rglob("*.safetensors") if ".fp16." not in p.name)
    inodes, total = set(), 0
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_ino not in inodes:
            inodes.add(path.stat().st_ino)
            total += path.stat().st_size
    stored = sum(p.stat().st_size for p in weights)
    assert total < 2 * stored, (total, stored)                                   # not stored twice
    for path in weights:
        with safe_open(path, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), path
    components = sorted(n for n, c in plain.components.items() if isinstance(c, torch.nn.Module))
    for name in components:
        a, b = getattr(plain, name).state_dict(), getattr(variant, name).state_dict()
        assert all(v.dtype == torch.float16 for v in b.values()), name
        assert a.keys() == b.keys() and all(torch.equal(a[k].half(), b[k]) for k in a), name
    # The plain load is one dtype throughout (fp32, as diffusers loads), so it generates.
    assert {getattr(plain, n).dtype for n in components} == {torch.float32}, components
    if getattr(plain, "text_encoder", None) is not None:
        image = plain("a 3", num_inference_steps=2, height=16, width=16, output_type="np").images
        assert image.shape[1:3] == (16, 16)
    return " ".join(components)

for case, out, pipeline in zip(*[iter(sys.argv[1:])] * 3):
    try:
        print(case, "ok", check(Path(out), getattr(diffusers, pipeline)))
    except Exception as err:
        print(case, "failed:", repr(err)[-2000:].replace(chr(10), " "))
"""

_FP16_CASES = {  # id: (fixture, pipeline class, the components it loads)
    "pixel": ("tiny_model_dir", "DDPMPipeline", "unet"),
    "latent": ("tiny_ldm_dir", "LDMPipeline", "unet vqvae"),
    "dit": ("tiny_dit_dir", "DiTPipeline", "transformer vae"),
    "sd": ("tiny_sd_dir", "StableDiffusionPipeline", "text_encoder unet vae"),
    "sdxl": ("tiny_sdxl_dir", "StableDiffusionXLPipeline", "text_encoder text_encoder_2 unet vae"),
}


@pytest.fixture(scope="module")
def fp16_exports(request, tmp_path_factory):
    """Each case's model exported with --dtype fp16, and what stock diffusers (without
    difcompress, in one fresh interpreter) said of each folder."""
    exports, argv = {}, []
    for case, (fixture, pipeline, _) in _FP16_CASES.items():
        out = tmp_path_factory.mktemp(f"fp16-{case}") / "export"
        exports[case] = (out, run_export(request.getfixturevalue(fixture), out, dtype="fp16"))
        argv += [case, str(out), pipeline]
    proc = run_python(f"import sys; sys.argv = ['-', *{argv!r}]\n" + _FP16_LOADS + NO_DIFCOMPRESS_CHECK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in _FP16_CASES)
    return exports, said


@pytest.mark.parametrize("case", list(_FP16_CASES))
def test_an_fp16_export_loads_with_and_without_the_variant(case, fp16_exports):
    """Plain weight files in fp16, the fp16 variant's names hard links to them: stock
    from_pretrained loads the folder either way (transformers' text encoders included)."""
    from difcompress.loading.models import load_model

    (out, info), said = fp16_exports[0][case], fp16_exports[1]
    components = _FP16_CASES[case][2]
    assert said.get(case) == f"ok {components}", said.get(case)
    for part in components.split():
        plain = next(p for p in (out / part).glob("*.safetensors") if ".fp16." not in p.name)
        assert plain.with_name(plain.name.replace(".safetensors", ".fp16.safetensors")).samefile(plain)
    weights = sum(p.stat().st_size for p in out.rglob("*.safetensors") if ".fp16." not in p.name)
    assert weights < info["size_on_disk_bytes"] < 2 * weights  # hard links counted once
    card = (out / "README.md").read_text()
    assert f".from_pretrained('{out.resolve()}', torch_dtype=torch.float16" in card and "variant='fp16'" in card
    assert load_model(out).model.dtype == torch.float32  # difcompress reads the plain file, in fp32


def test_a_variant_name_falls_back_to_a_copy_without_hard_links(tmp_path, monkeypatch):
    import errno
    import os

    from difcompress.artifacts.folders import add_variant_names, variant_name

    assert variant_name("model-00001-of-00002.safetensors", "fp16") == "model.fp16-00001-of-00002.safetensors"
    assert variant_name("model.safetensors.index.json", "fp16") == "model.safetensors.index.fp16.json"
    assert variant_name("model.fp16.safetensors", "fp16") is None and variant_name("config.json", "fp16") is None
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (tmp_path / "text_encoder").mkdir()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / "text_encoder" / shard).write_bytes(b"shard")
    (tmp_path / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))

    def no_links(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    add_variant_names(tmp_path, "fp16")
    copy = tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    assert copy.read_bytes() == b"weights" and copy.stat().st_nlink == 1
    index = json.loads((tmp_path / "text_encoder" / "model.safetensors.index.fp16.json").read_text())
    assert index["weight_map"] == {"a": "model.fp16-00001-of-00002.safetensors", "b": "model.fp16-00002-of-00002.safetensors"}
    assert all((tmp_path / "text_encoder" / name).read_bytes() == b"shard" for name in index["weight_map"].values())


def test_push_to_hub_uploads_the_export_and_is_one_error_offline(evaluated_student, tmp_path, monkeypatch, run_cli):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("export", evaluated_student, "-o", tmp_path / "a", "--push-to-hub", "me/student")
    assert "HF_HUB_OFFLINE" in assert_one_line_error(code, err, 2)
    assert not (tmp_path / "a").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(
        ("create", repo_id, kw["private"])))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", kw["repo_id"], sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir()))))
    code, stdout, err = run_cli("export", evaluated_student, "-o", tmp_path / "b", "--push-to-hub", "me/student",
                                "--private", "--json")
    assert code == 0, err
    assert calls[0] == ("create", "me/student", True) and calls[1][1] == "me/student"
    assert "README.md" in calls[1][2] and "model_index.json" in calls[1][2]
    assert "me/student" in (tmp_path / "b" / "README.md").read_text()  # the usage names the repo
    assert json.loads(stdout)["hub_url"] == "https://huggingface.co/me/student"
