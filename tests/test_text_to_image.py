"""Text-to-image (Stable Diffusion U-Nets): BK-SDM block removal, captioned data and its
caches, distillation with caption dropout and BK-SDM feature KD, evaluation from prompts
with CLIP score, and a StableDiffusionPipeline export that stock diffusers loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    NO_DIFCOMPRESS_CHECK,
    assert_one_line_error,
    run_distill,
    run_eval,
    run_export,
    run_prune,
    write_captioned_digits,
    write_tiny_clip,
)

from difcompress.core.errors import UserError
from difcompress.loading.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return write_captioned_digits(tmp_path_factory.mktemp("captioned") / "digits")


@pytest.fixture(scope="module")
def small(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "bk-small"
    report = run_prune(tiny_sd_dir, 0.0, out, preset="bk-small", device="cpu")
    return out, report


def test_presets_remove_bk_sdms_blocks_and_copy_the_teacher_weights(tiny_sd_dir, small, tmp_path):
    from diffusers import UNet2DConditionModel

    from difcompress.pruning.blocks import teacher_key

    out, report = small
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    student = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert student.config.layers_per_block == 1 and student.mid_block is None
    assert report["preset"] == "bk-small" and "mid_block" in report["removed_blocks"]
    source = teacher.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, source[teacher_key(key, "bk-small")]), key
    assert teacher_key("up_blocks.2.resnets.1.conv1.weight", "bk-small") == "up_blocks.2.resnets.2.conv1.weight"
    tiny = run_prune(tiny_sd_dir, 0.0, tmp_path / "tiny", preset="bk-tiny", device="cpu")
    tiny_unet = UNet2DConditionModel.from_pretrained(tmp_path / "tiny", subfolder="unet")
    assert len(tiny_unet.down_blocks) == 3 and tiny_unet.config.block_out_channels == [16, 32, 32]
    assert torch.equal(tiny_unet.up_blocks[0].resnets[1].conv1.weight, teacher.up_blocks[1].resnets[2].conv1.weight)
    assert tiny["params"][1] < report["params"][1] < report["params"][0]


def test_a_unet_without_sds_pattern_and_other_pipelines_are_clear_errors(tiny_sd_dir, tmp_path, run_cli):
    from conftest import build_tiny_sd

    odd = build_tiny_sd(tmp_path / "odd", layers_per_block=1)
    code, _, err = run_cli("prune", odd, "--preset", "bk-base", "--ratio", "0", "-o", tmp_path / "p", "--device",
                           "cpu")
    assert "block pattern" in assert_one_line_error(code, err, 2)
    other = tmp_path / "sdxl-like"
    shutil.copytree(tiny_sd_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionXLPipeline without its text_encoder_2"):
        load_model(other)
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionXLImg2ImgPipeline with a UNet2DConditionModel, which is not "
                                        "supported yet"):
        load_model(other)
    code, _, err = run_cli("prune", tiny_sd_dir, "--preset", "bk-small", "--ratio", "0.5", "--global", "-o",
                           tmp_path / "q", "--device", "cpu")
    assert "two steps" in assert_one_line_error(code, err, 2)


def test_channel_pruning_after_a_preset_keeps_heads_and_rebuilds_from_the_stock_config(tiny_sd_dir, small, tmp_path):
    """--preset bk-small --ratio 0.5: blocks go, then half of every width; each level keeps
    its head count (SD's config names heads, not head dims) and the GEGLU halves stay paired."""
    from diffusers import UNet2DConditionModel

    report = run_prune(tiny_sd_dir, 0.5, tmp_path / "both", preset="bk-small", importance="magnitude", device="cpu")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "both", subfolder="unet")
    assert unet.config.block_out_channels == [8, 16, 16, 16] and unet.config.norm_num_groups == 4
    assert list(unet.config.attention_head_dim) == [2, 4, 4, 4] and unet.mid_block is None
    assert report["preset"] == "bk-small" and report["widths"]["down_blocks.0 (layers)"] == ["16 x 2", "8 x 1"]
    attention = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    assert attention.attn2.heads == 4 and attention.attn2.to_k.in_features == 32  # still reads the text width
    assert attention.ff.net[0].proj.out_features == 2 * 4 * 16
    assert report["params"][1] < small[1]["params"][1] / 2
    loaded = load_model(tmp_path / "both")
    assert loaded.family.name == "t2i"
    with torch.no_grad():
        out = loaded.model(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]),
                           encoder_hidden_states=torch.randn(2, 5, 32)).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_channel_pruning_alone_keeps_each_geglu_value_beside_its_gate(tiny_sd_dir, tmp_path):
    """A GEGLU projects to (value | gate) halves multiplied position by position: value j must
    stay with gate j. Teacher biases are distinct, so each kept row names its teacher row."""
    from diffusers import UNet2DConditionModel

    from difcompress.pruning.graph import ChannelUnit

    assert ChannelUnit(copies=2).channels(3, 16) == [3, 11]
    assert ChannelUnit(size=2, copies=3).channels(1, 12) == [2, 3, 6, 7, 10, 11]
    run_prune(tiny_sd_dir, 0.5, tmp_path / "ratio", importance="magnitude", device="cpu")
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    student = UNet2DConditionModel.from_pretrained(tmp_path / "ratio", subfolder="unet")
    assert student.config.block_out_channels == [8, 16, 16, 16] and student.config.layers_per_block == 2
    name = "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj"
    bias, kept = teacher.get_submodule(name).bias.tolist(), student.get_submodule(name).bias.tolist()
    rows = [bias.index(b) for b in kept]
    half = len(bias) // 2
    assert len(rows) == half and [r + half for r in rows[: half // 2]] == rows[half // 2:]


@pytest.fixture(scope="module")
def distilled(small, captioned, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-distill")
    summary = run_distill(small[0], root / "run", loss="place", data=str(captioned), w_feat=1.0,
                          feature_reduction="sum", coarse_norm="l1", fit_eps=1e-8, steps=4, batch_size=4,
                          checkpoint_every=2, log_every=1, device="cpu", latent_cache=root / "cache")
    return root, summary


def test_distill_on_captions_with_bk_sdm_feature_kd(distilled):
    root, summary = distilled
    settings = summary["settings"]
    assert settings["caption_dropout"] == 0.1 and settings["objective"] == "place+feat"
    assert "down_blocks.0" in settings["feature_layers"] and "up_blocks.3" in settings["feature_layers"]
    assert summary["data"]["items"] == 24 and not summary["data"]["text_cache"]["reused"]
    final = summary["final"]
    assert {"task", "kd", "feature", "w"} <= set(final)
    assert json.loads((root / "run" / "difcompress.json").read_text())["status"] == "complete"


def test_the_text_and_latent_caches_are_reused_across_runs(distilled, small, captioned, monkeypatch):
    from difcompress.data.text import TextEncoder

    root, _ = distilled
    calls = []
    real = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, prompts, **kw: calls.append(len(prompts)) or real(
        self, prompts, **kw))
    summary = run_distill(small[0], root / "again", loss="place", data=str(captioned), steps=1, batch_size=4,
                          checkpoint_every=0, device="cpu", latent_cache=root / "cache")
    assert summary["data"]["text_cache"]["reused"] and summary["data"]["latent_cache"]["reused"]
    assert calls == []


def test_resume_with_captions_and_caption_dropout_is_bit_identical(small, captioned, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from difcompress.training.trainer import Trainer

    settings = dict(loss="place", data=str(captioned), steps=6, batch_size=4, checkpoint_every=3, log_every=1,
                    caption_dropout=0.5, device="cpu", latent_cache=tmp_path / "cache")
    run_distill(small[0], tmp_path / "full", **settings)
    real = Trainer.train_step

    def crash(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(UserError, match="interrupted at step 4"):
        run_distill(small[0], tmp_path / "resumed", **settings)
    monkeypatch.setattr(Trainer, "train_step", real)
    assert run_distill(small[0], tmp_path / "resumed", resume=True, **settings)["resumed_from_step"] == 3
    a, b = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (tmp_path / "full",
                                                                                      tmp_path / "resumed"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_eval_from_prompts_with_guidance_and_clip_score(tiny_sd_dir, distilled, tmp_path):
    root, _ = distilled
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 3\nthe digit 7\n")
    clip = write_tiny_clip(tmp_path / "clip")
    result = run_eval([tiny_sd_dir, root / "run"], prompts=str(prompts), clip_model=str(clip), sampler_steps=2,
                      grid_size=4, latency_batch_size=2, device="cpu", output=tmp_path / "eval", negative_prompt="blur")
    for row in result["models"]:
        assert row["guidance_scale"] == 7.5 and -1 <= row["clip_score"] <= 1
        assert row["pipeline_s_per_image"] > 0 and row["pipeline_batch_size"] == 4  # beside the U-Net's latency
        assert row["prompts"] == ["a handwritten 3", "the digit 7", "a handwritten 3", "the digit 7"]
    assert (tmp_path / "eval" / "samples.png").is_file()
    with pytest.raises(UserError, match="--prompts"):
        run_eval([tiny_sd_dir], sampler_steps=2, device="cpu", output=tmp_path / "e2")


def test_export_is_a_stable_diffusion_pipeline_stock_diffusers_runs(tiny_sd_dir, distilled, tmp_path,
                                                                     run_subprocess):
    root, _ = distilled
    out = tmp_path / "export"
    run_export(root / "run", out, dtype="fp16")
    for part in ("vae", "text_encoder"):  # the frozen parts, as the teacher has them (in the export dtype)
        ours = sorted(p.name for p in (out / part).iterdir())
        assert any(name.endswith(".fp16.safetensors") for name in ours), ours
    vocab = [json.loads((d / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"] for d in (out, tiny_sd_dir)]
    assert vocab[0] == vocab[1]
    code = f"""
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(out)!r}, variant="fp16", torch_dtype=torch.float32)
image = pipe("a handwritten 5", num_inference_steps=2, height=16, width=16, output_type="np").images
assert image.shape == (1, 16, 16, 3), image.shape
print("t2i-ok")
""" + NO_DIFCOMPRESS_CHECK
    proc = run_subprocess(code)
    assert proc.returncode == 0 and "t2i-ok" in proc.stdout, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "text-to-image" in card and "StableDiffusionPipeline" in card


def test_full_layout_presets_match_bk_sdms_parameter_counts():
    """SD-2.1-base's U-Net from its config (no weights: meta tensors); BK-SDM's own student
    configs counted with diffusers 0.42 give 583.48M / 485.79M / 326.83M (teacher 865.91M)."""
    from diffusers import UNet2DConditionModel

    from difcompress.layouts import SD21_BASE_UNET
    from difcompress.pruning.blocks import student_config

    published = {"bk-base": 583.48e6, "bk-small": 485.79e6, "bk-tiny": 326.83e6}
    with torch.device("meta"):
        teacher = UNet2DConditionModel(**SD21_BASE_UNET)
        assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(865.91e6, rel=5e-3)
        for preset, count in published.items():
            student = UNet2DConditionModel.from_config(student_config(dict(teacher.config), preset))
            assert sum(p.numel() for p in student.parameters()) == pytest.approx(count, rel=5e-3), preset


def test_data_free_distill_samples_the_teacher_from_prompts_once(small, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("file_name,text\na.png,a handwritten 3\nb.png,the digit 7\n")
    settings = dict(loss="place", data="teacher", prompts=str(prompts), teacher_samples=4, teacher_sampler_steps=2,
                    steps=2, batch_size=2, checkpoint_every=1, device="cpu", latent_cache=tmp_path / "cache")
    summary = run_distill(small[0], tmp_path / "free", **settings)
    assert summary["data"] == {"data": "teacher", "prompts": str(prompts), "items": 4}
    kept = tmp_path / "free" / "teacher_samples"
    assert (kept / "samples.safetensors").is_file() and not list(kept.parent.glob(".teacher_samples*"))
    with pytest.raises(UserError, match="--prompts"):
        run_distill(small[0], tmp_path / "none", **{**settings, "prompts": None})


def test_resolution_seeded_crops_and_random_flip_frame_the_training_images(small, tiny_dit_dir, tmp_path):
    """--resolution resizes the short side, --no-center-crop crops each image where (seed,
    index) says, the same every epoch, and --random-flip keeps each image both ways (their
    latents encoded once)."""
    from PIL import Image

    from difcompress.data.datasets import MirroredDataset, open_image_data
    from difcompress.data.images import crop_position
    from difcompress.loading.data import training_size

    folder = tmp_path / "wide"
    folder.mkdir()
    torch.manual_seed(0)
    for i in range(6):
        Image.fromarray((torch.rand(32, 64, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"the digit {i}")
    full = (folder / "0.png").read_bytes()
    (folder / "9.png").write_bytes(full[: len(full) // 2])  # truncated: skipped, counted, warned
    centred, cropped = open_image_data(folder, 32, 3), open_image_data(folder, 32, 3, crop_seed=5)
    assert torch.equal(cropped[2], open_image_data(folder, 32, 3, crop_seed=5)[2])
    assert crop_position(5, 2) != crop_position(5, 3) and crop_position(None, 2) is None
    assert not all(torch.equal(centred[i], cropped[i]) for i in range(6))
    mirrored = MirroredDataset(centred)
    assert len(mirrored) == 12 and torch.equal(mirrored[8], centred[2].flip(-1))
    assert mirrored.captions[8] == "the digit 2"
    settings = dict(loss="mse", data=str(folder), steps=2, batch_size=4, checkpoint_every=0, device="cpu",
                    latent_cache=tmp_path / "cache")
    summary = run_distill(small[0], tmp_path / "run", resolution=32, center_crop=False, random_flip=True, **settings)
    assert summary["data"]["items"] == 12 and summary["data"]["latent_cache"]["shape"] == [4, 16, 16]
    assert summary["data"]["unreadable_skipped"] == 1 and summary["data"]["first_unreadable"].endswith("9.png")
    with pytest.raises(UserError, match="multiple of 16"):
        run_distill(small[0], tmp_path / "odd", resolution=24, **settings)
    with pytest.raises(UserError, match="--data teacher"):
        run_distill(small[0], tmp_path / "free", **{**settings, "data": "teacher", "random_flip": True})
    with pytest.raises(UserError, match="position embeddings"):
        training_size(load_model(tiny_dit_dir), 64)


def _sd_memory(layout, preset, *, micro_batch, ema=True):
    from diffusers import UNet2DConditionModel

    from difcompress.config import DistillConfig
    from difcompress.families.t2i import TextToImageFamily
    from difcompress.pruning.blocks import feature_pairs, student_config
    from difcompress.training.memory import estimate_distill_memory

    with torch.device("meta"):
        teacher = UNet2DConditionModel(**layout)
        student = UNet2DConditionModel.from_config(student_config(dict(teacher.config), preset))
    config = DistillConfig(student="s", output="o", mixed_precision="fp16", gradient_checkpointing=True,
                           teacher_dtype="fp16", optimizer="adamw", ema_decay=0.9999 if ema else 0.0)
    return estimate_distill_memory(config, TextToImageFamily(), student, teacher, micro_batch=micro_batch,
                                   feature_pairs=feature_pairs(preset), text_tokens=77)


def test_the_memory_estimate_meets_bk_sdms_published_figure():
    """BK-SDM's README: BK-SDM-Base from SD-1.4, fp16, gradient checkpointing, EMA, micro-batch
    16 x 4 accumulation: 28 GB on an A100."""
    from difcompress.layouts import SD14_UNET

    total = _sd_memory(SD14_UNET, "bk-base", micro_batch=16)["total_bytes"]
    assert total == pytest.approx(28 * 2**30, rel=0.15)


@pytest.mark.parametrize("recipe", ["bk-sdm-small.yaml", "bk-sdm-v2-small-place.yaml", "bk-sdm-v2-tiny-place.yaml"])
def test_the_stable_diffusion_recipes_fit_one_24gb_gpu(recipe):
    """At the recipe's micro-batch, with its checkpointing and fp16 teacher, with 15% left for
    the allocator's fragmentation."""
    import yaml

    from difcompress.layouts import SD14_UNET, SD21_BASE_UNET

    settings = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    distill = settings["distill"]
    assert distill["gradient_checkpointing"] and distill["teacher_dtype"] == "fp16"
    assert distill["mixed_precision"] == "fp16"
    micro_batch = distill["batch_size"] // distill["gradient_accumulation_steps"]
    layout = SD21_BASE_UNET if "v2" in recipe else SD14_UNET
    total = _sd_memory(layout, settings["prune"]["preset"], micro_batch=micro_batch)["total_bytes"]
    assert total * 1.15 < 24e9, f"{total / 2**30:.1f} GiB"


def test_rows_without_a_caption_are_counted_warned_once_and_refused_when_none_has_one(small, tmp_path, capsys,
                                                                                      run_cli):
    data = write_captioned_digits(tmp_path / "gaps", count=8)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[2].pop("text")
    rows[5]["text"] = None
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    summary = run_distill(small[0], tmp_path / "run", loss="place", data=str(data), steps=1, batch_size=4,
                          checkpoint_every=0, device="cpu", latent_cache=tmp_path / "cache")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "2 of 8 rows" in err and "002.png" in err, err
    assert summary["data"]["uncaptioned"] == 2 and summary["data"]["first_uncaptioned"].endswith("002.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"], "text": ""}) + "\n"
                                                       for r in rows))
    code, _, err = run_cli("distill", "--student", small[0], "-o", tmp_path / "none", "--data", data, "--steps", "1",
                           "--device", "cpu", "--latent-cache", tmp_path / "cache")
    assert "no row of" in assert_one_line_error(code, err, 2)


def test_a_text_cache_cut_short_is_rebuilt_with_one_warning(tiny_sd_dir, tmp_path, capsys):
    from difcompress.data.text import cached_text

    text = load_model(tiny_sd_dir).text
    captions = [f"a handwritten {i}" for i in range(5)]
    first, empty, report = cached_text(captions, text, tmp_path)
    shard = Path(report["folder"]) / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    again, empty_again, report = cached_text(captions, text, tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "100 of" in err and "rebuilding" in err, err
    assert not report["reused"] and all(torch.equal(first[n], again[n]) for n in first)
    assert all(torch.equal(empty[n], empty_again[n]) for n in empty)
    assert cached_text(captions, text, tmp_path)[2]["reused"]
