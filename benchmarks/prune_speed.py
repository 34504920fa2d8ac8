"""Gradient-criterion pruning speed: Diff-Pruning's timesteps per second with several
timesteps per batched forward/backward pass against one per pass, and whether the two give
the same importance (the same kept channels).

    .venv/bin/python benchmarks/prune_speed.py --model digits --timesteps 200
    .venv/bin/python benchmarks/prune_speed.py --model ddpm-cifar10-32 --timesteps 40 --per-pass 1 8
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from difcompress.builtin import digits_images
from difcompress.families.registry import family_for_model
from difcompress.layouts import DDPM_CIFAR10_32
from difcompress.loading.models import load_model
from difcompress.pruning.graph import prune_channels
from difcompress.pruning.importance import accumulate_gradients, make_importance


def teacher_and_batch(name: str, batch_size: int, device: torch.device):
    if name == "digits":
        loaded = load_model("digits", device)
        return loaded.model, loaded.scheduler, digits_images(16, 1)[:batch_size].to(device)
    torch.manual_seed(0)
    model = UNet2DModel(**DDPM_CIFAR10_32).to(device)  # random weights: the loss never falls below the threshold
    images = torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model, DDPMScheduler(num_train_timesteps=1000), images.to(device)


def run(model, scheduler, images, per_pass: int, timesteps: int, device):
    family = family_for_model(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    used = accumulate_gradients(model, family, scheduler, images, None, "diff-pruning", seed=0, threshold=0.05,
                                max_timesteps=timesteps, timesteps_per_pass=per_pass)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return used, seconds, grads


def kept_channels(model, grads) -> dict[str, torch.Tensor]:
    """The pruned model's widths and weights after Taylor pruning at 0.5 with these gradients."""
    pruned = copy.deepcopy(model)
    for name, p in pruned.named_parameters():
        p.grad = grads.get(name)
    prune_channels(pruned, family_for_model(pruned), 0.5, make_importance("diff-pruning"))
    return {k: v.detach().cpu() for k, v in pruned.state_dict().items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "ddpm-cifar10-32"), default="digits")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=200, help="cap on timesteps visited (strided)")
    parser.add_argument("--per-pass", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, scheduler, images = teacher_and_batch(args.model, args.batch_size, device)
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
          f"up to {args.timesteps} timesteps")
    results = {}
    for per_pass in args.per_pass:
        used, seconds, grads = run(model, scheduler, images, per_pass, args.timesteps, device)
        results[per_pass] = (used, seconds, grads)
        print(f"{per_pass:3d} timesteps/pass: {used} timesteps in {seconds:.2f} s = {used / seconds:.1f} timesteps/s")
    base_used, base_seconds, base_grads = results[args.per_pass[0]]
    reference = kept_channels(model, base_grads)
    for per_pass, (used, seconds, grads) in results.items():
        if per_pass == args.per_pass[0]:
            continue
        same_stop = used == base_used
        # Over all weights at once: a tensor with a near-zero gradient would blow up a per-tensor ratio.
        difference = sum(float((grads[n] - base_grads[n]).square().sum()) for n in base_grads) ** 0.5
        worst = difference / sum(float(base_grads[n].square().sum()) for n in base_grads) ** 0.5
        pruned = kept_channels(model, grads)
        same_model = all(torch.equal(pruned[k], reference[k]) for k in reference)
        print(f"{per_pass:3d}/pass vs {args.per_pass[0]}/pass: speed-up {base_seconds / seconds * used / base_used:.2f}x,"
              f" same stop: {same_stop}, relative gradient difference {worst:.1e}, same pruned model: {same_model}")


if __name__ == "__main__":
    main()
