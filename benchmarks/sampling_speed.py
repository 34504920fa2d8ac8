"""How much of a MACs reduction turns into sampling speed: denoiser-call latency of the
ddpm-cifar10-32 layout against its pruned students (random weights), with and without
`--round-to`. Prints, per student, the MACs reduction, the measured speed-up and their
ratio (1.0 would be a speed-up as large as the MACs reduction).

    .venv/bin/python benchmarks/sampling_speed.py --ratio 0.9 --batch-size 64 --round-to 1 8
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from diffusers import UNet2DModel

from difcompress.families.registry import family_for_model
from difcompress.layouts import DDPM_CIFAR10_32
from difcompress.metrics.cost import model_size
from difcompress.pruning.graph import prune_channels
from difcompress.pruning.importance import make_importance


@torch.no_grad()
def seconds_per_call(model, family, batch_size: int, calls: int, device) -> float:
    inputs = family.example_inputs(model, batch_size)
    model(**inputs)  # warm-up
    best = float("inf")
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per model (the fastest counts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = UNet2DModel(**DDPM_CIFAR10_32).eval()
    family = family_for_model(teacher)
    teacher_size = model_size(teacher, family)
    teacher_time = seconds_per_call(teacher.to(device), family, args.batch_size, args.calls, device)
    print(f"{device} ({torch.get_num_threads()} threads), batch {args.batch_size}; teacher "
          f"{teacher_size['macs'] / 1e9:.2f}G MACs, {teacher_time * 1000:.0f} ms per call")
    print("| --round-to | widths | MACs reduction | measured speed-up | speed-up / MACs reduction |")
    print("|---|---|---|---|---|")
    for round_to in args.round_to:
        student = copy.deepcopy(teacher).cpu()
        prune_channels(student, family, args.ratio, make_importance("magnitude"), round_to=round_to)
        size = model_size(student, family)
        seconds = seconds_per_call(student.to(device).eval(), family, args.batch_size, args.calls, device)
        macs_reduction = teacher_size["macs"] / size["macs"]
        speedup = teacher_time / seconds
        widths = [b.resnets[-1].conv2.out_channels for b in student.down_blocks]
        print(f"| {round_to} | {widths} | {macs_reduction:.1f}x | {speedup:.1f}x | {speedup / macs_reduction:.2f} |")


if __name__ == "__main__":
    main()
