"""DiT family: depth and width pruning to a stock config, distillation with the variance
split, the block map and masked feature KD, guided sampling, export to DiTPipeline."""

import json
import math
import shutil

import pytest
import torch
from conftest import (
    TINY_DIT_CLASSES,
    assert_one_line_error,
    build_tiny_dit,
    run_distill,
    run_eval,
    run_export,
    run_prune,
)
from diffusers import DiTPipeline, DiTTransformer2DModel

from difcompress.core.errors import UserError
from difcompress.diffusion.inputs import ModelInputs
from difcompress.diffusion.sampling import Guidance, guided_prediction
from difcompress.loading.models import load_model
from difcompress.pruning.blocklists import uniform_blocks
from difcompress.pruning.transformer import residual_channels

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def dit_student(tiny_dit_dir, tmp_path_factory):
    """Half the heads and half the blocks of the tiny latent DiT."""
    out = tmp_path_factory.mktemp("dit") / "pruned"
    report = run_prune(str(tiny_dit_dir), 0.5, out, depth=2, device="cpu")
    return out, report


def test_uniform_blocks_is_tinyfusion_map_when_halving():
    assert uniform_blocks(28, 14) == list(range(1, 28, 2))
    assert uniform_blocks(4, 4) == [0, 1, 2, 3]
    assert uniform_blocks(6, 3) == [1, 3, 5]


def test_prune_writes_stock_config(dit_student):
    out, report = dit_student
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"]) == (2, 2)
    assert report["kept_blocks"] == [1, 3]
    assert report["widths"]["residual width"] == [32, 16]
    assert report["widths"]["feed-forward width"] == [128, 64]
    assert report["params"][1] < report["params"][0] / 4
    model = DiTTransformer2DModel.from_pretrained(out / "transformer")  # stock diffusers, no record
    assert not (out / "transformer" / "difcompress_structure.json").exists()
    assert model.config.num_layers == 2
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # the VAE travels along


def test_keeping_everything_reproduces_the_teacher(tiny_dit_dir, tmp_path):
    """A ratio that rounds to no head removed (with a warning) rebuilds the teacher exactly."""
    report = run_prune(str(tiny_dit_dir), 0.1, tmp_path / "same", device="cpu")
    assert any("removing none" in w for w in report["warnings"])
    teacher, copy = load_model(str(tiny_dit_dir)), load_model(str(tmp_path / "same"))
    inputs = teacher.family.example_inputs(teacher.model, 3)
    with torch.no_grad():
        assert torch.equal(teacher.model(**inputs).sample, copy.model(**inputs).sample)


def test_depth_only_keeps_the_chosen_blocks_exactly(tiny_dit_dir, tmp_path):
    """Blocks 0 and 2 kept: the pruned model equals the teacher with blocks 1 and 3 skipped."""
    run_prune(str(tiny_dit_dir), 0.0, tmp_path / "depth", blocks=[0, 2], device="cpu")
    teacher, student = load_model(str(tiny_dit_dir)), load_model(str(tmp_path / "depth"))
    inputs = teacher.family.example_inputs(teacher.model, 2)
    hooks = [teacher.model.transformer_blocks[i].register_forward_hook(lambda _m, args, _o: args[0]) for i in (1, 3)]
    with torch.no_grad():
        expected = teacher.model(**inputs).sample
    for h in hooks:
        h.remove()
    with torch.no_grad():
        assert torch.allclose(student.model(**inputs).sample, expected, atol=1e-6)


def test_width_pruning_keeps_the_stock_position_embedding(dit_student, tiny_dit_dir):
    """diffusers recomputes the sin-cos table from the width; the kept residual channels
    carry exactly the frequencies of the smaller table."""
    teacher, student = load_model(str(tiny_dit_dir)), load_model(str(dit_student[0]))
    kept = residual_channels(32, 16)
    assert torch.allclose(teacher.model.pos_embed.pos_embed[..., kept], student.model.pos_embed.pos_embed)


def test_output_change_criterion_keeps_the_most_influential_blocks(tiny_dit_dir, tmp_path):
    report = run_prune(str(tiny_dit_dir), 0.0, tmp_path / "scored", depth=2, depth_criterion="output-change",
                   data="digits", batch_size=8, device="cpu")
    scores = report["block_scores"]
    assert len(scores) == 4 and all(s >= 0 for s in scores)
    assert report["kept_blocks"] == sorted(sorted(range(4), key=lambda i: -scores[i])[:2])


def test_taylor_importance_on_dit(tiny_dit_dir, tmp_path):
    report = run_prune(str(tiny_dit_dir), 0.5, tmp_path / "taylor", importance="taylor", data="teacher",
                   batch_size=4, importance_timesteps=2, device="cpu")
    assert report["heads_kept"] == 2 and report["importance_timesteps"] == 2


@pytest.mark.parametrize("args, expected", [
    (["--ratio", "0.5", "--global"], "drop --global"),
    (["--ratio", "0", "--blocks", "0,9"], "--blocks"),
    (["--ratio", "0", "--depth", "7"], "--depth"),
    (["--ratio", "0.5", "--depth", "4"], "--depth 4: keep between 1 and 3 of the 4 blocks"),
    (["--ratio", "0", "--blocks", "2,0,2"], "--blocks names block 2 more than once"),
    (["--ratio", "0", "--blocks", "a,b"], "comma-separated"),
])
def test_dit_prune_mistakes_are_one_line_errors(tiny_dit_dir, tmp_path, run_cli, args, expected):
    code, _, err = run_cli("prune", tiny_dit_dir, "-o", tmp_path / "x", "--device", "cpu", *args)
    line = assert_one_line_error(code, err, 2)
    assert expected in line and line.count("a,b") <= 1  # the bad value said once


def test_depth_options_are_refused_for_unets(tiny_model_dir, tmp_path, run_cli):
    code, _, err = run_cli("prune", tiny_model_dir, "-o", tmp_path / "x", "--depth", "2", "--device", "cpu")
    assert "transformer" in assert_one_line_error(code, err, 2)


@pytest.fixture(scope="module")
def dit_distilled(dit_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit") / "student"
    summary = run_distill(str(dit_student[0]), out, loss="place", data="digits", steps=3, batch_size=4, w_feat=0.1,
                      feature_mask_std=2.0, checkpoint_every=0, device="cpu", show_progress=False,
                      latent_cache=tmp_path_factory.mktemp("cache"))
    return out, summary


def test_distill_splits_learned_variance_and_maps_blocks(dit_distilled):
    out, summary = dit_distilled
    final = summary["final"]
    assert {"task", "kd", "variance", "feature"} <= set(final)  # variance: a plain MSE beside KD on eps
    # Student block i <-> the teacher block it was copied from (1 and 3).
    assert summary["settings"]["feature_layers"] == ["transformer_blocks.0=transformer_blocks.1",
                                                     "transformer_blocks.1=transformer_blocks.3"]
    assert DiTTransformer2DModel.from_pretrained(out / "transformer").config.num_layers == 2


def test_student_label_embedder_never_drops_labels_itself(dit_student):
    """The trainer drops labels (seeded, same for teacher and student); diffusers' own random
    drop in train mode would make the student see other labels than the teacher."""
    loaded = load_model(str(dit_student[0]))
    loaded.model.train()
    loaded.family.disable_label_dropout(loaded.model)
    inputs = loaded.family.example_inputs(loaded.model, 64)
    with torch.no_grad():
        first = loaded.model(**inputs).sample
        assert torch.equal(first, loaded.model(**inputs).sample)


def test_guidance_formula():
    class Linear:
        def forward(self, model, inputs):
            labels = inputs.cond["class_labels"][:, None, None, None].float()
            return inputs.sample * (labels + 1), -labels * inputs.sample

    x, t, labels = torch.ones(2, 1, 2, 2), torch.zeros(2), torch.tensor([1, 2])
    fam, null = Linear(), {"class_labels": torch.tensor([9])}
    inputs = ModelInputs(x, t, {"class_labels": labels})
    eps, var = fam.forward(None, inputs)
    unguided = guided_prediction(fam, None, inputs, Guidance(inputs.cond, null, 1.0))
    assert torch.equal(unguided[0], eps) and torch.equal(unguided[1], var)
    guided, guided_var = guided_prediction(fam, None, inputs, Guidance(inputs.cond, null, 3.0))
    assert torch.allclose(guided, 10 + 3.0 * (eps - 10))
    assert torch.equal(guided_var, var)  # the labelled branch's variance


def test_eval_samples_with_guidance_and_decodes(tiny_dit_dir, dit_distilled, tmp_path):
    from PIL import Image

    result = run_eval([str(tiny_dit_dir), str(dit_distilled[0])], sampler_steps=2, grid_size=3,
                      latency_batch_size=2, guidance_scale=2.0, class_labels=[3, 7], output=tmp_path, device="cpu")
    assert [r["guidance_scale"] for r in result["models"]] == [2.0, 2.0]
    assert all(r["latent"] for r in result["models"])
    grid = Image.open(result["grid"])
    assert grid.height >= 2 * 16 and grid.width >= 3 * 16  # decoded 16x16 images, not 4x4 latents


def test_eval_rejects_out_of_range_labels(tiny_dit_dir, run_cli, tmp_path):
    code, _, err = run_cli("eval", tiny_dit_dir, "--class-label", f"1,{TINY_DIT_CLASSES}", "--sampler-steps", "2",
                           "-o", tmp_path, "--device", "cpu")
    assert "out of range" in assert_one_line_error(code, err, 2)


def test_guidance_on_unconditional_model_is_refused(tiny_model_dir, run_cli, tmp_path):
    code, _, err = run_cli("eval", tiny_model_dir, "--guidance-scale", "2", "-o", tmp_path, "--device", "cpu")
    assert "unconditional" in assert_one_line_error(code, err, 2)


def test_class_names_travel_through_every_stage(tiny_dit_dir, tmp_path):
    """The hub DiT's model_index.json carries id2label (ImageNet names); outputs keep it."""
    source = tmp_path / "named"
    shutil.copytree(tiny_dit_dir, source)
    index = json.loads((source / "model_index.json").read_text())
    (source / "model_index.json").write_text(json.dumps({**index, "id2label": {"0": "zero, nought", "1": "one"}}))
    run_prune(str(source), 0.5, tmp_path / "pruned", device="cpu")
    run_export(str(tmp_path / "pruned"), tmp_path / "export")
    assert DiTPipeline.from_pretrained(tmp_path / "export").get_label_ids(["nought", "one"]) == [0, 1]


def test_export_loads_and_samples_with_stock_dit_pipeline(dit_distilled, tmp_path):
    info = run_export(str(dit_distilled[0]), tmp_path / "export")
    assert info["autoencoder"] == "AutoencoderKL"
    pipe = DiTPipeline.from_pretrained(tmp_path / "export")
    images = pipe(class_labels=[0, 1], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    assert "DiTPipeline.from_pretrained" in (tmp_path / "export" / "README.md").read_text()


def test_class_conditional_data_without_labels_is_refused(dit_student, tmp_path):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(flat / f"{i}.png")
    with pytest.raises(UserError, match="no class labels"):
        run_distill(str(dit_student[0]), tmp_path / "run", loss="task", data=str(flat), steps=1, batch_size=2,
                device="cpu", show_progress=False, latent_cache=tmp_path / "cache")


def test_pixel_dit_saves_without_vae(tmp_path):
    from diffusers import DDPMScheduler

    from difcompress.families.dit import DiTFamily

    model = build_tiny_dit(in_channels=1, out_channels=1, sample_size=8)
    DiTFamily().pipeline(model, DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pixel")
    report = run_prune(str(tmp_path / "pixel"), 0.5, tmp_path / "pruned", device="cpu")
    assert report["latent"] is False
    pipe = DiTPipeline.from_pretrained(tmp_path / "pruned", vae=None)
    assert pipe.vae is None and pipe.transformer.config.num_attention_heads == 2
    loaded = load_model(str(tmp_path / "pruned"))
    assert loaded.autoencoder is None and loaded.image_shape() == (1, 8, 8)
    shutil.rmtree(tmp_path / "pixel")


def test_ancestral_sampling_uses_the_learned_variance(tiny_dit_dir, monkeypatch):
    """DDPM steps get (eps, variance) with variance_type learned_range; DDIM gets eps only."""
    from diffusers import DDPMScheduler

    loaded = load_model(str(tiny_dit_dir))
    seen = []
    real_step = DDPMScheduler.step
    monkeypatch.setattr(DDPMScheduler, "step", lambda self, out, t, x, **kw: seen.append(
        (out.shape[1], self.config.variance_type)) or real_step(self, out, t, x, **kw))
    guidance = Guidance(loaded.family.conditions(loaded.model, labels=torch.tensor([0, 1])))
    loaded.sample(2, seed=0, steps=2, sampler="ddpm", guidance=guidance)
    assert seen and all(s == (8, "learned_range") for s in seen)
    images = loaded.sample(2, seed=0, steps=2, guidance=guidance)
    assert images.shape == (2, 4, 4, 4)


def test_recipe_runs_the_dit_chain_and_resumes(tiny_dit_dir, tmp_path):
    import yaml

    from difcompress.commands.run import run_recipe

    recipe = tmp_path / "dit.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-dit", "output_dir": str(tmp_path / "out"), "seed": 0, "device": "cpu",
        "prune": {"model": str(tiny_dit_dir), "ratio": 0.5, "depth": 2},
        "distill": {"loss": "place", "data": "digits", "steps": 2, "batch_size": 4, "checkpoint_every": 1,
                    "w_feat": 0.1, "w_feat_schedule": "linear", "feature_mask_std": 2.0,
                    "latent_cache": str(tmp_path / "cache")},
        "eval": {"sampler_steps": 2, "grid_size": 2, "latency_batch_size": 2, "guidance_scale": 1.5,
                 "class_labels": [4]},
        "export": {"dtype": "fp16"},
    }))
    first = run_recipe(recipe)
    assert [e["status"] for e in first] == ["ran"] * 4
    assert [e["status"] for e in run_recipe(recipe)] == ["complete (skipped)"] * 4
    from safetensors import safe_open

    for part in ("transformer", "vae"):  # one dtype for the whole pipeline
        with safe_open(tmp_path / "out" / "export" / part / "diffusion_pytorch_model.fp16.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    pipe = DiTPipeline.from_pretrained(tmp_path / "out" / "export", variant="fp16", dtype=torch.float16)
    assert pipe.transformer.config.num_layers == 2


def test_dit_resume_is_bit_identical(dit_student, tmp_path, monkeypatch):
    """Label dropout, the variance term and masked feature KD all resume exactly: the label
    drop draws from the trainer's checkpointed generator."""
    from safetensors.torch import load_file
    from test_distill import SimulatedCrash, crash_at

    settings = dict(loss="place", data="digits", steps=6, batch_size=4, checkpoint_every=3, w_feat=0.1,
                    feature_mask_std=2.0, class_dropout=0.5, lr=1e-3, device="cpu", show_progress=False,
                    latent_cache=tmp_path / "cache")
    run_distill(str(dit_student[0]), tmp_path / "full", **settings)
    with monkeypatch.context() as mp:
        crash_at(mp, 5)
        with pytest.raises(SimulatedCrash):
            run_distill(str(dit_student[0]), tmp_path / "crashed", **settings)
    assert run_distill(str(dit_student[0]), tmp_path / "crashed", resume=True, **settings)["resumed_from_step"] == 3

    full = load_file(tmp_path / "full" / "transformer" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_balanced_labels_cover_all_classes_even_with_few_samples():
    from difcompress.diffusion.sampling import balanced_labels

    few = balanced_labels(512, 1000, seed=0)
    assert len(set(few.tolist())) == 512 and few.max() > 600  # not just classes 0..511
    many = balanced_labels(25, 10, seed=3)
    assert sorted(many.bincount().tolist()) == [2] * 5 + [3] * 5
    assert torch.equal(many, balanced_labels(25, 10, seed=3))


def test_pruning_a_pruned_dit_records_blocks_of_the_original_teacher(dit_student, tmp_path):
    """28 -> 14 -> 7 style chains: kept_blocks always index the teacher feature KD pairs with."""
    again = run_prune(str(dit_student[0]), 0.0, tmp_path / "again", blocks=[1], device="cpu")
    assert again["kept_blocks"] == [3] and again["blocks"] == 4
    student = load_model(str(tmp_path / "again"))
    teacher = load_model(student.manifest["teacher"])
    pairs = student.family.feature_layer_pairs(student.model, teacher.model, student.manifest["report"])
    assert pairs == [("transformer_blocks.0", "transformer_blocks.3")]


def test_variance_channels_learn_from_the_teacher_under_every_objective(dit_student, tmp_path):
    summary = run_distill(str(dit_student[0]), tmp_path / "task", loss="task", data="digits", steps=1, batch_size=4,
                      checkpoint_every=0, device="cpu", show_progress=False, latent_cache=tmp_path / "cache")
    assert "variance" in summary["final"] and "kd" not in summary["final"]


def test_latent_sampling_never_clips(tiny_dit_dir):
    from difcompress.diffusion.formulations import formulation_for

    formulation = formulation_for(load_model(str(tiny_dit_dir)).scheduler)
    assert formulation.scheduler.config.clip_sample  # the fixture's DDIM default clips x0 to [-1, 1]
    assert not formulation.sampler("ddim", 2, pixels=False).config.clip_sample
    assert formulation.sampler("ddim", 2).config.clip_sample


def test_class_folders_must_match_the_model_classes(dit_student, tmp_path):
    from PIL import Image

    for cls in ("a", "b", "c"):
        (tmp_path / "three" / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / "three" / cls / "x.png")
    with pytest.raises(UserError, match="3 class folders but the model has 10"):
        run_distill(str(dit_student[0]), tmp_path / "run", loss="task", data=str(tmp_path / "three"), steps=1,
                batch_size=2, device="cpu", show_progress=False, latent_cache=tmp_path / "cache")


@pytest.mark.parametrize("args, expected", [
    (["--ratio", "0", "--depth", "2", "--blocks", "0,1"], "not both"),
    (["--ratio", "0", "--single-depth", "2"], "one block list"),
    (["--ratio", "0.5", "--depth-criterion", "output-change"], "give --depth"),
    (["--ratio", "0", "--depth", "2", "--depth-criterion", "best"], "--depth-criterion"),
])
def test_depth_option_mistakes(tiny_dit_dir, tmp_path, run_cli, args, expected):
    code, _, err = run_cli("prune", tiny_dit_dir, "-o", tmp_path / "x", "--device", "cpu", *args)
    assert expected in assert_one_line_error(code, err, 2)


def test_the_authors_dit_setting_runs_end_to_end(dit_student, tmp_path):
    """Task/KD 0.1/0.9, PLACE + masked feature KD (each model by its own statistics) decayed
    per epoch, and the variance trained by the VLB plus a KL to the teacher's."""
    summary = run_distill(str(dit_student[0]), tmp_path / "run", loss="place+feat", data="digits", steps=3,
                          batch_size=4, w_task=0.1, w_kd=0.9, w_feat=1e-2, w_feat_schedule="epoch-linear",
                          feature_mask_std=2.0, feature_mask_by="own", variance_loss="vlb-kl", checkpoint_every=0,
                          log_every=1, device="cpu", latent_cache=tmp_path / "cache")
    final = summary["final"]
    assert {"task", "kd", "vlb", "variance_kl", "feature"} <= set(final) and "variance" not in final
    assert all(math.isfinite(final[k]) for k in ("vlb", "variance_kl", "loss"))
    assert summary["settings"]["objective"] == "place+feat"
