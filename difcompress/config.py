"""Every setting of every command: names, defaults, choices, bounds and help, in one place.

The CLI (cli.py) generates its options from these models, recipes (`difcompress run`)
validate their stages against them, and the Python API takes them:

    from difcompress import DistillConfig, distill
    distill(DistillConfig(student="runs/p", output="runs/s", loss="place", data="imgs/"))

A field's description is its `--help` text. Fields marked ``argument`` are positional on
the command line; ``flags`` names an option's spelling when it is not ``--field-name``.
Floats must be finite everywhere (``nan``/``inf`` are refused), and bounds are checked
before any work starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from difcompress.core.errors import UserError
from difcompress.objectives.core import COARSE_NORMS, FIT_EPS, PLACE_GROUP_SIZE
from difcompress.objectives.feature import MASK_SOURCES, REDUCTIONS
from difcompress.objectives.registry import LOSS_NAMES, OBJECTIVES

# ---- choices ---------------------------------------------------------------------------------
Importance = Literal["random", "magnitude", "taylor", "diff-pruning"]
DepthCriterion = Literal["uniform", "output-change", "block-io-mse"]
Loss = Literal[LOSS_NAMES]  # type: ignore[valid-type]  (the objectives registry is the source)
CoarseNorm = Literal[COARSE_NORMS]  # type: ignore[valid-type]
FeatureSchedule = Literal["constant", "linear", "epoch-linear"]
FeatureHooks = Literal["stages", "blocks", "self-attention", "depth"]
Reduction = Literal[REDUCTIONS]  # type: ignore[valid-type]
MaskSource = Literal[MASK_SOURCES]  # type: ignore[valid-type]
VarianceLoss = Literal["mse", "vlb-kl"]
MixedPrecision = Literal["no", "fp16", "bf16"]
# The block-removal presets every family offers (each family's `presets` lists its own).
Preset = Literal["bk-base", "bk-small", "bk-tiny", "koala-1b", "koala-700m", "ssd-1b", "vega"]
ExportFormatName = Literal["diffusers", "comfyui-fp8", "gguf-q8_0", "gguf-q4_0"]  # commands/export.py's FORMATS writes each
# diffusers' QuantoConfig(weights_dtype=...) names (artifacts/quantize.py; docs/quantization.md)
QuantizeScheme = Literal["int8", "int4"]
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
Optimizer = Literal["adamw", "adam", "adamw-8bit"]
Tracker = Literal["none", "tensorboard", "wandb"]
Sampler = Literal["ddim", "ddpm", "euler"]
Extractor = Literal["inception", "digits"]
DType = Literal["fp32", "fp16", "bf16"]
Shard = Literal["fsdp", "zero2", "none"]  # training/sharding.py sets each engine up
Family = Literal["unet2d", "dit", "t2i", "flux"]
GRADIENT_CRITERIA = ("taylor", "diff-pruning")

DEVICE_HELP = "auto, cpu, cuda or cuda:N (auto: the GPU when there is one)."


def _device_name(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError("use auto, cpu, cuda or cuda:N")
    return value


Device = Annotated[str, AfterValidator(_device_name)]


def _comma_ints(value: Any) -> Any:
    """"1,3,5" (the CLI's spelling) -> [1, 3, 5]; lists pass through."""
    if isinstance(value, str):
        try:
            return [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError("takes comma-separated integers, e.g. 1,3,5") from None  # the error adds the value
    return value


IntList = Annotated[list[int], BeforeValidator(_comma_ints)]
# A model, data or file reference: a string (hub ids, built-in names) or any path object.
Ref = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


def _cli(*, argument: bool = False, flags: tuple[str, ...] | None = None, metavar: str | None = None) -> dict:
    out: dict[str, Any] = {}
    if argument:
        out["argument"] = True
    if flags:
        out["flags"] = list(flags)
    if metavar:
        out["metavar"] = metavar
    return out


def OutputField(description: str, **kwargs):  # noqa: N802 - a Field factory, spelled like one
    return Field(description=description, json_schema_extra=_cli(flags=("-o", "--output")), **kwargs)


class StageConfig(BaseModel):
    """Shared behaviour: unknown settings, wrong types and non-finite floats are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)
    command: ClassVar[str]

    def __init__(self, **values: Any):
        """Build from keyword settings; a bad value is one UserError (exit code 2), as on the CLI."""
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SettingsError(err) from None

    @classmethod
    def build(cls, values: dict[str, Any], where: str = "") -> StageConfig:
        """Validate `values` into a config; a bad value is one UserError (exit code 2).
        `where` prefixes the setting's name (a recipe's section), else it is spelled --option."""
        try:
            return cls(**values)
        except SettingsError as err:
            raise SettingsError(err.validation_error, where) from None


class SettingsError(UserError):
    """A bad setting, told in one line: which setting, what is wrong, what was given."""

    def __init__(self, err: ValidationError, where: str = ""):
        super().__init__(str(settings_error(err, where)), exit_code=2)
        self.validation_error = err


def settings_error(err: ValidationError, where: str = "") -> UserError:
    """One line for the first problem: which setting, what is wrong, what was given."""
    first = err.errors()[0]
    name = ".".join(str(p) for p in first["loc"]) or "settings"
    label = f"{where}.{name}" if where else f"--{name.replace('_', '-')}"
    given = f" (got {first['input']!r})" if first["type"] != "missing" and not isinstance(first["input"], dict) else ""
    more = f"; {err.error_count() - 1} more problem(s)" if err.error_count() > 1 else ""
    return UserError(f"{label}: {first['msg']}{given}{more}", exit_code=2)


class PruneConfig(StageConfig):
    """`difcompress prune`: remove channels (U-Net), heads or blocks (DiT)."""

    command: ClassVar[str] = "prune"
    model: Ref = Field(description="Hub id, diffusers pipeline/model folder, difcompress folder, or 'digits' / "
                                   "'digits-dit' (the embedded teachers).", json_schema_extra=_cli(argument=True))
    output: Path = OutputField("Output folder (new, or an earlier difcompress folder, which is replaced).")
    ratio: float = Field(0.3, ge=0, lt=1, description="Fraction of channels (U-Net) or attention heads (DiT) "
                         "removed from every layer; 0 with --depth/--blocks for depth only.")
    importance: Importance = Field("magnitude", description="How channels are ranked; taylor and diff-pruning "
                                   "need data (--data) or use the teacher's own samples.")
    data: Optional[Ref] = Field(None, description="Images for gradient criteria: folder, saved dataset, parquet, "
                                "hf:NAME, 'digits', or 'teacher' (its own samples).")
    split: Optional[str] = Field(None, description="Dataset split of --data (Hub, parquet or imagefolder data; "
                                 "default: train when there is one).")
    image_column: Optional[str] = Field(None, description="Image column of --data (default: the first image "
                                        "column, else image or img).")
    preset: Optional[Preset] = Field(
        None, description="Text-to-image U-Nets: block removal, every weight copied from the teacher. SD: BK-SDM's "
        "bk-base (one layer per block), bk-small (and no mid block), bk-tiny (and no innermost stage); SDXL: the "
        "published koala-1b, koala-700m, ssd-1b and vega layouts.")
    global_pruning: bool = Field(False, description="Rank channels across layers (widths recorded in JSON, "
                                 "not in the stock config).", json_schema_extra=_cli(flags=("--global",)))
    depth: Optional[int] = Field(None, ge=1, description="Transformers: blocks to keep of the first (or only) "
                                 "block list (DiT's blocks, Flux's double-stream blocks).")
    blocks: Optional[IntList] = Field(None, description="Transformers: blocks of the first list to keep, as "
                                      "indices (e.g. 1,3,5).", json_schema_extra=_cli(metavar="I,J,..."))
    single_depth: Optional[int] = Field(None, ge=1, description="Flux: single-stream blocks to keep.")
    single_blocks: Optional[IntList] = Field(None, description="Flux: single-stream blocks to keep, as indices.",
                                             json_schema_extra=_cli(metavar="I,J,..."))
    depth_criterion: DepthCriterion = Field("uniform", description="How --depth / --single-depth choose: uniform "
                                            "(TinyFusion's i -> 2i+1 when halving), output-change (keep the blocks "
                                            "whose removal changes the output most, on a --data batch) or "
                                            "block-io-mse (keep the blocks that change their input most: the MSE "
                                            "between a block's input and output, Freepik's Flux.1-lite rule).")
    seed: int = Field(0, ge=0, description="Seeds random importance, data order and noise.")
    batch_size: int = Field(16, ge=1, description="Images for gradient criteria and output-change scoring.")
    diff_threshold: float = Field(0.05, ge=0, le=1, description="diff-pruning: stop once the loss falls below this "
                                  "fraction of its maximum.")
    importance_timesteps: Optional[int] = Field(None, ge=1, description="Cap on timesteps visited by gradient "
                                                "criteria.")
    timesteps_per_pass: Optional[int] = Field(None, ge=1, description="Gradient criteria: timesteps pushed through "
                                              "one batched forward/backward pass (the early stop stays exact; "
                                              "default 16 on a GPU, 1 on the CPU, where batching does not pay).")
    round_to: int = Field(1, ge=1, description="U-Net: make every pruned width a multiple of this (8 suits tensor "
                          "cores); still a stock config.")
    device: Device = Field("auto", description=DEVICE_HELP, json_schema_extra=_cli(metavar="auto|cpu|cuda|cuda:N"))


class DistillConfig(StageConfig):
    """`difcompress distill`: train a pruned student from its teacher."""

    command: ClassVar[str] = "distill"
    # Settings that define a run: a checkpoint only resumes a run with the same ones.
    identity: ClassVar[tuple[str, ...]] = (
        "student", "teacher", "loss", "data", "batch_size", "lr", "w_task", "w_kd", "w_feat", "group_size",
        "coarse_norm", "ema_decay", "grad_clip", "seed", "antithetic", "feature_layers", "feature_mask_std",
        "w_feat_schedule", "class_dropout", "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps",
        "optimizer", "weight_decay", "fit_eps", "feature_hooks", "feature_reduction", "feature_adapter_bias",
        "feature_adapter_init", "feature_adapter_always", "feature_mask_by", "loss_reduction", "variance_loss",
        "caption_dropout", "caption_column", "prompts", "resolution", "center_crop", "random_flip",
        "guidance_scale")
    # Settings added later, left out of the identity at these values so older checkpoints still resume.
    neutral: ClassVar[dict[str, Any]] = {
        "feature_mask_std": 0.0, "w_feat_schedule": "constant", "class_dropout": 0.0,
        "gradient_accumulation_steps": 1, "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "adamw",
        "weight_decay": 0.0, "fit_eps": FIT_EPS, "feature_hooks": "stages", "feature_reduction": "mean",
        "feature_adapter_bias": True, "feature_adapter_init": None, "feature_adapter_always": False,
        "feature_mask_by": "teacher", "loss_reduction": "mean", "variance_loss": "mse", "caption_dropout": 0.0,
        "caption_column": None, "prompts": None, "resolution": None, "center_crop": True, "random_flip": False,
        "guidance_scale": None}

    student: Ref = Field(description="Pruned student (difcompress folder or any diffusers model).")
    output: Path = OutputField("Run folder (checkpoints, logs, final student).")
    data: Ref = Field("teacher", description="Image folder, save_to_disk or imagefolder dataset, parquet file(s), "
                      "hf:NAME[:CONFIG] (Hub, cached offline), 'digits', or 'teacher' (data-free: the teacher's own "
                      "samples).")
    split: Optional[str] = Field(None, description="Dataset split of --data (Hub, parquet or imagefolder data; "
                                 "default: train when there is one).")
    image_column: Optional[str] = Field(None, description="Image column of --data (default: the first image "
                                        "column, else image or img).")
    teacher: Optional[Ref] = Field(None, description="Defaults to the model the student was pruned from.")
    loss: Loss = Field("place", description="Distillation objective (task: no teacher; feature: feature KD only; "
                       "NAME+feat: output KD plus feature KD).")
    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Images per optimizer step, over all processes and accumulation "
                            "steps (a run's result does not depend on how many GPUs share it).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Split each batch into this many micro-batches "
                                             "per process, accumulating gradients (less memory, same step).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule (diffusers' get_scheduler).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps of the schedule.")
    optimizer: Optimizer = Field("adamw", description="adamw, adam, or adamw-8bit (needs bitsandbytes: "
                                 "pip install 'difcompress[8bit]').")
    weight_decay: float = Field(0.0, ge=0, description="Optimizer weight decay.")
    w_task: float = Field(1.0, ge=0, description="Weight of the denoising (task) loss.")
    w_kd: float = Field(1.0, ge=0, description="Weight of the output-KD objective.")
    w_feat: Optional[float] = Field(None, ge=0, description="Feature KD weight (default 1 for --loss feature and "
                                    "NAME+feat, else 0).")
    group_size: int = Field(PLACE_GROUP_SIZE, ge=1, description="PLACE group size G (positions per affine fit).")
    coarse_norm: CoarseNorm = Field("l2", description="Norm of the coarse term: l2 (a-1)^2 + b^2, or l1.")
    fit_eps: float = Field(FIT_EPS, gt=0, description="Epsilon in the LIFT/PLACE slope's denominator.")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA of the student's weights (0 disables); the final "
                             "student is the EMA.")
    ema_offload: bool = Field(False, description="Keep the EMA weights in CPU memory (saves GPU memory).")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 disables).")
    seed: int = Field(0, ge=0, description="Seeds data order, noise, timesteps and label dropout.")
    checkpoint_every: int = Field(500, ge=0, description="Steps between checkpoints (0 disables).")
    checkpoints_total_limit: Optional[int] = Field(2, ge=1, description="Keep at most this many checkpoints "
                                                   "(the newest).")
    resume: bool = Field(False, description="Continue the run in OUTPUT from its last checkpoint (also to extend "
                         "a finished run with more --steps).")
    resume_from: Optional[Ref] = Field(None, description="Resume from this checkpoint folder (or 'latest') "
                                       "instead; implies --resume.")
    antithetic: bool = Field(False, description="Antithetic timestep pairs (t, T-1-t).")
    feature_layers: Optional[list[str]] = Field(None, description="Module for feature KD, NAME or STUDENT=TEACHER "
                                                "(repeatable; default: stage outputs, or DiT blocks mapped to the "
                                                "teacher blocks they came from).",
                                                json_schema_extra=_cli(flags=("--feature-layer",)))
    feature_hooks: FeatureHooks = Field("stages", description="Default feature-KD modules: stages (the output of "
                                        "each down/mid/up block), blocks (every resnet, attention and resampling "
                                        "conv: the LIFT/PLACE authors' DDPM FitNet rule) or self-attention (every "
                                        "transformer block's self-attention: KOALA's, SDXL only); Flux: stages / blocks pair every "
                                        "student block with the teacher block it was copied from, depth with "
                                        "teacher block round(i * L / K) (Flux-Mini's x -> 4x).")
    feature_reduction: Reduction = Field("mean", description="Feature KD over the hooked pairs: mean, or sum "
                                         "(BK-SDM and the LIFT/PLACE authors).")
    feature_adapter_bias: bool = Field(True, description="Feature adapters (1x1 conv / linear) with a bias.")
    feature_adapter_init: Optional[float] = Field(None, gt=0, description="Initialise adapter weights uniform in "
                                                  "+-this (the authors: 0.005; default: PyTorch's).")
    feature_adapter_always: bool = Field(False, description="An adapter on every pair, even where widths agree "
                                         "(the authors' DDPM setting).")
    feature_mask_std: float = Field(0.0, ge=0, description="Zero activations beyond this many std from the mean in "
                                    "feature KD (TinyFusion: 2; 0 disables).")
    feature_mask_by: MaskSource = Field("teacher", description="Masked feature KD: both features by the teacher's "
                                        "statistics, or each by its own (the authors' TinyFusion setting).")
    w_feat_schedule: FeatureSchedule = Field("constant", description="constant; linear (decays the feature weight "
                                             "to 0 by the last step); epoch-linear (the same, one value per epoch).")
    loss_reduction: Reduction = Field("mean", description="mean: every term a mean over elements; sum: the "
                                      "authors' sum form (task and output KD summed over each sample's elements, "
                                      "feature errors summed too), so weights and --grad-clip act in their units.")
    variance_loss: VarianceLoss = Field("mse", description="Learned-variance models: an MSE to the teacher's "
                                        "variance channels, or vlb-kl (the VLB, weighted like the task, plus a KL "
                                        "to the teacher's p(x_t-1|x_t), weighted like KD: the authors' DiT setting).")
    class_dropout: float = Field(0.1, ge=0, lt=1, description="Class-conditional models: label dropout for "
                                 "classifier-free guidance.")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="Text-to-image models: captions dropped to the "
                                   "empty prompt, for classifier-free guidance.")
    guidance_scale: Optional[float] = Field(None, ge=0, description="Guidance-distilled models (FLUX.1-dev): the "
                                            "guidance value teacher and student both read as an input; required "
                                            "for them (FluxPipeline's default is 3.5).")
    caption_column: Optional[str] = Field(None, description="Text-to-image data: the caption column (default: "
                                          "text, caption or prompt).")
    resolution: Optional[int] = Field(None, ge=8, description="Short side training images are resized to "
                                      "(default: the model's own size; U-Nets only). Images whose short side is "
                                      "under a quarter of it are refused.")
    center_crop: bool = Field(True, description="Crop training images at the centre; --no-center-crop draws a "
                              "crop position once per image from --seed (kept across epochs and in the latent "
                              "cache).")
    random_flip: bool = Field(False, description="Mirror training images left-right with probability 1/2 (each "
                              "image is kept both ways; latent models encode both once).")
    prompts: Optional[Ref] = Field(None, description="Text-to-image, --data teacher: prompts the teacher draws "
                                   "its samples from (.txt lines, .csv/.jsonl caption column, COCO captions .json).")
    teacher_samples: int = Field(512, ge=1, description="Images the teacher generates for --data teacher.")
    teacher_sampler_steps: int = Field(50, ge=1, description="DDIM steps the teacher samples them with.")
    mixed_precision: Optional[MixedPrecision] = Field(None, description="no, fp16 or bf16 (default: accelerate's "
                                                      "configuration, e.g. accelerate launch --mixed_precision).")
    teacher_dtype: Optional[DType] = Field(None, description="The frozen teacher's weights dtype (bf16/fp16 halve "
                                           "its memory; default: fp32).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass "
                                         "(less memory, slower).")
    compile: bool = Field(False, description="torch.compile the student and teacher.")
    shard: Optional[Shard] = Field(None, description="Shard the training state over the processes: fsdp (FSDP2: "
                                   "student weights, gradients, optimizer state and EMA split per block), zero2 "
                                   "(DeepSpeed ZeRO-2: gradients and optimizer state; pip install "
                                   "'difcompress\\[deepspeed]') or none (DDP; default: what accelerate launch "
                                   "--use_fsdp / --use_deepspeed or its config asks for, else none). Under torchrun "
                                   "difcompress sets the engine up itself (CPU and GPU); docs/many-gpus.md.")
    shard_teacher: bool = Field(False, description="--shard fsdp: shard the frozen teacher per block too "
                                "(default: replicated on each process in --teacher-dtype, no gathers per forward).")
    channels_last: bool = Field(False, description="channels_last memory format for conv nets on GPU.")
    allow_tf32: bool = Field(False, description="TF32 matmuls on Ampere and newer GPUs.")
    dataloader_num_workers: int = Field(0, ge=0, description="Processes decoding images (0: the main process). "
                                        "Resume stays exact.")
    report_to: Tracker = Field("none", description="Also log to TensorBoard or Weights & Biases (accelerate "
                               "trackers; pip install tensorboard / wandb).")
    log_every: int = Field(10, ge=1, description="Steps between log lines, each the mean over its steps (values stay "
                           "on the GPU in between; the NaN guard looks at every line).")
    latent_cache: Optional[Path] = Field(None, description="Latent models: where encoded datasets are cached "
                                         "(default $DIFCOMPRESS_CACHE or ~/.cache/difcompress).")
    device: Device = Field("auto", description=DEVICE_HELP, json_schema_extra=_cli(metavar="auto|cpu|cuda|cuda:N"))

    def resolved_w_feat(self) -> float:
        """The feature weight in effect: given, or 1 for --loss feature and NAME+feat, else 0."""
        if self.w_feat is not None:
            return self.w_feat
        return 1.0 if OBJECTIVES[self.loss].with_features else 0.0


class EvalConfig(StageConfig):
    """`difcompress eval`: compare models side by side."""

    command: ClassVar[str] = "eval"
    models: list[Ref] = Field(description="Models to compare (folders, hub ids, or 'digits').",
                              json_schema_extra=_cli(argument=True))
    fid: bool = Field(False, description="Sample and compute FID and KID.")
    num_samples: int = Field(1000, ge=2, description="Samples per model for FID/KID.")
    sampler: Sampler = Field("ddim", description="Sampler: ddim or ddpm (ancestral) for DDPM-trained models; a "
                             "flow-matching model (Flux) samples with its Euler ODE sampler, named ddim or euler.")
    sampler_steps: int = Field(100, ge=1, description="Denoising steps per sample.")
    ref: Optional[Ref] = Field(None, description="Reference images folder, stats .npz, or 'digits' (default for "
                               "the embedded teacher).")
    inception: Optional[Ref] = Field(None, description="clean-fid's Inception file (inception-2015-12-05.pt). It is "
                                     "TorchScript, which holds pickled data: use clean-fid's own download.")
    feature_extractor: Optional[Extractor] = Field(None, description="Features for FID (default: digits for the "
                                                   "embedded teacher, else inception).")
    seed: int = Field(0, ge=0, description="Sample i starts from noise seeded seed + i.")
    guidance_scale: Optional[float] = Field(None, ge=1, description="Conditional models: classifier-free guidance "
                                            "scale (default 1.5 for class labels, 7.5 for text; 1 disables).")
    prompts: Optional[Ref] = Field(None, description="Text-to-image models: prompts to sample (.txt one per line, "
                                   ".csv/.jsonl caption column, or a COCO captions .json), cycled over --num-samples.")
    negative_prompt: str = Field("", description="Text-to-image models: what guidance steers away from.")
    clip_model: Optional[Ref] = Field(None, description="Text-to-image models: a transformers CLIPModel folder; "
                                      "reports the CLIP score (mean image-prompt cosine similarity).")
    class_labels: Optional[IntList] = Field(None, description="Class-conditional models: labels to sample, e.g. "
                                            "3,7 (default: uniform over classes).",
                                            json_schema_extra=_cli(flags=("--class-label",), metavar="I,J,..."))
    batch_size: int = Field(64, ge=1, description="Samples per batch.")
    latency_batch_size: int = Field(16, ge=1, description="Batch the latency and throughput are measured at.")
    grid_size: int = Field(8, ge=1, description="Samples per model in the grid.")
    output: Optional[Path] = OutputField("Where eval.json and samples.png go (default: FIRST_MODEL/eval for a "
                                         "difcompress folder, else ./difcompress-eval).", default=None)
    device: Device = Field("auto", description=DEVICE_HELP, json_schema_extra=_cli(metavar="auto|cpu|cuda|cuda:N"))


class ExportConfig(StageConfig):
    """`difcompress export`: a clean safetensors pipeline folder with a model card."""

    command: ClassVar[str] = "export"
    model: Ref = Field(description="A difcompress folder (or any diffusers model).",
                       json_schema_extra=_cli(argument=True))
    output: Path = OutputField("Pipeline folder to write.")
    dtype: DType = Field("fp32", description="Weights dtype of the exported folder (fp16/bf16: the plain weight "
                         "files in that dtype, plus the diffusers variant's names linked to them, so "
                         "from_pretrained loads it with or without variant='fp16').")
    format: ExportFormatName = Field("diffusers", description="What to write: diffusers (a pipeline folder stock "
                                     "diffusers loads, with a model card) or comfyui-fp8 (SD / SDXL U-Nets: one "
                                     "float8_e4m3fn safetensors file under the LDM key names ComfyUI and Forge "
                                     "read, with its config.json), gguf-q8_0 / gguf-q4_0 (Flux transformers: "
                                     "one GGUF file for ComfyUI-GGUF; the gguf package of the quantize extra).")
    quantize: Optional[QuantizeScheme] = Field(None, description="Store the denoiser's linear-layer weights in "
                                               "int8 or packed int4 (optimum-quanto through diffusers; needs "
                                               "--dtype fp16 or bf16 and the quantize extra). Stock "
                                               "from_pretrained(folder) reloads it; see docs/quantization.md.")
    quantize_text_encoders: bool = Field(False, description="With --quantize: the text encoders in the same "
                                         "scheme too, applied when the pipeline loads (transformers cannot save "
                                         "quanto weights; the card shows the PipelineQuantizationConfig call).")
    push_to_hub: Optional[str] = Field(None, description="Also upload the folder to this Hugging Face repo id "
                                       "(needs the network and a login).", json_schema_extra=_cli(metavar="REPO_ID"))
    private: bool = Field(False, description="With --push-to-hub: create the repo private.")


class StatsConfig(StageConfig):
    """`difcompress stats`: reference statistics for FID/KID, in clean-fid's format."""

    command: ClassVar[str] = "stats"
    source: Ref = Field(description="Real images: a folder (read as clean-fid reads it), a dataset (save_to_disk, "
                        "parquet, imagefolder, hf:NAME; resized to --size first) or 'digits'.",
                        json_schema_extra=_cli(argument=True))
    output: Path = OutputField("Statistics file to write (.npz: mu and sigma as clean-fid names them, plus the "
                               "features for KID).")
    feature_extractor: Extractor = Field("inception", description="Features for FID.")
    inception: Optional[Ref] = Field(None, description="clean-fid's Inception file (TorchScript, which holds "
                                     "pickled data: use clean-fid's own download).")
    size: Optional[int] = Field(None, ge=8, description="Datasets: the resolution images are resized to first "
                                "(the model's); folders keep their images' size, as clean-fid does.")
    split: Optional[str] = Field(None, description="Dataset split (default: train when there is one).")
    image_column: Optional[str] = Field(None, description="Dataset image column.")
    batch_size: int = Field(64, ge=1, description="Images per batch.")
    device: Device = Field("auto", description=DEVICE_HELP, json_schema_extra=_cli(metavar="auto|cpu|cuda|cuda:N"))


class DemoConfig(StageConfig):
    """`difcompress demo`: the whole chain offline on the embedded digits teacher."""

    command: ClassVar[str] = "demo"
    output: Optional[Path] = OutputField("Folder for every stage's output (default: runs/demo, runs/demo-t2i).",
                                         default=None)
    family: Literal["unet2d", "t2i", "flux"] = Field("unet2d", description="unet2d: the digits U-Net, pruned by "
                                                     "--ratio; t2i: the digits-t2i Stable-Diffusion-layout teacher, "
                                                     "BK-SDM's bk-small then --ratio; flux: the digits-flux "
                                                     "teacher, depth halved.")
    quick: bool = Field(False, description="A 1-2 minute smoke version.")
    ratio: Optional[float] = Field(None, gt=0, lt=1, description="Fraction of channels removed (default: 0.9 for "
                                   "unet2d, 0.5 after bk-small for t2i); flux: of heads (default: none).")
    seed: int = Field(0, ge=0, description="Seeds every stage.")
    device: Device = Field("auto", description=DEVICE_HELP, json_schema_extra=_cli(metavar="auto|cpu|cuda|cuda:N"))


class BuildDigitsConfig(StageConfig):
    """`difcompress build-digits`: train the embedded digits teachers and classifier."""

    command: ClassVar[str] = "build-digits"
    output: Optional[Path] = OutputField("Default: the package's assets folder.", default=None)
    family: Family = Field("unet2d", description="unet2d (the 'digits' teacher, plus the classifier), t2i (the "
                           "'digits-t2i' text-to-image teacher, with its autoencoder), dit "
                           "(the 'digits-dit' teacher) or flux (the 'digits-flux' teacher, on digits-t2i's autoencoder).")
    teacher_steps: int = Field(5000, ge=1, description="Training steps of the teacher.")
    batch_size: int = Field(64, ge=1, description="Training batch.")
    lr: float = Field(5e-4, gt=0, description="Learning rate.")
    seed: int = Field(0, ge=0, description="Seeds everything.")
    work_dir: Path = Field(Path("runs/build-digits"), description="Run folder for the teacher's training "
                           "(resumable).")
    device: Device = Field("auto", description=DEVICE_HELP, json_schema_extra=_cli(metavar="auto|cpu|cuda|cuda:N"))


STAGE_CONFIGS: dict[str, type[StageConfig]] = {"prune": PruneConfig, "distill": DistillConfig, "eval": EvalConfig,
                                               "export": ExportConfig}
# What a recipe fills in from the chain (earlier stages, its output_dir), per stage.
CHAIN_FIELDS = {"prune": ("output",), "distill": ("student", "output"), "eval": ("models", "output"),
                "export": ("model", "output")}


class Recipe(BaseModel):
    """A recipe YAML: a run folder and the stages to run in order, each with the settings of
    its command (chain fields such as the student come from the earlier stages)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    output_dir: Path
    seed: int = Field(0, ge=0)
    device: Device = "auto"
    prune: Optional[dict[str, Any]] = None
    distill: Optional[dict[str, Any]] = None
    eval: Optional[dict[str, Any]] = None
    export: Optional[dict[str, Any]] = None
