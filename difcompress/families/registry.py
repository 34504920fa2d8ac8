"""Every supported model family, by name and by diffusers class name."""

from __future__ import annotations

from torch import nn

from difcompress.errors import UserError
from difcompress.families.base import ModelFamily
from difcompress.families.dit import DiTFamily
from difcompress.families.t2i import TextToImageFamily
from difcompress.families.unet2d import PixelUNetFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (PixelUNetFamily(), DiTFamily(), TextToImageFamily())}
SUPPORTED_CLASSES = {f.model_class.__name__: f for f in FAMILIES.values()}


def family_for_model(model: nn.Module) -> ModelFamily:
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    raise UserError(
        f"unsupported model class {type(model).__name__}; difcompress supports {', '.join(SUPPORTED_CLASSES)}"
    )


def family_for_class_name(class_name: str) -> ModelFamily:
    try:
        return SUPPORTED_CLASSES[class_name]
    except KeyError:
        raise UserError(
            f"unsupported model class {class_name}; difcompress supports {', '.join(SUPPORTED_CLASSES)}"
        ) from None
