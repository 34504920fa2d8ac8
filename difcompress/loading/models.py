"""Resolve a model reference (hub id, pipeline folder, model folder, difcompress folder)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file
from torch import nn

from difcompress.artifacts.checkpoint import (
    is_sharded_checkpoint,
    latest_checkpoint,
    load_final_weights,
    read_checkpoint_info,
)
from difcompress.artifacts.folders import STRUCTURE, read_manifest
from difcompress.artifacts.quantize import quiet_backend
from difcompress.builtin import builtin_model_path
from difcompress.core.environment import hub_offline
from difcompress.core.errors import UserError
from difcompress.core.files import read_json
from difcompress.data.latents import AUTOENCODER_CLASSES, Autoencoder
from difcompress.data.text import load_transformers_part
from difcompress.diffusion.sampling import sample_images
from difcompress.families.base import ModelFamily
from difcompress.families.registry import family_for
from difcompress.pruning.graph import replay_history

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DENOISER_COMPONENTS = ("unet", "transformer")
AUTOENCODER_COMPONENTS = ("vae", "vqvae")  # DiTPipeline, LDMPipeline


@dataclass
class LoadedModel:
    model: nn.Module
    scheduler: Any
    family: ModelFamily
    source: str  # what the user named
    path: Path  # the local folder it came from
    manifest: dict[str, Any] | None  # difcompress.json when the folder is ours
    structure: dict[str, Any] | None = None  # the --global pruning record, when there is one
    autoencoder: Autoencoder | None = None  # latent pipelines: the frozen VAE / VQ-VAE
    pipeline_settings: dict[str, Any] | None = None  # model_index.json entries that are not components (id2label)
    text: Any = None  # text-to-image pipelines: the frozen tokenizers and text encoders (data/text.py)

    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this model generates."""
        c, h, w = self.family.sample_shape(self.model)
        if self.autoencoder is None:
            return c, h, w
        f = self.autoencoder.downscale
        return self.autoencoder.image_channels, h * f, w * f

    def sample(self, num_samples: int, **kwargs) -> torch.Tensor:
        """Samples of this model in its space (latents stay unclamped); keyword arguments as
        diffusion/sampling.py's `sample_images` takes them."""
        return sample_images(self.family, self.model, self.scheduler, num_samples, pixels=self.autoencoder is None,
                             **kwargs)

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples in the denoiser's space -> images in [-1, 1] (decoded for latent models)."""
        return samples if self.autoencoder is None else self.autoencoder.decode(samples)


def load_model(source: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the denoiser (with its scheduler and, for latent pipelines, its autoencoder) that
    `source` names: a built-in name, a folder, or a Hugging Face hub id (cache only when offline)."""
    source = str(source)
    loaded = _load_folder(load_model_folder(source), source)
    loaded.model.to(device).eval()
    if loaded.autoencoder is not None:
        loaded.autoencoder.model.to(device).eval().requires_grad_(False)
    if loaded.text is not None:
        loaded.text = loaded.text.with_models(lambda encoder: encoder.to(device))
    return loaded


def load_model_folder(source: str | Path) -> Path:
    """The local folder `source` names (a built-in name, a folder, or a hub id, downloaded
    into or read from the Hugging Face cache), without loading anything from it."""
    source = str(source)
    path = builtin_model_path(source) or Path(source).expanduser()
    if path.name == "latest" and path.parent.name == "checkpoints" and not path.exists():
        newest = latest_checkpoint(path.parent.parent)  # RUN/checkpoints/latest: the newest complete one
        if newest is None:
            raise UserError(f"{path.parent.parent} has no complete checkpoint yet")
        return newest
    if not path.exists():
        return _from_hub(source)
    if not path.is_dir():
        raise UserError(f"{source} is a file; pass a diffusers model or pipeline folder")
    return path


def looks_local(reference: str) -> bool:
    """Whether a model reference can only be a path: ./, ../, /, ~, or not shaped owner/name."""
    return reference.startswith(("./", "../", "/", "~")) or not HUB_ID.match(reference)


def _from_hub(source: str) -> Path:
    if looks_local(source):
        raise UserError(f"model not found: {source} is neither a folder nor a Hugging Face hub id (owner/name)")
    offline = hub_offline()
    try:
        # Only configs and safetensors: the project never reads pickled weights.
        folder = snapshot_download(
            source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"], local_files_only=offline
        )
    except RepositoryNotFoundError:
        raise UserError(f"{source} was not found on the Hugging Face Hub (check the id, or log in for gated models)") from None
    except (LocalEntryNotFoundError, OSError, ConnectionError, ValueError) as err:
        reason = "offline mode (HF_HUB_OFFLINE=1)" if offline else f"the Hub cannot be reached ({type(err).__name__})"
        raise UserError(
            f"cannot load {source}: no such folder here, {reason} and it is not in the local cache; "
            f"run `hf download {source} --local-dir DIR` where there is network and pass DIR instead"
        ) from None
    return Path(folder)


def _load_folder(path: Path, source: str) -> LoadedModel:
    if is_checkpoint_folder(path):
        return _load_checkpoint(path, source)
    manifest = read_manifest(path)
    if manifest and manifest.get("status") == "running":
        newest = latest_checkpoint(path)
        look = f", or look at its newest checkpoint: {newest}" if newest else ""
        raise UserError(f"{path} is an unfinished {manifest.get('stage', 'difcompress')} run (its manifest says "
                        f"running); finish it with --resume, or use a complete folder{look}")
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        component = next((c for c in DENOISER_COMPONENTS if c in index), None)
        if component is None:
            raise UserError(f"{path} is a pipeline without a unet or transformer; nothing to compress")
        family = _family(path, index[component][1], index.get("_class_name"))
        model_dir = path / component
        scheduler_dir = path / "scheduler"
        autoencoder = _load_autoencoder(path, index)
        text = _load_text(path, index, family) if family.takes_text else None
        settings = {k: v for k, v in index.items() if not k.startswith("_") and not _is_component(v)}
    elif (path / "config.json").is_file():
        family = _family(path, read_json(path / "config.json").get("_class_name", "?"))
        model_dir = path
        scheduler_dir = path if (path / "scheduler_config.json").is_file() else path.parent / "scheduler"
        autoencoder, settings, text = None, None, None
    else:
        raise UserError(f"{path} is not a diffusers model or pipeline folder (no model_index.json or config.json)")
    model = _load_weights(family, model_dir)
    family.attach(model, autoencoder, text)
    if not family.matches(model):  # e.g. an SD U-Net in an SDXL pipeline folder
        raise UserError(f"{model_dir}: this {type(model).__name__} does not fit a {family.name} pipeline "
                        f"({', '.join(family.pipelines)}); check the folder")
    structure = read_json(model_dir / STRUCTURE) if (model_dir / STRUCTURE).is_file() else None
    return LoadedModel(model, load_scheduler(scheduler_dir), family, source, path, manifest, structure, autoencoder,
                       settings or None, text)


def _family(path: Path, denoiser_class: str, pipeline_class: str | None = None) -> ModelFamily:
    try:
        return family_for(denoiser_class, pipeline_class)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def is_checkpoint_folder(path: Path) -> bool:
    return (path / "state.json").is_file() and ((path / "student.safetensors").is_file() or is_sharded_checkpoint(path))


def _load_checkpoint(path: Path, source: str) -> LoadedModel:
    """A distill checkpoint (RUN/checkpoints/step-N), read-only and without the run's lock,
    so a long run can be looked at while it trains: the run's student architecture with the
    checkpoint's weights (its EMA where the run keeps one, as the final student is)."""
    info = read_checkpoint_info(path)
    settings = info.get("settings") or {}
    if not settings.get("student"):
        raise UserError(f"{path}: the checkpoint does not record its student; it cannot be rebuilt")
    base = _load_folder(load_model_folder(settings["student"]), settings["student"])
    kept = load_final_weights(path, base.model)
    manifest = {**(base.manifest or {}), "teacher": settings.get("teacher") or (base.manifest or {}).get("teacher"),
                "checkpoint": {"step": info.get("step"), "weights": kept, "run": str(path.parent.parent)}}
    return dataclasses.replace(base, source=source, path=path, manifest=manifest)


def _is_component(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


def _load_autoencoder(path: Path, index: dict[str, Any]) -> Autoencoder | None:
    """The pipeline's VAE / VQ-VAE, if it lists one (a pixel-space DiT lists vae as null)."""
    component = next((c for c in AUTOENCODER_COMPONENTS if c in index and index[c][1]), None)
    if component is None:
        return None
    class_name = index[component][1]
    if class_name not in AUTOENCODER_CLASSES:
        raise UserError(f"{path}: unsupported autoencoder {class_name} in {component}/; "
                        f"difcompress reads {', '.join(AUTOENCODER_CLASSES)}")
    folder = path / component
    weights, variant = weights_file(folder)
    if not (folder / "config.json").is_file() or weights is None:
        what = "has only pickled .bin weights" if list(folder.glob("*.bin")) else "is missing"
        raise UserError(f"{path} is a latent pipeline but its {component} ({folder}) {what}; "
                        f"a latent denoiser needs its {class_name} (safetensors) to encode data and decode samples")
    try:
        model = getattr(diffusers, class_name).from_pretrained(folder, use_safetensors=True, variant=variant)
    except Exception as err:  # diffusers raises many types for damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the {component} in {folder}: {first}") from None
    return Autoencoder(component, model)


def weights_file(folder: Path) -> tuple[Path | None, str | None]:
    """A component's safetensors weights: the plain file (which `export --dtype fp16` writes
    in fp16, its variant name a link to it), else its one diffusers variant
    (diffusion_pytorch_model.fp16.safetensors alone, as earlier exports and some Hub repos have)."""
    plain = folder / "diffusion_pytorch_model.safetensors"
    if plain.is_file():
        return plain, None
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors"))
    if variants:
        return variants[0], variants[0].name.split(".")[1]
    return None, None


def _load_text(path: Path, index: dict[str, Any], family: ModelFamily):
    """The pipeline's tokenizers and text encoders (safetensors only), frozen, as the
    family's text side."""
    parts = {}
    for component in family.text_parts:
        entry = index.get(component)
        cls = getattr(transformers, entry[1], None) if entry and entry[1] else None
        if cls is None or not (path / component).is_dir():
            raise UserError(f"{path} is a {index.get('_class_name')} without its {component}; its U-Net needs it "
                            "to encode captions and prompts")
        where = f"the {component} in {path}"
        options = {} if "tokenizer" in component else {"use_safetensors": True}
        part = load_transformers_part(cls, path / component, where, **options)
        parts[component] = part if "tokenizer" in component else part.eval().requires_grad_(False)
    return family.text_side(parts)


def _load_weights(family: ModelFamily, model_dir: Path) -> nn.Module:
    weights, variant = weights_file(model_dir)
    if weights is None:
        if list(model_dir.glob("*.bin")):
            raise UserError(f"{model_dir} has only pickled .bin weights; difcompress reads safetensors only "
                            "(convert with diffusers' save_pretrained(safe_serialization=True))")
        raise UserError(f"no weights in {model_dir} (diffusion_pytorch_model.safetensors missing)")
    try:
        if (model_dir / STRUCTURE).is_file():
            return _rebuild_from_record(family, model_dir, weights)
        with quiet_backend():  # a quantized export: diffusers' deprecation notice for its quanto backend
            return family.model_class.from_pretrained(model_dir, use_safetensors=True, variant=variant)
    except UserError:
        raise
    except Exception as err:  # diffusers raises many types for damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model in {model_dir}: {first}") from None


def _rebuild_from_record(family: ModelFamily, model_dir: Path, weights: Path) -> nn.Module:
    """Base architecture from the record's config, pruned by replaying the history."""
    record = read_json(model_dir / STRUCTURE)
    model = family.model_class.from_config(record["base_config"])
    replay_history(model, family, record["history"], record.get("groupnorm_groups"))
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()}, strict=True)
    return model


def load_scheduler(folder: Path):
    """The folder's noise scheduler; only diffusers scheduler classes are accepted."""
    config_path = folder / "scheduler_config.json"
    if not config_path.is_file():
        return diffusers.DDPMScheduler(num_train_timesteps=1000)
    config = read_json(config_path)
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"{config_path} names {name!r}, which is not a diffusers scheduler class; "
                        "fix its _class_name (e.g. DDPMScheduler)")
    try:
        return cls.from_config(config)
    except Exception as err:  # diffusers raises many types for bad configs
        raise UserError(f"cannot build the scheduler from {config_path}: {str(err).splitlines()[0]}") from None
