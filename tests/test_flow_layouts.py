"""Full-size flow-matching transformer layouts (difcompress/layouts.py) built on the meta
device and counted against their published sizes (docs/published-layouts.md).

Each count is asserted exactly (it is the "meta check" value the docs record) and against the
published size within half a unit of its last published digit ("12B" within 0.5B, "3.2B"
within 0.05B): a published figure rounded that way cannot tell apart configs closer than that,
and a wrong field (one block more, another width) moves the count by more."""

import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    ZImageTransformer2DModel,
)

from difcompress import layouts

B = 1e9

# layout, class, exact count here, published size, half its rounding unit (sources: layouts.py)
CASES = {
    "FLUX.1-dev": (layouts.FLUX1_DEV_TRANSFORMER, FluxTransformer2DModel, 11_901_408_320, 12 * B, 0.5 * B),
    "FLUX.1-schnell": (layouts.FLUX1_SCHNELL_TRANSFORMER, FluxTransformer2DModel, 11_891_178_560, 12 * B, 0.5 * B),
    "Flex.1-alpha": (layouts.FLEX1_ALPHA_TRANSFORMER, FluxTransformer2DModel, 8_163_264_064, 8 * B, 0.5 * B),
    "Flux-Mini": (layouts.FLUX_MINI_TRANSFORMER, FluxTransformer2DModel, 3_179_199_552, 3.2 * B, 0.05 * B),
    "SD3.5-large": (layouts.SD35_LARGE_TRANSFORMER, SD3Transformer2DModel, 8_056_627_520, 8 * B, 0.5 * B),
    "Z-Image-Turbo": (layouts.Z_IMAGE_TURBO_TRANSFORMER, ZImageTransformer2DModel, 6_154_908_736, 6 * B, 0.5 * B),
}


def build(layout, model_class):
    with torch.device("meta"):
        return model_class(**layout)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_count(model) -> int:
    """Every tensor a checkpoint stores: parameters and persistent buffers (SD3's position table)."""
    return sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("name", list(CASES))
def test_published_layout_counts(name):
    layout, model_class, exact, published, tolerance = CASES[name]
    count = parameter_count(build(layout, model_class))
    assert count == exact
    assert abs(count - published) <= tolerance


def test_flux_block_lists_follow_their_config_keys():
    mini = build(layouts.FLUX_MINI_TRANSFORMER, FluxTransformer2DModel)
    assert (len(mini.transformer_blocks), len(mini.single_transformer_blocks)) == (5, 10)
    flex = build(layouts.FLEX1_ALPHA_TRANSFORMER, FluxTransformer2DModel)
    assert (len(flex.transformer_blocks), len(flex.single_transformer_blocks)) == (8, 38)
    assert flex.config.guidance_embeds


def test_sd35_sizes_quoted_elsewhere_count_the_position_table():
    """The quoted "8.1B" (Large) and "2.47B" (Medium's GGUF card) are the checkpoint's tensors:
    the parameters plus the persistent 2-D sin-cos position table (pos_embed_max_size^2 x
    width), a buffer in diffusers. Medium's parameters alone are 2.24B."""
    large = build(layouts.SD35_LARGE_TRANSFORMER, SD3Transformer2DModel)
    assert checkpoint_count(large) - parameter_count(large) == 192 * 192 * 2432
    assert checkpoint_count(large) == 8_146_280_768
    assert abs(checkpoint_count(large) - 8.1 * B) <= 0.05 * B
    medium = build(layouts.SD35_MEDIUM_TRANSFORMER, SD3Transformer2DModel)
    assert parameter_count(medium) == 2_243_171_520
    assert checkpoint_count(medium) == 2_469_663_936
    assert abs(checkpoint_count(medium) - 2.47 * B) <= 0.005 * B
    assert abs(checkpoint_count(medium) - 2.5 * B) <= 0.05 * B
    dual = [i for i, block in enumerate(medium.transformer_blocks) if block.use_dual_attention]
    assert dual == list(range(13))
    assert medium.transformer_blocks[-1].context_pre_only


def test_z_image_stacks():
    model = build(layouts.Z_IMAGE_TURBO_TRANSFORMER, ZImageTransformer2DModel)
    assert (len(model.layers), len(model.noise_refiner), len(model.context_refiner)) == (30, 2, 2)
    assert model.siglip_refiner is None


@pytest.mark.parametrize("name, request_, params, kept_dual", [
    ("SD3.5-large", dict(depth=19, ratio=0.5), 1_006_726_464, ()),
    ("SD3.5-medium", dict(depth=12, ratio=0.0), 1_107_717_952, tuple(range(6))),  # teacher blocks 1, 3, ..., 11 had it
    ("Z-Image-Turbo", dict(depth=15, ratio=0.5), 880_394_176, None),
])
def test_full_size_students_on_the_meta_device(name, request_, params, kept_dual):
    """Depth halved uniformly (blocks 1, 3, ...) and / or half the heads with the residual width,
    rebuilt from the stock config without allocating a weight."""
    from difcompress.families.base import PruneRequest
    from difcompress.families.registry import family_for_model

    layout, model_class = {**CASES, "SD3.5-medium": (layouts.SD35_MEDIUM_TRANSFORMER, SD3Transformer2DModel)}[name][:2]
    with torch.device("meta"):
        teacher = model_class(**layout)
        student = family_for_model(teacher).prune(teacher, PruneRequest(importance="random", **request_)).model
    assert parameter_count(student) == params
    if kept_dual is not None:
        assert tuple(student.config.dual_attention_layers) == kept_dual
        assert student.transformer_blocks[-1].context_pre_only
