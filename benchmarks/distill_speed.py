"""Distillation steps/s for output KD (mse) vs PLACE on the ddpm-cifar10-32 layout.

One training step as the trainer does it: teacher forward (no grad), student forward and
backward, AdamW. The student is the teacher pruned at --ratio. Prints steps/s per
objective and the PLACE/mse ratio (random weights: speed does not depend on them).

    .venv/bin/python benchmarks/distill_speed.py --ratio 0.9 --batch-size 16 --steps 10
"""

import argparse
import copy
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from difcompress import objectives
from difcompress.families import family_for_model
from difcompress.layouts import DDPM_CIFAR10_32
from difcompress.measure import model_size
from difcompress.pruning import make_importance, prune_channels


def steps_per_second(loss, teacher, student, family, batch_size, steps, device):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch_size, 3, 32, 32, generator=gen).to(device)

    def step():
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = family.predict(student, noisy, t)
        with torch.no_grad():
            target = family.predict(teacher, noisy, t)
        total = objectives.task_loss(pred, noise).loss + objectives.kd_loss(loss, pred, target).loss
        opt.zero_grad()
        total.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = UNet2DModel(**DDPM_CIFAR10_32)
    family = family_for_model(teacher)
    student = copy.deepcopy(teacher)
    prune_channels(student, family, args.ratio, make_importance("magnitude"))
    teacher.to(device).requires_grad_(False)
    student.to(device).train()
    t_size, s_size = model_size(teacher, family), model_size(student, family)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"teacher {t_size['params'] / 1e6:.2f}M params {t_size['macs'] / 1e9:.3f}G MACs; "
          f"student (ratio {args.ratio}) {s_size['params'] / 1e6:.3f}M params {s_size['macs'] / 1e9:.4f}G MACs")
    speed = {}
    for loss in ("mse", "place", "mse", "place"):  # interleaved twice against drift
        speed.setdefault(loss, []).append(
            steps_per_second(loss, teacher, student, family, args.batch_size, args.steps, device))
    for loss, values in speed.items():
        print(f"{loss:6s} {max(values):.3f} steps/s (runs: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"place / mse speed ratio: {max(speed['place']) / max(speed['mse']):.3f}")


if __name__ == "__main__":
    main()
