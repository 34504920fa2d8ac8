"""Z-Image (ZImageTransformer2DModel in ZImagePipeline) on a tiny pipeline built from configs
(tests/tiny_flow.py): its chat-templated Qwen3 text side, and the stock pipeline reloading it
offline."""

import pytest
import torch
from diffusers import ZImagePipeline
from tiny_flow import assert_guided_sampling_matches, build_tiny_zimage

from difcompress.data.text import ChatTextEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a handwritten 7", "", "a handwritten 0 on a page"]


@pytest.fixture(scope="module")
def tiny_zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("models") / "tiny-zimage")


@pytest.fixture(scope="module")
def zimage_pipe(tiny_zimage_dir):
    return ZImagePipeline.from_pretrained(tiny_zimage_dir)


def test_text_side_encodes_as_the_pipeline(zimage_pipe):
    """The penultimate Qwen3 states of each templated prompt's real tokens, padded to the
    512-token window with a mask saying which are real."""
    text = ChatTextEncoder(zimage_pipe.tokenizer, zimage_pipe.text_encoder)
    mine = text.encode(PROMPTS)
    with torch.no_grad():
        reference, _ = zimage_pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert mine["cap_feats"].shape == (3, 512, 32) and mine["cap_mask"].shape == (3, 512)
    for row, expected in enumerate(reference):
        real = mine["cap_mask"][row] > 0
        assert int(real.sum()) == len(expected)
        torch.testing.assert_close(mine["cap_feats"][row][real], expected)
        assert mine["cap_feats"][row][~real].abs().max() == 0


def test_text_side_truncation_counts_the_template(zimage_pipe):
    text = ChatTextEncoder(zimage_pipe.tokenizer, zimage_pipe.text_encoder, max_sequence_length=24)
    # the template adds 19 tokens around the prompt ("<|im_start|>user\n" ... "assistant\n", one per byte)
    assert text.truncated(["a" * 5, "a" * 6]) == ["a" * 6]
    assert text.fingerprint() != ChatTextEncoder(zimage_pipe.tokenizer, zimage_pipe.text_encoder).fingerprint()


# ---- the family: pruning, sampling, the chain ---------------------------------------------------

def tiny_inputs():
    from difcompress.diffusion.inputs import ModelInputs

    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 40)
    mask[0, :30], mask[1, :22] = 1, 1  # captions of different lengths, zero-padded
    return ModelInputs(torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([250.0, 750.0]),
                       {"cap_feats": torch.randn(2, 40, 32, generator=gen) * mask[..., None], "cap_mask": mask})


def test_forward_is_the_velocity_at_sigma(zimage_pipe):
    """The family feeds t = 1 - sigma and negates the output, as ZImagePipeline does."""
    from difcompress.families.registry import FAMILIES

    model, inputs = zimage_pipe.transformer, tiny_inputs()
    with torch.no_grad():
        ours = FAMILIES["zimage"].forward(model, inputs)[0]
        captions = [row[mask > 0] for row, mask in zip(inputs.cond["cap_feats"], inputs.cond["cap_mask"])]
        raw = model(list(inputs.sample.unsqueeze(2).unbind(0)), torch.tensor([0.75, 0.25]), captions,
                    return_dict=False)[0]
    torch.testing.assert_close(ours, -torch.stack(raw).squeeze(2))


def test_depth_prunes_the_main_stack_and_heads_take_the_width(zimage_pipe):
    from diffusers import ZImageTransformer2DModel

    from difcompress.families.base import PruneRequest
    from difcompress.families.registry import FAMILIES

    family, teacher = FAMILIES["zimage"], zimage_pipe.transformer
    outcome = family.prune(teacher, PruneRequest(ratio=0.0, importance="magnitude", blocks=[0, 2]))
    assert outcome.details["kept_blocks"] == {"layers": [0, 2], "noise_refiner": [0], "context_refiner": [0]}

    def pass_on(_module, args, _kwargs, _out):
        return args[0]

    handles = [teacher.layers[i].register_forward_hook(pass_on, with_kwargs=True) for i in (1, 3)]
    try:
        with torch.no_grad():
            skipped = family.forward(teacher, tiny_inputs())[0]
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(family.forward(outcome.model, tiny_inputs())[0], skipped)

    half = family.prune(teacher, PruneRequest(ratio=0.5, importance="magnitude")).model
    assert (half.config.n_heads, half.config.n_kv_heads, half.config.dim) == (1, 1, 16)
    assert half.layers[0].feed_forward.w1.out_features == int(16 / 3 * 8)  # as the config derives it
    rebuilt = ZImageTransformer2DModel.from_config(half.config)
    rebuilt.load_state_dict(half.state_dict(), strict=True)


def test_sampling_matches_the_stock_pipeline(tiny_zimage_dir, zimage_pipe):
    """difcompress's sampler at guidance scale s = ZImagePipeline at guidance_scale s - 1 (its
    pos + g (pos - neg)), from the same noise, at the pipeline's linear sigmas."""
    from difcompress.loading.models import load_model

    loaded = load_model(tiny_zimage_dir)
    assert loaded.family.sample_shape(loaded.model) == (16, 8, 8)  # the VAE's 16 px through its factor 2
    assert_guided_sampling_matches(tiny_zimage_dir, zimage_pipe, 3.0, 2.0)


def test_prune_distill_eval_export_and_stock_generation(tiny_zimage_dir, tmp_path, run_subprocess):
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
    report = run_prune(tiny_zimage_dir, 0.5, tmp_path / "d2h", depth=2, device="cpu")
    assert report["kept_blocks"]["layers"] == [1, 3]
    # PLACE on the velocity, and feature KD pairing student block i with teacher block round(i L / K)
    summary = run_distill(tmp_path / "d2h", tmp_path / "run", loss="place+feat", feature_hooks="depth",
                          data=str(data), steps=3, batch_size=2, device="cpu", latent_cache=tmp_path / "cache")
    assert summary["steps"] == 3
    assert all(torch.isfinite(torch.tensor(summary["final"][k])) for k in ("task", "kd", "feature"))
    result = run_eval([tiny_zimage_dir, tmp_path / "run"], prompts=str(prompts), num_samples=2, sampler_steps=2,
                      batch_size=2, device="cpu")
    assert result["models"][1]["params"] < result["models"][0]["params"]
    run_export(tmp_path / "run", tmp_path / "export")
    code = f"""
import torch
from diffusers import ZImagePipeline
pipe = ZImagePipeline.from_pretrained({str(tmp_path / "export")!r})
assert pipe.transformer.config.n_layers == 2 and pipe.transformer.config.n_heads == 1
pipe.set_progress_bar_config(disable=True)
image = pipe("a handwritten 3", num_inference_steps=2, guidance_scale=0.0, height=16, width=16, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
assert image.shape == (1, 16, 16, 3) and bool((image == image).all())
""" + NO_DIFCOMPRESS_CHECK
    done = run_subprocess(code)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("args, expected", [
    (("--ratio", "0", "--single-blocks", "0"), "--single-blocks: a ZImageTransformer2DModel has no such block list"),
    (("--ratio", "0", "--blocks", "0,9"), "--blocks must name blocks between 0 and 3"),
])
def test_bad_pruning_requests_are_one_line(tiny_zimage_dir, tmp_path, run_cli, args, expected):
    from conftest import assert_one_line_error

    code, _, err = run_cli("prune", tiny_zimage_dir, *args, "-o", tmp_path / "out", "--device", "cpu")
    assert expected in assert_one_line_error(code, err, 2)


def test_other_zimage_pipelines_are_refused_by_name(tiny_zimage_dir, tmp_path, run_cli):
    import json
    import shutil

    from conftest import assert_one_line_error

    folder = shutil.copytree(tiny_zimage_dir, tmp_path / "inpaint")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "ZImageInpaintPipeline"}))
    code, _, err = run_cli("prune", folder, "--ratio", "0", "--depth", "2", "-o", tmp_path / "out")
    assert "ZImageInpaintPipeline" in assert_one_line_error(code, err)


def test_dry_run_estimates_memory_with_feature_taps(tiny_zimage_dir, tmp_path, run_cli):
    """The estimate runs teacher and student on the meta device, per-sample lists and all."""
    import json

    from conftest import write_captioned_digits

    data = write_captioned_digits(tmp_path / "data", 4)
    code, out, err = run_cli("distill", "--student", tiny_zimage_dir, "--teacher", tiny_zimage_dir, "--data", data,
                             "--loss", "place+feat", "--dry-run", "--json", "-o", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    memory = json.loads(out)["memory"]
    assert memory["total_bytes"] == sum(memory["parts"].values()) > 0 and not (tmp_path / "run").exists()
