"""The training options a GPU user expects (diffusers' training-script names): accumulation,
schedules, optimizers, checkpoint rotation, resume from a named checkpoint, trackers,
mixed precision from accelerate's configuration, and the speed switches that must not
change the result."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_distill
from PIL import Image
from safetensors.torch import load_file

from difcompress.core.errors import UserError
from difcompress.loading.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

# No EMA: the final student is the trained weights, comparable to float tolerance.
BASE = dict(data="digits", device="cpu", seed=0, log_every=1, checkpoint_every=0, lr=1e-3, ema_decay=0.0,
            batch_size=8, steps=3)


def final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close(a, b, atol=1e-6, what=""):
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, (what, worst)


def make_trainer(pruned_dir, **options):
    """A Trainer on the digits, built as distill builds one (not yet prepared)."""
    from accelerate import Accelerator

    from difcompress.builtin import builtin_data
    from difcompress.config import DistillConfig
    from difcompress.data.datasets import TrainingSet
    from difcompress.loading.models import load_model
    from difcompress.training.trainer import Trainer

    student, teacher = load_model(pruned_dir), load_model(load_model(pruned_dir).manifest["teacher"])
    config = DistillConfig(student=str(pruned_dir), output="unused", loss="mse",
                           **{**{k: v for k, v in BASE.items() if k != "data"}, **options})
    return Trainer(config, Accelerator(cpu=True), student.family, student.model, student.scheduler,
                   teacher.model.requires_grad_(False), TrainingSet(builtin_data("digits", 16, 3)))


def step_gradients(pruned_dir, took_effect=None, **options) -> dict[str, torch.Tensor]:
    """The gradient the first optimizer step applies, under `options`; `took_effect(model)`
    is asserted on the prepared student, so a switch that is silently ignored fails."""
    trainer = make_trainer(pruned_dir, **options)
    student = trainer.model  # before prepare: the model itself
    trainer.prepare()
    if took_effect is not None:
        assert took_effect(student), options
    captured = {}
    real_step = trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in student.named_parameters()})
        return real_step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.train_step(trainer.next_batch())
    return captured


def assert_same_gradients(a, b):
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("parts", [2, 4])
def test_gradient_accumulation_is_the_same_step_as_one_big_batch(parts, pruned_dir, tmp_path):
    assert_same_gradients(step_gradients(pruned_dir), step_gradients(pruned_dir, gradient_accumulation_steps=parts))
    run_distill(pruned_dir, tmp_path / "one", loss="mse", **BASE)
    run_distill(pruned_dir, tmp_path / "acc", loss="mse", gradient_accumulation_steps=parts, **BASE)
    first, accumulated = metrics(tmp_path / "one")[0], metrics(tmp_path / "acc")[0]
    for key in ("loss", "task", "kd", "grad_norm"):  # logged values are means over the micro-batches
        assert accumulated[key] == pytest.approx(first[key], rel=1e-5), key


def test_a_trainer_loaded_from_another_trainers_state_continues_it_exactly(pruned_dir):
    """The run's state is one object: weights, optimizer, schedule, data position, the
    seeded generator and the global RNG, all restored by load_state_dict."""
    import copy

    first = make_trainer(pruned_dir, ema_decay=0.9, lr_scheduler="cosine", steps=6)
    first.prepare()
    for _ in range(2):
        first.train_step(first.next_batch())
    state = copy.deepcopy(first.state_dict())
    torch.manual_seed(123)  # the global RNG moves on; the state brings it back
    second = make_trainer(pruned_dir, ema_decay=0.9, lr_scheduler="cosine", steps=6)
    second.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), state.rng["torch"])
    second.prepare()
    for trainer in (first, second):
        trainer.train_step(trainer.next_batch())
    assert second.step == first.step == 3
    assert_close(first.model.state_dict(), second.model.state_dict(), atol=0, what="weights")
    assert_close(first.ema.state_dict(), second.ema.state_dict(), atol=0, what="ema")
    assert torch.equal(first.generator.get_state(), second.generator.get_state())


def test_batch_must_split_evenly_over_accumulation(pruned_dir, tmp_path):
    with pytest.raises(UserError, match="split evenly"):
        run_distill(pruned_dir, tmp_path / "run", loss="mse", **{**BASE, "gradient_accumulation_steps": 3})


def test_learning_rate_schedule_and_warm_up_are_logged(pruned_dir, tmp_path):
    from diffusers.optimization import get_scheduler

    run = tmp_path / "run"
    run_distill(pruned_dir, run, loss="mse", lr_scheduler="cosine", lr_warmup_steps=2, **{**BASE, "steps": 6})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        optimizer.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    assert [r["lr"] for r in metrics(run)] == pytest.approx(expected)
    assert expected[1] == pytest.approx(1e-3) and expected[-1] == pytest.approx(0.0, abs=1e-12)


def test_checkpoints_rotate_to_the_limit(pruned_dir, tmp_path):
    run = tmp_path / "run"
    run_distill(pruned_dir, run, loss="mse", checkpoints_total_limit=3, **{**BASE, "steps": 6, "checkpoint_every": 1})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000005",
                                                                        "step-0000006"]


def test_resume_from_a_named_checkpoint(pruned_dir, tmp_path):
    full = tmp_path / "full"
    settings = {**BASE, "steps": 6, "checkpoint_every": 2, "checkpoints_total_limit": None}
    run_distill(pruned_dir, full, loss="place", **settings)
    again = tmp_path / "again"
    shutil.copytree(full, again)
    summary = run_distill(pruned_dir, again, loss="place", resume_from=str(again / "checkpoints" / "step-0000002"),
                          **settings)
    assert summary["resumed_from_step"] == 2  # not the latest (6), which would train nothing and end the same
    assert_close(final(full), final(again), 0.0, "resumed from step 2")
    assert [r["step"] for r in metrics(again)] == list(range(1, 7))
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run_distill(pruned_dir, again, loss="place", resume_from=str(tmp_path), **settings)


@pytest.mark.parametrize("option", ["gradient_checkpointing", "channels_last"])
def test_memory_and_layout_switches_leave_the_gradients_alone(option, pruned_dir):
    took_effect = {"gradient_checkpointing": lambda model: model.is_gradient_checkpointing,
                   "channels_last": lambda model: all(p.is_contiguous(memory_format=torch.channels_last)
                                                      for p in model.parameters() if p.dim() == 4)}[option]
    assert not took_effect(load_model(pruned_dir).model)  # off by default, so the check can tell
    assert_same_gradients(step_gradients(pruned_dir), step_gradients(pruned_dir, took_effect, **{option: True}))


def test_decoding_in_worker_processes_changes_nothing(pruned_dir, tmp_path, monkeypatch):
    from difcompress.data.stream import BatchStream

    data = tmp_path / "images"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(24):
        pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i:02d}.png")
    settings = {**BASE, "data": str(data)}
    run_distill(pruned_dir, tmp_path / "main", loss="mse", **settings)
    workers, real = [], BatchStream.loader
    monkeypatch.setattr(BatchStream, "loader", lambda self, rows, n: workers.append(n) or real(self, rows, n))
    run_distill(pruned_dir, tmp_path / "workers", loss="mse", dataloader_num_workers=2, **settings)
    assert workers and set(workers) == {2}  # the images really were decoded in worker processes
    assert_close(final(tmp_path / "main"), final(tmp_path / "workers"), 0.0, "decoded in workers")


def test_adam_a_half_precision_teacher_and_an_offloaded_ema_run(pruned_dir, tmp_path):
    summary = run_distill(pruned_dir, tmp_path / "run", loss="place", optimizer="adam", weight_decay=0.01,
                          teacher_dtype="bf16", ema_offload=True, **{**BASE, "ema_decay": 0.99})
    assert summary["settings"]["optimizer"] == "adam" and summary["settings"]["teacher_dtype"] == "bf16"
    assert all(torch.isfinite(v).all() for v in final(tmp_path / "run").values())


def test_missing_optional_packages_are_clear_errors(pruned_dir, tmp_path, monkeypatch):
    import difcompress.commands.distill as distill_module

    # Absent whether or not this machine has them installed.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(distill_module, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match="pip install") as info:
        run_distill(pruned_dir, tmp_path / "a", loss="mse", optimizer="adamw-8bit", **BASE)
    assert info.value.exit_code == 2
    with pytest.raises(UserError, match="pip install wandb"):
        run_distill(pruned_dir, tmp_path / "b", loss="mse", report_to="wandb", **BASE)


def test_tensorboard_event_files_are_written_offline(pruned_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_distill(pruned_dir, run, loss="place", report_to="tensorboard", **{**BASE, "steps": 4})
    events = list(run.rglob("events.out.tfevents.*"))
    assert events, sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"loss", "w", "lr"} <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3, 4]


def test_accelerates_mixed_precision_setting_is_honoured(pruned_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision sets
    summary = run_distill(pruned_dir, tmp_path / "env", loss="mse", **BASE)
    assert summary["settings"]["mixed_precision"] == "bf16"
    summary = run_distill(pruned_dir, tmp_path / "flag", loss="mse", mixed_precision="no", **BASE)
    assert summary["settings"]["mixed_precision"] == "no"  # an explicit option still wins


def test_bf16_mixed_precision_trains_feature_kd_through_width_adapters(pruned_dir, tmp_path):
    """Features leave autocast in bf16 while the 1x1 adapters stay fp32: the adapters read
    them in their own dtype (this was a dtype-mismatch error before)."""
    summary = run_distill(pruned_dir, tmp_path / "bf16", loss="place+feat", mixed_precision="bf16", **BASE)
    assert summary["settings"]["mixed_precision"] == "bf16"
    assert torch.isfinite(torch.tensor(summary["final"]["loss"]))


def test_distill_dry_run_estimates_memory_and_writes_nothing(tmp_path, run_cli):
    """The estimate's parts follow the options: checkpointing shrinks the step, a bf16 teacher
    halves the teacher's weights, an offloaded EMA leaves the GPU, 8-bit AdamW keeps 2 bytes."""
    from conftest import run_prune

    pruned = tmp_path / "pruned"
    run_prune("digits", 0.5, pruned, device="cpu")

    def plan(*options):
        code, out, err = run_cli("distill", "--student", pruned, "--data", "digits", "-o", tmp_path / "run",
                                 "--batch-size", "256", "--dry-run", "--json", *options)
        assert code == 0, err
        return json.loads(out)

    plain = plan()
    parts = dict(plain["memory"]["parts"])
    assert not (tmp_path / "run").exists() and plain["memory"]["micro_batch"] == 256
    step = next(v for k, v in parts.items() if k.startswith("one step"))
    checkpointed = plan("--gradient-checkpointing")["memory"]["parts"]
    assert next(v for k, v in checkpointed.items() if k.startswith("one step")) < step
    cheap = plan("--teacher-dtype", "bf16", "--ema-offload", "--gradient-accumulation-steps", "4")["memory"]
    assert cheap["parts"]["teacher weights (bf16)"] * 2 == parts["teacher weights (fp32)"]
    assert cheap["parts"]["EMA weights"] == 0 and cheap["micro_batch"] == 64
    assert parts["optimizer state (adamw)"] == 2 * parts["student weights (fp32)"]
    assert plain["memory"]["total_bytes"] == sum(parts.values())
