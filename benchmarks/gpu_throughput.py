"""Distill-step throughput and peak memory on one GPU: the ddpm-cifar10-32 layout pruned at
0.3 and 0.9, and a DiT-XL/2 D14 student (random weights, no download), each in fp32, bf16,
and bf16 + torch.compile + channels_last. Also Diff-Pruning's importance pass with one
timestep per pass against sixteen. Prints markdown tables and writes JSON.

The sharded rows (bf16+fsdp: FSDP2 per block, teacher replicated, as `distill --shard fsdp`
runs; bf16+zero2: DeepSpeed ZeRO-2, as `--shard zero2`) need a launcher; each process
prints its own row (its peak memory, its weights):

    python benchmarks/gpu_throughput.py --json gpu.json          # about 5 minutes on one H100
    torchrun --nproc_per_node 2 benchmarks/gpu_throughput.py --only DiT --modes bf16+fsdp   # 2 GPUs
    torchrun --nproc_per_node 2 benchmarks/gpu_throughput.py --only DiT --modes bf16+zero2  # needs deepspeed
    python benchmarks/gpu_throughput.py --smoke                   # tiny layouts on the CPU: checks the script
    torchrun --nproc_per_node 2 benchmarks/gpu_throughput.py --smoke --only DiT --modes bf16+fsdp
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from difcompress.config import DistillConfig
from difcompress.data.datasets import TensorImageDataset, TrainingSet
from difcompress.families.base import PruneRequest
from difcompress.families.registry import family_for_model
from difcompress.layouts import DDPM_CIFAR10_32, DIT_XL_2_256
from difcompress.metrics.cost import model_size
from difcompress.pruning.graph import prune_channels
from difcompress.pruning.importance import accumulate_gradients, make_importance
from difcompress.training.sharding import (
    accelerator_plugins,
    engage_on_cpu,
)
from difcompress.training.trainer import Trainer

MODES = {"fp32": {}, "bf16": {"mixed_precision": "bf16"},
         "bf16+compile+channels_last": {"mixed_precision": "bf16", "compile": True, "channels_last": True},
         "bf16+fsdp": {"mixed_precision": "bf16", "shard": "fsdp"},
         "bf16+zero2": {"mixed_precision": "bf16", "shard": "zero2"}}


SMOKE_UNET = {**DDPM_CIFAR10_32, "block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8, "sample_size": 16}
SMOKE_DIT = {**DIT_XL_2_256, "num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 16, "sample_size": 8}


def students(smoke: bool):
    """(name, teacher, student, batch size, sample shape, learns variance)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**(SMOKE_UNET if smoke else DDPM_CIFAR10_32))
    size = unet.config.sample_size
    family = family_for_model(unet)
    for ratio in (0.3, 0.9):
        student = copy.deepcopy(unet)
        prune_channels(student, family, ratio, make_importance("magnitude"))
        yield f"ddpm-cifar10-32 at {ratio}", unet, student, 4 if smoke else 128, (3, size, size), False
    dit = DiTTransformer2DModel(**(SMOKE_DIT if smoke else DIT_XL_2_256))
    depth = dit.config.num_layers // 2
    d14 = family_for_model(dit).prune(dit, PruneRequest(ratio=0.0, importance="magnitude", depth=depth)).model
    latent = dit.config.sample_size
    yield f"DiT-XL/2 D{depth} (latents)", dit, d14, 4 if smoke else 32, (4, latent, latent), True


def measure(teacher, student, batch, shape, learns_variance, mode, steps, device):
    options = MODES[mode]
    if "shard" not in options:  # a launched process keeps its one state
        AcceleratorState._reset_state(reset_partial_state=True)
    config = DistillConfig(student="bench", output="bench", loss="place", batch_size=batch, steps=10**9,
                           log_every=10**9, allow_tf32=False, **options)
    plugins = accelerator_plugins(config, options.get("shard", "none"))
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=options.get("mixed_precision", "no"),
                              **plugins)
    engage_on_cpu(accelerator, plugins)
    device = accelerator.device
    images = torch.randn(batch * 2, *shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    family = family_for_model(student)
    labels = torch.arange(batch * 2) % 1000 if family.num_classes(student) else None
    data = TrainingSet(TensorImageDataset(images), family.conditions(student, labels=labels),
                       family.null_conditions(student))
    trainer = Trainer(config, accelerator, family, copy.deepcopy(student).to(device),
                      DDPMScheduler(num_train_timesteps=1000), teacher.to(device).requires_grad_(False).eval(),
                      data, learn_variance=learns_variance)
    trainer.prepare()
    start = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        trainer.accumulate(trainer.train_step(trainer.next_batch())[1])
    synchronize(device)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.accumulate(trainer.train_step(trainer.next_batch())[1])
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return {"images_per_s": batch * steps / seconds, "peak_memory_gb": peak, "warmup_s": warmup, "batch": batch,
            "sharding": trainer.sharding_report()}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def diff_pruning_speed(device, smoke: bool, timesteps: int = 64):
    """Timesteps per second of Diff-Pruning's gradient pass (random weights: it never stops early)."""
    torch.manual_seed(0)
    model = UNet2DModel(**(SMOKE_UNET if smoke else DDPM_CIFAR10_32)).to(device)
    size = model.config.sample_size
    family = family_for_model(model)
    images = (torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    rows = {}
    for per_pass in (1, 16):
        synchronize(device)
        start = time.perf_counter()
        used = accumulate_gradients(model, family, DDPMScheduler(num_train_timesteps=1000), images, None,
                                    "diff-pruning", seed=0, max_timesteps=timesteps, timesteps_per_pass=per_pass)
        synchronize(device)
        rows[per_pass] = used / (time.perf_counter() - start)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--budget-s", type=float, default=420, help="skip what is left after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny layouts on the CPU, to check the script")
    parser.add_argument("--only", default="", help="measure only students whose name contains this")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if any("shard" in MODES[m] for m in args.modes) and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        parser.error("the sharded modes run under torchrun --nproc_per_node N (N >= 2), on their own (--modes)")
    steps = 2 if args.smoke else args.steps
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    print(f"{name}, torch {torch.__version__}")
    results = {"device": name, "torch": torch.__version__, "rows": [],
               "diff_pruning_timesteps_per_s": diff_pruning_speed(device, args.smoke) if not args.only else None}
    print(f"diff-pruning timesteps/s (ddpm-cifar10-32, batch 16): {results['diff_pruning_timesteps_per_s']}")
    print("| student | params / MACs | mode | images/s | peak memory | warm-up |")
    print("|---|---|---|---|---|---|")
    for label, teacher, student, batch, shape, learns_variance in students(args.smoke):
        if args.only not in label:
            continue
        size = model_size(student, family_for_model(student))
        for mode in args.modes:
            if time.perf_counter() - started > args.budget_s:
                print(f"| {label} | | {mode} | skipped (time budget) | | |")
                continue
            if args.smoke and "compile" in mode:
                continue
            row = measure(teacher, student, batch, shape, learns_variance, mode, steps, device)
            row.update(student=label, mode=mode, params=size["params"], macs=size["macs"])
            results["rows"].append(row)
            print(f"| {label} | {size['params'] / 1e6:.2f}M / {size['macs'] / 1e9:.2f}G | {mode} | "
                  f"{row['images_per_s']:.0f} (batch {batch}) | {row['peak_memory_gb']:.1f} GB | "
                  f"{row['warmup_s']:.0f} s |", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["wall_s"] = time.perf_counter() - started
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
