"""Tests for difcompress.objectives: the properties LIFT/PLACE must have (docs/method.md),
the baselines, feature KD and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difcompress.core.errors import UserError
from difcompress.objectives import (
    LOSS_NAMES,
    OBJECTIVES,
    FeatureAdapters,
    KDTerms,
    OutputOptions,
    affine_fit,
    coarse_term,
    dist_loss,
    feature_loss,
    fine_term,
    group_sizes,
    kd_loss,
    lift_loss,
    mse_loss,
    place_loss,
    task_loss,
)

GROUPED = {
    "lift": lambda s, t, **kw: lift_loss(s, t, **kw),
    "place": lambda s, t, **kw: place_loss(s, t, group_size=16, **kw),
}


def _pair(shape=(2, 3, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=dtype)
    s = t + 0.3 * torch.randn(shape, generator=g, dtype=dtype)
    return s, t


def _reference(s: torch.Tensor, t: torch.Tensor, G: int, norm="l2", eps=1e-4):
    """Naive per-group loop over the spec's formulas (float64). G=None means LIFT."""
    s = s.detach().double().flatten(2)
    t = t.detach().double().flatten(2)
    B, C, N = s.shape
    G = N if G is None else min(G, N)
    # Consecutive groups of G; a remainder of one position joins the group before it.
    starts = list(range(0, N, G))
    if N % G == 1 and len(starts) > 1:
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [N]))
    coarse, a_all, b_all, fine_all = [], [], [], []
    for i in range(B):
        for c in range(C):
            order = torch.argsort((t[i, c] - s[i, c]) ** 2)
            for start, end in bounds:
                idx = order[start:end]
                x, y = s[i, c, idx], t[i, c, idx]
                xc, yc = x - x.mean(), y - y.mean()
                a = (xc * yc).sum() / ((xc**2).sum() + eps)
                b = y.mean() - a * x.mean()
                if norm == "l2":
                    coarse.append(((a - 1) ** 2 + b**2).item())
                else:
                    coarse.append((abs(a - 1) + abs(b)).item())
                a_all.append(a.item())
                b_all.append(b.item())
                fine_all.extend(((a * x + b - y) ** 2).tolist())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    w = 1 - min(1.0, mean([abs(a - 1) for a in a_all]) + mean([abs(b) for b in b_all]))
    return {
        "loss": mean(coarse) + w * mean(fine_all),
        "coarse": mean(coarse),
        "fine": mean(fine_all),
        "w": w,
        "slope": mean(a_all),
        "intercept": mean(b_all),
        "num_groups": len(a_all),
    }


def _assert_logs_match(terms: KDTerms, ref: dict, rel=1e-6, abs_=1e-9):
    for key in ("loss", "coarse", "fine", "w", "slope", "intercept"):
        assert terms.floats()[key] == pytest.approx(ref[key], rel=rel, abs=abs_), key
    assert terms.loss.item() == pytest.approx(ref["loss"], rel=rel, abs=abs_)


# ----------------------------------------------------------------- the fit itself


def test_affine_fit_matches_least_squares():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 20, generator=g, dtype=torch.float64)
    t = 0.7 * s - 0.2 + 0.1 * torch.randn(3, 4, 20, generator=g, dtype=torch.float64)
    a, b = affine_fit(s, t, eps=0.0)
    design = torch.stack([s, torch.ones_like(s)], dim=-1)  # (3, 4, 20, 2)
    sol = torch.linalg.lstsq(design, t.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(a, sol[..., 0])
    torch.testing.assert_close(b, sol[..., 1])


def test_affine_fit_mask_ignores_invalid_elements():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 10, generator=g)
    t = torch.randn(2, 10, generator=g)
    mask = torch.arange(10) < 6
    a, b = affine_fit(s, t, mask=mask)
    a_ref, b_ref = affine_fit(s[:, :6], t[:, :6])
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)


# ----------------------------------------------------------------- identical outputs


@pytest.mark.parametrize("name", ["lift", "place"])
def test_identical_outputs_give_zero_loss_and_unit_weight(name):
    _, t = _pair()
    s = t.clone().requires_grad_(True)
    terms = GROUPED[name](s, t)
    assert terms.loss.item() < 1e-6
    assert terms.floats()["coarse"] < 1e-6
    assert terms.floats()["fine"] < 1e-6
    assert terms.floats()["w"] == pytest.approx(1.0, abs=1e-3)
    assert terms.floats()["slope"] == pytest.approx(1.0, abs=1e-3)
    assert terms.floats()["intercept"] == pytest.approx(0.0, abs=1e-3)


# ----------------------------------------------------------------- affine mismatch


@pytest.mark.parametrize("name", ["lift", "place"])
def test_a_pure_affine_mismatch_is_all_coarse(name):
    _, t = _pair()
    alpha, beta = 2.0, 0.5
    s = alpha * t + beta
    terms = GROUPED[name](s, t)
    assert terms.floats()["fine"] < 1e-6
    assert terms.floats()["coarse"] > 0.1
    # teacher = (s - beta) / alpha: slope 1/alpha, intercept -beta/alpha on every group
    assert terms.floats()["slope"] == pytest.approx(1 / alpha, abs=1e-3)
    assert terms.floats()["intercept"] == pytest.approx(-beta / alpha, abs=1e-3)
    # the same mismatch is large under plain output MSE: it was moved, not hidden
    assert mse_loss(s, t).floats()["loss"] > 0.1


# ----------------------------------------------------------------- fine term


def test_fine_term_with_identity_fit_is_squared_error():
    s, t = _pair()
    a = torch.ones(s.shape[:-1])
    b = torch.zeros(s.shape[:-1])
    torch.testing.assert_close(fine_term(s, t, a, b), (s - t) ** 2)


def test_identity_fit_on_real_groups_gives_mse():
    # t = s + r with r zero-mean and orthogonal to the centered student on each row:
    # the least-squares fit is then a = 1, b = 0 (up to eps) on every LIFT group.
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 64, generator=g, dtype=torch.float64)
    r = torch.randn(2, 3, 64, generator=g, dtype=torch.float64)
    sc = s - s.mean(-1, keepdim=True)
    r = r - r.mean(-1, keepdim=True)
    r = r - (r * sc).sum(-1, keepdim=True) / (sc * sc).sum(-1, keepdim=True) * sc
    t = s + r
    for terms in (lift_loss(s, t), place_loss(s, t, group_size=64)):
        assert terms.floats()["slope"] == pytest.approx(1.0, abs=1e-4)
        assert terms.floats()["intercept"] == pytest.approx(0.0, abs=1e-4)
        assert terms.floats()["fine"] == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-4)


# ----------------------------------------------------------------- adaptive weight


def test_weight_in_unit_interval_and_follows_formula():
    _, t = _pair()
    for scale, shift in [(1.0, 0.0), (1.25, 0.1), (0.9, -0.05), (4.0, 2.0), (-1.0, 0.0)]:
        for name in ("lift", "place"):
            terms = GROUPED[name](scale * t + shift, t)
            assert 0.0 <= terms.floats()["w"] <= 1.0
    # exact value: slope error |1/1.25 - 1| = 0.2, intercept error 0.1/1.25 = 0.08
    w = lift_loss(1.25 * t + 0.1, t).floats()["w"]
    assert w == pytest.approx(1 - 0.2 - 0.08, abs=1e-3)


@pytest.mark.parametrize("name", ["lift", "place"])
def test_weight_is_zero_when_coefficient_error_reaches_one(name):
    _, t = _pair()
    s = (t + 3.0).requires_grad_(True)  # intercept -3 on every group
    terms = GROUPED[name](s, t)
    assert terms.floats()["w"] == 0.0
    # with w = 0 the loss is the coarse term alone
    assert terms.loss.item() == pytest.approx(terms.floats()["coarse"], rel=1e-6)


# ----------------------------------------------------------------- PLACE vs LIFT


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 2, 5, 5), (1, 4, 12)])
def test_place_with_one_full_group_equals_lift(shape):
    s, t = _pair(shape, seed=4)
    n = math.prod(shape[2:])
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    lift = lift_loss(s1, t)
    place = place_loss(s2, t, group_size=n)
    lift.loss.backward()
    place.loss.backward()
    torch.testing.assert_close(place.loss, lift.loss, rtol=1e-5, atol=1e-7)
    for key in lift.logs:
        assert place.floats()[key] == pytest.approx(lift.floats()[key], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-8)
    # a group larger than H*W is one group too
    torch.testing.assert_close(place_loss(s, t, group_size=10 * n).loss, lift.loss)


# ----------------------------------------------------------------- gradients


def test_fine_term_sends_no_gradient_through_fit():
    s, t = _pair(dtype=torch.float64)
    s = s.requires_grad_(True)
    a, b = affine_fit(s, t)
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    fine_term(s, t, a, b).sum().backward()
    assert a.grad is None and b.grad is None
    expected = 2 * a.detach()[..., None] * (a.detach()[..., None] * s + b.detach()[..., None] - t)
    torch.testing.assert_close(s.grad, expected.detach())


@pytest.mark.parametrize("name", ["lift", "place"])
def test_total_gradient_is_coarse_plus_weighted_frozen_fit_residual(name):
    s0, t = _pair((2, 2, 8, 8), seed=5, dtype=torch.float64)
    s = s0.clone().requires_grad_(True)
    terms = GROUPED[name](s, t)
    terms.loss.backward()
    assert 0.0 < terms.floats()["w"] < 1.0  # both terms active

    # Rebuild the same groups by hand; fine gradient with a, b held constant.
    ref = s0.clone().requires_grad_(True)
    rows_s, rows_t = ref.flatten(2), t.flatten(2)
    G = rows_s.shape[-1] if name == "lift" else 16
    order = torch.argsort((rows_t - rows_s.detach()) ** 2, dim=-1)
    gs = torch.gather(rows_s, -1, order).unflatten(-1, (-1, G))
    gt = torch.gather(rows_t, -1, order).unflatten(-1, (-1, G))
    a, b = affine_fit(gs, gt)
    coarse = coarse_term(a, b).mean()
    with torch.no_grad():
        fine_frozen = ((a[..., None] * gs + b[..., None] - gt) ** 2).mean()
    fine_manual = (a.detach()[..., None] * gs + b.detach()[..., None] - gt) ** 2
    (coarse + terms.floats()["w"] * fine_manual.mean()).backward()
    torch.testing.assert_close(s.grad, ref.grad)
    assert terms.floats()["fine"] == pytest.approx(fine_frozen.item(), rel=1e-9)

    # If the fit were NOT stopped in the fine term, the gradient would differ.
    alt = s0.clone().requires_grad_(True)
    rows = alt.flatten(2)
    gs2 = torch.gather(rows, -1, order).unflatten(-1, (-1, G))
    a2, b2 = affine_fit(gs2, gt)
    leaky_fine = ((a2[..., None] * gs2 + b2[..., None] - gt) ** 2).mean()
    leaky = coarse_term(a2, b2).mean() + terms.floats()["w"] * leaky_fine
    leaky.backward()
    assert not torch.allclose(alt.grad, s.grad)


def test_coarse_term_sends_gradient_into_student():
    s, t = _pair((1, 2, 4, 4), seed=6, dtype=torch.float64)
    t = t.flatten(2)
    s = (1.5 * s.flatten(2) + 0.2).requires_grad_(True)

    def coarse_only(x):
        a, b = affine_fit(x, t)
        return coarse_term(a, b).mean()

    assert torch.autograd.gradcheck(coarse_only, (s,))
    coarse_only(s).backward()
    assert s.grad.abs().sum() > 1e-3
    # through lift_loss with w = 0, the only gradient is the coarse one and it is non-zero
    x = (t.unflatten(-1, (4, 4)) + 3.0).requires_grad_(True)
    terms = lift_loss(x, t.unflatten(-1, (4, 4)))
    assert terms.floats()["w"] == 0.0
    terms.loss.backward()
    assert x.grad.abs().sum() > 1e-3


def test_coarse_gradient_of_full_objective_gradcheck():
    # The whole loss is not a true gradient field (sg in the fine term, w without grad),
    # but with w = 0 it is the coarse term alone, which must be exact -- including the
    # masked statistics of a smaller last group (G=5 on 16 positions leaves 1 element).
    s, t = _pair((1, 2, 4, 4), seed=7, dtype=torch.float64)
    x = (0.5 * s + 3.0).requires_grad_(True)
    for G in (4, 5, 16):
        assert place_loss(x, t, group_size=G).floats()["w"] == 0.0
        assert torch.autograd.gradcheck(lambda y: place_loss(y, t, group_size=G).loss, (x,))
    assert torch.autograd.gradcheck(lambda y: lift_loss(y, t).loss, (x,))


# ----------------------------------------------------------------- cost


def test_one_batched_argsort_per_call(monkeypatch):
    calls = []
    real = torch.argsort

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "argsort", counting)
    s, t = _pair((3, 4, 8, 8))
    place_loss(s, t, group_size=16)
    assert len(calls) == 1
    assert tuple(calls[0]) == (3, 4, 64)  # all (sample, channel) rows in one call
    place_loss(s, t, group_size=5)  # irregular last group: still one
    assert len(calls) == 2
    lift_loss(s, t)  # LIFT needs no ranking
    assert len(calls) == 2


def test_no_parameters_no_state_teacher_untouched(monkeypatch):
    created = []
    original_new = nn.Parameter.__new__

    def counting_new(cls, data=None, requires_grad=True):
        created.append(cls)
        return original_new(cls, data, requires_grad)

    monkeypatch.setattr(nn.Parameter, "__new__", counting_new)
    nn.Linear(2, 2)  # the counter works
    assert created
    created.clear()

    s, t = _pair()
    s.requires_grad_(True)
    t.requires_grad_(True)  # even a teacher output that tracks grad gets none
    for name, objective in OBJECTIVES.items():
        if objective.output_fn is None:
            continue
        objective.output_fn(s, t, OutputOptions()).loss.backward()
        assert not isinstance(objective.output_fn, nn.Module), name
    assert created == []
    assert t.grad is None
    assert s.grad is not None


# ----------------------------------------------------------------- irregular last group


@pytest.mark.parametrize(
    "shape,G",
    [((2, 2, 5, 5), 16), ((2, 2, 7, 7), 4), ((1, 3, 10), 3), ((2, 2, 8, 8), 16)],
)
def test_place_irregular_last_group_matches_reference(shape, G):
    s, t = _pair(shape, seed=8, dtype=torch.float64)
    s = s.requires_grad_(True)
    terms = place_loss(s, t, group_size=G)
    ref = _reference(s, t, G)
    _assert_logs_match(terms, ref)
    terms.loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("shape,G", [((2, 2, 5, 5), 16), ((2, 2, 7, 7), 4)])
def test_place_irregular_float32_finite(shape, G):
    s, t = _pair(shape, seed=9)
    s = s.requires_grad_(True)
    terms = place_loss(s, t, group_size=G)
    assert torch.isfinite(terms.loss)
    assert all(math.isfinite(v) for v in terms.floats().values())
    terms.loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


def test_singleton_group_has_zero_slope_and_absorbing_intercept():
    s, t = _pair((1, 1, 7, 7), seed=10, dtype=torch.float64)
    a, b = affine_fit(s.flatten()[:1].view(1, 1), t.flatten()[:1].view(1, 1))
    assert a.item() == 0.0
    assert b.item() == pytest.approx(t.flatten()[0].item())


@pytest.mark.parametrize("n,G,sizes", [(49, 4, [4] * 11 + [5]), (17, 16, [17]), (50, 4, [4] * 12 + [2]),
                                       (64, 16, [16] * 4), (5, 16, [5]), (1, 16, [1])])
def test_a_remainder_of_one_joins_the_group_before_it(n, G, sizes):
    assert group_sizes(n, G) == sizes


@pytest.mark.parametrize("shape,G", [((1, 2, 7, 7), 4), ((2, 1, 17), 16), ((2, 2, 5, 5), 8)])
def test_identical_outputs_give_zero_loss_at_every_size(shape, G):
    """No one-element group (a = 0, b = t) can keep s == t from a zero loss."""
    _, t = _pair(shape, seed=21, dtype=torch.float64)
    terms = place_loss(t.clone(), t, group_size=G)
    assert terms.loss.item() < 1e-6
    assert terms.floats()["w"] == pytest.approx(1.0, abs=1e-3)
    _assert_logs_match(terms, _reference(t.clone(), t, G))


def test_lift_reference_and_3d_inputs():
    s, t = _pair((2, 3, 6, 6), seed=11, dtype=torch.float64)
    _assert_logs_match(lift_loss(s, t), _reference(s, t, None))
    # (B, C, N) inputs give the same as (B, C, H, W)
    torch.testing.assert_close(lift_loss(s.flatten(2), t.flatten(2)).loss, lift_loss(s, t).loss)
    torch.testing.assert_close(
        place_loss(s.flatten(2), t.flatten(2), group_size=8).loss,
        place_loss(s, t, group_size=8).loss,
    )


# ----------------------------------------------------------------- L1 option


@pytest.mark.parametrize("name,G", [("lift", None), ("place", 16), ("place", 7)])
def test_l1_coarse_norm(name, G):
    s, t = _pair((2, 2, 8, 8), seed=12, dtype=torch.float64)
    s = 1.3 * s - 0.2
    fn = lift_loss if name == "lift" else (lambda x, y, **kw: place_loss(x, y, group_size=G, **kw))
    l1 = fn(s, t, coarse_norm="l1")
    l2 = fn(s, t)
    _assert_logs_match(l1, _reference(s, t, G, norm="l1"))
    assert l1.floats()["coarse"] != pytest.approx(l2.floats()["coarse"], rel=1e-3)
    assert l1.floats()["w"] == pytest.approx(l2.floats()["w"])  # w does not depend on the norm


def test_bad_options_raise_user_error():
    s, t = _pair()
    with pytest.raises(UserError, match="coarse_norm"):
        lift_loss(s, t, coarse_norm="l3")
    with pytest.raises(UserError, match="group_size"):
        place_loss(s, t, group_size=0)
    with pytest.raises(UserError, match="shape"):
        lift_loss(s, t[:, :1])


# ----------------------------------------------------------------- precision / devices


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name", ["lift", "place", "mse", "dist"])
def test_bf16_autocast_computes_in_float32(device, name):
    s, t = _pair((2, 3, 8, 8), seed=13)
    s16 = s.to(device, torch.bfloat16).requires_grad_(True)
    t16 = t.to(device, torch.bfloat16)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        terms = kd_loss(name, s16, t16)
    assert terms.loss.dtype == torch.float32
    assert torch.isfinite(terms.loss)
    # same numbers as float32 math on the same (bf16-rounded) values
    ref = kd_loss(name, s16.detach().float().cpu(), t16.float().cpu())
    assert terms.loss.item() == pytest.approx(ref.loss.item(), rel=1e-4, abs=1e-6)
    terms.loss.backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()


# ----------------------------------------------------------------- baselines


def test_baselines_zero_for_identical_and_positive_otherwise():
    s, t = _pair()
    assert task_loss(t.clone(), t).loss.item() == 0.0
    assert mse_loss(t.clone(), t).loss.item() == 0.0
    assert dist_loss(t.clone(), t).loss.item() == pytest.approx(0.0, abs=1e-5)
    assert task_loss(s, t).loss.item() > 0.01
    assert mse_loss(s, t).loss.item() > 0.01
    assert dist_loss(s, t).loss.item() > 0.01
    torch.testing.assert_close(mse_loss(s, t).loss, ((s - t) ** 2).mean())

    adapters = FeatureAdapters([3, 5], [3, 5])
    feats = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    assert feature_loss([f.clone() for f in feats], feats, adapters).loss.item() == 0.0
    other = [f + 0.5 for f in feats]
    assert feature_loss(other, feats, adapters).loss.item() == pytest.approx(0.25)


def test_baselines_detach_teacher():
    s, t = _pair()
    s.requires_grad_(True)
    t.requires_grad_(True)
    for terms in (mse_loss(s, t), dist_loss(s, t), task_loss(s, t)):
        terms.loss.backward()
    assert t.grad is None


def test_dist_matches_definition():
    s, t = _pair((3, 2, 4, 4), seed=14, dtype=torch.float64)
    S, T = s.flatten(1), t.flatten(1)
    inter = torch.stack([1 - torch.corrcoef(torch.stack([S[i], T[i]]))[0, 1] for i in range(3)])
    intra = torch.stack(
        [1 - torch.corrcoef(torch.stack([S[:, j], T[:, j]]))[0, 1] for j in range(S.shape[1])]
    )
    terms = dist_loss(s, t, beta=0.7, gamma=2.0)
    assert terms.floats()["inter"] == pytest.approx(inter.mean().item(), rel=1e-6)
    assert terms.floats()["intra"] == pytest.approx(intra.mean().item(), rel=1e-6)
    assert terms.loss.item() == pytest.approx(0.7 * inter.mean().item() + 2.0 * intra.mean().item())
    # a single sample has no batch to correlate over
    one = dist_loss(s[:1], t[:1])
    assert one.floats()["intra"] == 0.0
    assert one.floats()["loss"] == pytest.approx(one.floats()["inter"])


def test_dist_invariant_to_positive_affine_student():
    s, t = _pair((4, 2, 4, 4), seed=15, dtype=torch.float64)
    base = dist_loss(s, t).loss.item()
    assert base > 0.01
    assert dist_loss(3.0 * s + 1.5, t).loss.item() == pytest.approx(base, rel=1e-6)
    assert dist_loss(0.2 * s - 4.0, t).loss.item() == pytest.approx(base, rel=1e-6)
    # a negative scale flips the correlation: not invariant
    assert dist_loss(-s, t).loss.item() > base + 0.5


# ----------------------------------------------------------------- feature KD


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_feature_adapters_train_when_widths_differ(kind):
    torch.manual_seed(16)
    adapters = FeatureAdapters([4, 6], [8, 6], kind=kind)
    assert isinstance(adapters.adapters[1], nn.Identity)
    assert isinstance(adapters.adapters[0], nn.Conv2d if kind == "conv" else nn.Linear)
    if kind == "conv":
        s_feats = [torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 6, 2, 2)]
        t_feats = [torch.randn(2, 8, 3, 3), torch.randn(2, 6, 2, 2)]
    else:
        s_feats = [torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 3, 6)]
        t_feats = [torch.randn(2, 5, 8), torch.randn(2, 3, 6)]
    t_feats[0].requires_grad_(True)
    terms = feature_loss(s_feats, t_feats, adapters)
    terms.loss.backward()
    params = list(adapters.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert s_feats[0].grad is not None and s_feats[0].grad.abs().sum() > 0
    assert t_feats[0].grad is None
    # mean over pairs of per-pair MSE
    with torch.no_grad():
        pair0 = ((adapters(0, s_feats[0]) - t_feats[0]) ** 2).mean()
        pair1 = ((s_feats[1] - t_feats[1]) ** 2).mean()
    assert terms.loss.item() == pytest.approx(((pair0 + pair1) / 2).item(), rel=1e-6)
    # a few adapter-only steps reduce the loss
    opt = torch.optim.SGD(adapters.parameters(), lr=0.1)
    before = terms.loss.item()
    for _ in range(20):
        opt.zero_grad()
        feature_loss(s_feats, t_feats, adapters).loss.backward()
        opt.step()
    assert feature_loss(s_feats, t_feats, adapters).loss.item() < before


def test_feature_mismatches_raise_user_error():
    with pytest.raises(UserError):
        FeatureAdapters([4, 6], [8])
    adapters = FeatureAdapters([4], [8])
    with pytest.raises(UserError):
        feature_loss([torch.randn(1, 4, 2, 2)], [torch.randn(1, 8, 3, 3)], adapters)
    with pytest.raises(UserError):
        feature_loss([], [], adapters)


# ----------------------------------------------------------------- registry


def test_registry_and_names():
    assert LOSS_NAMES == ("task", "mse", "feature", "dist", "lift", "place", "mse+feat", "dist+feat", "lift+feat",
                          "place+feat")
    assert {n for n, o in OBJECTIVES.items() if o.kind == "output" and not o.with_features} == {
        "mse", "dist", "lift", "place"}
    s, t = _pair((2, 2, 8, 8), seed=17)
    for name, fn in (("mse", mse_loss), ("dist", dist_loss), ("lift", lift_loss), ("place", place_loss)):
        torch.testing.assert_close(kd_loss(name, s, t).loss, fn(s, t).loss)


def test_kd_loss_unknown_or_non_output_name_raises_user_error():
    s, t = _pair()
    with pytest.raises(UserError, match="unknown loss 'fitnet'.*choose one of"):
        kd_loss("fitnet", s, t)
    with pytest.raises(UserError, match="not an output objective"):
        kd_loss("task", s, t)


def test_kd_loss_passes_the_options_each_objective_uses():
    s, t = _pair((2, 2, 8, 8), seed=18)
    options = OutputOptions(group_size=4, coarse_norm="l1", eps=1e-6)
    torch.testing.assert_close(kd_loss("mse", s, t, options).loss, mse_loss(s, t).loss)
    torch.testing.assert_close(kd_loss("lift", s, t, options).loss, lift_loss(s, t, coarse_norm="l1", eps=1e-6).loss)
    torch.testing.assert_close(kd_loss("place", s, t, options).loss,
                               place_loss(s, t, group_size=4, coarse_norm="l1", eps=1e-6).loss)
    assert kd_loss("place", s, t, options).loss.item() != pytest.approx(place_loss(s, t).loss.item())


# ---- masked feature KD (TinyFusion) ----------------------------------------------------------

def test_massive_activation_mask_flags_outliers_per_sample():
    from difcompress.objectives import massive_activation_mask

    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    x[0, 3, 5], x[1, 3, 5] = 100.0, 0.0  # a massive activation in sample 0 only, an ordinary value in 1
    keep = massive_activation_mask(x, 2.0)
    assert not keep[0, 3, 5] and keep[1, 3, 5]
    assert keep.float().mean() > 0.9  # ordinary elements stay


def test_masked_feature_loss_ignores_massive_activations():
    from difcompress.objectives import FeatureAdapters, feature_loss

    teacher = torch.randn(2, 16, 8)
    student = teacher.clone()
    teacher[0, 3, 5] = 100.0  # the student does not reproduce the outlier
    adapters = FeatureAdapters([8], [8], kind="linear")
    assert feature_loss([student], [teacher], adapters).loss > 1.0
    assert feature_loss([student], [teacher], adapters, mask_std=2.0).loss < 1e-12
