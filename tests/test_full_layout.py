"""The 0.9 numbers on the full google/ddpm-cifar10-32 layout (random weights)."""

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from difcompress.families import family_for_model
from difcompress.layouts import DDPM_CIFAR10_32
from difcompress.measure import model_size
from difcompress.pruning import make_importance, prune_channels


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
    assert 5.9e9 < before["macs"] < 6.2e9  # published 6.1G, attention matmuls included
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
