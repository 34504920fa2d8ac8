"""Sizes on full published layouts (random weights): google/ddpm-cifar10-32 at 0.9 and
facebook/DiT-XL-2-256 halved in depth (TinyDiT-D14) or in heads."""

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from difcompress.families.registry import family_for_model
from difcompress.layouts import DDPM_CIFAR10_32
from difcompress.metrics.cost import model_size
from difcompress.pruning.graph import prune_channels
from difcompress.pruning.importance import make_importance


@pytest.fixture(scope="module")
def pruned_090():
    torch.manual_seed(0)
    model = UNet2DModel(**DDPM_CIFAR10_32)
    family = family_for_model(model)
    before = model_size(model, family)
    groups_before = {n: (m.num_channels, m.num_groups) for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    outcome = prune_channels(model, family, 0.9, make_importance("magnitude"))
    return model, family, before, groups_before, outcome


def test_params_and_macs_at_most_3_percent(pruned_090):
    model, family, before, _, _ = pruned_090
    after = model_size(model, family)
    assert before["params"] == 35_746_307  # the published 35.7M
    assert 6.2e9 < before["macs"] < 6.25e9  # published 6.1G (convolutions, linears) + 0.17G of attention matmuls
    assert after["params"] <= 0.03 * before["params"]
    assert after["macs"] <= 0.03 * before["macs"]


def test_every_groupnorm_keeps_about_ten_percent_in_whole_groups(pruned_090):
    model, _, _, groups_before, outcome = pruned_090
    assert outcome.uniform_groups == 3  # round(32 * 0.1)
    for name, gn in model.named_modules():
        if isinstance(gn, nn.GroupNorm):
            channels, groups = groups_before[name]
            assert 0.08 <= gn.num_channels / channels <= 0.12, name
            assert gn.num_groups == 3, name
            assert gn.num_channels // gn.num_groups == channels // groups, name  # group size as trained
    assert outcome.warnings == []


def test_stock_config_rebuilds_the_pruned_model(pruned_090):
    model, family, *_ = pruned_090
    rebuilt = UNet2DModel.from_config(family.pruned_config(model))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    inputs = family.example_inputs(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**inputs).sample, model(**inputs).sample, atol=1e-5, rtol=1e-4)


def test_dit_xl_d14_and_half_heads():
    """DiT paper: 675M params, 118.6 GFLOPs (fvcore, which counts MACs). diffusers gives every
    block its own timestep/label embedder (2,777,472 params each), so the stock model has
    27 x 2.78M = 75M more: 749.8M. TinyFusion's D14 has 340M; ours carries 14 embedders."""
    from diffusers import DiTTransformer2DModel

    from difcompress.families.base import PruneRequest
    from difcompress.layouts import DIT_XL_2_256

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**DIT_XL_2_256).eval()
    family = family_for_model(model)
    before = model_size(model, family)
    per_block_embedder = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    assert per_block_embedder == 2_777_472
    assert before["params"] == 749_826_464
    assert before["params"] - 27 * per_block_embedder == pytest.approx(675e6, rel=0.001)
    assert before["macs"] == pytest.approx(118.6e9, rel=0.002)  # fvcore: linears, convolutions, attention

    d14 = family.prune(model, PruneRequest(ratio=0.0, importance="magnitude", depth=14))
    after = model_size(d14.model, family)
    assert d14.details["kept_blocks"] == list(range(1, 28, 2))
    assert after["params"] - 13 * per_block_embedder == pytest.approx(340e6, rel=0.01)  # TinyDiT-D14: 340M
    assert after["macs"] == pytest.approx(before["macs"] / 2, rel=0.01)

    half = family.prune(model, PruneRequest(ratio=0.5, importance="magnitude"))
    assert half.model.config.num_attention_heads == 8 and half.model.config.num_layers == 28
    assert model_size(half.model, family)["macs"] < 0.27 * before["macs"]  # linears width^2, attention width: ~0.26
