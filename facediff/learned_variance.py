"""Improved DDPM's learned variances (Nichol & Dhariwal 2021): the UNet also outputs v in [-1, 1], the reverse step's
log-variance `v' log beta_t + (1 - v') log betatilde_t` with v' = (v + 1) / 2 (diffusers' `learned_range`), trained by
the variational bound's term at each t, weighted beside the document's noise regression (the hybrid loss)."""

import functools
import math

import torch

from .pipelines import FaceDiffScheduler

# Improved DDPM's weight of the bound in L_hybrid = L_simple + lambda L_vlb.
VLB_WEIGHT = 1e-3


def variational_bound(
    scheduler: FaceDiffScheduler,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    prediction: torch.Tensor,
    prediction_type: str,
    variance_output: torch.Tensor,
) -> torch.Tensor:
    """
    Each sample's term of the variational bound, in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
    for t > 0, and the decoder's discretized Gaussian negative log-likelihood of x_0 at t = 0.

    The model's mean comes from its `prediction`, which the caller detaches so that this term trains the variance
    only, as in Improved DDPM.

    Args:
        scheduler (`FaceDiffScheduler`):
            The training schedule.
        clean (`torch.Tensor`):
            x_0, in [-1, 1].
        noisy (`torch.Tensor`):
            x_t, formed from `clean` by (3).
        timesteps (`torch.Tensor`):
            t per sample, in [0, T-1].
        prediction (`torch.Tensor`):
            The model's prediction at (x_t, t), of `prediction_type`.
        prediction_type (`str`):
            `"epsilon"`, `"v_prediction"` or `"sample"`.
        variance_output (`torch.Tensor`):
            The model's v, of `clean`'s shape.

    Returns:
        `torch.Tensor`: one value per sample.
    """
    table = _posterior_table(scheduler, clean.device)
    shape = (-1,) + (1,) * (clean.ndim - 1)
    columns = (column[timesteps].reshape(shape) for column in table)
    mean_from_original, mean_from_noisy, log_variance, log_beta, signal, noise = columns
    prediction = prediction.float()
    if prediction_type == "epsilon":
        pred_original_sample = (noisy - noise * prediction) / signal
    elif prediction_type == "v_prediction":
        pred_original_sample = signal * noisy - noise * prediction
    else:
        pred_original_sample = prediction
    true_mean = mean_from_original * clean + mean_from_noisy * noisy
    model_mean = mean_from_original * pred_original_sample + mean_from_noisy * noisy
    fraction = (variance_output.float() + 1) / 2
    model_log_variance = fraction * log_beta + (1 - fraction) * log_variance

    kl = 0.5 * (
        -1.0
        + model_log_variance
        - log_variance
        + torch.exp(log_variance - model_log_variance)
        + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance)
    )
    decoder_nll = -_discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_variance)
    terms = torch.where(timesteps.reshape(shape) == 0, decoder_nll, kl)
    return terms.flatten(1).mean(dim=1) / math.log(2.0)


@functools.lru_cache(maxsize=8)  # once per run and device: a fresh copy to a GPU at every step would wait for it
def _posterior_table(scheduler: FaceDiffScheduler, device: torch.device) -> torch.Tensor:
    """Per t, in float32 from the float64 schedule: the posterior mean's coefficients of x_0 and x_t, its log-variance
    (at t = 0, where it is 0, that of t = 1, as Improved DDPM clips it), log beta_t, sqrt(alphabar_t) and
    sqrt(1 - alphabar_t)."""
    alphas_cumprod = scheduler.alphas_cumprod
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    betas = scheduler.betas
    variance = betas * (1 - previous) / (1 - alphas_cumprod)
    log_variance = torch.log(torch.cat([variance[1:2], variance[1:]]))
    return torch.stack(
        [
            betas * previous.sqrt() / (1 - alphas_cumprod),
            (1 - betas).sqrt() * (1 - previous) / (1 - alphas_cumprod),
            log_variance,
            torch.log(betas),
            alphas_cumprod.sqrt(),
            (1 - alphas_cumprod).sqrt(),
        ]
    ).to(device=device, dtype=torch.float32)


def _discretized_gaussian_log_likelihood(
    image: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(image) under N(mean, exp(log_scale)^2) integrated over each of the 256 pixel bins of [-1, 1], the end
    bins open (Ho et al. 2020, eq. 13)."""
    centered = image - mean
    inverse_scale = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inverse_scale * (centered + 1 / 255))
    cdf_min = _standard_normal_cdf(inverse_scale * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(image < -0.999, log_cdf_plus, torch.where(image > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
