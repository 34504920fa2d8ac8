"""`difcompress distill`: train a pruned student from its teacher.

Orchestration only: resolve the device, take the run folder's lock, load student and
teacher, resolve the data, build the Trainer (training/trainer.py), resume it from a
checkpoint when asked, run it with logging and checkpoints, and publish the final student.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import is_tensorboard_available, is_wandb_available

from difcompress.artifacts.checkpoint import (
    is_sharded_checkpoint,
    latest_checkpoint,
    read_checkpoint_info,
)
from difcompress.artifacts.folders import check_output_folder, pruning_report
from difcompress.artifacts.quantize import refuse_quantized
from difcompress.config import DistillConfig
from difcompress.core.console import distill_progress, warn
from difcompress.core.environment import (
    DTYPES,
    deepspeed_on_the_cpu_quietly,
    launched,
    launched_processes,
    resolve_device,
    seed_everything,
    versions,
)
from difcompress.core.errors import Interrupted, UserError
from difcompress.core.files import folder_lock
from difcompress.loading.data import Processes, training_data
from difcompress.loading.models import LoadedModel, load_model, load_model_folder
from difcompress.objectives import get_objective
from difcompress.objectives.registry import objective_name
from difcompress.reports.plots import plot_metrics
from difcompress.training.feature_taps import parse_feature_layers
from difcompress.training.memory import (
    estimate_distill_memory,
    per_process_under_sharding,
)
from difcompress.training.run_folder import (
    append_metrics,
    prepare_run_folder,
    publish_student,
    remove_unused_run_folder,
    truncate_metrics,
)
from difcompress.training.sharding import (
    accelerator_plugins,
    check_shard_options,
    engage_on_cpu,
    engine_of,
    resolve_shard,
)
from difcompress.training.trainer import (
    CheckpointPolicy,
    NonFiniteLoss,
    Trainer,
    micro_batch_size,
)

# Settings that describe where the run happens, not what it computes.
NOT_SETTINGS = {"output", "resume", "resume_from", "device", "latent_cache"}
# How often training drops a condition, per kind; only the family's own is recorded as set.
DROPOUT_OPTIONS = ("class_dropout", "caption_dropout")
# Schedules that depend on the total step count: more --steps is then another run.
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def distill(config: DistillConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Distill `config.student` from its teacher into the run folder `config.output`.

    Returns the run summary (steps, the last log line, settings, data report, output). The
    folder's lock is held for the whole run; under `accelerate launch` every process trains
    and the main one writes.
    """
    check_trainable(config)
    check_resume_from(config)
    check_unquantized(config.student, "student")
    output = check_output_folder(config.output, inputs=[m for m in (config.student, config.teacher) if m])
    resume = bool(config.resume or config.resume_from)
    if resume:  # on every process, before any (it only reads): all stop on the same line
        check_resume_identity(config, output)
    accelerator = make_accelerator(config)
    micro_batch_size(config.batch_size, accelerator.num_processes, config.gradient_accumulation_steps)
    new_folder = not output.exists() or not any(output.iterdir())
    with folder_lock(output) if accelerator.is_main_process else contextlib.nullcontext():
        if accelerator.is_main_process:
            resume, notes = prepare_run_folder(output, resume)
            for note in notes:
                warn(note)
        accelerator.wait_for_everyone()
        try:
            summary = _run(config, accelerator, resume, show_progress)
        except BaseException:
            if new_folder and accelerator.is_main_process:
                remove_unused_run_folder(output)
            raise
    # A launch's process group ends here, not at the interpreter's exit, where gloo's worker
    # threads can abort a finished process (SIGABRT: "terminate called without an active exception").
    accelerator.state.destroy_process_group()
    return summary


def plan_distill(config: DistillConfig) -> dict[str, Any]:
    """`--dry-run`: the settings the run would record and its estimated peak memory per
    process (training/memory.py); loads student and teacher on the CPU, writes nothing."""
    check_trainable(config)
    check_resume_from(config)
    check_unquantized(config.student, "student")
    check_output_folder(config.output, inputs=[m for m in (config.student, config.teacher) if m])
    processes = launched_processes()
    micro_batch = micro_batch_size(config.batch_size, processes, config.gradient_accumulation_steps)
    cpu = torch.device("cpu")
    student = load_model(config.student, cpu)
    teacher, teacher_ref = _load_teacher(config, student, cpu)
    w_feat = config.resolved_w_feat()
    pairs = _feature_pairs(config, student, teacher, w_feat) or []
    memory = estimate_distill_memory(
        config, student.family, student.model, teacher.model if teacher else None, micro_batch=micro_batch,
        feature_pairs=pairs, text_tokens=student.text.max_length if student.text else None)
    settings = config.model_dump(mode="json", exclude=NOT_SETTINGS)
    settings.update(teacher=teacher_ref, w_feat=w_feat, objective=objective_name(config.loss, w_feat),
                    processes=processes, shard=resolve_shard(config))
    memory["per_process_sharded"] = per_process_under_sharding(memory)
    return {"settings": settings, "memory": memory, "output": str(Path(config.output).resolve())}


def check_trainable(config: DistillConfig) -> None:
    """At least one loss term must be on."""
    terms = {"task": config.w_task > 0, "feature": config.resolved_w_feat() > 0,
             "kd": get_objective(config.loss).kind == "output" and config.w_kd > 0}
    if not any(terms.values()):
        raise UserError(f"nothing to train: --loss {config.loss} with --w-task {config.w_task:g}, --w-kd "
                        f"{config.w_kd:g} and --w-feat {config.resolved_w_feat():g} leaves no loss term", exit_code=2)


def check_unquantized(reference: str, role: str) -> None:
    """Distillation is refused from a quantized export: its low-bit weights do not train, and
    a quantized teacher teaches its rounding errors. One line naming the unquantized folder."""
    refuse_quantized(load_model_folder(reference), reference,
                     f"a quantized {role} cannot be distilled: distill from the unquantized folder it was exported "
                     "from")


def check_resume_from(config: DistillConfig) -> None:
    """--resume-from names a checkpoint folder (or `latest`)."""
    if config.resume_from not in (None, "latest") and not (Path(config.resume_from) / "state.json").is_file():
        raise UserError(f"--resume-from {config.resume_from} is not a checkpoint folder "
                        "(RUN/checkpoints/step-XXXXXXX)", exit_code=2)


# Identity settings the run resolves (from the student's manifest, the family, the
# feature pairs) before recording them: compared only once resolved, in _resume.
RESOLVED_SETTINGS = ("teacher", "w_feat", "feature_layers", "grad_clip", *DROPOUT_OPTIONS)


def check_resume_identity(config: DistillConfig, output: Path) -> None:
    """Before any work (and before the folder is marked running again): the settings as
    given must match the checkpoint's, data source included."""
    path = latest_checkpoint(output) if config.resume_from in (None, "latest") else Path(config.resume_from)
    if path is None:
        return  # prepare_run_folder says what is wrong with the folder
    info = read_checkpoint_info(path)
    check_resume_sharding(path, info, resolve_shard(config))
    recorded = info.get("settings", {})
    given = config.model_dump(mode="json")
    differ = [k for k in DistillConfig.identity if k not in RESOLVED_SETTINGS and k in recorded
              and recorded[k] != given.get(k)]
    if differ:
        shown = ", ".join(f"{k} {recorded[k]!r} -> {given.get(k)!r}" for k in differ)
        raise UserError(f"checkpoint {path} belongs to another run (differs in: {shown}); resume with the same "
                        "settings or choose another -o")


def check_resume_sharding(path: Path, info: dict[str, Any], shard: str) -> None:
    """A sharded (DCP) checkpoint resumes sharded or whole on any number of processes; a
    whole one resumes whole; a ZeRO-2 one (its optimizer in per-process parts) only as it
    was written. Else one line, before anything in the run folder changes."""
    recorded = info.get("sharding") or {"engine": "none", "processes": 1}
    written = recorded["engine"]
    if written == "fsdp" and is_sharded_checkpoint(path) and shard in ("fsdp", "none"):
        return
    if written == "none" and shard == "none" and not is_sharded_checkpoint(path):
        return
    if written == "zero2" and shard == "zero2" and recorded["processes"] == launched_processes():
        return
    raise UserError(f"checkpoint {path} was written {_sharding_words(recorded)}; it cannot resume with --shard {shard} "
                    f"on {launched_processes()} process(es) (a --shard fsdp checkpoint resumes with fsdp or none on "
                    "any number, an unsharded one with none, a zero2 one with zero2 on as many); nothing "
                    "was changed", exit_code=2)


def _sharding_words(recorded: dict[str, Any]) -> str:
    engine = recorded["engine"]
    return "unsharded" if engine == "none" else f"with --shard {engine} on {recorded['processes']} processes"


def make_accelerator(config: DistillConfig) -> Accelerator:
    """The accelerate state for this run, on exactly the device asked for, with the
    sharding engine asked for (training/sharding.py)."""
    shard = resolve_shard(config)
    check_shard_options(config, shard)
    deepspeed_on_the_cpu_quietly()
    device = resolve_device(config.device)
    if launched() and config.device not in ("auto", "cuda"):
        raise UserError(f"--device {config.device}: under accelerate launch each process uses its own GPU; "
                        "leave --device auto", exit_code=2)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    trackers = _trackers(config.report_to)
    if not launched():
        # accelerate keeps one state per process; a process that runs several distills (the
        # Python API, benchmarks) must get the precision each one asks for.
        AcceleratorState._reset_state(reset_partial_state=True)
    plugins = accelerator_plugins(config, shard)
    try:
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=config.mixed_precision,
                                  log_with=trackers, project_dir=str(config.output), **plugins)
    except ValueError as err:  # e.g. fp16 on a CPU, bf16 on an old GPU; a launch environment half set
        message = str(err).splitlines()[0]
        about = "--mixed-precision" if "precision" in message or "fp16" in message or "bf16" in message \
            else "accelerate could not start"
        raise UserError(f"{about}: {message}", exit_code=2) from None
    check_process_count(accelerator)
    engage_on_cpu(accelerator, plugins)
    if engine_of(accelerator) != shard:
        raise UserError(f"--shard {shard}: accelerate did not start {shard} here ({accelerator.distributed_type}); "
                        "docs/many-gpus.md says how to launch it", exit_code=2)
    return accelerator


def check_process_count(accelerator: Accelerator) -> None:
    """The guard against N copies of one run: the launcher started WORLD_SIZE processes, and
    accelerate must see as many (it does not where `accelerate launch --use_fsdp` finds no
    GPU: each process then believes it is alone and would train, and write, the whole run)."""
    started = launched_processes()
    if started != accelerator.num_processes:
        raise UserError(f"the launcher started {started} processes but accelerate sees {accelerator.num_processes} "
                        "in each (accelerate launch --use_fsdp/--use_deepspeed without GPUs does this); on CPUs use "
                        f"torchrun --nproc_per_node {started} -m difcompress distill ... --shard fsdp", exit_code=2)


def _trackers(report_to: str) -> list[str] | None:
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to == "none":
        return None
    if not available[report_to]():
        raise UserError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}", 2)
    return [report_to]


def _run(config: DistillConfig, accelerator: Accelerator, resume: bool, show_progress: bool) -> dict[str, Any]:
    seed_everything(config.seed)
    output = Path(config.output)
    student = load_model(config.student, accelerator.device)
    teacher, teacher_ref = _load_teacher(config, student, accelerator.device)
    processes = Processes(accelerator.is_main_process, accelerator.is_local_main_process, show_progress)
    data, data_report = training_data(config, student, teacher, cache_dir=output, processes=processes)
    w_feat = config.resolved_w_feat()
    pairs = _feature_pairs(config, student, teacher, w_feat)
    learn_variance = teacher is not None and student.family.learns_variance(teacher.model)
    settings = run_settings(config, student, teacher_ref, w_feat, pairs, accelerator)
    fingerprint = run_fingerprint(settings)
    sharding = {"engine": engine_of(accelerator), "processes": accelerator.num_processes}
    trainer = Trainer(config, accelerator, student.family, student.model, student.scheduler,
                      teacher.model if teacher else None, data, feature_pairs=pairs, learn_variance=learn_variance,
                      checkpoints=CheckpointPolicy(output, {"fingerprint": fingerprint, "settings": settings,
                                                            "sharding": sharding}))
    trainer.prepare()  # before the resume: a sharded checkpoint is read into the shards
    resumed_from = _resume(trainer, config, settings, fingerprint) if resume else None
    last = _fit(trainer, config, settings, show_progress)
    report = trainer.sharding_report()  # after training: the optimizer's state exists by then
    summary = {"steps": config.steps, "resumed_from_step": resumed_from, "final": last, "settings": settings,
               "data": data_report, "latent_cache": data_report.get("latent_cache"), "sharding": report}
    _finish(trainer, config, student, settings, summary)
    summary["output"] = str(output.resolve())
    return summary


def _load_teacher(config: DistillConfig, student: LoadedModel, device: torch.device
                  ) -> tuple[LoadedModel | None, str | None]:
    """The frozen teacher when the objective, the feature term, data-free training or a
    learned-variance student needs one, and the teacher reference the run records."""
    family = student.family
    teacher_ref = config.teacher or (student.manifest or {}).get("teacher")
    needs = get_objective(config.loss).kind == "output" or config.resolved_w_feat() > 0 or config.data == "teacher"
    wants = family.learns_variance(student.model) and teacher_ref is not None
    if needs and not teacher_ref:
        raise UserError(f"{config.student} does not record its teacher; pass --teacher MODEL")
    if not (needs or wants):
        return None, config.teacher
    try:
        check_unquantized(teacher_ref, "teacher")
        teacher = load_model(teacher_ref, device)
    except UserError as err:
        if needs:
            raise
        warn(f"the variance channels stay untrained: {err}")
        return None, config.teacher
    if teacher.family is not family:
        raise UserError(f"teacher is a {teacher.family.name} model but the student is a {family.name} model; "
                        "distill between models of the same family")
    teacher.model.requires_grad_(False).eval()
    if config.teacher_dtype:
        teacher.model.to(DTYPES[config.teacher_dtype])
    if not needs and not family.learns_variance(teacher.model):
        return None, teacher_ref  # a fixed-variance teacher has no variance to teach
    return teacher, teacher_ref


def _feature_pairs(config, student, teacher, w_feat) -> list[tuple[str, str]] | None:
    if w_feat == 0:
        return None
    return parse_feature_layers(config.feature_layers) or student.family.feature_layer_pairs(
        student.model, teacher.model, pruning_report(student.manifest), config.feature_hooks)


def run_settings(config: DistillConfig, student: LoadedModel, teacher: str | None, w_feat: float,
                 pairs: list[tuple[str, str]] | None, accelerator: Accelerator) -> dict[str, Any]:
    """What the run computes, as recorded in its manifest and checkpoints (resolved values:
    the teacher, the feature weight and layers, the precision that actually ran)."""
    settings = config.model_dump(mode="json", exclude=NOT_SETTINGS)
    settings.update(teacher=teacher, w_feat=w_feat, mixed_precision=accelerator.mixed_precision,
                    grad_clip=config.grad_clip or None, objective=objective_name(config.loss, w_feat))
    if pairs:
        settings["feature_layers"] = [s if s == t else f"{s}={t}" for s, t in pairs]
    used = student.family.dropout_option(student.model) if student.family.num_classes(student.model) \
        or student.family.takes_text else None
    for option in DROPOUT_OPTIONS:
        if option != used:
            settings[option] = 0.0  # recorded as off where the family drops nothing of that kind
    return settings


def run_fingerprint(settings: dict[str, Any]) -> str:
    """A checkpoint resumes only a run with the same identity settings (config.py)."""
    neutral = DistillConfig.neutral
    identity = {k: settings.get(k) for k in DistillConfig.identity
                if k not in neutral or settings.get(k) != neutral[k]}
    if settings.get("w_feat_schedule") == "linear" or settings.get("lr_scheduler") not in STEP_FREE_SCHEDULES:
        identity["steps"] = settings["steps"]  # the schedule spans the run: more steps is another run
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume(trainer: Trainer, config: DistillConfig, settings: dict[str, Any], fingerprint: str) -> int:
    """Load the checkpoint to continue from; returns its step."""
    output = Path(config.output)
    path = latest_checkpoint(output) if config.resume_from in (None, "latest") else Path(config.resume_from)
    info = read_checkpoint_info(path)
    if info.get("fingerprint") != fingerprint:
        keys = DistillConfig.identity + ("steps",)
        diff = [k for k in keys if k in info.get("settings", {}) and info["settings"].get(k) != settings.get(k)]
        raise UserError(f"checkpoint {path} belongs to another run (differs in: {', '.join(diff) or 'settings'}); "
                        "resume with the same settings or choose another -o")
    if info["step"] > config.steps:
        raise UserError(f"checkpoint {path} is at step {info['step']}, past --steps {config.steps}", exit_code=2)
    trainer.load_state_dict(trainer.read_checkpoint(path))
    return info["step"]


def _fit(trainer: Trainer, config: DistillConfig, settings, show_progress) -> dict[str, Any]:
    output, main = Path(config.output), trainer.accelerator.is_main_process
    metrics = output / "metrics.jsonl"
    if main:
        truncate_metrics(metrics, trainer.step)
        if config.report_to != "none":
            trainer.accelerator.init_trackers(output.name, config={k: v for k, v in settings.items()
                                                                   if isinstance(v, (int, float, str, bool))})
    with distill_progress(show_progress and main, config.loss, config.steps, trainer.step) as advance:
        def on_log(line):
            if main:
                append_metrics(metrics, line)
                advance(line)
            if config.report_to != "none":
                trainer.accelerator.log({k: v for k, v in line.items() if k != "step" and v is not None},
                                        step=line["step"])

        try:
            return trainer.fit(on_log)
        except NonFiniteLoss as err:
            raise _non_finite_error(output, err.step) from None
        except KeyboardInterrupt:
            raise _interrupted_error(output, trainer.step) from None
        finally:
            if config.report_to != "none":
                trainer.accelerator.end_training()


def _non_finite_error(output: Path, step: int) -> UserError:
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        return UserError(f"loss became NaN or infinite at step {step}; stopped before any checkpoint. Try a lower "
                         f"--lr or a --grad-clip: the same -o {output} starts over")
    return UserError(f"loss became NaN or infinite at step {step}; stopped. Last good checkpoint: {checkpoint}. "
                     "Try a lower --lr or a --grad-clip in a new run (another -o)")


def _interrupted_error(output: Path, step: int) -> Interrupted:
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        return Interrupted(f"interrupted at step {step}, before the first checkpoint; the same command starts "
                           f"{output} over")
    return Interrupted(f"interrupted at step {step}; add --resume to the same command to continue from {checkpoint}")


def _finish(trainer: Trainer, config: DistillConfig, student: LoadedModel, settings, summary) -> None:
    """The last checkpoint (the training state, before the EMA replaces the weights), then
    the final student (the EMA) and the curves."""
    output = Path(config.output)
    if config.checkpoint_every:
        trainer.save_checkpoint()
    trainer.accelerator.wait_for_everyone()
    final = trainer.final_student()  # under FSDP a gather every process takes part in
    if not trainer.accelerator.is_main_process:
        return
    manifest = {
        "stage": "distill", "status": "complete", "family": student.family.name, "student_source": config.student,
        "teacher": settings.get("teacher") or (student.manifest or {}).get("teacher"),
        "structure": (student.manifest or {}).get("structure", "config"),
        "pruning": pruning_report(student.manifest), "versions": versions(), "distill": summary,
        "sharding": summary["sharding"],
    }
    publish_student(output, final.eval().to("cpu"), student, manifest)
    plot_metrics(output / "metrics.jsonl", output / "curves.png", title=f"{output.name}: {settings['objective']}")
