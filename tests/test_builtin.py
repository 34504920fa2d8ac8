"""The embedded default: digits data, the shipped classifier and teacher, digits-FID."""

import json
import os
import subprocess
import sys

import torch

from difcompress.builtin import ASSETS, digits_extractor, digits_images, digits_labels
from difcompress.metrics.extractors import features_of_images
from difcompress.metrics.fid import fid_kid


def test_digits_are_real_scans_scaled_to_unit_range():
    images = digits_images(16, 1)
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() == -1 and images.max() == 1
    assert digits_labels().bincount().tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_shipped_classifier_is_accurate_on_held_out_digits():
    """The shipped weights, scored again on the split they were trained beside (the seeded
    permutation of train_digits_classifier), agree with the report shipped with them."""
    from difcompress.builtin import load_digits_classifier

    report = json.loads((ASSETS / "classifier.json").read_text())
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(report["seed"]))
    held_out = order[report["train_images"]:]
    assert len(held_out) == report["held_out_images"] > 300
    with torch.no_grad():
        predicted = load_digits_classifier()(digits_images()[held_out]).argmax(1)
    accuracy = (predicted == digits_labels()[held_out]).float().mean().item()
    assert accuracy >= 0.95 and abs(accuracy - report["held_out_accuracy"]) < 1e-6


def test_digits_fid_real_vs_real_is_near_zero_and_noise_is_far():
    extractor = digits_extractor()
    real = digits_images()
    feats_a = features_of_images(real[::2], extractor)
    feats_b = features_of_images(real[1::2], extractor)
    noise = features_of_images(torch.rand(800, 1, 16, 16) * 2 - 1, extractor)
    same = fid_kid(feats_a, feats_b)["fid"]
    far = fid_kid(noise, feats_b)["fid"]
    assert same < 0.05 * far
    assert far > 10 * max(same, 1e-3)


def test_teacher_and_extractor_load_offline_from_package_data(tmp_path):
    code = (
        "from difcompress.loading.models import load_model\n"
        "from difcompress.builtin import digits_extractor\n"
        "m = load_model('digits')\n"
        "assert m.model.config.sample_size == 16 and m.family.name == 'unet2d'\n"
        "d = load_model('digits-dit')\n"
        "assert d.family.name == 'dit' and d.model.config.patch_size == 2 and d.autoencoder is None\n"
        "digits_extractor()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_eval_digits_fid_against_an_image_folder_and_saved_stats(tmp_path, capsys):
    from PIL import Image

    from difcompress.builtin import digits_extractor
    from difcompress.cli import main
    from difcompress.metrics.fid import save_reference_stats

    real = digits_images()[:64]
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(real):
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    stats = tmp_path / "ref.npz"
    save_reference_stats(stats, features_of_images(real, digits_extractor()), {"extractor": "digits"})
    for ref in (folder, stats):
        try:
            main(["eval", "digits", "--fid", "--ref", str(ref), "--num-samples", "8", "--sampler-steps", "2",
                  "--grid-size", "2", "--latency-batch-size", "2", "-o", str(tmp_path / "out"), "--json"])
        except SystemExit as exit_:
            assert exit_.code == 0
        result = json.loads(capsys.readouterr().out)
        row, protocol = result["models"][0], result["protocol"]  # the protocol once, for every row
        assert row["fid"] > 0 and protocol["feature_extractor"] == "digits" and "protocol" not in row
        assert protocol["reference"] == str(ref.resolve()) and protocol["num_samples"] == row["num_samples"] == 8


def test_dit_teacher_draws_the_digit_it_is_asked_for():
    """The embedded pixel DiT is class-conditional: guided samples of label k are classified
    as k by the (independently trained) digits classifier."""
    from difcompress.builtin import DIT_TEACHER_NAME
    from difcompress.diffusion.sampling import Guidance
    from difcompress.loading.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(DIT_TEACHER_NAME)
    assert loaded.family.name == "dit" and loaded.autoencoder is None
    assert loaded.family.num_classes(loaded.model) == 10 and loaded.image_shape() == (1, 16, 16)
    labels = torch.arange(40) % 10
    family, model = loaded.family, loaded.model
    guidance = Guidance(family.conditions(model, labels=labels), family.null_conditions(model), 1.5)
    images = loaded.sample(40, seed=0, steps=25, guidance=guidance)
    extractor = digits_extractor()
    with torch.no_grad():
        predicted = extractor.model(images).argmax(1)
    assert (predicted == labels).float().mean() >= 0.8


def test_t2i_teacher_draws_the_digit_its_prompt_names():
    """digits-t2i: Stable Diffusion's U-Net pattern over a trained autoencoder and a frozen
    CLIP text encoder; guided samples of "a handwritten k" are read as k by the digits
    classifier (prompt accuracy), and the captions name every digit both ways."""
    from difcompress.builtin import (
        T2I_TEACHER_NAME,
        digit_in_prompt,
        digits_captions,
        load_digits_classifier,
        prompt_hits,
    )
    from difcompress.commands.demo import DIGIT_PROMPTS
    from difcompress.diffusion.sampling import Guidance
    from difcompress.loading.models import load_model

    torch.set_num_threads(1)
    captions = digits_captions()
    assert captions[:2] == ["a handwritten zero", "the digit 1"] and digit_in_prompt("a drawn seven") == 7
    assert digit_in_prompt("the digit 7 or 8") is None
    loaded = load_model(T2I_TEACHER_NAME)
    assert loaded.family.name == "t2i" and loaded.image_shape() == (1, 16, 16)
    prompts = [DIGIT_PROMPTS[i % 10] for i in range(40)]
    family, model, text = loaded.family, loaded.model, loaded.text
    guidance = Guidance(family.conditions(model, text=text.encode(prompts)),
                        family.null_conditions(model, text=text.encode([""])), 2.0)
    images = loaded.to_images(loaded.sample(40, seed=0, steps=25, guidance=guidance))
    assert prompt_hits(load_digits_classifier(), images, prompts).mean() >= 0.8


def test_demo_t2i_quick_prunes_distills_evaluates_and_exports_a_pipeline_diffusers_runs(tmp_path, run_subprocess):
    """digits-t2i: bk-small then half of every width, PLACE + feature KD, prompt accuracy,
    and an exported StableDiffusionPipeline that generates from a prompt without difcompress."""
    from conftest import NO_DIFCOMPRESS_CHECK

    from difcompress.commands.demo import demo
    from difcompress.config import DemoConfig

    result = demo(DemoConfig(family="t2i", quick=True, output=tmp_path / "demo", device="cpu"), announce=lambda _: None)
    teacher_row, student_row = result["eval"]["models"]
    assert result["pruning"]["preset"] == "bk-small" and result["pruning"]["ratio"] == 0.5
    assert student_row["params"] < 0.25 * teacher_row["params"]
    assert all(0 <= row["prompt_accuracy"] <= 1 for row in (teacher_row, student_row))
    code = f"""
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(tmp_path / "demo" / "export")!r})
image = pipe("a handwritten seven", num_inference_steps=3, guidance_scale=2.0, output_type="np").images
assert image.shape == (1, 16, 16, 1), image.shape
print("digits-t2i-ok")
""" + NO_DIFCOMPRESS_CHECK
    proc = run_subprocess(code)
    assert proc.returncode == 0 and "digits-t2i-ok" in proc.stdout, proc.stderr[-3000:]


def test_flux_teacher_draws_the_digit_its_prompt_names():
    """digits-flux: FLUX.1's layout (4 double + 8 single blocks, packed latents, CLIP pooled +
    T5 sequence) without a guidance input (schnell's kind); unguided Euler samples of "a
    handwritten k" are read as k by the digits classifier."""
    from difcompress.builtin import (
        FLUX_TEACHER_NAME,
        load_digits_classifier,
        prompt_hits,
    )
    from difcompress.commands.demo import DIGIT_PROMPTS
    from difcompress.diffusion.sampling import Guidance
    from difcompress.loading.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(FLUX_TEACHER_NAME)
    family, model, text = loaded.family, loaded.model, loaded.text
    assert family.name == "flux" and not family.takes_guidance(model) and loaded.image_shape() == (1, 16, 16)
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (4, 8)
    prompts = [DIGIT_PROMPTS[i % 10] for i in range(40)]
    guidance = Guidance(family.conditions(model, text=text.encode(prompts)))
    images = loaded.to_images(loaded.sample(40, seed=0, steps=20, guidance=guidance))
    assert prompt_hits(load_digits_classifier(), images, prompts).mean() >= 0.8


def test_demo_flux_quick_halves_the_depth_distills_evaluates_and_exports_a_flux_pipeline(tmp_path, run_subprocess):
    """digits-flux: 2 of 4 double and 4 of 8 single blocks kept, PLACE, prompt accuracy, and
    an exported FluxPipeline that generates from a prompt without difcompress."""
    from conftest import NO_DIFCOMPRESS_CHECK

    from difcompress.commands.demo import demo
    from difcompress.config import DemoConfig

    result = demo(DemoConfig(family="flux", quick=True, output=tmp_path / "demo", device="cpu"),
                  announce=lambda _: None)
    teacher_row, student_row = result["eval"]["models"]
    assert student_row["params"] < 0.6 * teacher_row["params"]
    assert all(0 <= row["prompt_accuracy"] <= 1 and row["fid"] > 0 for row in (teacher_row, student_row))
    assert result["eval"]["protocol"]["sampler"] == "flow-euler"
    code = f"""
from diffusers import FluxPipeline
pipe = FluxPipeline.from_pretrained({str(tmp_path / "demo" / "export")!r})
t = pipe.transformer
assert (len(t.transformer_blocks), len(t.single_transformer_blocks)) == (2, 4)
image = pipe("a handwritten seven", num_inference_steps=3, guidance_scale=0.0, height=16, width=16,
             max_sequence_length=32, output_type="np").images
assert image.shape == (1, 16, 16, 1), image.shape
print("digits-flux-ok")
""" + NO_DIFCOMPRESS_CHECK
    proc = run_subprocess(code)
    assert proc.returncode == 0 and "digits-flux-ok" in proc.stdout, proc.stderr[-3000:]
