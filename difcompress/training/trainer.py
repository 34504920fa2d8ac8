"""The distillation trainer: setup (``Trainer(...)``), one optimizer step (``train_step``)
and the loop (``fit``).

Loss = w_task * L_task + w_kd * L_kd(objective) + w_feat * L_feature (+ the learned
variance's loss against the teacher's, MSE or VLB + KL by --variance-loss; docs/method.md).
The trainer runs on accelerate: the student, optimizer and adapters train on every process,
the frozen teacher is moved but never wrapped (unless --shard-teacher shards it). Under
--shard fsdp / zero2 (training/sharding.py) accelerate's FSDP2 or DeepSpeed engine holds the
student's state in shards (DeepSpeed clips and steps inside its backward).

One optimizer step consumes one *global* batch of ``batch_size`` images, drawn with its
noise, timesteps and label dropout from one seeded generator that every process holds.
Each process takes its rows of that batch and splits them into
``gradient_accumulation_steps`` micro-batches, so the optimisation does not depend on the
number of processes, and accumulation matches one big batch for per-sample-mean
objectives (PLACE's ``w`` and DIST's batch statistics are computed per micro-batch).

Nothing on the hot path waits for the GPU: logged values stay on the device and are read
every ``log_every`` steps, where the NaN guard also looks.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch import nn

from difcompress.artifacts.checkpoint import (
    Checkpoint,
    is_sharded_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from difcompress.config import DistillConfig
from difcompress.core.errors import UserError
from difcompress.data.conditions import Conditions, drop, take, to
from difcompress.data.datasets import TrainingSet
from difcompress.data.stream import BatchStream
from difcompress.diffusion.inputs import ModelInputs
from difcompress.families.base import ModelFamily
from difcompress.metrics.cost import meta_copy
from difcompress.objectives import OutputOptions, feature_loss, get_objective, task_loss
from difcompress.objectives.variance import learned_variance_terms
from difcompress.training import sharding
from difcompress.training.ema import EMA
from difcompress.training.feature_taps import FeatureTaps

LOGGED_FROM_TERMS = ("coarse", "fine", "w", "slope", "intercept")


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite at `step`."""

    def __init__(self, step: int):
        super().__init__(f"loss became NaN or infinite at step {step}")
        self.step = step


@dataclass
class Batch:
    """This process's rows of one global batch, with everything random already drawn."""

    x0: torch.Tensor
    cond: Conditions | None
    noise: torch.Tensor
    timesteps: torch.Tensor

    def split(self, parts: int) -> list[Batch]:
        size = self.x0.shape[0] // parts
        cut = [slice(i * size, (i + 1) * size) for i in range(parts)]
        return [Batch(self.x0[c], take(self.cond, c), self.noise[c], self.timesteps[c]) for c in cut]


@dataclass
class CheckpointPolicy:
    """Where the trainer saves its state (every ``checkpoint_every`` steps, keeping
    ``checkpoints_total_limit``), and what each checkpoint records beside it: the run's
    fingerprint and settings, which a resume checks."""

    run_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes  # noqa: PLC0415 - optional extra, imported only when asked for
    except ImportError:
        raise UserError("--optimizer adamw-8bit needs bitsandbytes: pip install 'difcompress[8bit]'", 2) from None
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def micro_batch_size(batch_size: int, processes: int, accumulation: int) -> int:
    """What each process takes per accumulation step; the batch must split evenly."""
    if batch_size % (processes * accumulation):
        raise UserError(f"--batch-size {batch_size} must split evenly over {processes} process(es) x "
                        f"{accumulation} accumulation step(s)", exit_code=2)
    return batch_size // (processes * accumulation)


class Trainer:
    """Distills `student` from `teacher` as `config` says. Build it, then call `fit()`, or
    drive it step by step: ``trainer.train_step(trainer.next_batch())``."""

    def __init__(self, config: DistillConfig, accelerator: Accelerator, family: ModelFamily, student: nn.Module,
                 scheduler: Any, teacher: nn.Module | None, data: TrainingSet, *,
                 feature_pairs: list[tuple[str, str]] | None = None, learn_variance: bool = False,
                 checkpoints: CheckpointPolicy | None = None):
        self.config, self.accelerator, self.family, self.scheduler = config, accelerator, family, scheduler
        self.formulation = family.formulation(student, scheduler)
        self.objective = get_objective(config.loss)
        self.output_options = OutputOptions(config.group_size, config.coarse_norm, config.fit_eps)
        self.w_feat, self.learn_variance = config.resolved_w_feat(), learn_variance
        self.teacher, self.checkpoints = teacher, checkpoints
        self.engine = sharding.engine_of(accelerator)
        self.step = 0
        processes = accelerator.num_processes
        micro_batch_size(config.batch_size, processes, config.gradient_accumulation_steps)
        per_process = config.batch_size // processes
        self.rows = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
        self.stream = BatchStream(data.images, config.batch_size, seed=config.seed, conditions=data.conditions)
        self.generator = torch.Generator().manual_seed(config.seed)
        # Classifier-free guidance training: what a dropped condition becomes, and how often.
        option = family.dropout_option(student)
        self.null = data.null
        self.dropout = getattr(config, option) if option and data.null and data.conditions is not None else 0.0

        self.model = student.train().requires_grad_(True)  # every student weight trains
        family.disable_label_dropout(self.model)
        self.taps, self.adapters = None, None
        if feature_pairs:
            self.taps = FeatureTaps(self.model, teacher, feature_pairs)
            self.adapters = self.taps.build_adapters(
                family, self.model, teacher, accelerator.device, bias=config.feature_adapter_bias,
                init_range=config.feature_adapter_init, always=config.feature_adapter_always)
        if self.engine == "zero2" and self.adapters is not None:
            sharding.check_zero2_adapters(self.adapters)
        self.params = list(self.model.parameters()) + (list(self.adapters.parameters()) if self.adapters else [])
        self.optimizer = make_optimizer(config.optimizer, self.params, config.lr, config.weight_decay)
        self.lr_scheduler = self._schedule(self.optimizer)
        # Under FSDP the EMA is made from the shards (in prepare), and the final weights are
        # gathered into a weightless copy of the student's modules.
        fsdp = self.engine == "fsdp"
        self.ema = EMA(self.model, config.ema_decay, "cpu" if config.ema_offload else None) \
            if config.ema_decay > 0 and not fsdp else None
        self._skeleton = meta_copy(self.model) if fsdp else None
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._first_bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self._batches: Iterator | None = None

    def _schedule(self, optimizer: torch.optim.Optimizer) -> Any:
        config = self.config
        return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=config.steps)

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> Checkpoint:
        """Everything a resumed run needs to continue bit for bit: weights, EMA, adapters,
        optimizer moments, schedule, data position, the seeded generator and the RNGs."""
        modules = {"student": self.accelerator.unwrap_model(self.model).state_dict()}
        if self.ema is not None:
            modules["ema"] = self.ema.state_dict()
        if self.adapters is not None:
            modules["adapters"] = self.adapters.state_dict()
        info = {"stream": self.stream.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}
        if self.accelerator.scaler is not None:
            info["grad_scaler"] = self.accelerator.scaler.state_dict()
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        zero2 = self.engine == "zero2"
        optimizer = sharding.zero2_optimizer_state(self.optimizer) if zero2 else self.optimizer.state_dict()
        return Checkpoint(self.step, modules, optimizer, rng, info, sharded=self.engine == "fsdp",
                          optimizer_per_process=zero2)

    def read_checkpoint(self, path: Path) -> Checkpoint:
        """The checkpoint folder `path` as this trainer's state. A sharded one (torch
        distributed checkpoint) is read in place into the trainer's own tensors, sharded or
        whole, on any number of processes: DCP reshards (call after `prepare` under FSDP)."""
        if not is_sharded_checkpoint(path):
            return load_checkpoint(path)
        sharding.init_optimizer_state(getattr(self.optimizer, "optimizer", self.optimizer))
        return load_checkpoint(path, like=self.state_dict())

    def load_state_dict(self, state: Checkpoint) -> None:
        """Continue from `state`; after `prepare` (FSDP reads into the shards, ZeRO-2 into
        DeepSpeed's optimizer)."""
        self.accelerator.unwrap_model(self.model).load_state_dict(state.modules["student"])
        if self.adapters is not None:
            self.adapters.load_state_dict(state.modules["adapters"])
        if self.ema is not None and "ema" in state.modules:
            self.ema.load_state_dict(state.modules["ema"])
        if state.optimizer_per_process:
            sharding.load_zero2_optimizer_state(self.optimizer, state.optimizer)
        else:
            self.optimizer.load_state_dict(state.optimizer)
        if "lr_scheduler" in state.info:
            self.lr_scheduler.load_state_dict(state.info["lr_scheduler"])
        if "grad_scaler" in state.info and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state.info["grad_scaler"])
        self.stream.load_state_dict(state.info["stream"])
        self.generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch"])
        cuda_states = [state.rng[k] for k in sorted(state.rng) if k.startswith("cuda")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        self.step = state.step

    def save_checkpoint(self) -> Path | None:
        """Write this step's checkpoint into the run folder (the main process writes, or under
        FSDP every process its shards, under ZeRO-2 its optimizer part; every process waits
        for it). Returns the folder on the main process."""
        policy = self.checkpoints
        self.accelerator.wait_for_everyone()
        if policy is None or not (self.accelerator.is_main_process or self.engine != "none"):
            return None
        path = save_checkpoint(policy.run_dir, self.state_dict(), info=policy.info,
                               keep=self.config.checkpoints_total_limit)
        return path if self.accelerator.is_main_process else None

    def final_student(self) -> nn.Module | None:
        """The trained student (its EMA when there is one) as one whole model on the main
        process, None on the others. Under FSDP it is gathered once from the shards, under
        mixed-precision ZeRO-2 from the fp32 master partitions: every process must call this."""
        main = self.accelerator.is_main_process
        model = self.accelerator.unwrap_model(self.model)
        if self.engine == "zero2" and next(model.parameters()).dtype != torch.float32:
            # DeepSpeed trains a bf16/fp16 copy: the student is its fp32 masters (or the fp32 EMA), as unsharded
            masters = sharding.zero2_master_weights(model, keep=main) if self.ema is None else {}
            if main:
                model.float().load_state_dict(masters, strict=False)
        if self.engine != "fsdp":
            if main and self.ema is not None:
                self.ema.copy_to(model)
            return model if main else None
        state = self.ema.state_dict() if self.ema is not None else model.state_dict()
        full = sharding.gather_full(state, keep=main)
        return sharding.materialize(self._skeleton, full, model) if main else None

    def sharding_report(self) -> dict[str, Any]:
        """What this run shards, and the bytes of the student's weights each process holds,
        measured on its local shards (a collective: every process calls it)."""
        if self.engine == "none":  # data-parallel (or one process): every process holds everything
            return {"engine": "none", "processes": self.accelerator.num_processes}
        params = list(self.accelerator.unwrap_model(self.model).parameters())
        mine = torch.tensor([sharding.local_bytes(params)], device=self.accelerator.device)
        report = {"engine": self.engine, "processes": self.accelerator.num_processes,
                  "parameter_bytes_per_process": self.accelerator.gather(mine).tolist(),
                  "parameter_bytes_unsharded": sharding.full_bytes(params)}
        if self.engine == "fsdp":
            report.update(units=sharding.unit_count(self.model), checkpointed_blocks=sharding.checkpointed(self.model),
                          teacher="sharded" if self.config.shard_teacher else "replicated")
        if self.engine == "zero2":  # what ZeRO-2 splits: the fp32 master weights and the optimizer's moments
            mine = torch.tensor([sharding.zero2_optimizer_bytes(self.optimizer)], device=self.accelerator.device)
            report["optimizer_bytes_per_process"] = self.accelerator.gather(mine).tolist()
        return report

    def prepare(self) -> None:
        """Hand the student and optimizer to accelerate (DDP, mixed precision) and apply the
        speed settings. Call once, before any `load_state_dict` (a checkpoint is read into the
        prepared model and optimizer)."""
        config = self.config
        if config.gradient_checkpointing and self.engine != "fsdp":  # FSDP checkpoints per block itself
            if not getattr(self.model, "_supports_gradient_checkpointing", False):
                raise UserError(f"{type(self.model).__name__} does not support gradient checkpointing", 2)
            self.model.enable_gradient_checkpointing()
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.engine == "fsdp":
            self._prepare_fsdp()
        elif self.engine == "zero2":
            self.model, self.optimizer = sharding.prepare_zero2(self.accelerator, self.model, self.optimizer,
                                                                self.rows.stop - self.rows.start)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.teacher_forward = self.teacher
        if config.compile and self.teacher is not None:
            self.teacher_forward = torch.compile(self.teacher)

    def _prepare_fsdp(self) -> None:
        """FSDP2 through accelerate: the student sharded per family block. accelerate's
        prepare takes the model with an optimizer and maps only the model's own parameters,
        so it gets a stand-in; the real optimizer (with the feature adapters, kept whole
        beside the student) and its schedule are built on the shards; the EMA is a shard."""
        config = self.config
        self.optimizer = self.lr_scheduler = self.params = None  # they hold the whole weights: let them go
        if not sharding.set_fsdp_blocks(self.accelerator, self.family, self.model) and config.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()  # accelerate's follows its class rule, unused here
        self.model, _ = self.accelerator.prepare(self.model, torch.optim.SGD(self.model.parameters(), lr=0.0))
        self.params = list(self.model.parameters()) + (list(self.adapters.parameters()) if self.adapters else [])
        optimizer = make_optimizer(config.optimizer, self.params, config.lr, config.weight_decay)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.lr_scheduler = self._schedule(self.optimizer)
        if config.ema_decay > 0:
            self.ema = EMA(self.model, config.ema_decay)
        if config.shard_teacher and self.teacher is not None:
            sharding.shard_frozen(self.teacher, self.family)

    # ---- one step -----------------------------------------------------------------------------
    def _images(self) -> tuple[torch.Tensor, Conditions | None]:
        if self.config.dataloader_num_workers and not self.stream.in_memory:
            if self._batches is None:
                self._batches = self.stream.loader(self.rows, self.config.dataloader_num_workers)
            return next(self._batches)
        return self.stream.next_with_conditions(self.rows)

    def next_batch(self) -> Batch:
        """This process's rows of the next global batch, noise, timesteps and dropped conditions."""
        x0, cond = self._images()
        size = self.config.batch_size
        noise = torch.randn((size, *x0.shape[1:]), generator=self.generator)[self.rows]
        t = self.formulation.draw_timesteps(size, self.generator, self.config.antithetic,
                                           sample_shape=tuple(x0.shape[1:]))[self.rows]
        if cond is not None and self.dropout > 0:
            # Classifier-free guidance training: conditions dropped to the null condition,
            # seeded, the same for teacher and student.
            dropped = (torch.rand((size,), generator=self.generator) < self.dropout)[self.rows]
            cond = drop(cond, self.null, dropped)
        device = self.accelerator.device
        return Batch(x0.to(device), to(cond, device), noise.to(device), t.to(device))

    def feature_weight(self, step: int) -> float:
        """constant; linear: from w_feat at the first step down to 0 at the last; epoch-linear:
        the same per epoch, w_feat * (1 - epoch / (epochs - 1)) (the authors' DiT setting)."""
        schedule = self.config.w_feat_schedule
        if schedule == "constant":
            return self.w_feat
        if schedule == "linear":
            return self.w_feat * (1 - (step - 1) / max(1, self.config.steps - 1))
        per_epoch = self.stream.batches_per_epoch
        epochs = -(-self.config.steps // per_epoch)
        return self.w_feat * (1 - ((step - 1) // per_epoch) / max(1, epochs - 1))

    def compute_losses(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(total loss, each term's KDTerms) of one micro-batch; gradients flow to the student."""
        config, family = self.config, self.family
        noisy = self.formulation.noisy(batch.x0, batch.noise, batch.timesteps)
        if config.channels_last and noisy.dim() == 4:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = self.formulation.target(batch.x0, batch.noise, batch.timesteps)
        inputs = ModelInputs(noisy, batch.timesteps, batch.cond or {})
        kd = self.objective.kind == "output" and config.w_kd > 0
        with self.accelerator.autocast():
            pred, variance = family.forward(self.forward_model, inputs)
            variance = variance if self.learn_variance else None
            teacher_pred = teacher_variance = None
            if kd or variance is not None or self.taps is not None:  # one teacher call serves all three
                with torch.no_grad():
                    teacher_pred, teacher_variance = family.forward(
                        self.teacher_forward, inputs.cast(next(self.teacher.parameters()).dtype))
        # Sum form (the authors'): task and output KD summed over each sample's elements.
        scale = pred[0].numel() if config.loss_reduction == "sum" else 1.0
        terms: dict[str, Any] = {}
        weighted: list[torch.Tensor] = []
        if config.w_task > 0:
            terms["task"] = task_loss(pred.float(), target)
            weighted.append(config.w_task * scale * terms["task"].loss)
        if kd:
            terms["kd"] = self.objective.output_fn(pred.float(), teacher_pred.float(), self.output_options)
            weighted.append(config.w_kd * scale * terms["kd"].loss)
        if variance is not None:
            weighted += self._variance_terms(terms, batch, noisy, pred, variance, teacher_pred, teacher_variance, kd)
        if self.taps is not None:
            reduction = config.loss_reduction
            terms["feature"] = feature_loss(
                self.taps.student_outputs(), self.taps.teacher_outputs(), self.adapters,
                mask_std=config.feature_mask_std, mask_by=config.feature_mask_by, element_reduction=reduction,
                layer_reduction="sum" if reduction == "sum" else config.feature_reduction)
            weighted.append(self.feature_weight(step) * terms["feature"].loss)
            self.taps.clear()
        total = sum(weighted[1:], weighted[0]) if weighted else torch.zeros((), device=noisy.device)
        return total, terms  # summed in order, as the terms were added

    def _variance_terms(self, terms, batch, noisy, pred, variance, teacher_pred, teacher_variance, kd
                        ) -> list[torch.Tensor]:
        """The learned variance: an MSE to the teacher's (weighted like KD when a KD objective
        runs), or the VLB (weighted like the task) plus a KL to the teacher's (like KD)."""
        config = self.config
        if config.variance_loss == "mse":
            terms["variance"] = task_loss(variance.float(), teacher_variance.float())
            return [(config.w_kd if kd else 1.0) * terms["variance"].loss]
        terms["vlb"], terms["variance_kl"] = learned_variance_terms(
            pred.float(), variance.float(), teacher_pred.float(), teacher_variance.float(), noisy.float(),
            batch.x0.float(), batch.timesteps, self.scheduler.betas, self.scheduler.alphas_cumprod)
        return [config.w_task * terms["vlb"].loss, config.w_kd * terms["variance_kl"].loss]

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step on one global batch: forward and backward per micro-batch,
        clip, step, schedule, EMA. Returns the loss and the logged values (device tensors)."""
        self.step += 1
        parts = self.config.gradient_accumulation_steps
        logs: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(batch.split(parts)):
            # Gradients are averaged over processes only on the last micro-batch (where
            # DeepSpeed also clips and steps, inside its backward).
            last = i == parts - 1
            self.accelerator.sync_gradients = last
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                total, terms = self.compute_losses(micro, self.step)
                # DeepSpeed divides by its own accumulation steps (the same number).
                self.accelerator.backward(total if self.engine == "zero2" else total / parts)
            for name, value in _flatten_logs(total, terms).items():
                logs[name] = logs.get(name, 0) + value / parts
        if self.accelerator.num_processes > 1 and self.adapters is not None:
            # The adapters sit outside the DDP-wrapped student: average their gradients here.
            for p in (p for p in self.adapters.parameters() if p.grad is not None):
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if self.config.grad_clip > 0:
            # DeepSpeed has clipped and stepped inside backward; it returns its norm as a float.
            norm = self.accelerator.clip_grad_norm_(self.params, self.config.grad_clip)
            logs["grad_norm"] = torch.as_tensor(norm, dtype=torch.float32, device=self.accelerator.device)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.accelerator.unwrap_model(self.model), self.step)
        self._watch(logs["loss"])
        return logs["loss"], logs

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, on_log: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Train from the current step to `config.steps`. Every `log_every` steps (and at
        the last) the mean values since the previous line go to `on_log`; every
        `checkpoints.every` steps a checkpoint is saved (never after a non-finite loss).
        Raises NonFiniteLoss when the loss stops being finite."""
        config = self.config
        clock, line = time.perf_counter(), {}
        while self.step < config.steps:
            _, logs = self.train_step(self.next_batch())
            self.accumulate(logs)
            if self.step % config.log_every == 0 or self.step == config.steps:
                now = time.perf_counter()
                line, clock = self.read_window(now - clock), now
                self.check_finite()
                on_log(line)
            every = config.checkpoint_every if self.checkpoints else 0
            if every and self.step % every == 0 and self.step < config.steps:
                self.check_finite()
                self.save_checkpoint()
        return line

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if any step so far had a NaN or infinite loss on any process
        (reads the GPU; a collective, so that every process stops at the same step, none left
        in the next step's all-reduce)."""
        steps = self._first_bad_step[None]
        if self.accelerator.num_processes > 1:
            steps = self.accelerator.gather(steps)
        bad = steps[steps > 0]
        if bad.numel():
            raise NonFiniteLoss(int(bad.min()))

    def _watch(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss was not finite, without waiting for the GPU."""
        bad = ~torch.isfinite(loss.detach())
        self._first_bad_step = torch.where(bad & (self._first_bad_step == 0), self.step, self._first_bad_step)

    # ---- logging ------------------------------------------------------------------------------
    def accumulate(self, logs: dict[str, torch.Tensor]) -> None:
        for name, value in logs.items():
            self._window[name] = self._window.get(name, 0) + value.detach().float()
        self._window_steps += 1

    def read_window(self, seconds: float) -> dict[str, Any]:
        """The log line for the steps since the last one: their mean values, read in one sync."""
        names = list(self._window)
        values = torch.stack([self._window[n] for n in names]).div(self._window_steps) if names else None
        if values is not None and self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")  # the global batch's, not one process's rows
        values = values.tolist() if values is not None else []
        line = {"step": self.step, "lr": self.lr_scheduler.get_last_lr()[0],
                "steps_per_s": self._window_steps / max(seconds, 1e-9)}
        line.update({n: (v if v == v and abs(v) != float("inf") else None) if n == "grad_norm" else v
                     for n, v in zip(names, values)})
        self._window, self._window_steps = {}, 0
        return line


def _flatten_logs(total: torch.Tensor, terms: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The values one log line shows: the total, each term's loss, and LIFT/PLACE's fit statistics."""
    out = {"loss": total.detach()}
    for name, term in terms.items():
        out[name] = term.loss.detach()
        out.update({key: term.logs[key] for key in LOGGED_FROM_TERMS if key in term.logs})
    return out
