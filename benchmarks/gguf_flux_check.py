"""The GGUF export checked end to end where diffusers can read it: a Flux transformer of
FLUX.1's full width (24 heads x 128: diffusers' convert_flux_transformer_checkpoint_to_diffusers
splits single blocks at 3072) with 1 double and 1 single block, random weights, written as
Q8_0 and Q4_0 GGUF by difcompress and loaded by stock diffusers with
`FluxTransformer2DModel.from_single_file(file, config=folder,
quantization_config=GGUFQuantizationConfig(...))`; prints each output's difference from the
unquantized model's. About 500M parameters: 2 GB of memory, a few minutes on one CPU core.

    python benchmarks/gguf_flux_check.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

from difcompress.artifacts.gguf_file import write_gguf
from difcompress.artifacts.single_file import bfl_flux_state_dict

LAYOUT = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))


def inputs(tokens: int = 64, text: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, tokens, 16, generator=generator),
                encoder_hidden_states=torch.randn(1, text, 64, generator=generator),
                pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**LAYOUT).eval()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    with torch.no_grad():
        reference = model(**inputs()).sample
    with tempfile.TemporaryDirectory() as folder:
        model.save_config(folder)
        for scheme in ("gguf-q8_0", "gguf-q4_0"):
            path = Path(folder) / f"t.{scheme}.gguf"
            started = time.perf_counter()
            counts = write_gguf(path, bfl_flux_state_dict(model), "bfl-flux", scheme)
            written = time.perf_counter() - started
            loaded = FluxTransformer2DModel.from_single_file(
                str(path), config=folder, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                torch_dtype=torch.float32)
            with torch.no_grad():
                out = loaded(**inputs()).sample
            change = (out - reference).norm() / reference.norm()
            print(f"{scheme}: {counts}, {path.stat().st_size / 2**20:.0f} MiB (written in {written:.0f} s); "
                  f"stock from_single_file + GGUFQuantizationConfig: output finite {bool(out.isfinite().all())}, "
                  f"relative difference from the unquantized model {change:.4f}")


if __name__ == "__main__":
    main()
