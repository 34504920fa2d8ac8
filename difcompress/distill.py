"""`difcompress distill`: train a pruned student from its teacher.

Loss = w_task * L_task + w_kd * L_kd(objective) + w_feat * L_feature
(see difcompress/objectives.py and docs/method.md). The trainer runs on accelerate: the
student and optimizer are prepared, the frozen teacher is moved but never wrapped, and
each process reads its own shard of one global, seeded batch stream.

The output folder is the run folder: metrics.jsonl, curves.png, checkpoints/, and, once
training has finished, the student as a diffusers folder with difcompress.json marked
complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from difcompress import objectives
from difcompress.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from difcompress.data import BatchStream, TensorImageDataset, check_class_data, open_image_data
from difcompress.errors import UserError
from difcompress.folders import MANIFEST, pruning_report, read_manifest, save_model_folder, write_json
from difcompress.loading import LoadedModel, load_model
from difcompress.runtime import seed_everything, versions

FEATURE_SCHEDULES = ("constant", "linear")
# Settings that define a run: a checkpoint only resumes a run with the same ones.
RUN_IDENTITY = ("student", "teacher", "loss", "data", "batch_size", "lr", "w_task", "w_kd", "w_feat",
                "group_size", "coarse_norm", "ema_decay", "grad_clip", "seed", "antithetic", "feature_layers",
                "feature_mask_std", "w_feat_schedule", "class_dropout")


def distill(
    student: str,
    output: Path,
    *,
    teacher: str | None = None,
    loss: str = "place",
    data: str = "teacher",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-4,
    w_task: float = 1.0,
    w_kd: float = 1.0,
    w_feat: float | None = None,
    group_size: int = 16,
    coarse_norm: str = "l2",
    ema_decay: float = 0.9999,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    checkpoint_every: int = 500,
    resume: bool = False,
    antithetic: bool = False,
    feature_layers: list[str] | None = None,
    feature_mask_std: float = 0.0,
    w_feat_schedule: str = "constant",
    class_dropout: float = 0.1,
    teacher_samples: int = 512,
    sampler_steps: int = 50,
    device: str = "auto",
    mixed_precision: str = "no",
    latent_cache: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    settings = dict(locals())
    for key in ("output", "resume", "show_progress", "device", "latent_cache"):
        settings.pop(key)
    _validate(settings)
    if w_feat is None:
        settings["w_feat"] = w_feat = 1.0 if loss == "feature" else 0.0
    output = Path(output)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)
    if accelerator.is_main_process:  # one process decides about the run folder
        _prepare_run_folder(output, resume)
    accelerator.wait_for_everyone()
    seed_everything(seed)
    student_loaded = load_model(student, accelerator.device)
    family = student_loaded.family
    teacher_ref = teacher or (student_loaded.manifest or {}).get("teacher")
    needs_teacher = loss not in ("task", "feature") or w_feat > 0 or data == "teacher"
    # A learned-variance student's variance channels learn from the teacher whenever it can be had.
    wants_teacher = family.learns_variance(student_loaded.model) and teacher_ref is not None
    teacher_loaded = None
    if needs_teacher and not teacher_ref:
        raise UserError(f"{student} does not record its teacher; pass --teacher MODEL")
    if needs_teacher or wants_teacher:
        try:
            teacher_loaded = load_model(teacher_ref, accelerator.device)
        except UserError as err:
            if needs_teacher:
                raise
            from difcompress.report import err_console

            err_console.print(f"[yellow]warning:[/] the variance channels stay untrained: {err}")
    if teacher_loaded is not None:
        if teacher_loaded.family is not family:
            raise UserError(
                f"teacher is a {teacher_loaded.family.name} model but the student is a {family.name} model; "
                "distill between models of the same family"
            )
        teacher_loaded.model.requires_grad_(False).eval()
        settings["teacher"] = teacher_ref
        if not family.learns_variance(teacher_loaded.model) and not needs_teacher:
            teacher_loaded = None  # a fixed-variance teacher has no variance to learn from
    # The student's variance channels train only against a teacher that has them.
    learn_variance = teacher_loaded is not None and family.learns_variance(teacher_loaded.model)
    model = student_loaded.model.train()
    family.disable_label_dropout(model)
    scheduler = student_loaded.scheduler
    num_classes = family.num_classes(model)
    null_class = family.null_class(model)
    if not num_classes:
        settings["class_dropout"] = class_dropout = 0.0
    elif class_dropout > 0 and null_class is None:
        raise UserError("--class-dropout needs a model with a null-class embedding; pass --class-dropout 0", 2)

    dataset, latent_report = _training_data(data, student_loaded, teacher_loaded, output, teacher_samples,
                                            sampler_steps, seed, accelerator, latent_cache, show_progress)
    stream = BatchStream(dataset, batch_size, seed=seed, num_shards=accelerator.num_processes,
                         shard_index=accelerator.process_index)

    feature_pairs = None
    extra_modules: dict[str, nn.Module] = {}
    if w_feat > 0:
        pairs = _parse_feature_layers(feature_layers) or family.feature_layer_pairs(
            model, teacher_loaded.model, pruning_report(student_loaded.manifest))
        settings["feature_layers"] = [s if s == t else f"{s}={t}" for s, t in pairs]
        feature_pairs = _FeatureTaps(model, teacher_loaded.model, pairs)
        adapters = feature_pairs.build_adapters(family, model, teacher_loaded.model, accelerator.device)
        extra_modules["adapters"] = adapters

    params = list(model.parameters()) + [p for m in extra_modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if ema_decay > 0 else None

    fingerprint = _fingerprint(settings)
    start_step = 0
    if resume:
        ckpt = latest_checkpoint(output)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {output}/checkpoints; start without --resume")
        info = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
        if info.get("fingerprint") != fingerprint:
            keys = (*RUN_IDENTITY, "steps") if w_feat_schedule == "linear" else RUN_IDENTITY
            diff = [k for k in keys if info.get("settings", {}).get(k) != settings.get(k)]
            raise UserError(
                f"checkpoint {ckpt} belongs to another run (differs in: {', '.join(diff) or 'settings'}); "
                "resume with the same settings or choose another -o"
            )
        info, ema_state = load_checkpoint(ckpt, student=model, extra_modules=extra_modules, optimizer=optimizer,
                                          generator=generator)
        if ema is not None and ema_state is not None:
            ema = {k: v.to(accelerator.device) for k, v in ema_state.items()}
        stream.load_state_dict(info["stream"])
        start_step = info["step"]

    model, optimizer = accelerator.prepare(model, optimizer)
    metrics_path = output / "metrics.jsonl"
    if start_step == 0 and accelerator.is_main_process:
        metrics_path.write_text("")
    elif accelerator.is_main_process:
        _truncate_metrics(metrics_path, start_step)

    num_train = scheduler.config.num_train_timesteps
    last = {}
    with ExitStack() as stack:
        progress = stack.enter_context(_progress(show_progress and accelerator.is_main_process))
        task_id = progress.add_task(f"distill ({loss})", total=steps, completed=start_step, stats="")
        tick = time.perf_counter()
        for step in range(start_step + 1, steps + 1):
            x0, labels = stream.next_labeled_batch()
            x0 = x0.to(accelerator.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            t = _timesteps(x0.shape[0], num_train, generator, antithetic).to(x0.device)
            if labels is not None:
                # Classifier-free guidance training: drop labels to the null class, seeded, and
                # the same for teacher and student.
                if class_dropout > 0:
                    dropped = torch.rand(labels.shape, generator=generator) < class_dropout
                    labels = torch.where(dropped, null_class, labels)
                labels = labels.to(x0.device)
            noisy = scheduler.add_noise(x0, noise, t)
            target = _target(scheduler, x0, noise, t)
            with accelerator.autocast():
                pred, variance = family.predict_split(model, noisy, t, labels)
                terms = {}
                total = torch.zeros((), device=x0.device)
                if w_task > 0:
                    terms["task"] = objectives.task_loss(pred.float(), target)
                    total = total + w_task * terms["task"].loss
                teacher_pred = teacher_variance = None
                kd = loss not in ("task", "feature") and w_kd > 0
                if not learn_variance:
                    variance = None
                if kd or variance is not None or feature_pairs is not None:  # one teacher call serves all three
                    with torch.no_grad():
                        teacher_pred, teacher_variance = family.predict_split(teacher_loaded.model, noisy, t, labels)
                if kd:
                    terms["kd"] = objectives.kd_loss(loss, pred.float(), teacher_pred.float(),
                                                     group_size=group_size, coarse_norm=coarse_norm)
                    total = total + w_kd * terms["kd"].loss
                if variance is not None:
                    # Learned variance: a plain MSE to the teacher's, beside whatever trains epsilon.
                    terms["variance"] = objectives.task_loss(variance.float(), teacher_variance.float())
                    total = total + _variance_weight(loss, w_kd) * terms["variance"].loss
                if feature_pairs is not None:
                    terms["feature"] = objectives.feature_loss(
                        feature_pairs.student_outputs(), feature_pairs.teacher_outputs(), extra_modules["adapters"],
                        mask_std=feature_mask_std,
                    )
                    total = total + _feature_weight(w_feat, w_feat_schedule, step, steps) * terms["feature"].loss
            if not torch.isfinite(total):
                ckpt = latest_checkpoint(output)
                raise UserError(
                    f"loss became {total.item()} at step {step}; stopped. Last good checkpoint: "
                    f"{ckpt or 'none'}. Try a lower --lr or a --grad-clip"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(total)
            if accelerator.num_processes > 1:
                # The adapters sit outside the DDP-wrapped student: average their gradients here.
                for p in (p for m in extra_modules.values() for p in m.parameters() if p.grad is not None):
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            grad_norm = None
            if grad_clip:
                grad_norm = float(accelerator.clip_grad_norm_(params, grad_clip))
            optimizer.step()
            if ema is not None:
                _ema_update(ema, accelerator.unwrap_model(model), ema_decay, step)

            now = time.perf_counter()
            last = _step_metrics(step, total, terms, grad_norm, lr, 1.0 / max(now - tick, 1e-9))
            tick = now
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                progress.update(task_id, advance=1, stats=_stats_text(last))
            if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(
                        output, step, student=accelerator.unwrap_model(model), ema=ema, extra_modules=extra_modules,
                        optimizer=optimizer, generator=generator,
                        info={"fingerprint": fingerprint, "settings": settings, "stream": stream.state_dict()},
                    )

    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model)
    if ema is not None:
        final.load_state_dict({k: v.to(final.dtype) if v.is_floating_point() else v for k, v in ema.items()})
    summary = {"steps": steps, "final": last, "settings": settings, "latent_cache": latent_report}
    if accelerator.is_main_process:
        _write_student(output, final.eval(), scheduler, family, student_loaded, settings, summary)
        if checkpoint_every:
            save_checkpoint(
                output, steps, student=accelerator.unwrap_model(model), ema=ema, extra_modules=extra_modules,
                optimizer=optimizer, generator=generator,
                info={"fingerprint": fingerprint, "settings": settings, "stream": stream.state_dict()},
            )
        from difcompress.plots import plot_metrics

        plot_metrics(metrics_path, output / "curves.png")
    summary["output"] = str(output)
    return summary


def _validate(settings: dict[str, Any]) -> None:
    if settings["loss"] not in objectives.LOSS_NAMES:
        raise UserError(f"unknown loss '{settings['loss']}'; choose one of {', '.join(objectives.LOSS_NAMES)}", 2)
    for key in ("steps", "batch_size"):
        if settings[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1", 2)
    if settings["lr"] <= 0:
        raise UserError("--lr must be positive", 2)
    if not 0 <= settings["ema_decay"] < 1:
        raise UserError("--ema-decay must lie in [0, 1)", 2)
    if settings["group_size"] < 1:
        raise UserError("--group-size must be at least 1", 2)
    if settings["coarse_norm"] not in ("l1", "l2"):
        raise UserError("--coarse-norm must be l1 or l2", 2)
    if not 0 <= settings["class_dropout"] < 1:
        raise UserError("--class-dropout must lie in [0, 1)", 2)
    if settings["w_feat_schedule"] not in FEATURE_SCHEDULES:
        raise UserError(f"--w-feat-schedule must be one of {', '.join(FEATURE_SCHEDULES)}", 2)
    if settings["feature_mask_std"] < 0:
        raise UserError("--feature-mask-std must be >= 0 (0 disables masking)", 2)


def _prepare_run_folder(output: Path, resume: bool) -> None:
    manifest = read_manifest(output) if output.is_dir() else None
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is a file; choose another -o")
    if output.is_dir() and any(output.iterdir()):
        if manifest is None or manifest.get("stage") != "distill":
            raise UserError(f"output folder {output} exists and is not a difcompress distill run; choose another -o")
        if not resume:
            raise UserError(f"{output} already holds a distill run; pass --resume to continue it or choose another -o")
    elif resume:
        raise UserError(f"--resume: {output} holds no run to resume")
    output.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        write_json(output / MANIFEST, {"stage": "distill", "status": "running"})


def _variance_weight(loss: str, w_kd: float) -> float:
    """The variance MSE weighs like KD when a KD objective runs, else 1."""
    return w_kd if loss not in ("task", "feature") and w_kd > 0 else 1.0


def _feature_weight(w_feat: float, schedule: str, step: int, steps: int) -> float:
    """constant, or linear: from w_feat at the first step down to 0 at the last (the DiT
    recipes' decaying feature weight)."""
    return w_feat if schedule == "constant" else w_feat * (1 - (step - 1) / max(1, steps - 1))


# Settings added later, left out of the identity at their neutral value so that older
# checkpoints still resume.
NEUTRAL_SETTINGS = {"feature_mask_std": 0.0, "w_feat_schedule": "constant", "class_dropout": 0.0}


def _fingerprint(settings: dict[str, Any]) -> str:
    identity = {k: settings.get(k) for k in RUN_IDENTITY
                if k not in NEUTRAL_SETTINGS or settings.get(k) != NEUTRAL_SETTINGS[k]}
    if settings.get("w_feat_schedule") == "linear":
        identity["steps"] = settings["steps"]  # the decay spans the run: more steps is another run
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _training_data(data, student_loaded, teacher_loaded, output, teacher_samples, sampler_steps, seed, accelerator,
                   latent_cache, show_progress):
    """The training set in the denoiser's space, with labels for class-conditional models."""
    from difcompress.builtin import builtin_data
    from difcompress.latents import latent_training_data
    from difcompress.sampling import balanced_labels

    family, student = student_loaded.family, student_loaded.model
    if data == "teacher":
        # Data-free: the teacher's own samples (latents for latent models, labels uniform over
        # classes), generated once and kept with the run.
        cache = output / "teacher_samples.safetensors"
        if cache.is_file():
            saved = load_file(cache)
            return TensorImageDataset(saved["images"], saved.get("labels")), None
        classes = family.num_classes(student)
        labels = balanced_labels(teacher_samples, classes, seed) if classes else None
        images = teacher_loaded.sample(teacher_samples, seed=seed + 1_000_003, steps=sampler_steps,
                                       class_labels=labels)
        if accelerator.is_main_process:
            tensors = {"images": images.contiguous()}
            if labels is not None:
                tensors["labels"] = labels
            save_file(tensors, cache)
        return TensorImageDataset(images, labels), None
    c, h, _ = student_loaded.image_shape()
    builtin = builtin_data(data, h, c)
    dataset = builtin if builtin is not None else open_image_data(data, h, c)
    classes = family.num_classes(student)
    if classes:  # before a possibly long encode
        check_class_data(dataset, classes, data)
    return latent_training_data(dataset, student_loaded.autoencoder, h, cache_root=latent_cache,
                                is_main=accelerator.is_local_main_process, show_progress=show_progress)


def _timesteps(batch: int, num_train: int, generator: torch.Generator, antithetic: bool) -> torch.Tensor:
    if not antithetic:
        return torch.randint(0, num_train, (batch,), generator=generator)
    # Antithetic pairs (t, T-1-t) lower the variance of the loss estimate across timesteps.
    half = torch.randint(0, num_train, ((batch + 1) // 2,), generator=generator)
    return torch.cat([half, num_train - 1 - half])[:batch]


def _target(scheduler, x0, noise, t):
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float, step: int) -> None:
    # Warm-up as in common diffusion trainers: early averages do not drag in the init.
    d = min(decay, (1 + step) / (10 + step))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v.float(), 1 - d)
        else:
            ema[k].copy_(v)


def _step_metrics(step, total, terms, grad_norm, lr, steps_per_s) -> dict[str, Any]:
    out = {"step": step, "loss": total.item(), "lr": lr, "steps_per_s": steps_per_s}
    for name, term in terms.items():
        out[name] = term.loss.item()
        for key in ("coarse", "fine", "w", "slope", "intercept"):
            if key in term.logs:
                out[key] = term.logs[key]
    if grad_norm is not None:
        out["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
    return out


def _stats_text(m: dict[str, Any]) -> str:
    parts = [f"loss {m['loss']:.4f}"]
    for key in ("task", "kd", "feature", "w", "slope", "intercept"):
        if key in m:
            parts.append(f"{key} {m[key]:.3f}")
    return " ".join(parts)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop log lines past the checkpoint so the log has no duplicates."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the crash
            continue
        if record.get("step", step + 1) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _progress(enabled: bool):
    from rich.progress import TextColumn

    from difcompress.report import progress_bar

    return progress_bar(enabled, TextColumn("{task.fields[stats]}"))


def _write_student(output, model, scheduler, family, student_loaded: LoadedModel, settings, summary) -> None:
    """Model files go in through a temporary folder; the manifest is marked complete last."""
    tmp = output / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {
        "stage": "distill",
        "status": "complete",
        "family": family.name,
        "student_source": settings["student"],
        "teacher": settings.get("teacher") or (student_loaded.manifest or {}).get("teacher"),
        "structure": (student_loaded.manifest or {}).get("structure", "config"),
        "pruning": pruning_report(student_loaded.manifest),
        "versions": versions(),
        "distill": summary,
    }
    save_model_folder(tmp, model.to("cpu"), scheduler, family, manifest, student_loaded.structure,
                      autoencoder=student_loaded.autoencoder, pipeline_settings=student_loaded.pipeline_settings)
    for item in tmp.iterdir():
        if item.name == MANIFEST:
            continue
        dest = output / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        item.replace(dest)
    (tmp / MANIFEST).replace(output / MANIFEST)
    tmp.rmdir()


def _parse_feature_layers(layers: list[str] | None) -> list[tuple[str, str]] | None:
    """'name' (same module in both) or 'student_name=teacher_name'."""
    if not layers:
        return None
    return [tuple(item.split("=", 1)) if "=" in item else (item, item) for item in layers]


class _FeatureTaps:
    """Forward hooks that keep the outputs of paired student and teacher blocks."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]):
        self.pairs = pairs
        self._student: dict[int, torch.Tensor] = {}
        self._teacher: dict[int, torch.Tensor] = {}
        for model, store, side in ((student, self._student, 0), (teacher, self._teacher, 1)):
            modules = dict(model.named_modules())
            for i, pair in enumerate(pairs):
                if pair[side] not in modules:
                    raise UserError(f"feature layer '{pair[side]}' not found in the {('student', 'teacher')[side]}")
                modules[pair[side]].register_forward_hook(self._hook(store, i))

    @staticmethod
    def _hook(store, index):
        def hook(_module, _inputs, output):
            store[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def student_outputs(self):
        return [self._student[i] for i in range(len(self.pairs))]

    def teacher_outputs(self):
        return [self._teacher[i].detach() for i in range(len(self.pairs))]

    @torch.no_grad()
    def build_adapters(self, family, student, teacher, device):
        """Adapters from student to teacher widths (1x1 conv on maps, linear on tokens),
        read off one dry forward pass."""
        inputs = family.example_inputs(student, 1)
        student(**inputs)
        teacher(**inputs)
        conv = self._student[0].dim() == 4
        width = (lambda x: x.shape[1]) if conv else (lambda x: x.shape[-1])
        return objectives.FeatureAdapters([width(t) for t in self.student_outputs()],
                                          [width(t) for t in self.teacher_outputs()],
                                          kind="conv" if conv else "linear").to(device)
