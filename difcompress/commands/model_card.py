"""The model card an exported student carries: Hub metadata written with huggingface_hub's
ModelCardData (base model and relation, license, pipeline tag, datasets, tags, a
model-index with the FID/KID it was evaluated with), and a body saying what was done and
how stock diffusers loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from difcompress.core.console import human
from difcompress.families.registry import FAMILIES
from difcompress.loading.models import HUB_ID

# The Hub's relations are adapter, merge, quantized and finetune; it has none for a pruned
# model, so a pruned and distilled student is described as a finetune of its teacher.
BASE_MODEL_RELATION = "finetune"


def teacher_license(teacher_folder: Path | None) -> str | None:
    """The license in the teacher's own model card, when it has one."""
    readme = teacher_folder / "README.md" if teacher_folder else None
    if readme is None or not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a card that does not parse tells us nothing about the license
        return None


def _eval_results(info: dict[str, Any]) -> list[EvalResult]:
    row = info.get("eval") or {}
    if "fid" not in row:
        return []
    protocol = info["eval_protocol"]
    reference = str(protocol["reference"])
    described = (f"{protocol['feature_extractor']} features, {protocol['num_samples']} samples, "
                 f"{protocol['sampler']} {protocol['steps']} steps")
    return [EvalResult(task_type=info["pipeline_tag"], dataset_type=reference, dataset_name=reference,
                       metric_type=metric, metric_name=f"{metric.upper()} ({described})", metric_value=row[metric])
            for metric in ("fid", "kid")]


def card_data(info: dict[str, Any], name: str) -> ModelCardData:
    teacher = info.get("teacher") or ""
    extra = {"base_model_relation": BASE_MODEL_RELATION} if HUB_ID.match(teacher) else {}
    data = ModelCardData(
        library_name="diffusers", base_model=teacher if HUB_ID.match(teacher) else None, license=info.get("license"),
        pipeline_tag=info["pipeline_tag"], datasets=info.get("datasets") or None, model_name=name,
        tags=["difcompress", "pruned", "distilled", info["family"], *([info["objective"]] if info["objective"] else []),
              *(["quantized", info["quantize"]["backend"]] if info.get("quantize") else [])],
        eval_results=_eval_results(info) or None, **extra)
    return data


def usage(info: dict[str, Any], where: str) -> list[str]:
    """How stock diffusers loads and samples this folder (or repo)."""
    dtype = {"fp16": "torch.float16", "bf16": "torch.bfloat16"}.get(info["dtype"])
    load_args = f"'{where}'" + (f", torch_dtype={dtype}" if dtype else "")
    lines = FAMILIES[info["family"]].card_usage(where, load_args, ["import torch"] if dtype else [], info)
    if dtype:  # export writes the plain weight files in the dtype and links the variant's names to them
        lines += ["", f"The weights are stored in {info['dtype']}; `variant='{info['dtype']}'` loads the same "
                  "files (the variant's names are links to them)."]
    quantize = info.get("quantize")
    if quantize:
        lines += ["", f"The denoiser's linear-layer weights are quantized to {quantize['scheme']} with "
                  f"{quantize['backend']} {quantize['backend_version']} (diffusers' quanto backend): install it "
                  f"(`pip install {quantize['backend']}`) before loading; diffusers reads the scheme from the "
                  "denoiser's config.json."]
    encoders = (quantize or {}).get("text_encoders")
    if encoders:
        lines += ["", f"The text encoders are stored in {info['dtype']} and meant to load quantized to "
                  f"{quantize['scheme']} (transformers' quanto integration, which cannot save quantized "
                  "weights, so the quantizing happens as the pipeline loads):", "", "```python",
                  "import torch, transformers", "from diffusers import DiffusionPipeline, PipelineQuantizationConfig",
                  f"weights = transformers.QuantoConfig(weights='{quantize['scheme']}')",
                  "encoders = PipelineQuantizationConfig(quant_mapping={name: weights for name in "
                  f"{tuple(encoders['components'])!r}}})",
                  f"pipe = DiffusionPipeline.from_pretrained({load_args}, quantization_config=encoders)", "```"]
    return lines


def _facts(info: dict[str, Any]) -> list[str]:
    pruning = info["pruning"] or {}
    lines = [
        "| | |", "|---|---|",
        f"| base model (teacher) | {info.get('teacher') or 'unknown'} |",
        f"| pruning | ratio {pruning.get('ratio', 'n/a')}, {pruning.get('importance', 'n/a')} importance, "
        f"{pruning.get('mode', 'n/a')} |",
        f"| distillation objective | {info['objective'] or 'none'} |",
        f"| distillation steps | {info['distill_steps'] or 0} |",
        f"| params | {human(info['params'])} |",
        f"| MACs per denoiser call | {human(info['macs'])} |",
        f"| weights dtype | {info['dtype']} |",
        *_quantize_facts(info),
        f"| peak inference memory, one image | {_memory_cell(_exported_row(info['inference_memory']))} "
        "(estimate; see Memory) |",
    ]
    row = info.get("eval") or {}
    if "fid" in row:
        p = info["eval_protocol"]
        lines.append(f"| FID / KID | {row['fid']:.2f} / {row['kid']:.4f} ({p['feature_extractor']}, "
                     f"{p['num_samples']} samples, {p['sampler']} {p['steps']} steps, reference {p['reference']}) |")
    return lines


def _exported_row(memory: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in memory["rows"] if r["scheme"] == memory["exported"])


def _memory_cell(row: dict[str, Any]) -> str:
    fits = f"fits {', '.join(str(g) for g in row['fits_gb'])} GB cards" if row["fits_gb"] else "over 24 GB"
    return f"{human(row['peak_bytes'], 'B')}, {fits}"


def memory_lines(info: dict[str, Any]) -> list[str]:
    """The card's Memory section: weight bytes and estimated peak inference memory per scheme."""
    memory = info["inference_memory"]
    height, width = memory["resolution"]
    lines = [f"Estimated for one {height}x{width} image with every component on the GPU (diffusers' default): "
             "all weights, plus the largest peak of one stage (text encoding, one denoiser step with "
             "classifier-free guidance where the model uses it, VAE decoding), measured on PyTorch's meta device "
             "with fused attention; 0.5 GiB is kept back for the CUDA context.", "",
             "| weights | weight bytes | peak inference memory | fits (GB) |", "|---|---|---|---|"]
    for row in memory["rows"]:
        name = f"{row['scheme']} ({memory['quantized']} linears)" if row["scheme"] else info["dtype"]
        this = " (this folder)" if row["scheme"] == memory["exported"] else ""
        lines.append(f"| {name}{this} | {human(row['weight_bytes'], 'B')} | {human(row['peak_bytes'], 'B')} | "
                     f"{', '.join(str(g) for g in row['fits_gb']) or 'none of 8-24'} |")
    return lines


def _quantize_facts(info: dict[str, Any]) -> list[str]:
    quantize = info.get("quantize")
    if not quantize:
        return []
    return [f"| quantization | {quantize['scheme']} weights of the {quantize['quantized']}, "
            f"{quantize['backend']} {quantize['backend_version']} |",
            f"| denoiser weight files | {human(quantize['denoiser_weight_bytes'], 'B')} |",
            *([f"| text encoders | {quantize['scheme']} when loaded as *Use* shows (transformers "
               f"{quantize['text_encoders']['transformers_version']}) |"] if quantize.get("text_encoders") else [])]


def model_card(info: dict[str, Any], where: str, name: str) -> ModelCard:
    """The card for an exported student; `where` is the folder or repo id users load from."""
    notes = []
    if not HUB_ID.match(info.get("teacher") or ""):
        notes.append("The teacher is not a Hub model, so the card names no `base_model`.")
    if not info.get("license"):
        notes.append("The teacher's card gives no license, so none is stated here: check the teacher's terms "
                     "before sharing this model.")
    body = [f"# {name}", "", f"A compressed `{info['model_class']}` made with difcompress from "
            f"**{info.get('teacher') or info['source']}**: pruned, then distilled from the teacher.", "",
            *_facts(info), "", "## Memory", "", *memory_lines(info), "", "## Use", ""]
    if info["stock_diffusers_loadable"]:
        body += usage(info, where)
    else:
        body += ["Pruned with `--global`: per-layer widths are not expressible in the stock config.",
                 f"Load with `difcompress.load_model('{where}')`, which replays the recorded pruning."]
    if notes:
        body += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    content = f"---\n{card_data(info, name).to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    return ModelCard(content)
