"""Every supported model family, found by the pipeline that holds a denoiser and the
denoiser's class together (an SDXL U-Net is a `UNet2DConditionModel`, as SD's is)."""

from __future__ import annotations

from torch import nn

from difcompress.core.errors import UserError
from difcompress.families.base import ModelFamily
from difcompress.families.dit import DiTFamily
from difcompress.families.flux import FluxFamily
from difcompress.families.sd3 import SD3Family
from difcompress.families.sdxl import SDXLFamily
from difcompress.families.t2i import TextToImageFamily
from difcompress.families.unet2d import PixelUNetFamily
from difcompress.families.zimage import ZImageFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (PixelUNetFamily(), DiTFamily(), TextToImageFamily(),
                                                         SDXLFamily(), FluxFamily(), SD3Family(),
                                                         ZImageFamily())}
SUPPORTED_CLASSES = sorted({f.model_class.__name__ for f in FAMILIES.values()})


def family_for_model(model: nn.Module) -> ModelFamily:
    """The family of a denoiser in memory (its class and config tell)."""
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    raise UserError(f"unsupported model class {type(model).__name__}; difcompress supports "
                    f"{', '.join(SUPPORTED_CLASSES)}")


def family_for(denoiser_class: str, pipeline_class: str | None = None) -> ModelFamily:
    """The family of a `denoiser_class` inside a `pipeline_class` (model_index.json's
    _class_name), or in a bare model folder when `pipeline_class` is None."""
    candidates = [f for f in FAMILIES.values() if f.model_class.__name__ == denoiser_class]
    if not candidates:
        raise UserError(f"unsupported model class {denoiser_class}; difcompress supports "
                        f"{', '.join(SUPPORTED_CLASSES)}")
    pipelines = [p for f in candidates for p in f.pipelines]
    if pipeline_class is None:
        bare = [f for f in candidates if not f.needs_pipeline]
        if not bare:
            raise UserError(f"a bare {denoiser_class} cannot be compressed alone; pass its pipeline folder "
                            f"({' or '.join(pipelines)}: its other components come from there)")
        return bare[0]
    for family in candidates:
        if pipeline_class in family.pipelines:
            return family
    raise UserError(f"a {pipeline_class} with a {denoiser_class}, which is not supported yet: difcompress "
                    f"compresses the {denoiser_class} of {', '.join(pipelines)}")
