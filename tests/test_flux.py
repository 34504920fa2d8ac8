"""FLUX.1 family (issue 23): a tiny Flux-layout pipeline built from configs here (CLIP + T5
encoders over tokenizers written offline, 4 double + 8 single blocks, 16 px images)
goes prune --depth 2 --single-depth 4 -> prune --ratio 0.5 -> distill --loss place ->
eval --prompts -> export, and stock FluxPipeline generates from the export without
difcompress; plus the flow formulation and the one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_one_line_error,
    one_thread,
    run_distill,
    run_eval,
    run_export,
    run_prune,
    write_captioned_digits,
    write_tiny_clip,
)
from tiny_flow import build_tiny_flux

from difcompress.core.errors import UserError


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> Path:
    with one_thread():
        return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    return write_captioned_digits(tmp_path_factory.mktemp("data") / "captioned", count=8)


STOCK_FLUX = """
import json, sys, torch
from diffusers import FluxPipeline
torch.set_num_threads(1)
pipe = FluxPipeline.from_pretrained(sys.argv[1])
out = pipe("a handwritten 7", height=16, width=16, num_inference_steps=2, guidance_scale=3.5,
           max_sequence_length=24, output_type="pt", generator=torch.Generator().manual_seed(0)).images
t = pipe.transformer
print(json.dumps({"finite": bool(torch.isfinite(out).all()), "shape": list(out.shape),
                  "double": len(t.transformer_blocks), "single": len(t.single_transformer_blocks),
                  "heads": t.config.num_attention_heads, "imported": "difcompress" in sys.modules}))
"""


def test_done_when_chain_prune_prune_distill_eval_export_stock_flux(tiny_flux_dir, captioned, tmp_path):
    """The issue's chain: depth, then heads, then PLACE distillation, eval, export; stock
    FluxPipeline generates from the export in a process that never imports difcompress."""
    with one_thread():
        depth = run_prune(tiny_flux_dir, 0.0, tmp_path / "depth", depth=2, single_depth=4, device="cpu")
        assert depth["kept_blocks"] == {"transformer_blocks": [1, 3], "single_transformer_blocks": [1, 3, 5, 7]}
        heads = run_prune(tmp_path / "depth", 0.5, tmp_path / "heads", device="cpu")
        assert heads["kept_blocks"] == depth["kept_blocks"]  # still named by the original teacher's blocks
        assert heads["heads_kept"] == 2 and heads["widths"]["residual width"] == [32, 16]
        summary = run_distill(tmp_path / "heads", tmp_path / "student", loss="place+feat", data=str(captioned),
                              steps=2, batch_size=4, guidance_scale=3.5, checkpoint_every=0, device="cpu",
                              latent_cache=tmp_path / "cache")
        assert all(torch.isfinite(torch.tensor(summary["final"][k])) for k in ("task", "kd", "feature"))
        (tmp_path / "prompts.txt").write_text("a handwritten 3\na handwritten 7\n")
        report = run_eval([tmp_path / "student", tiny_flux_dir], prompts=str(tmp_path / "prompts.txt"), grid_size=2,
                          sampler_steps=2, batch_size=2, latency_batch_size=1, device="cpu", output=tmp_path / "eval",
                          clip_model=str(write_tiny_clip(tmp_path / "clip")), fid=True, ref=str(captioned),
                          feature_extractor="digits", num_samples=4)
        student_row, teacher_row = report["models"]
        assert all(-1 <= row["clip_score"] <= 1 and row["fid"] > 0 and row["num_samples"] == 4 for row in report["models"])
        assert report["protocol"]["feature_extractor"] == "digits"
        assert student_row["guidance_scale"] == 3.5 and student_row["params"] < teacher_row["params"] / 4
        assert student_row["latency_s_per_image"] > 0 and student_row["pipeline_s_per_image"] > 0
        assert report["sampler"] == "flow-euler"  # what --sampler ddim (the default) runs as for a flow model
        run_export(tmp_path / "student", tmp_path / "export")
    assert "FluxPipeline.from_pretrained" in (tmp_path / "export" / "README.md").read_text()
    done = subprocess.run([sys.executable, "-c", STOCK_FLUX, str(tmp_path / "export")], capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"finite": True, "shape": [1, 3, 16, 16], "double": 2, "single": 4, "heads": 2,
                      "imported": False}


def test_depth_pruning_equals_the_teacher_with_blocks_skipped(tiny_flux_dir, tmp_path):
    """Blocks kept by index: the student is exactly the teacher with the others skipped."""
    from difcompress.diffusion.inputs import ModelInputs
    from difcompress.loading.models import load_model

    with one_thread():
        run_prune(tiny_flux_dir, 0.0, tmp_path / "p", blocks=[0, 2], single_blocks=[1, 2, 7], device="cpu")
        teacher, student = load_model(str(tiny_flux_dir)), load_model(str(tmp_path / "p"))
        text = teacher.text.encode(["a handwritten 1", "a handwritten 2"])
        cond = teacher.family.conditions(teacher.model, text=text, guidance=3.5)
        inputs = ModelInputs(torch.randn(2, 16, 8, 8), torch.tensor([300.0, 800.0]), cond)
        skipped = [(teacher.model.transformer_blocks, (1, 3)), (teacher.model.single_transformer_blocks, (0, 3, 4, 5, 6))]
        hooks = [blocks[i].register_forward_hook(lambda _m, _a, kw, _o: (kw["encoder_hidden_states"],
                                                                         kw["hidden_states"]), with_kwargs=True)
                 for blocks, removed in skipped for i in removed]
        with torch.no_grad():
            expected = teacher.family.predict(teacher.model, inputs)
            for hook in hooks:
                hook.remove()
            assert torch.allclose(student.family.predict(student.model, inputs), expected, atol=1e-5)


def test_flow_formulation_is_rectified_flow_with_the_pipeline_schedule():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as pipeline_shift

    from difcompress.diffusion.flow import FlowTraining
    from difcompress.diffusion.formulations import formulation_for

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    flow = formulation_for(scheduler, FlowTraining(patch=2, linear_sigmas=True))
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([250.0, 750.0])
    assert torch.allclose(flow.noisy(x0, noise, t)[0], 0.75 * x0[0] + 0.25 * noise[0])
    assert torch.allclose(flow.target(x0, noise, t), noise - x0)
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=pipeline_shift(4096))
    assert torch.allclose(flow.sampler("euler", 4, sample_shape=(16, 128, 128)).timesteps, reference.timesteps)
    # u ~ logit-normal(0, 1) has median 0.5, which the dynamic shift moves to e^mu / (e^mu + 1),
    # mu read off the image sequence length (1024 px: 4096 tokens, mu 1.15; 16 px: 16 tokens);
    # a static shift 3 would put both at 0.75.
    static = formulation_for(FlowMatchEulerDiscreteScheduler(shift=3.0), FlowTraining(patch=2))
    for shape in ((16, 128, 128), (16, 8, 8)):
        drawn = flow.draw_timesteps(4096, torch.Generator().manual_seed(0), sample_shape=shape)
        assert drawn.dtype == torch.float32 and 0 < drawn.min() and drawn.max() < 1000
        mu = pipeline_shift(shape[1] * shape[2] // 4)
        assert abs(float(drawn.median()) - 1000 * np.exp(mu) / (np.exp(mu) + 1)) < 8
        fixed = static.draw_timesteps(4096, torch.Generator().manual_seed(0), sample_shape=shape)
        assert abs(float(fixed.median()) - 750) < 8
    exact = flow.denoise(noise.clone(), lambda x, _t: (noise - x0, None), sampler="ddim", steps=3)
    assert torch.allclose(exact, x0, atol=1e-5)  # Euler on a straight path is exact


@pytest.mark.parametrize("criterion", ["output-change", "block-io-mse"])
def test_scored_depth_keeps_the_top_blocks_of_each_list(tiny_flux_dir, captioned, tmp_path, criterion):
    """Each criterion scores every block of both lists on a captioned batch (dev's guidance
    3.5); the kept blocks are each list's top scorers, and the student's blocks are those
    teacher blocks' weights."""
    from difcompress.loading.models import load_model

    with one_thread():
        report = run_prune(str(tiny_flux_dir), 0.0, tmp_path / "scored", depth=2, single_depth=4,
                           depth_criterion=criterion, data=str(captioned), batch_size=4, device="cpu")
        teacher, student = load_model(str(tiny_flux_dir)).model, load_model(str(tmp_path / "scored")).model
    assert report["depth_criterion"] == criterion
    for name, keep in (("transformer_blocks", 2), ("single_transformer_blocks", 4)):
        scores, kept = report["block_scores"][name], report["kept_blocks"][name]
        assert len(scores) == len(getattr(teacher, name)) and all(s > 0 for s in scores)
        assert kept == sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])
        for position, index in enumerate(kept):
            mine, theirs = getattr(student, name)[position].state_dict(), getattr(teacher, name)[index].state_dict()
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_text_and_sampling_match_the_stock_flux_pipeline(tiny_flux_dir):
    """The text side = FluxPipeline.encode_prompt (T5 sequence at its window, CLIP pooled), and
    difcompress's sampler (eval, teacher data) at dev's embedded guidance 3.5 lands where
    FluxPipeline's own loop does from the same noise: the packed 2x2 latents, the shifted
    sigmas of its 16 px sequence length and the guidance vector all agree."""
    from diffusers import FluxPipeline

    from difcompress.diffusion.sampling import Guidance, sample_images
    from difcompress.families.flux import pack, unpack
    from difcompress.loading.models import load_model

    prompts = ["a handwritten 3", "a handwritten 5"]
    with one_thread():
        loaded = load_model(str(tiny_flux_dir))
        family, model = loaded.family, loaded.model
        cond = family.conditions(model, text=loaded.text.encode(prompts), guidance=3.5)
        pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            states, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=24)
        torch.testing.assert_close(cond["encoder_hidden_states"], states, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond["pooled_projections"], pooled, atol=1e-5, rtol=1e-5)
        ours = sample_images(family, model, loaded.scheduler, 2, seed=7, steps=3,
                             guidance=Guidance(cond, None, 1.0), pixels=False)
        c, h, w = family.sample_shape(model)
        noise = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(7 + i)) for i in range(2)])
        stock = pipe(prompts, latents=pack(noise), num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                     height=16, width=16, max_sequence_length=24).images
    torch.testing.assert_close(ours, unpack(stock, h, w), atol=1e-4, rtol=1e-4)
    assert float(ours.abs().mean()) > 0.1  # a real sample, not two zero tensors agreeing


@pytest.mark.parametrize(("args", "expected"), [
    (["--ratio", "0", "--depth", "4"], "--depth 4: keep between 1 and 3 of the 4 blocks"),
    (["--ratio", "0", "--single-depth", "9"], "--single-depth 9"),
    (["--ratio", "0", "--depth", "0"], "--depth"),
    (["--ratio", "0.9"], "leaves no head"),
    (["--ratio", "0", "--single-blocks", "0,8"], "--single-blocks must name blocks between 0 and 7"),
    (["--ratio", "0", "--blocks", "1,1"], "--blocks names block 1 more than once"),
    (["--ratio", "0.5", "--single-blocks", "3,3,5"], "--single-blocks names block 3 more than once"),
    (["--ratio", "0", "--blocks", "0,1,2,3"], "--blocks names all 4 blocks"),
    (["--ratio", "0", "--depth", "2", "--depth-criterion", "block-io-mse"], "--data"),
])
def test_prune_mistakes_are_one_line(tiny_flux_dir, tmp_path, run_cli, args, expected):
    code, _, err = run_cli("prune", tiny_flux_dir, "-o", tmp_path / "x", "--device", "cpu", *args)
    assert expected in assert_one_line_error(code, err, 2)


def test_dev_teacher_without_guidance_is_one_line(tiny_flux_dir, captioned, tmp_path, run_cli):
    code, _, err = run_cli("distill", "--student", tiny_flux_dir, "--teacher", tiny_flux_dir, "-o", tmp_path / "s", "--data", captioned, "--steps", "1",
                           "--batch-size", "2", "--device", "cpu", "--latent-cache", tmp_path / "cache")
    assert "--guidance-scale" in assert_one_line_error(code, err, 2)


def test_long_t5_captions_are_truncated_as_the_pipeline_does(tiny_flux_dir, tmp_path, run_cli):
    data = write_captioned_digits(tmp_path / "long", count=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = "a handwritten digit drawn slowly with a thick black pen"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli("distill", "--student", tiny_flux_dir, "--teacher", tiny_flux_dir, "-o", tmp_path / "s", "--data", data, "--steps", "1",
                             "--batch-size", "2", "--guidance-scale", "3.5", "--device", "cpu", "--checkpoint-every",
                             "0", "--latent-cache", tmp_path / "cache", "--json")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "longer than 24 tokens" in line]
    assert len(warning) == 1 and "1 of 4 captions" in warning[0]


@pytest.mark.parametrize("pipeline", ["FluxControlPipeline", "FluxFillPipeline", "FluxKontextPipeline",
                                      "FluxImg2ImgPipeline", "FluxInpaintPipeline"])
def test_other_flux_pipelines_are_refused_by_name(tiny_flux_dir, tmp_path, run_cli, pipeline):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(tiny_flux_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    code, _, err = run_cli("prune", folder, "-o", tmp_path / "x", "--ratio", "0.5", "--device", "cpu")
    assert pipeline in assert_one_line_error(code, err)


def test_feature_pairs_follow_the_record_or_the_depth(tiny_flux_dir):
    from difcompress.families.flux import LAYOUT, FluxFamily
    from difcompress.loading.models import load_model
    from difcompress.pruning.blocklists import DepthRequest, choose_blocks, rebuilt
    from difcompress.pruning.transformer import element_scorer

    family, teacher = FluxFamily(), load_model(str(tiny_flux_dir)).model
    kept, _ = choose_blocks(family, teacher, LAYOUT, DepthRequest({"transformer_blocks": 1,
                                                                    "single_transformer_blocks": 2}), None, 0)
    student = rebuilt(teacher, LAYOUT, kept, 4, element_scorer("magnitude", 0))
    by_record = family.feature_layer_pairs(student, teacher, {"kept_blocks": kept})
    assert by_record == [("transformer_blocks.0[1]", "transformer_blocks.3[1]"),
                         ("transformer_blocks.0[0]", "transformer_blocks.3[0]"),
                         ("single_transformer_blocks.0[1]", "single_transformer_blocks.3[1]"),
                         ("single_transformer_blocks.1[1]", "single_transformer_blocks.7[1]")]
    by_depth = family.feature_layer_pairs(student, teacher, None, hooks="depth")
    assert [t for _, t in by_depth] == ["transformer_blocks.0[1]", "transformer_blocks.0[0]",
                                        "single_transformer_blocks.0[1]", "single_transformer_blocks.4[1]"]


def test_flex_sized_student_from_flux_dev_at_1024_px_needs_sharding():
    """--dry-run's estimate for Flex.1-alpha's layout (8 double + 38 single blocks) distilled
    from FLUX.1-dev at 1024 px (4096 image + 512 text tokens), micro-batch 1, bf16 teacher
    and mixed precision, gradient checkpointing, EMA: over 80 GB, and it says where to go."""
    from diffusers import FluxTransformer2DModel

    from difcompress.config import DistillConfig
    from difcompress.families.flux import FluxFamily
    from difcompress.layouts import FLEX1_ALPHA_TRANSFORMER, FLUX1_DEV_TRANSFORMER
    from difcompress.training.memory import estimate_distill_memory

    with torch.device("meta"):
        teacher = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
        student = FluxTransformer2DModel(**FLEX1_ALPHA_TRANSFORMER)
    assert FluxFamily().sample_shape(student) == (16, 128, 128)  # FluxPipeline's default 1024 px
    config = DistillConfig(student="s", output="o", mixed_precision="bf16", gradient_checkpointing=True,
                           teacher_dtype="bf16")
    memory = estimate_distill_memory(config, FluxFamily(), student, teacher, micro_batch=1, feature_pairs=[],
                                     text_tokens=512)
    params = sum(p.numel() for p in student.parameters())
    parts = list(memory["parts"].values())
    assert parts[:3] == [params * 4, params * 8, params * 4]  # fp32 weights, AdamW moments, EMA
    # One step: the fp32 gradients and a few GB of checkpointed activations (a view of a
    # weight is no allocation: the transposed weights of the linear layers are not counted).
    assert params * 4 < parts[4] < params * 4 + 10 * 10**9
    assert memory["total_bytes"] > 2 * 80 * 10**9
    assert "does not fit one 80 GB GPU unsharded" in memory["fit"] and "--shard fsdp" in memory["fit"]


def test_schnell_takes_no_guidance_value(tmp_path, captioned):
    """FLUX.1-schnell (no guidance embedder) distills without --guidance-scale, and eval
    reports no guidance scale (it would not act)."""
    with one_thread():
        schnell = build_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
        run_prune(schnell, 0.5, tmp_path / "p", single_depth=2, device="cpu")
        summary = run_distill(tmp_path / "p", tmp_path / "s", loss="place", data=str(captioned), steps=1,
                              batch_size=2, checkpoint_every=0, device="cpu", latent_cache=tmp_path / "cache")
        assert torch.isfinite(torch.tensor(summary["final"]["loss"]))
        (tmp_path / "prompts.txt").write_text("a handwritten 5\n")
        row = run_eval([tmp_path / "s"], prompts=str(tmp_path / "prompts.txt"), grid_size=1, sampler_steps=1,
                       latency_batch_size=1, device="cpu", output=tmp_path / "eval")["models"][0]
    assert "guidance_scale" not in row and row["family"] == "flux"


def test_a_dev_teacher_reads_the_guidance_value_beside_a_schnell_layout_student(tiny_flux_dir, captioned, tmp_path):
    """A student without a guidance embedder (schnell's layout) from a dev teacher: the
    teacher still reads --guidance-scale (its first-step loss moves with the value; it was
    refused as 'pass --guidance-scale' after training had started), and without one the run
    is refused in one line before any work."""
    with one_thread():
        schnell = build_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
        settings = dict(teacher=str(tiny_flux_dir), loss="place", data=str(captioned), steps=1, batch_size=2,
                        checkpoint_every=0, device="cpu", latent_cache=tmp_path / "cache")
        losses = [run_distill(schnell, tmp_path / f"s{scale}", guidance_scale=scale, **settings)["final"]["loss"]
                  for scale in (1.0, 6.0)]
        with pytest.raises(UserError, match="guidance-distilled"):
            run_distill(schnell, tmp_path / "none", **settings)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] != losses[1]
    assert not (tmp_path / "none").exists()


def test_head_pruning_keeps_the_important_heads_and_slices_every_weight_by_them(tiny_flux_dir):
    """Heads 1 and 3 of every block made the heaviest: --ratio 0.5 keeps exactly them, and the
    student's q/k/v rows, output columns and single-block proj_out columns are the teacher's
    slices at those heads and the kept residual channels."""
    from difcompress.families.flux import LAYOUT
    from difcompress.loading.models import load_model
    from difcompress.pruning.blocklists import HEADS, RES, WidthPlan, rebuilt
    from difcompress.pruning.transformer import element_scorer

    teacher = load_model(str(tiny_flux_dir)).model
    heads = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])  # heads 1 and 3 of 4 x 8
    with torch.no_grad():
        for block in [*teacher.transformer_blocks, *teacher.single_transformer_blocks]:
            for proj in (block.attn.to_q, block.attn.to_k, block.attn.to_v):
                proj.weight[heads] *= 10
    kept = {"transformer_blocks": [0, 1, 2, 3], "single_transformer_blocks": list(range(8))}
    score = element_scorer("magnitude", 0)
    plan = WidthPlan(teacher, LAYOUT, 2, score, kept)
    assert all(torch.equal(plan.chosen[(f"{name}.{i}", HEADS)], heads) for name, ids in kept.items() for i in ids)
    res = plan.chosen[("", RES)]
    student = rebuilt(teacher, LAYOUT, kept, 2, score)
    double, single = teacher.transformer_blocks[2], teacher.single_transformer_blocks[5]
    assert torch.equal(student.transformer_blocks[2].attn.add_k_proj.weight, double.attn.add_k_proj.weight[heads][:, res])
    assert torch.equal(student.transformer_blocks[2].attn.to_out[0].weight, double.attn.to_out[0].weight[res][:, heads])
    mlp = plan.chosen[("single_transformer_blocks.5", "ff:mlp")]
    assert len(mlp) == 64  # 4 x the new residual width of 16
    columns = torch.cat([heads, 32 + mlp])  # attention output, then the MLP branch
    assert torch.equal(student.single_transformer_blocks[5].proj_out.weight, single.proj_out.weight[res][:, columns])
    assert torch.equal(student.norm_out.linear.weight, teacher.norm_out.linear.weight[torch.cat([res, 32 + res])][:, res])
