"""Training a learned variance (DiT's "learned range" channels) against the true posterior
and against the teacher's, as the LIFT/PLACE authors' TinyFusion setting does.

For a learned-range model the extra output channels ``v`` in [-1, 1] interpolate the log
variance of p(x_{t-1} | x_t) between the clipped posterior variance and beta_t (Nichol &
Dhariwal 2021). With the mean held fixed (stop-gradient on the epsilon prediction), two
terms train ``v``, both mean KLs over the sample's elements, in bits:

* ``vlb``: KL(q(x_{t-1} | x_t, x_0) || p_student), the usual variational bound term; at
  t = 0 the negative log likelihood of x_0 under the discretised Gaussian decoder;
* ``kl_to_teacher``: KL(p_teacher || p_student), the teacher's mean and variance against the
  student's (stop-gradient) mean and learned variance; at t = 0 the student's decoder NLL.

Pure tensor functions of the schedule (``betas``, ``alphas_cumprod``), no model code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difcompress.objectives.core import KDTerms

LN2 = math.log(2.0)


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] broadcast over a batch shaped like `like`."""
    return values.to(like.device, torch.float64)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def posterior(betas: Tensor, alphas_cumprod: Tensor) -> dict[str, Tensor]:
    """The coefficients of q(x_{t-1} | x_t, x_0) for every t (float64)."""
    betas, cumprod = betas.double(), alphas_cumprod.double()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    variance = betas * (1 - previous) / (1 - cumprod)
    return {
        "log_variance_clipped": torch.log(torch.cat([variance[1:2], variance[1:]])),
        "log_beta": torch.log(betas),
        "mean_coef_x0": betas * previous.sqrt() / (1 - cumprod),
        "mean_coef_xt": (1 - previous) * (1 - betas).sqrt() / (1 - cumprod),
        "recip_sqrt_cumprod": (1 / cumprod).sqrt(),
        "recipm1_sqrt_cumprod": (1 / cumprod - 1).sqrt(),
    }


def model_distribution(eps: Tensor, v: Tensor, x_t: Tensor, t: Tensor, q: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(mean, log variance) of p(x_{t-1} | x_t) for an epsilon prediction with learned range."""
    x0 = _at(q["recip_sqrt_cumprod"], t, x_t) * x_t - _at(q["recipm1_sqrt_cumprod"], t, x_t) * eps
    mean = _at(q["mean_coef_x0"], t, x_t) * x0 + _at(q["mean_coef_xt"], t, x_t) * x_t
    frac = (v + 1) / 2
    log_variance = frac * _at(q["log_beta"], t, x_t) + (1 - frac) * _at(q["log_variance_clipped"], t, x_t)
    return mean, log_variance


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2).square() * torch.exp(-log_var2))


def _standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def decoder_nll(x0: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """Negative log likelihood of x0 (in [-1, 1], 256 levels) under a discretised Gaussian."""
    centered = x0 - mean
    inv_std = torch.exp(-0.5 * log_variance)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x0 < -0.999, log_cdf_plus, torch.where(x0 > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def _per_sample_bits(kl: Tensor, nll: Tensor, t: Tensor) -> Tensor:
    """Mean over each sample's elements, in bits; the decoder NLL where t = 0."""
    kl, nll = kl.flatten(1).mean(1) / LN2, nll.flatten(1).mean(1) / LN2
    return torch.where(t == 0, nll, kl)


def learned_variance_terms(eps_student: Tensor, v_student: Tensor, eps_teacher: Tensor, v_teacher: Tensor,
                           x_t: Tensor, x0: Tensor, t: Tensor, betas: Tensor, alphas_cumprod: Tensor
                           ) -> tuple[KDTerms, KDTerms]:
    """(vlb, kl_to_teacher): batch means of the two terms; gradients reach only `v_student`."""
    q = posterior(betas, alphas_cumprod)
    dtype = torch.promote_types(v_student.dtype, torch.float32)
    x_t, x0 = x_t.to(dtype), x0.to(dtype)
    mean_s, log_var_s = model_distribution(eps_student.detach().to(dtype), v_student.to(dtype), x_t, t, q)
    mean_t, log_var_t = model_distribution(eps_teacher.detach().to(dtype), v_teacher.detach().to(dtype), x_t, t, q)
    true_mean = _at(q["mean_coef_x0"], t, x_t) * x0 + _at(q["mean_coef_xt"], t, x_t) * x_t
    true_log_var = _at(q["log_variance_clipped"], t, x_t)
    nll = decoder_nll(x0, mean_s, log_var_s)
    vlb = _per_sample_bits(normal_kl(true_mean, true_log_var.expand_as(true_mean), mean_s, log_var_s), nll, t).mean()
    kd = _per_sample_bits(normal_kl(mean_t, log_var_t, mean_s, log_var_s), nll, t).mean()
    return KDTerms(vlb, {"loss": vlb.detach()}), KDTerms(kd, {"loss": kd.detach()})
