"""The objectives as the authors compose them: output KD plus a feature term (NAME+feat),
their adapters, the sum form, per-model masks, the per-epoch feature decay, and the
learned variance's VLB + KL to the teacher. Each is pinned to a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difcompress.diffusion.inputs import ModelInputs
from difcompress.objectives import (
    FeatureAdapters,
    feature_loss,
    get_objective,
    place_loss,
    task_loss,
)
from difcompress.objectives.registry import objective_name
from difcompress.objectives.variance import learned_variance_terms, normal_kl, posterior

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_output_objective_comes_with_the_feature_term():
    for name in ("mse", "dist", "lift", "place"):
        composite = get_objective(f"{name}+feat")
        assert composite.kind == "output" and composite.with_features
        assert composite.output_fn is get_objective(name).output_fn
    assert objective_name("place", 1e-6) == "place+feat" and objective_name("place", 0.0) == "place"
    assert objective_name("place+feat", 0.5) == "place+feat" and objective_name("feature", 1.0) == "feature"


def test_the_authors_adapters_are_bias_free_uniform_and_present_at_equal_widths():
    adapters = FeatureAdapters([4, 8], [4, 16], bias=False, init_range=0.005, always=True)
    for layer in adapters.adapters:
        assert isinstance(layer, nn.Conv2d) and layer.bias is None
        assert layer.weight.abs().max() <= 0.005
    default = FeatureAdapters([4, 8], [4, 16])
    assert isinstance(default.adapters[0], nn.Identity) and default.adapters[1].bias is not None


def test_sum_form_feature_loss_sums_elements_per_sample_and_pairs():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    teacher = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    adapters = FeatureAdapters([3, 5], [3, 5])
    summed = feature_loss(student, teacher, adapters, element_reduction="sum", layer_reduction="sum").loss
    expected = sum(((s - t) ** 2).sum(dim=(1, 2, 3)).mean() for s, t in zip(student, teacher))
    torch.testing.assert_close(summed, expected)
    mean_of_means = feature_loss(student, teacher, adapters).loss
    torch.testing.assert_close(mean_of_means, sum(((s - t) ** 2).mean() for s, t in zip(student, teacher)) / 2)
    bk_sdm = feature_loss(student, teacher, adapters, layer_reduction="sum").loss
    torch.testing.assert_close(bk_sdm, sum(((s - t) ** 2).mean() for s, t in zip(student, teacher)))


def test_per_model_masks_use_each_features_own_statistics():
    s = torch.zeros(1, 1, 10, 10)
    t = torch.zeros(1, 1, 10, 10)
    s[0, 0, 0, 0] = 100.0  # a massive activation in the student only
    t[0, 0, 5, 5] = 100.0  # and one in the teacher only, elsewhere
    adapters = FeatureAdapters([1], [1])
    by_teacher = feature_loss([s], [t], adapters, mask_std=2.0).loss
    by_own = feature_loss([s], [t], adapters, mask_std=2.0, mask_by="own").loss
    assert by_teacher.item() == pytest.approx(100.0 ** 2 / 100)  # the student's outlier still counts
    assert by_own.item() == 0.0  # each masked by its own statistics: both outliers drop out


@pytest.fixture(scope="module")
def trainer_and_batch(pruned_dir):
    """A trainer in the authors' DDPM setting (place+feat, sum form, their adapters, every
    block hooked), on the tiny pruned U-Net, with one batch."""
    from accelerate import Accelerator

    from difcompress.builtin import builtin_data
    from difcompress.config import DistillConfig
    from difcompress.data.datasets import TrainingSet
    from difcompress.loading.models import load_model
    from difcompress.training.trainer import Trainer

    student = load_model(pruned_dir)
    teacher = load_model(student.manifest["teacher"])
    teacher.model.requires_grad_(False)
    config = DistillConfig(student=str(pruned_dir), output="unused", loss="place+feat", w_feat=1e-3,
                           loss_reduction="sum", feature_hooks="blocks", feature_adapter_bias=False,
                           feature_adapter_init=0.005, feature_adapter_always=True, batch_size=4, device="cpu",
                           antithetic=True)
    pairs = student.family.feature_layer_pairs(student.model, teacher.model, None, "blocks")
    trainer = Trainer(config, Accelerator(cpu=True), student.family, student.model, student.scheduler,
                      teacher.model, TrainingSet(builtin_data("digits", 16, 3)), feature_pairs=pairs)
    trainer.prepare()
    return trainer, trainer.next_batch()


def test_place_plus_feature_in_sum_form_matches_a_hand_computation(trainer_and_batch):
    trainer, batch = trainer_and_batch
    family, student, teacher = trainer.family, trainer.model, trainer.teacher
    assert all(isinstance(a, nn.Conv2d) and a.bias is None for a in trainer.adapters.adapters)
    total, terms = trainer.compute_losses(batch, step=1)

    # By hand: hook the same modules, run both models, and add the terms in the authors' units.
    names = [s for s, _ in trainer.taps.pairs]
    features = {"student": {}, "teacher": {}}
    handles = [m.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, side=side, n=n: features[side].__setitem__(n, out))
        for side, m in (("student", student), ("teacher", teacher)) for n in names]
    noisy = trainer.scheduler.add_noise(batch.x0, batch.noise, batch.timesteps)
    with torch.no_grad():
        pred = family.predict(student, ModelInputs(noisy, batch.timesteps))
        target = family.predict(teacher, ModelInputs(noisy, batch.timesteps))
    for h in handles:
        h.remove()
    elements = pred[0].numel()  # C * H * W
    task = ((pred - batch.noise) ** 2).mean()
    kd = place_loss(pred, target, group_size=16).loss
    feature = sum(((trainer.adapters(i, features["student"][n]) - features["teacher"][n]) ** 2)
                  .sum(dim=(1, 2, 3)).mean() for i, n in enumerate(names))
    expected = elements * (task + kd) + 1e-3 * feature
    torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert set(terms) == {"task", "kd", "feature"}
    assert len(names) > len(family.feature_layer_pairs(student, teacher, None))  # every block, not the stages


def test_antithetic_timesteps_come_in_pairs(trainer_and_batch):
    trainer, batch = trainer_and_batch
    last = trainer.scheduler.config.num_train_timesteps - 1
    t = batch.timesteps.tolist()
    assert t[2:] == [last - t[0], last - t[1]]


def test_epoch_linear_feature_weight_steps_down_once_per_epoch(trainer_and_batch):
    trainer, _ = trainer_and_batch
    config = trainer.config
    trainer.config = config.model_copy(update={"w_feat_schedule": "epoch-linear", "steps": 3 * 449})
    try:
        per_epoch = trainer.stream.batches_per_epoch  # 1797 digits // 4
        weights = [trainer.feature_weight(s) for s in (1, per_epoch, per_epoch + 1, 2 * per_epoch + 1)]
    finally:
        trainer.config = config
    assert weights == pytest.approx([1e-3, 1e-3, 0.5e-3, 0.0])


# ---- the learned variance: VLB + KL to the teacher ----------------------------------------------

def _schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return betas, torch.cumprod(1 - betas, 0)


def test_variance_terms_match_the_gaussian_formulas_by_hand():
    betas, cumprod = _schedule()
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(2, 1, 2, 2, generator=g) * 2 - 1, torch.randn(2, 1, 2, 2, generator=g)
    t = torch.tensor([10, 500])
    x_t = cumprod[t].sqrt().float().view(-1, 1, 1, 1) * x0 + (1 - cumprod[t]).sqrt().float().view(-1, 1, 1, 1) * noise
    eps_s, eps_t = noise + 0.1, noise - 0.05
    v_s = torch.full_like(x0, 0.2, requires_grad=True)
    v_t = torch.full_like(x0, -0.3)
    vlb, kl = learned_variance_terms(eps_s, v_s, eps_t, v_t, x_t, x0, t, betas, cumprod)

    def by_hand(i, eps, v):
        tt = int(t[i])
        ab, ab_prev, beta = cumprod[tt].item(), cumprod[tt - 1].item(), betas[tt].item()
        post_var = beta * (1 - ab_prev) / (1 - ab)
        x0_hat = (x_t[i] - math.sqrt(1 - ab) * eps[i]) / math.sqrt(ab)
        mean = beta * math.sqrt(ab_prev) / (1 - ab) * x0_hat + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * x_t[i]
        frac = (v[i] + 1) / 2
        return mean, frac * math.log(beta) + (1 - frac) * math.log(post_var), post_var

    vlb_expected, kl_expected = [], []
    for i in range(2):
        mean_s, log_var_s, post_var = by_hand(i, eps_s, v_s.detach())
        mean_t, log_var_t, _ = by_hand(i, eps_t, v_t)
        tt = int(t[i])
        true_mean = (betas[tt] * cumprod[tt - 1].sqrt() / (1 - cumprod[tt])).item() * x0[i] + \
            ((1 - cumprod[tt - 1]) * (1 - betas[tt]).sqrt() / (1 - cumprod[tt])).item() * x_t[i]
        true_log_var = torch.full_like(mean_s, math.log(post_var))
        vlb_expected.append(normal_kl(true_mean, true_log_var, mean_s, log_var_s).mean() / math.log(2))
        kl_expected.append(normal_kl(mean_t, log_var_t, mean_s, log_var_s).mean() / math.log(2))
    torch.testing.assert_close(vlb.loss.detach(), torch.stack(vlb_expected).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kl.loss.detach(), torch.stack(kl_expected).mean(), rtol=1e-4, atol=1e-6)
    (vlb.loss + kl.loss).backward()
    assert v_s.grad is not None and v_s.grad.abs().sum() > 0


def test_variance_terms_train_only_the_variance_and_vanish_for_a_perfect_student():
    betas, cumprod = _schedule()
    g = torch.Generator().manual_seed(4)
    x0, x_t = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    v = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([3, 200, 999])
    student_v = v.clone().requires_grad_(True)
    _, kl = learned_variance_terms(eps, student_v, eps.detach(), v, x_t, x0, t, betas, cumprod)
    assert kl.loss.item() == pytest.approx(0.0, abs=1e-7)  # same mean and variance: no divergence (float32)
    kl.loss.backward()
    assert eps.grad is None  # the mean is held fixed
    q = posterior(betas, cumprod)
    assert torch.isfinite(q["log_variance_clipped"]).all()


def test_the_decoder_term_is_used_at_t_zero():
    betas, cumprod = _schedule()
    x0 = torch.zeros(1, 1, 2, 2)
    eps = torch.zeros(1, 1, 2, 2)
    v = torch.zeros(1, 1, 2, 2, requires_grad=True)
    x_t = cumprod[0].sqrt().float() * x0
    vlb, kl = learned_variance_terms(eps, v, eps + 5.0, v.detach() + 0.5, x_t, x0, torch.tensor([0]), betas, cumprod)
    # At t = 0 both are the student's decoder NLL, whatever the teacher says.
    assert vlb.loss.item() == pytest.approx(kl.loss.item()) and vlb.loss.item() > 0


def test_task_loss_is_still_the_plain_mse():
    a, b = torch.ones(2, 2), torch.zeros(2, 2)
    assert task_loss(a, b).loss.item() == 1.0
