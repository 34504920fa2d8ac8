"""SD3 / SD3.5 (SD3Transformer2DModel in StableDiffusion3Pipeline) on a tiny pipeline built
from configs (tests/tiny_flow.py): its text side, and the stock pipeline reloading it offline."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from tiny_flow import assert_guided_sampling_matches, build_tiny_sd3

from difcompress.data.text import ClipT5TextEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a handwritten 7", "", "a handwritten 0 on a page"]


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3_dir):
    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)


def sd3_text(pipe, max_sequence_length=256):
    return ClipT5TextEncoder(((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)),
                             pipe.tokenizer_3, pipe.text_encoder_3, max_sequence_length, clip_sequence=True)


def test_tiny_sd3_has_the_sd35_quirks(sd3_pipe):
    blocks = sd3_pipe.transformer.transformer_blocks
    assert [b.use_dual_attention for b in blocks] == [True, False, False, False]
    assert [b.context_pre_only for b in blocks] == [False, False, False, True]


def test_text_side_encodes_as_the_pipeline(sd3_pipe):
    """CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, before
    T5's 256 tokens; both pooled outputs side by side."""
    text = sd3_text(sd3_pipe)
    mine = text.encode(PROMPTS)
    with torch.no_grad():
        states, _, pooled, _ = sd3_pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=256)
    assert mine["encoder_hidden_states"].shape == (3, 16 + 256, 32)
    torch.testing.assert_close(mine["encoder_hidden_states"], states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["pooled_projections"], pooled)
    assert set(text.components()) == {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2",
                                      "tokenizer_3", "text_encoder_3"}


def test_text_side_reports_t5_truncation_and_fingerprints_its_window(sd3_pipe):
    short = sd3_text(sd3_pipe, max_sequence_length=8)
    assert short.truncated(["a handwritten 7", "ab"]) == ["a handwritten 7"]
    assert short.fingerprint() != sd3_text(sd3_pipe).fingerprint()


def test_cached_encodings_read_back(sd3_pipe, tmp_path):
    from difcompress.data.text import cached_text

    text = sd3_text(sd3_pipe)
    encodings, empty, report = cached_text(PROMPTS, text, tmp_path)
    again, _, second = cached_text(PROMPTS, text, tmp_path)
    assert not report["reused"] and second["reused"]
    assert set(encodings) == {"encoder_hidden_states", "pooled_projections"}
    torch.testing.assert_close(again["pooled_projections"], encodings["pooled_projections"])
    assert empty["encoder_hidden_states"].shape == (1, 272, 32)


# ---- the family: pruning, sampling, the chain ---------------------------------------------------

def skipped_teacher_output(model, skipped, inputs):
    """The teacher's prediction with blocks `skipped` handing on both streams unchanged."""
    from difcompress.families.registry import FAMILIES

    def pass_on(_module, _args, kwargs, _out):
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]

    handles = [model.transformer_blocks[i].register_forward_hook(pass_on, with_kwargs=True) for i in skipped]
    try:
        with torch.no_grad():
            return FAMILIES["sd3"].forward(model, inputs)[0]
    finally:
        for handle in handles:
            handle.remove()


def tiny_inputs(batch=2):
    from difcompress.diffusion.inputs import ModelInputs

    gen = torch.Generator().manual_seed(0)
    return ModelInputs(torch.randn(batch, 16, 8, 8, generator=gen), torch.tensor([250.0, 750.0][:batch]),
                       {"encoder_hidden_states": torch.randn(batch, 12, 32, generator=gen),
                        "pooled_projections": torch.randn(batch, 32, generator=gen)})


def test_depth_pruning_is_the_teacher_with_those_blocks_skipped(sd3_pipe):
    from difcompress.families.base import PruneRequest
    from difcompress.families.registry import FAMILIES

    family, teacher = FAMILIES["sd3"], sd3_pipe.transformer
    outcome = family.prune(teacher, PruneRequest(ratio=0.0, importance="magnitude", blocks=[0, 3]))
    student = outcome.model
    assert outcome.details["kept_blocks"] == {"transformer_blocks": [0, 3]}
    assert student.config.num_layers == 2 and tuple(student.config.dual_attention_layers) == (0,)
    assert [b.context_pre_only for b in student.transformer_blocks] == [False, True]
    with torch.no_grad():
        pruned = family.forward(student, tiny_inputs())[0]
    torch.testing.assert_close(pruned, skipped_teacher_output(teacher, [1, 2], tiny_inputs()))


def test_dual_attention_layers_are_reindexed_and_heads_halved():
    from diffusers import SD3Transformer2DModel

    from difcompress.families.base import PruneRequest
    from difcompress.families.registry import FAMILIES

    torch.manual_seed(0)
    teacher = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=5, attention_head_dim=8,
                                    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                    pooled_projection_dim=32, pos_embed_max_size=8, dual_attention_layers=(0, 2),
                                    qk_norm="rms_norm").eval()
    outcome = FAMILIES["sd3"].prune(teacher, PruneRequest(ratio=0.5, importance="magnitude", blocks=[1, 2, 4]))
    student = outcome.model
    assert tuple(student.config.dual_attention_layers) == (1,)
    assert [b.use_dual_attention for b in student.transformer_blocks] == [False, True, False]
    assert (student.config.num_attention_heads, student.config.caption_projection_dim, student.inner_dim) == (2, 16, 16)
    rebuilt = SD3Transformer2DModel.from_config(student.config)
    rebuilt.load_state_dict(student.state_dict(), strict=True)  # the stock config expresses the student
    # The stored sin-cos table keeps the frequencies by stride: the smaller stock table itself.
    torch.testing.assert_close(student.pos_embed.pos_embed, rebuilt.pos_embed.pos_embed)


def test_sampling_matches_the_stock_pipeline(tiny_sd3_dir, sd3_pipe):
    """difcompress's flow sampler under guidance (eval, teacher data) = StableDiffusion3Pipeline's
    loop from the same noise: scheduler sigmas, timesteps, guidance and text all agree."""
    assert_guided_sampling_matches(tiny_sd3_dir, sd3_pipe, 4.0, 4.0)


def test_prune_distill_eval_export_and_stock_generation(tiny_sd3_dir, tmp_path, run_subprocess):
    from conftest import (
        NO_DIFCOMPRESS_CHECK,
        run_distill,
        run_eval,
        run_export,
        run_prune,
        write_captioned_digits,
    )

    data = write_captioned_digits(tmp_path / "data", 8)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 3\na handwritten 5\n")
    report = run_prune(tiny_sd3_dir, 0.0, tmp_path / "d2", depth=2, device="cpu")
    assert report["kept_blocks"] == {"transformer_blocks": [1, 3]}
    run_prune(tmp_path / "d2", 0.5, tmp_path / "d2h", device="cpu")
    # PLACE on the velocity, and feature KD on both streams of every joint block (the last: image only)
    summary = run_distill(tmp_path / "d2h", tmp_path / "run", loss="place+feat", data=str(data), steps=3,
                          batch_size=2, device="cpu", latent_cache=tmp_path / "cache")
    assert summary["steps"] == 3
    assert all(torch.isfinite(torch.tensor(summary["final"][k])) for k in ("task", "kd", "feature"))
    result = run_eval([tiny_sd3_dir, tmp_path / "run"], prompts=str(prompts), num_samples=2, sampler_steps=2,
                      batch_size=2, device="cpu")
    rows = result["models"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["guidance_scale"] == 7.0
    assert rows[1]["pipeline_s_per_image"] > 0
    run_export(tmp_path / "run", tmp_path / "export")
    code = f"""
import torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained({str(tmp_path / "export")!r})
assert pipe.transformer.config.num_layers == 2 and pipe.transformer.config.num_attention_heads == 2
pipe.set_progress_bar_config(disable=True)
image = pipe("a handwritten 3", num_inference_steps=2, height=16, width=16, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
assert image.shape == (1, 16, 16, 3) and bool((image == image).all())
""" + NO_DIFCOMPRESS_CHECK
    done = run_subprocess(code)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("args, expected", [
    (("--ratio", "0", "--blocks", "0,1"), "must keep the last block (3)"),
    (("--ratio", "0", "--single-depth", "2"), "--single-depth: a SD3Transformer2DModel has no such block list"),
    (("--ratio", "0", "--depth", "4"), "--depth 4: keep between 1 and 3"),
    (("--ratio", "0.9"), "leaves no head"),
])
def test_bad_pruning_requests_are_one_line(tiny_sd3_dir, tmp_path, run_cli, args, expected):
    from conftest import assert_one_line_error

    code, _, err = run_cli("prune", tiny_sd3_dir, *args, "-o", tmp_path / "out", "--device", "cpu")
    assert expected in assert_one_line_error(code, err, 2)
    assert not (tmp_path / "out").exists()


def test_training_timesteps_are_logit_normal_and_shifted(sd3_pipe):
    """u ~ logit-normal(0, 1) (train_dreambooth_sd3.py's default), sigma = 3u / (1 + 2u) for
    the scheduler's shift 3: the median u = 0.5 lands at sigma 0.75, t = 750."""
    from difcompress.families.registry import FAMILIES

    formulation = FAMILIES["sd3"].formulation(sd3_pipe.transformer, sd3_pipe.scheduler)
    t = formulation.draw_timesteps(20_000, torch.Generator().manual_seed(0), sample_shape=(16, 8, 8))
    assert abs(float(t.median()) - 750) < 10
    u = t / 1000 / (3 - 2 * t / 1000)  # the shift undone
    logit = torch.log(u / (1 - u))
    assert abs(float(logit.mean())) < 0.05 and abs(float(logit.std()) - 1) < 0.05


def test_other_sd3_pipelines_are_refused_by_name(tiny_sd3_dir, tmp_path, run_cli):
    import json
    import shutil

    from conftest import assert_one_line_error

    folder = shutil.copytree(tiny_sd3_dir, tmp_path / "img2img")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Img2ImgPipeline"}))
    code, _, err = run_cli("prune", folder, "--ratio", "0", "--depth", "2", "-o", tmp_path / "out")
    assert "StableDiffusion3Img2ImgPipeline" in assert_one_line_error(code, err)
