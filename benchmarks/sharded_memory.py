"""Per-process memory of a distill run under sharding, at 1, 8 and 16 processes (issue 26).

Everything on the meta device (no weights, no download):
- SD-1.4's U-Net teacher (fp16) -> BK-SDM-Small student (layouts.SD14_UNET, the bk-small
  preset): the full `distill --dry-run` estimate (training/memory.py: weights, optimizer,
  EMA, teacher, and one measured step at micro-batch 8, fp16 mixed precision, gradient
  checkpointing), then `per_process_under_sharding`.
- A Flux.1-lite-sized student: FluxTransformer2DModel with FLUX.1-dev's config
  (docs/published-layouts.md) and num_layers 8 (8.16B), from the FLUX.1-dev teacher (bf16),
  through the Flux family: the same estimate at 1024x1024 (128x128 latents), 512 T5
  tokens, micro-batch 1, bf16, gradient checkpointing.

    python benchmarks/sharded_memory.py [--json]
"""

from __future__ import annotations

import json
import sys

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from difcompress.config import DistillConfig
from difcompress.families.registry import family_for_model
from difcompress.layouts import SD14_UNET
from difcompress.pruning.blocks import student_config
from difcompress.training.memory import (
    PROCESS_COUNTS,
    estimate_distill_memory,
    per_process_under_sharding,
)

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
GIB = 2**30


def _config(**settings) -> DistillConfig:
    """The distill defaults with `settings` and gradient checkpointing (no paths needed)."""
    defaults = {k: f.default for k, f in DistillConfig.model_fields.items()}
    return DistillConfig.model_construct(**{**defaults, "gradient_checkpointing": True, **settings})


def sd_bk_small() -> dict:
    with torch.device("meta"):
        teacher = UNet2DConditionModel(**SD14_UNET).to(torch.float16)
        student = UNet2DConditionModel(**student_config(SD14_UNET, "bk-small"))
    memory = estimate_distill_memory(_config(teacher_dtype="fp16", mixed_precision="fp16"), family_for_model(student), student, teacher, micro_batch=8,
                                     feature_pairs=[], text_tokens=77)
    return {"student_params": memory["student_params"], "per_process": per_process_under_sharding(memory),
            "counted": "state + one measured step (micro-batch 8, fp16, gradient checkpointing)"}


def flux_lite() -> dict:
    with torch.device("meta"):
        student = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": 8})
        teacher = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
    memory = estimate_distill_memory(_config(teacher_dtype="bf16", mixed_precision="bf16"), family_for_model(student),
                                     student, teacher, micro_batch=1, feature_pairs=[], text_tokens=512)
    return {"student_params": memory["student_params"], "per_process": per_process_under_sharding(memory),
            "counted": "state + one measured step (1024x1024, 512 T5 tokens, micro-batch 1, bf16, gradient "
                       "checkpointing)"}


def main() -> None:
    torch.set_num_threads(1)
    results = {"sd-1.4 -> bk-small": sd_bk_small(), "flux.1-dev -> 8 double blocks (flux.1-lite size)": flux_lite()}
    if "--json" in sys.argv:
        print(json.dumps(results, indent=2))
        return
    for name, result in results.items():
        print(f"\n{name}: student {result['student_params'] / 1e9:.2f}B parameters; {result['counted']}")
        print(f"{'--shard':24}" + "".join(f"{n:>10} GPU" for n in PROCESS_COUNTS))
        for layout, totals in result["per_process"].items():
            print(f"{layout:24}" + "".join(f"{totals[str(n)] / GIB:>10.1f} GiB" for n in PROCESS_COUNTS))


if __name__ == "__main__":
    main()
