"""The model-family interface: what a family must tell the family-agnostic stages.

A family knows its model class's quirks: which layers never prune, how channels group
(GroupNorm groups, attention heads), which attributes diffusers keeps beside the weights,
how to express a pruned model in the stock config, how it is conditioned and how to
sample. The stages (prune, distill, evaluate, export) only talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difcompress.core.errors import UserError
from difcompress.data.conditions import Conditions
from difcompress.diffusion.flow import FlowTraining
from difcompress.diffusion.formulations import formulation_for
from difcompress.diffusion.inputs import ModelInputs


@dataclass
class PruneRequest:
    """What `difcompress prune` asks of a family."""

    ratio: float  # fraction of channels (U-Net) or attention heads (DiT) removed
    importance: str  # random, magnitude, taylor, diff-pruning (gradients already in .grad)
    global_pruning: bool = False
    depth: int | None = None  # transformer blocks to keep (of the first block list)
    blocks: list[int] | None = None  # explicit blocks to keep
    single_depth: int | None = None  # Flux: single-stream blocks to keep
    single_blocks: list[int] | None = None  # Flux: explicit single-stream blocks to keep
    depth_criterion: str = "uniform"  # uniform, output-change or block-io-mse
    calibration: Any = None  # (x0, conditions, scheduler) for data-driven criteria
    seed: int = 0
    round_to: int = 1  # every pruned width a multiple of this (tensor-core friendly)
    preset: str | None = None  # block removal (text-to-image U-Nets: bk-base, bk-small, bk-tiny)


@dataclass
class PruneOutcome:
    model: nn.Module  # the pruned model (the input, pruned in place, or a new one)
    history: list[list] | None = None  # torch-pruning records, for the --global JSON record
    details: dict[str, Any] = field(default_factory=dict)  # family-specific report entries
    warnings: list[str] = field(default_factory=list)


class ModelFamily(ABC):
    name: str
    model_class: type[nn.Module]
    component: str  # the denoiser's folder inside a pipeline ("unet", "transformer")
    pipelines: tuple[str, ...]  # the pipeline classes (model_index _class_name) this family reads
    needs_pipeline: bool = False  # a bare denoiser folder is refused (its encoders live in the pipeline)
    pipeline_tag: str = "unconditional-image-generation"  # the Hub's task of an exported folder
    supports_depth: bool = False  # whether whole blocks can be removed (--depth / --blocks)
    takes_text: bool = False  # conditioned on captions / prompts through the pipeline's text encoder
    text_parts: tuple[str, ...] = ()  # the pipeline components of its text side (tokenizers, encoders)
    reads_geometry: bool = False  # told each training image's original size and crop (SDXL)
    presets: tuple[str, ...] = ()  # block-removal presets `prune --preset` offers
    single_file_layout: str | None = None  # key names of the UIs' single-file checkpoint (artifacts/single_file.py)
    denoiser_kind: str = "U-Net"  # what reports call the denoiser
    pruned_unit: str = "channel"  # what --ratio removes a fraction of
    default_guidance: float = 1.0  # classifier-free guidance scale eval samples with
    teacher_data_guidance: float = 1.0  # guidance of the teacher's samples `--data teacher` trains on

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    @abstractmethod
    def pipeline(self, model: nn.Module, scheduler: Any, autoencoder=None, text=None):
        """The stock diffusers pipeline that holds this denoiser (and its autoencoder, and its
        text encoder and tokenizer for text-to-image)."""

    # ---- shapes, conditioning and forward --------------------------------------------------
    @abstractmethod
    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of one sample the denoiser works on (pixels or latents)."""

    def num_classes(self, model: nn.Module) -> int | None:
        """Class count of a class-conditional denoiser; None when unconditional."""
        return None

    def null_class(self, model: nn.Module) -> int | None:
        """The label id meaning "no class" (classifier-free guidance), if the model has one."""
        return None

    def disable_label_dropout(self, model: nn.Module) -> None:
        """Stop the model dropping labels on its own in train mode (the trainer drops them,
        seeded, identically for teacher and student)."""

    def example_inputs(self, model: nn.Module, batch_size: int = 1) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        c, h, w = self.sample_shape(model)
        return {
            "sample": torch.randn(batch_size, c, h, w, device=device),
            "timestep": torch.full((batch_size,), 10, dtype=torch.long, device=device),
        }

    def attach(self, model: nn.Module, autoencoder, text=None) -> None:
        """Tell a loaded denoiser what its pipeline knows and its config does not (Flux: the
        native image size, from the VAE, and the text window). Nothing for most families."""

    def with_text_tokens(self, inputs: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
        """`example_inputs` with a text sequence of `tokens` tokens (the memory estimate's)."""
        if "encoder_hidden_states" not in inputs:
            return inputs
        states = inputs["encoder_hidden_states"]
        return {**inputs, "encoder_hidden_states": torch.randn(states.shape[0], tokens, states.shape[-1],
                                                               device=states.device)}

    def size_multiple(self, model: nn.Module) -> int | None:
        """What every other sample size must be a multiple of (a U-Net halves it at each
        level), or None when the model's size is fixed (position embeddings)."""
        return None

    def flow_training(self, model: nn.Module) -> FlowTraining | None:
        """How a flow-matching model draws training timesteps and samples (None: not a flow
        family, or diffusion/flow.py's defaults)."""
        return None

    def formulation(self, model: nn.Module, scheduler: Any):
        """The diffusion formulation the model was trained with (DDPM or rectified flow, by
        its scheduler), with this family's flow settings."""
        return formulation_for(scheduler, self.flow_training(model))

    def learns_variance(self, model: nn.Module) -> bool:
        """True when the output carries a learned variance beside epsilon (out = 2 x in)."""
        config = model.config
        return (config.get("out_channels") or config.in_channels) == 2 * config.in_channels

    # ---- conditioning ----------------------------------------------------------------------
    def text_side(self, parts: dict[str, Any]):
        """The text encoder object (data/text.py) over the loaded `text_parts`."""
        raise NotImplementedError(f"{self.name} takes no text")

    def conditions(self, model: nn.Module, *, labels: torch.Tensor | None = None, text: Conditions | None = None,
                   geometry: torch.Tensor | None = None, guidance: float | None = None) -> Conditions | None:
        """The named conditions the denoiser reads, one row per sample, from class labels or
        from encoded captions (the text side's encodings by name), with each image's
        (original height, width, crop top, left) where the model reads them, and the guidance
        value a guidance-distilled model reads as an input (FLUX.1-dev; others ignore it).
        None for an unconditional model."""
        return None

    def takes_guidance(self, model: nn.Module) -> bool:
        """Whether the denoiser reads a guidance value as an input (guidance distillation)."""
        return False

    def check_guidance(self, model: nn.Module, guidance: float | None) -> None:
        """A guidance-distilled model without a guidance value: one line, before any long work."""
        if guidance is None and self.takes_guidance(model):
            raise UserError(f"this {type(model).__name__} is guidance-distilled (guidance_embeds): teacher and "
                            "student read a guidance value; pass --guidance-scale (FluxPipeline's default is 3.5)",
                            exit_code=2)

    def null_conditions(self, model: nn.Module, *, text: Conditions | None = None) -> Conditions | None:
        """What classifier-free guidance drops a condition to (one row of each name that
        drops), or None when the model has no null condition."""
        return None

    def dropout_option(self, model: nn.Module) -> str | None:
        """The DistillConfig option that sets how often training drops the condition
        (class_dropout, caption_dropout), or None when nothing drops."""
        return None

    # ---- forward ---------------------------------------------------------------------------
    @abstractmethod
    def forward(self, model: nn.Module, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(epsilon-channel prediction, learned-variance channels or None), unpatchified."""

    def predict(self, model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
        """The prediction KD compares (noise / v / x0), epsilon channels only."""
        return self.forward(model, inputs)[0]

    # ---- export ----------------------------------------------------------------------------
    @abstractmethod
    def card_usage(self, where: str, load_args: str, imports: list[str], info: dict[str, Any]) -> list[str]:
        """Model-card lines showing how stock diffusers loads and samples the exported folder
        (`load_args`: the from_pretrained arguments; `info`: what the export records)."""

    def card_facts(self, model: nn.Module, text) -> dict[str, Any]:
        """What `card_usage` needs beyond the export's common record (none for most families)."""
        return {}

    # ---- pruning ---------------------------------------------------------------------------
    @abstractmethod
    def prune(self, model: nn.Module, request: PruneRequest) -> PruneOutcome:
        """Prune as requested; the result must be expressible in the stock config unless
        `request.global_pruning` (then `history` rebuilds it)."""

    def check_pruned(self, model: nn.Module) -> None:
        """Raise RuntimeError if the pruned model's attributes do not serve a forward pass."""
        with torch.no_grad():
            model(**self.example_inputs(model, 2))

    @abstractmethod
    def stage_widths(self, model: nn.Module) -> dict[str, Any]:
        """Width per stage, for before/after reports."""

    # ---- distillation ----------------------------------------------------------------------
    def shard_blocks(self, model: nn.Module) -> list[str]:
        """The modules FSDP shards as one unit each (all-gathered just before their forward,
        freed after): the model's repeated blocks. Empty: the whole model is one unit."""
        return []

    @abstractmethod
    def feature_layer_pairs(self, student: nn.Module, teacher: nn.Module, pruning: dict[str, Any] | None,
                            hooks: str = "stages") -> list[tuple[str, str]]:
        """Default (student module, teacher module) pairs whose outputs feature KD matches:
        `stages` (coarse, the default) or `blocks` (every block, the authors' FitNet rule)."""
