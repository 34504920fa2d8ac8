"""`difcompress prune` on tiny ddpm-cifar10-32-shaped U-Nets: structure, export, criteria, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    NO_DIFCOMPRESS_CHECK,
    TINY_BLOCK_OUT,
    TINY_GROUPS,
    assert_one_line_error,
    build_tiny_unet,
    run_prune,
    save_pipeline,
)
from safetensors.torch import load_file, save_file
from torch import nn

from difcompress.core.environment import seed_everything
from difcompress.core.errors import UserError
from difcompress.families.registry import family_for_model
from difcompress.loading.models import load_model
from difcompress.pruning.graph import prune_channels
from difcompress.pruning.importance import make_importance

INT_STAGES = ("conv_in", "time_embedding") + tuple(f"down_blocks.{i}" for i in range(4)) + (
    "mid_block",
) + tuple(f"up_blocks.{i}" for i in range(4))


# ----------------------------------------------------------------------------- helpers


def engine_prune(model_dir: Path, ratio: float = 0.5, importance: str = "magnitude", *, global_pruning=False, seed=0):
    """The pruning engine called directly: the pruned model as it is in memory."""
    loaded = load_model(model_dir, "cpu")
    seed_everything(seed)
    outcome = prune_channels(loaded.model, loaded.family, ratio, make_importance(importance),
                             global_pruning=global_pruning)
    loaded.model.eval()
    return loaded.model, outcome


def fixed_inputs(channels: int = 3, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "sample": torch.randn(2, channels, size, size, generator=g),
        "timestep": torch.tensor([3, 57], dtype=torch.long),
    }


@torch.no_grad()
def forward(model, inputs) -> torch.Tensor:
    return model(inputs["sample"], inputs["timestep"]).sample


def kept_indices(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which entries of a 1-D original parameter survive in the pruned one (values are unique)."""
    assert original.dim() == 1 and pruned.dim() == 1
    assert original.unique().numel() == original.numel(), "test needs distinct values to match channels"
    out = []
    for value in pruned.tolist():
        hits = (original == value).nonzero().flatten().tolist()
        assert len(hits) == 1, f"pruned value {value} not found exactly once in the original"
        out.append(hits[0])
    return out


def kept_groupnorm_channels(original: nn.Module, pruned: nn.Module) -> dict[str, list[int]]:
    orig = dict(original.named_modules())
    return {
        name: kept_indices(orig[name].bias.detach(), m.bias.detach())
        for name, m in pruned.named_modules()
        if isinstance(m, nn.GroupNorm)
    }


def assert_whole_units(indices: list[int], unit: int, where: str) -> None:
    """Kept channels are whole aligned blocks of `unit` consecutive original channels, in order."""
    assert indices == sorted(indices), where
    assert len(indices) % unit == 0, (where, indices)
    for start in range(0, len(indices), unit):
        block = indices[start : start + unit]
        assert block[0] % unit == 0 and block == list(range(block[0], block[0] + unit)), (where, indices)


def no_leftovers(out: Path) -> None:
    """Nothing that looks complete at OUT, and no temporary sibling left behind."""
    assert not (out / "difcompress.json").exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers


def check_stock_load(out: Path, model: nn.Module, tmp_path: Path, run_subprocess, *, channels=3, size=16) -> None:
    """In a fresh interpreter that never imports difcompress, stock diffusers loads OUT both as
    a model and as a pipeline, and reproduces `model`'s output on a fixed input."""
    inputs = fixed_inputs(channels, size)
    expected = forward(model, inputs)
    io = tmp_path / "stock_io.safetensors"
    save_file({"sample": inputs["sample"], "timestep": inputs["timestep"], "expected": expected.contiguous()}, io)
    code = f"""
import numpy as np
import torch
from safetensors.torch import load_file
from diffusers import DDPMPipeline, UNet2DModel

data = load_file({str(io)!r})
unet = UNet2DModel.from_pretrained({str(out)!r}, subfolder="unet").eval()
pipe = DDPMPipeline.from_pretrained({str(out)!r})
with torch.no_grad():
    a = unet(data["sample"], data["timestep"]).sample
    b = pipe.unet.eval()(data["sample"], data["timestep"]).sample
for name, got in (("UNet2DModel", a), ("DDPMPipeline.unet", b)):
    assert got.shape == data["expected"].shape, (name, tuple(got.shape))
    err = (got - data["expected"]).abs().max().item()
    assert err <= 1e-5, (name, "max abs difference", err)
images = pipe(batch_size=1, num_inference_steps=2, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
assert images.shape == (1, {size}, {size}, {channels}) and np.isfinite(images).all(), images.shape
print("stock-ok", list(unet.config.block_out_channels))
""" + NO_DIFCOMPRESS_CHECK
    proc = run_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stock-ok" in proc.stdout


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("prune-uniform") / "out"
    report = run_prune(str(tiny_model_dir), 0.5, out, importance="magnitude", device="cpu")
    return out, report


@pytest.fixture(scope="module")
def global_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("prune-global") / "out"
    report = run_prune(str(tiny_model_dir), 0.5, out, importance="magnitude", global_pruning=True, device="cpu")
    return out, report


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory, tiny_heads_model_dir):
    out = tmp_path_factory.mktemp("prune-heads") / "out"
    report = run_prune(str(tiny_heads_model_dir), 0.5, out, importance="magnitude", device="cpu")
    return out, report


# ----------------------------------------------------------------------------- uniform pruning


def test_uniform_prune_halves_every_width_in_whole_groupnorm_groups(uniform_run, tiny_model_dir):
    out, report = uniform_run
    assert report["mode"] == "uniform"
    assert report["groupnorm_groups_kept"] == TINY_GROUPS // 2
    for stage in INT_STAGES:
        before, after = report["widths"][stage]
        assert after * 2 == before, (stage, before, after)
    attention = {k: v for k, v in report["widths"].items() if "heads x dim" in k}
    assert len(attention) == 4
    assert all(v == ["1x64", "1x32"] for v in attention.values()), attention

    original = load_model(tiny_model_dir, "cpu").model
    pruned = load_model(out, "cpu").model
    orig_modules = dict(original.named_modules())
    norms = [(n, m) for n, m in pruned.named_modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == len([m for m in original.modules() if isinstance(m, nn.GroupNorm)])
    for name, gn in norms:
        old = orig_modules[name]
        assert gn.num_groups == TINY_GROUPS // 2 < old.num_groups, name
        assert gn.num_channels * 2 == old.num_channels, name
        assert gn.num_channels // gn.num_groups == old.num_channels // old.num_groups, name
        assert gn.num_channels % gn.num_groups == 0, name
    # The kept channels are whole original groups (matched through the GroupNorm biases).
    # Norms on a skip concatenation (up-block resnets' norm1) are left out: each half is
    # pruned in the group size of the layer that produced it, not the concat norm's.
    checked = 0
    for name, kept in kept_groupnorm_channels(original, pruned).items():
        if name.startswith("up_blocks.") and name.endswith(".norm1") and ".resnets." in name:
            continue
        old = orig_modules[name]
        assert_whole_units(kept, old.num_channels // old.num_groups, name)
        checked += 1
    assert checked >= 15


def test_uniform_prune_reports_params_and_macs(uniform_run, tiny_model_dir):
    out, report = uniform_run
    original = load_model(tiny_model_dir, "cpu").model
    pruned = load_model(out, "cpu").model
    p_before, p_after = report["params"]
    assert p_before == sum(p.numel() for p in original.parameters())
    assert p_after == sum(p.numel() for p in pruned.parameters())
    # Halving both sides of every conv leaves about a quarter of the weights and MACs.
    assert 0.15 * p_before < p_after < 0.35 * p_before
    m_before, m_after = report["macs"]
    assert 0.15 * m_before < m_after < 0.35 * m_before
    assert report["params_reduction"] == pytest.approx(1 - p_after / p_before)
    assert report["macs_reduction"] == pytest.approx(1 - m_after / m_before)


def test_uniform_prune_keeps_the_trained_timestep_frequencies(uniform_run, tiny_model_dir):
    """Every kept input column of time_embedding.linear_1 is fed the same sinusoid as before pruning.

    The stock config can only express a narrower embedding through (channels, freq_shift), so
    the pruned model must compute exactly the frequencies whose weights it kept.
    """
    out, _ = uniform_run
    original = load_model(tiny_model_dir, "cpu").model
    pruned = load_model(out, "cpu").model  # rebuilt by stock diffusers from the rewritten config
    t = torch.arange(0, 100, dtype=torch.float32)
    with torch.no_grad():
        old_emb, new_emb = original.time_proj(t), pruned.time_proj(t)
    assert new_emb.shape[1] * 2 == old_emb.shape[1]
    old_lin, new_lin = original.time_embedding.linear_1, pruned.time_embedding.linear_1
    rows = kept_indices(old_lin.bias.detach(), new_lin.bias.detach())
    columns = []
    for j in range(new_emb.shape[1]):
        err = (new_emb[:, j : j + 1] - old_emb).abs().max(0).values
        c = int(err.argmin())
        assert err[c] < 1e-4, f"pruned embedding column {j} matches no original frequency (best {err[c]:.2e})"
        columns.append(c)
        torch.testing.assert_close(new_lin.weight[:, j], old_lin.weight[rows, c], atol=0, rtol=0)
    assert len(set(columns)) == len(columns)


def test_uniform_prune_folder_layout(uniform_run, tiny_model_dir):
    out, report = uniform_run
    for rel in (
        "difcompress.json",
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (out / rel).is_file(), rel
    assert not (out / "unet" / "difcompress_structure.json").exists()
    # One copy of the weights: no second model at the top level.
    assert not (out / "config.json").exists() and not (out / "diffusion_pytorch_model.safetensors").exists()
    manifest = json.loads((out / "difcompress.json").read_text())
    assert manifest["stage"] == "prune"
    assert manifest["structure"] == "config"
    assert manifest["family"] == "unet2d"
    assert Path(manifest["teacher"]) == tiny_model_dir.resolve()
    assert manifest["report"]["params"] == report["params"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"][1] == "UNet2DModel"
    config = json.loads((out / "unet" / "config.json").read_text())
    assert list(config["block_out_channels"]) == [w // 2 for w in TINY_BLOCK_OUT]
    assert config["norm_num_groups"] == TINY_GROUPS // 2
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == 100
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_uniform_prune_loads_in_stock_diffusers_with_identical_outputs(uniform_run, tiny_model_dir, tmp_path,
                                                                     run_subprocess):
    out, _ = uniform_run
    model, _ = engine_prune(tiny_model_dir)
    # The saved weights are exactly the in-memory pruned model's ...
    assert_same_state(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), model.state_dict())
    # ... and stock diffusers, from the rewritten config alone, computes what that model computes.
    check_stock_load(out, model, tmp_path, run_subprocess)


def _processor_outputs(model, inputs):
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
    )

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attentions) == 4
    outs = []
    for proc in (AttnProcessor, AttnProcessor2_0):
        for attn in attentions:
            attn.set_processor(proc())
        outs.append(forward(model, inputs))
    return outs


@pytest.mark.parametrize("variant", ["uniform", "heads", "global"])
def test_pruned_forward_agrees_under_both_attention_processors(variant, tiny_model_dir, tiny_heads_model_dir):
    source = tiny_heads_model_dir if variant == "heads" else tiny_model_dir
    model, _ = engine_prune(source, global_pruning=variant == "global")
    inputs = fixed_inputs()
    classic, sdpa = _processor_outputs(model, inputs)
    assert torch.isfinite(classic).all()
    torch.testing.assert_close(classic, sdpa, atol=1e-5, rtol=1e-4)

    from difcompress.families.unet2d import both_attention_processors_agree

    assert both_attention_processors_agree(model, inputs)


# ----------------------------------------------------------------------------- multi-head attention


def test_multi_head_prune_removes_whole_heads(heads_run, tiny_heads_model_dir, tmp_path, run_subprocess):
    from diffusers.models.attention_processor import Attention

    out, report = heads_run
    attention = {k: v for k, v in report["widths"].items() if "heads x dim" in k}
    assert len(attention) == 4
    assert all(v == ["8x8", "4x8"] for v in attention.values()), attention

    original = load_model(tiny_heads_model_dir, "cpu").model
    model, _ = engine_prune(tiny_heads_model_dir)
    orig_modules = dict(original.named_modules())
    attns = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]
    for name, attn in attns:
        old = orig_modules[name]
        assert old.heads == 8
        assert attn.heads == 4, name
        assert attn.inner_dim // attn.heads == 8, name  # head dim unchanged
        assert attn.scale == pytest.approx(8**-0.5), name
        for proj in ("to_q", "to_k", "to_v"):
            kept = kept_indices(getattr(old, proj).bias.detach(), getattr(attn, proj).bias.detach())
            assert len(kept) == 32, (name, proj)
            assert_whole_units(kept, 8, f"{name}.{proj}")

    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["attention_head_dim"] == 8
    assert list(config["block_out_channels"]) == [16, 32, 32, 32]
    assert not (out / "unet" / "difcompress_structure.json").exists()
    assert_same_state(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), model.state_dict())
    check_stock_load(out, model, tmp_path, run_subprocess)


# ----------------------------------------------------------------------------- global pruning


def test_global_prune_records_structure_and_reloads_exactly(global_run, tiny_model_dir):
    out, report = global_run
    assert report["mode"] == "global"
    record_path = out / "unet" / "difcompress_structure.json"
    assert record_path.is_file()
    record = json.loads(record_path.read_text())
    assert record["history"] and record["base_config"]["block_out_channels"] == list(TINY_BLOCK_OUT)
    assert json.loads((out / "difcompress.json").read_text())["structure"] == "record"

    # Widths are chosen per layer: not every stage keeps the same fraction.
    fractions = {after / before for before, after in (report["widths"][s] for s in INT_STAGES if s != "time_embedding")}
    assert len(fractions) > 1, report["widths"]

    in_memory, _ = engine_prune(tiny_model_dir, global_pruning=True)
    loaded = load_model(out, "cpu")
    assert_same_state(loaded.model.state_dict(), in_memory.state_dict())
    assert loaded.family.stage_widths(loaded.model) == loaded.family.stage_widths(in_memory)
    inputs = fixed_inputs()
    torch.testing.assert_close(forward(loaded.model.eval(), inputs), forward(in_memory, inputs), atol=1e-6, rtol=0)
    assert report["params"][1] == sum(p.numel() for p in loaded.model.parameters())
    assert report["params"][1] < report["params"][0]


@pytest.mark.parametrize("first, second", [("uniform", "uniform"), ("global", "global")])
def test_pruned_folder_can_be_pruned_again(first, second, uniform_run, global_run, tmp_path):
    """A difcompress folder is a valid prune source, and pruning it again gives a loadable model."""
    out, _ = uniform_run if first == "uniform" else global_run
    again = tmp_path / "again"
    report = run_prune(str(out), 0.5, again, importance="magnitude", global_pruning=second == "global", device="cpu")
    assert report["params"][0] == sum(p.numel() for p in load_model(out, "cpu").model.parameters())
    assert report["params"][1] < report["params"][0]
    reloaded = load_model(again, "cpu").model
    assert sum(p.numel() for p in reloaded.parameters()) == report["params"][1]
    assert torch.isfinite(forward(reloaded.eval(), fixed_inputs())).all()
    # The teacher of a pruned-again model is still the original model.
    assert json.loads((again / "difcompress.json").read_text())["teacher"] == json.loads(
        (out / "difcompress.json").read_text()
    )["teacher"]


def test_uniform_prune_of_a_globally_pruned_folder_is_clean(global_run, tmp_path, run_cli):
    """Uniform pruning of a global result: either a loadable model or one clear error line."""
    out, _ = global_run
    again = tmp_path / "again"
    code, _, stderr = run_cli("prune", out, "-o", again, "--ratio", "0.3", "--device", "cpu", "--json")
    if code == 0:
        reloaded = load_model(again, "cpu").model
        assert torch.isfinite(forward(reloaded.eval(), fixed_inputs())).all()
    else:
        assert_one_line_error(code, stderr)
        assert not again.exists()


# ----------------------------------------------------------------------------- importance criteria


def _kept_sets(model_dir: Path, original: nn.Module) -> dict[str, list[int]]:
    return kept_groupnorm_channels(original, load_model(model_dir, "cpu").model)


def test_random_importance_is_seeded(tiny_model_dir, tmp_path):
    original = load_model(tiny_model_dir, "cpu").model
    outs = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs[tag] = tmp_path / tag
        run_prune(str(tiny_model_dir), 0.5, outs[tag], importance="random", seed=seed, device="cpu")
    weights = {tag: load_file(path / "unet" / "diffusion_pytorch_model.safetensors") for tag, path in outs.items()}
    assert_same_state(weights["a"], weights["b"])
    kept = {tag: _kept_sets(path, original) for tag, path in outs.items()}
    assert kept["a"] == kept["b"]
    assert kept["a"] != kept["c"], "a different seed must keep different channels"
    # Random still keeps whole groups.
    for name, idx in kept["c"].items():
        if name.startswith("up_blocks.") and name.endswith(".norm1") and ".resnets." in name:
            continue
        gn = dict(original.named_modules())[name]
        assert_whole_units(idx, gn.num_channels // gn.num_groups, name)


def test_magnitude_keeps_the_largest_weights(tmp_path):
    """Blow up the conv_in filters of four GroupNorm groups: magnitude must keep exactly those."""
    model = build_tiny_unet(seed=3)
    chosen_groups = [1, 3, 4, 6]
    cpg = TINY_BLOCK_OUT[0] // TINY_GROUPS
    chosen = [g * cpg + k for g in chosen_groups for k in range(cpg)]
    with torch.no_grad():
        model.conv_in.weight[chosen] *= 100.0
    source = save_pipeline(model, tmp_path / "skewed")
    out = tmp_path / "out"
    report = run_prune(str(source), 0.5, out, importance="magnitude", device="cpu")
    assert report["importance"] == "magnitude"
    pruned = load_model(out, "cpu").model
    assert kept_indices(model.conv_in.bias.detach(), pruned.conv_in.bias.detach()) == chosen
    torch.testing.assert_close(pruned.conv_in.weight, model.conv_in.weight[chosen], atol=0, rtol=0)


def test_magnitude_does_not_depend_on_the_seed(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_prune(str(tiny_model_dir), 0.5, a, importance="magnitude", seed=0, device="cpu")
    run_prune(str(tiny_model_dir), 0.5, b, importance="magnitude", seed=7, device="cpu")
    assert_same_state(load_file(a / "unet" / "diffusion_pytorch_model.safetensors"),
                      load_file(b / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("criterion, timesteps", [("taylor", 3), ("diff-pruning", 4)])
def test_gradient_criteria_with_teacher_samples(criterion, timesteps, tiny_model_dir, uniform_run, tmp_path):
    out = tmp_path / "out"
    report = run_prune(str(tiny_model_dir), 0.5, out, importance=criterion, data=None, batch_size=2,
                   importance_timesteps=timesteps, diff_threshold=0.0, device="cpu")
    # taylor visits exactly the capped number of timesteps; diff-pruning with threshold 0
    # never stops early, so it visits every strided timestep 0, 25, 50, 75.
    assert report["importance_timesteps"] == timesteps
    manifest = json.loads((out / "difcompress.json").read_text())
    assert manifest["report"]["importance_timesteps"] == timesteps
    assert manifest["report"]["importance"] == criterion
    # Gradients really drove the choice: the kept channels differ from magnitude's.
    original = load_model(tiny_model_dir, "cpu").model
    assert _kept_sets(out, original) != _kept_sets(uniform_run[0], original)
    for stage in INT_STAGES:
        before, after = report["widths"][stage]
        assert after * 2 == before, stage


def test_diff_pruning_stops_early_when_loss_drops(tiny_model_dir, tmp_path):
    """A threshold just below 1 stops at the first timestep whose loss is below the running max."""
    report = run_prune(str(tiny_model_dir), 0.5, tmp_path / "out", importance="diff-pruning", batch_size=2,
                   importance_timesteps=10, diff_threshold=0.999999, device="cpu")
    used = report["importance_timesteps"]
    assert 1 <= used < 10


@pytest.mark.parametrize("criterion", ["taylor", "diff-pruning"])
def test_gradient_criteria_with_builtin_digits(criterion, tiny_model_dir, tmp_path, run_cli):
    """`--data digits` is documented for gradient criteria (like for distill) and works offline."""
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        "prune", tiny_model_dir, "-o", out, "--ratio", "0.5", "--importance", criterion, "--data", "digits",
        "--batch-size", "4", "--importance-timesteps", "2", "--device", "cpu", "--json",
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert 1 <= report["importance_timesteps"] <= 2
    assert json.loads((out / "difcompress.json").read_text())["data"] == "digits"


# ----------------------------------------------------------------------------- CLI output


def test_cli_json_output(tiny_model_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("prune", tiny_model_dir, "-o", out, "--ratio", "0.5", "--device", "cpu", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)  # stdout is exactly one JSON document
    assert report["output"] == str(out)
    assert len(report["params"]) == 2 and report["params"][1] < report["params"][0]
    assert len(report["macs"]) == 2 and report["macs"][1] < report["macs"][0]
    assert report["widths"]["down_blocks.1"] == [64, 32]
    assert report["params"][1] == sum(p.numel() for p in load_model(out, "cpu").model.parameters())
    assert (out / "difcompress.json").is_file()


def test_cli_table_output_mentions_params_and_macs(tiny_model_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("prune", tiny_model_dir, "-o", out, "--ratio", "0.5", "--device", "cpu")
    assert code == 0, stderr
    assert "params" in stdout and "macs" in stdout.lower()
    assert "MACs -" in stdout  # the achieved-reduction summary line
    assert "1.53M" in stdout  # the tiny model's 1,525,411 parameters, human readable
    assert "saved to" in stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)
    assert (out / "difcompress.json").is_file()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_cli_rejects_ratio_outside_open_interval(ratio, tiny_model_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    code, _, stderr = run_cli("prune", tiny_model_dir, "-o", out, "--ratio", ratio, "--device", "cpu")
    line = assert_one_line_error(code, stderr, expected_code=2)
    assert "--ratio" in line
    assert not out.exists()
    no_leftovers(out)


def test_cli_rejects_unknown_importance(tiny_model_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    code, _, stderr = run_cli("prune", tiny_model_dir, "-o", out, "--importance", "l1-norm", "--device", "cpu")
    line = assert_one_line_error(code, stderr, expected_code=2)
    assert "l1-norm" in line and "magnitude" in line
    assert not out.exists()


def test_cli_missing_path(tmp_path, run_cli):
    out = tmp_path / "out"
    missing = tmp_path / "no" / "such" / "model"
    code, _, stderr = run_cli("prune", missing, "-o", out, "--device", "cpu")
    line = assert_one_line_error(code, stderr)
    assert str(missing) in line
    assert not out.exists()
    no_leftovers(out)


def test_cli_hub_id_not_cached_offline(tmp_path, monkeypatch, run_cli):
    import socket

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection in offline mode")

    monkeypatch.setattr(socket, "create_connection", no_network)
    out = tmp_path / "out"
    code, _, stderr = run_cli("prune", "difcompress-tests/not-a-cached-model", "-o", out, "--device", "cpu")
    line = assert_one_line_error(code, stderr)
    assert "difcompress-tests/not-a-cached-model" in line
    assert "HF_HUB_OFFLINE" in line or "offline" in line.lower()
    assert not out.exists()


def test_cli_folder_that_is_not_a_model(tmp_path, run_cli):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "notes.txt").write_text("not a model\n")
    out = tmp_path / "out"
    code, _, stderr = run_cli("prune", src, "-o", out, "--device", "cpu")
    line = assert_one_line_error(code, stderr)
    assert str(src) in line
    assert not out.exists()


def test_cli_unsupported_model_class_folder(tmp_path, run_cli):
    from diffusers import AutoencoderKL

    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, layers_per_block=1).save_pretrained(
        vae_dir, safe_serialization=True
    )
    out = tmp_path / "out"
    code, _, stderr = run_cli("prune", vae_dir, "-o", out, "--device", "cpu")
    line = assert_one_line_error(code, stderr)
    assert "AutoencoderKL" in line and "UNet2DModel" in line
    assert not out.exists()


def test_cli_unsupported_denoiser_in_pipeline(tmp_path, run_cli, tiny_model_dir):
    pipe_dir = tmp_path / "sd-like"
    shutil.copytree(tiny_model_dir, pipe_dir)
    index = json.loads((pipe_dir / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (pipe_dir / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    code, _, stderr = run_cli("prune", pipe_dir, "-o", out, "--device", "cpu")
    line = assert_one_line_error(code, stderr)
    assert "UNet2DConditionModel" in line
    assert not out.exists()


def test_cli_corrupt_safetensors(tmp_path, run_cli, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x13\x37 this is not a safetensors file " * 50)
    out = tmp_path / "out"
    code, _, stderr = run_cli("prune", broken, "-o", out, "--device", "cpu")
    line = assert_one_line_error(code, stderr)
    assert str(broken / "unet") in line
    assert not out.exists()
    no_leftovers(out)


def test_cli_output_folder_that_is_not_ours_is_left_untouched(tmp_path, run_cli, tiny_model_dir):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete\n")
    code, _, stderr = run_cli("prune", tiny_model_dir, "-o", out, "--device", "cpu")
    line = assert_one_line_error(code, stderr)
    assert str(out) in line
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "do not delete\n"
    no_leftovers(out)


def test_cli_output_that_is_a_file(tmp_path, run_cli, tiny_model_dir):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"data")
    code, _, stderr = run_cli("prune", tiny_model_dir, "-o", out, "--device", "cpu")
    assert_one_line_error(code, stderr)
    assert out.read_bytes() == b"data"


def test_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch, tiny_model_dir):
    """A crash while saving leaves no folder at -o (and a previous result intact)."""
    import difcompress.commands.prune as prune_module

    real_save = prune_module.save_model_folder

    def save_then_crash(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)  # everything written into the temporary folder ...
        raise OSError("disk full")  # ... then the write fails before the rename

    monkeypatch.setattr(prune_module, "save_model_folder", save_then_crash)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        run_prune(str(tiny_model_dir), 0.5, fresh, device="cpu")
    assert not fresh.exists()
    no_leftovers(fresh)

    monkeypatch.setattr(prune_module, "save_model_folder", real_save)
    earlier = tmp_path / "earlier"
    run_prune(str(tiny_model_dir), 0.5, earlier, device="cpu")
    manifest_before = (earlier / "difcompress.json").read_text()
    weights_before = (earlier / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    monkeypatch.setattr(prune_module, "save_model_folder", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        run_prune(str(tiny_model_dir), 0.3, earlier, device="cpu")
    assert (earlier / "difcompress.json").read_text() == manifest_before
    assert (earlier / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prune_api_raises_user_error_not_traceback_for_bad_ratio(tiny_model_dir, tmp_path):
    with pytest.raises(UserError) as info:
        run_prune(str(tiny_model_dir), 1.0, tmp_path / "out", device="cpu")
    assert info.value.exit_code == 2


def test_a_frozen_model_prunes_like_a_trainable_one():
    """The dependency graph is traced through autograd; frozen weights must not hide it."""
    trainable, frozen = build_tiny_unet(seed=5), build_tiny_unet(seed=5).requires_grad_(False)
    family = family_for_model(trainable)
    for model in (trainable, frozen):
        prune_channels(model, family, 0.5, make_importance("magnitude"))
    assert {k: v.shape for k, v in frozen.state_dict().items()} == {k: v.shape for k, v in trainable.state_dict().items()}
    assert not any(p.requires_grad for p in frozen.parameters())
