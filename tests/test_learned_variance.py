"""Learned variances (Improved DDPM's hybrid loss): the variational bound against distributions computed from
diffusers' DDPMScheduler and torch.distributions, and a training run that learns and samples with them."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch.distributions import Normal, kl_divergence

from facediff import FaceDiffPipeline, FaceDiffScheduler, training
from facediff.learned_variance import variational_bound
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, TINY_GRAY_UNET, tiny_run, tiny_unet_config


def posterior_mean(scheduler: DDPMScheduler, eps: torch.Tensor, t: int, noisy: torch.Tensor) -> torch.Tensor:
    """diffusers' posterior mean of x_{t-1}: its step, less the noise it added (drawn again from the same seed)."""
    stepped = scheduler.step(eps, t, noisy, generator=torch.Generator().manual_seed(t)).prev_sample
    noise = randn_tensor(noisy.shape, generator=torch.Generator().manual_seed(t), dtype=noisy.dtype)
    return stepped - scheduler._get_variance(t).sqrt() * noise


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_the_bound_is_the_kl_between_diffusers_posterior_and_the_model(t):
    generator = torch.Generator().manual_seed(t)
    clean = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    true_noise = torch.randn(clean.shape, generator=generator)
    predicted_noise = true_noise + 0.3 * torch.randn(clean.shape, generator=generator)
    v = torch.rand(clean.shape, generator=generator) * 2 - 1
    timesteps = torch.full((3,), t)
    ours = FaceDiffScheduler()
    noisy = ours.add_noise(clean, true_noise, timesteps)

    fixed_small = DDPMScheduler(variance_type="fixed_small", clip_sample=False)
    true_mean = posterior_mean(fixed_small, true_noise, t, noisy)  # the posterior's mean, x_0 known
    model_mean = posterior_mean(fixed_small, predicted_noise, t, noisy)
    learned = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    model_log_variance = learned._get_variance(t, predicted_variance=v)
    expected = kl_divergence(
        Normal(true_mean.double(), fixed_small._get_variance(t).double().sqrt()),
        Normal(model_mean.double(), model_log_variance.double().mul(0.5).exp()),
    )
    expected = expected.flatten(1).mean(1) / math.log(2)

    bound = variational_bound(ours, clean, noisy, timesteps, predicted_noise, "epsilon", v)
    torch.testing.assert_close(bound.double(), expected, rtol=2e-3, atol=1e-6)


def test_the_bound_at_t_0_is_the_decoders_discretized_likelihood():
    generator = torch.Generator().manual_seed(0)
    clean = (torch.randint(1, 255, (2, 1, 4, 4), generator=generator).float() / 127.5) - 1  # no edge bins
    eps = torch.randn(clean.shape, generator=generator)
    v = torch.rand(clean.shape, generator=generator) * 2 - 1
    timesteps = torch.zeros(2, dtype=torch.long)
    ours = FaceDiffScheduler()
    noisy = ours.add_noise(clean, eps, timesteps)
    predicted = eps + 0.5 * torch.randn(clean.shape, generator=generator)

    # At t = 0 the model's mean is its x_0; its log-variance lies between beta_1's posterior variance (Improved
    # DDPM's clip: at t = 0 the posterior's is 0) and log beta_0.
    alphabar = ours.alphas_cumprod[0].item()
    mean = (noisy - math.sqrt(1 - alphabar) * predicted) / math.sqrt(alphabar)
    betas, alphas_cumprod = ours.betas, ours.alphas_cumprod
    low = math.log(betas[1].item() * (1 - alphas_cumprod[0].item()) / (1 - alphas_cumprod[1].item()))
    log_variance = (v + 1) / 2 * math.log(betas[0].item()) + (1 - v) / 2 * low
    normal = Normal(mean.double(), log_variance.double().mul(0.5).exp())
    probability = normal.cdf(clean.double() + 1 / 255) - normal.cdf(clean.double() - 1 / 255)
    expected = -probability.clamp(min=1e-12).log().flatten(1).mean(1) / math.log(2)

    bound = variational_bound(ours, clean, noisy, timesteps, predicted, "epsilon", v)
    torch.testing.assert_close(bound.double(), expected, rtol=1e-2, atol=1e-3)


def test_a_run_with_learned_variances_trains_them_and_samples_with_them(tmp_path):
    output = tmp_path / "learned"
    train(
        parse_training_arguments(tiny_run(output, "--train_data_dir", str(FACES), "--variance_type", "learned_range"))
    )
    pipeline = FaceDiffPipeline.from_pretrained(output)
    assert pipeline.unet.config.out_channels == 2 and pipeline.scheduler.config.variance_type == "learned_range"
    images = pipeline(batch_size=2, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and torch.isfinite(torch.from_numpy(images)).all()
    assert "the model's, learned between the posterior's and sqrt(beta_t)" in (output / "README.md").read_text()


def test_learned_variances_are_refused_with_a_base(tmp_path):
    with pytest.raises(ValueError, match="--variance_type learned_range needs a UNet with a variance output"):
        parse_training_arguments(["--pretrained_model_name_or_path", str(tmp_path), "--variance_type", "learned_range"])


def test_the_bound_alone_trains_the_variance_output(monkeypatch):
    # Improved DDPM's stop-gradient: the bound's gradient reaches the variance output (the second half of the last
    # convolution's filters) and not the prediction, which L_simple alone trains.
    args = parse_training_arguments(
        ["--variance_type", "learned_range", "--model_config_name_or_path", str(TINY_GRAY_UNET)]
    )
    torch.manual_seed(0)
    unet = UNet2DModel(**{**tiny_unet_config(1), "out_channels": 2})
    pixels = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    scheduler = FaceDiffScheduler(variance_type="learned_range")

    def gradient() -> torch.Tensor:
        unet.zero_grad()
        torch.manual_seed(1)  # the same t and noise in both calls
        training._diffusion_loss(unet, scheduler, pixels, args).backward()
        return unet.conv_out.weight.grad.clone()

    hybrid = gradient()
    monkeypatch.setattr(training, "variational_bound", lambda *inputs: torch.zeros(4))
    simple = gradient()
    assert hybrid[1].abs().sum() > 0 and simple[1].abs().sum() == 0
    torch.testing.assert_close(hybrid[0], simple[0])
