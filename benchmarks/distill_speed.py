"""Distill step throughput: the trainer's train_step against a minimal hand-written KD loop,
and PLACE against output MSE, on the ddpm-cifar10-32 layout (random weights: speed does not
depend on them).

The minimal loop does what any KD loop must (teacher forward without grad, student
forward/backward, the objective, AdamW, gradient clipping, an EMA update); the trainer
adds its bookkeeping (seeded global batches, logs kept on the device, NaN watch). Both
run the same student, batch and objective. Startup is cancelled by timing a short and a
long run and differencing. Prints steps/s and the ratios.

    .venv/bin/python benchmarks/distill_speed.py --ratio 0.9 --batch-size 16 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel

from difcompress.config import DistillConfig
from difcompress.data.datasets import TensorImageDataset, TrainingSet
from difcompress.diffusion.inputs import ModelInputs
from difcompress.families.registry import family_for_model
from difcompress.layouts import DDPM_CIFAR10_32
from difcompress.metrics.cost import model_size
from difcompress.objectives import OutputOptions, kd_loss, task_loss
from difcompress.pruning.graph import prune_channels
from difcompress.pruning.importance import make_importance
from difcompress.training.ema import EMA
from difcompress.training.trainer import Trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_step_seconds(run_steps, device, short: int, long: int) -> float:
    """Seconds per step with startup and warm-up cancelled: (T(long) - T(short)) / (long - short)."""
    times = []
    for n in (short, long):
        synchronize(device)
        start = time.perf_counter()
        run_steps(n)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (long - short)


def minimal_loop(loss, teacher, student, family, images, device):
    """The least a KD step needs: returns run_steps(n)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    ema = EMA(student, 0.9999)
    gen = torch.Generator().manual_seed(0)
    x0 = images.to(device)

    def run_steps(n):
        for step in range(1, n + 1):
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, 1000, (x0.shape[0],), generator=gen).to(device)
            noisy = scheduler.add_noise(x0, noise, t)
            pred = family.predict(student, ModelInputs(noisy, t))
            with torch.no_grad():
                target = family.predict(teacher, ModelInputs(noisy, t))
            total = task_loss(pred, noise).loss + kd_loss(loss, pred, target, OutputOptions()).loss
            total.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(student, step)

    return run_steps


def trainer_loop(loss, teacher, student, family, images, device, **options):
    """The same steps through difcompress's Trainer: returns run_steps(n)."""
    config = DistillConfig(student="bench", output="bench", loss=loss, batch_size=images.shape[0], lr=1e-4,
                           steps=10**9, log_every=10**9, device=device.type, **options)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=options.get("mixed_precision"))
    trainer = Trainer(config, accelerator, family, student, DDPMScheduler(num_train_timesteps=1000), teacher,
                      TrainingSet(TensorImageDataset(images)))
    trainer.prepare()

    def run_steps(n):
        for _ in range(n):
            trainer.accumulate(trainer.train_step(trainer.next_batch())[1])

    return run_steps


def build(ratio: float, device: torch.device):
    torch.manual_seed(0)
    teacher = UNet2DModel(**DDPM_CIFAR10_32)
    family = family_for_model(teacher)
    student = copy.deepcopy(teacher)
    prune_channels(student, family, ratio, make_importance("magnitude"))
    return teacher.to(device).requires_grad_(False).eval(), student.to(device).train(), family


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps of the long run (the short one is a quarter)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions against drift")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    teacher, student, family = build(args.ratio, device)
    t_size, s_size = model_size(teacher, family), model_size(student, family)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"teacher {t_size['params'] / 1e6:.2f}M params {t_size['macs'] / 1e9:.3f}G MACs; student (ratio "
          f"{args.ratio}) {s_size['params'] / 1e6:.3f}M params {s_size['macs'] / 1e9:.4f}G MACs")
    images = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    short, long = max(2, args.steps // 4), args.steps
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):
        for loss in ("mse", "place"):
            for name, make in (("minimal", minimal_loop), ("trainer", trainer_loop)):
                run = make(loss, teacher, copy.deepcopy(student), family, images, device)
                seconds = per_step_seconds(run, device, short, long)
                best[(name, loss)] = min(best.get((name, loss), float("inf")), seconds)
    for (name, loss), seconds in sorted(best.items()):
        print(f"{name:8s} {loss:6s} {1 / seconds:8.3f} steps/s")
    for loss in ("mse", "place"):
        print(f"trainer / minimal throughput ({loss}): {best[('minimal', loss)] / best[('trainer', loss)]:.3f}")
    print(f"PLACE / MSE step time (trainer): {best[('trainer', 'place')] / best[('trainer', 'mse')]:.3f}")


if __name__ == "__main__":
    main()
