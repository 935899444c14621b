"""FaceDiffScheduler as a superset of diffusers' DDPMScheduler: every config key with its behaviour, learned
variances, diffusers' timestep spacings and typing, each against DDPMScheduler itself."""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from facediff import FaceDiffPipeline, FaceDiffScheduler

from .conftest import one_level_unet


def fake_model(channels: int, learned: str | None = None):
    """A smooth function of (x_t, t) standing in for a UNet; with a learned variance, also its variance output:
    v in [-1, 1] for learned_range, a positive variance for learned."""

    def model(sample: torch.Tensor, t: int) -> torch.Tensor:
        scale = 1 + int(t) / 1000
        prediction = torch.tanh(0.7 * sample * scale) + 0.05 * sample.roll(1, dims=-1)
        if learned == "learned_range":
            return torch.cat([prediction, torch.tanh(sample.mean(dim=1, keepdim=True) * scale).expand_as(sample)], 1)
        if learned == "learned":
            return torch.cat([prediction, 1e-3 * torch.sigmoid(sample) * scale], 1)
        return prediction

    return model


def as_saved(config) -> dict:
    """A scheduler config as save_config writes it: diffusers' in-memory `_use_default_values` (the keys left at
    their defaults, which from_config of another class replaces with its own defaults) is not saved."""
    return {key: value for key, value in config.items() if key != "_use_default_values"}


DDPM_CONFIGS = [
    pytest.param({}, id="DDPMScheduler's defaults: fixed_small, clip_sample, leading"),
    pytest.param({"variance_type": "fixed_large", "clip_sample": False}, id="the document's update"),
    pytest.param({"variance_type": "fixed_small_log"}, id="fixed_small_log"),
    pytest.param({"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}, id="thresholding"),
    pytest.param({"trained_betas": torch.linspace(2e-4, 0.03, 1000).tolist()}, id="trained_betas"),
    pytest.param({"beta_schedule": "scaled_linear", "beta_end": 0.012, "beta_start": 8.5e-4}, id="scaled_linear"),
    pytest.param({"beta_schedule": "sigmoid"}, id="sigmoid"),
    pytest.param({"beta_schedule": "squaredcos_cap_v2"}, id="cosine"),
    pytest.param(
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "linspace"},
        id="zero terminal SNR, v-prediction",
    ),
    pytest.param({"timestep_spacing": "leading", "steps_offset": 1}, id="leading, steps_offset"),
    pytest.param({"prediction_type": "sample", "clip_sample_range": 0.8}, id="sample prediction"),
    pytest.param({"variance_type": "learned_range"}, id="learned_range"),
    pytest.param({"variance_type": "learned", "clip_sample": False}, id="learned"),
]


@pytest.mark.parametrize("config", DDPM_CONFIGS)
@pytest.mark.parametrize("num_inference_steps", [None, 20])
def test_each_step_matches_ddpm_scheduler(config, num_inference_steps):
    # The same x_t, model output and noise into both schedulers at every step of the chain, following diffusers'
    # trajectory; ours keeps its schedule in float64, so they agree to float32 rounding.
    stock = DDPMScheduler(**config)
    ours = FaceDiffScheduler.from_config(as_saved(stock.config))
    if num_inference_steps is not None:  # else both run the full chain T-1, ..., 0
        stock.set_timesteps(num_inference_steps)
    ours.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == stock.timesteps.tolist()
    if stock.timesteps[-1] != 0:
        pytest.skip("a chain that ends above t = 0: DDPMScheduler adds noise at its last step, the document does not")
    model = fake_model(2, config.get("variance_type") if "learned" in config.get("variance_type", "") else None)
    sample = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in stock.timesteps:
        output = model(sample, t)
        expected = stock.step(output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        result = ours.step(output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(result.pred_original_sample, expected.pred_original_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.prev_sample, expected.prev_sample, rtol=1e-4, atol=1e-4)
        sample = expected.prev_sample


def test_a_ddpm_scheduler_config_keeps_every_key():
    stock = DDPMScheduler(thresholding=True, timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True)
    ours, unused = FaceDiffScheduler.from_config(as_saved(stock.config), return_unused_kwargs=True)
    assert unused == {}
    assert {key: ours.config[key] for key in stock.config if not key.startswith("_")} == {
        key: value for key, value in stock.config.items() if not key.startswith("_")
    }


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_inference_steps", [1, 3, 7, 10, 25, 333, 999, 1000])
def test_timestep_spacings_are_diffusers(spacing, num_inference_steps):
    offset = 1 if spacing == "leading" and num_inference_steps < 1000 else 0
    stock = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ours = FaceDiffScheduler(timestep_spacing=spacing, steps_offset=offset)
    stock.set_timesteps(num_inference_steps)
    ours.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == stock.timesteps.tolist()


def test_previous_timestep_is_typed_as_diffusers():
    stock, ours = DDPMScheduler(), FaceDiffScheduler()
    assert ours.previous_timestep(5) == stock.previous_timestep(5) == 4 and isinstance(ours.previous_timestep(5), int)
    stock.set_timesteps(10)
    ours.set_timesteps(timesteps=stock.timesteps.tolist())
    for t in stock.timesteps:
        expected, result = stock.previous_timestep(t), ours.previous_timestep(t)
        assert isinstance(result, torch.Tensor) and result.dtype == expected.dtype and result == expected


def test_a_learned_range_model_samples_as_in_ddpm_pipeline():
    # A UNet with twice the channels out: the noise prediction, then v. (An untrained UNet's raw output is no
    # variance for "learned", which takes its square root: the step test above covers that type.)
    torch.manual_seed(0)
    template = one_level_unet()
    unet = UNet2DModel(**{**template.config, "out_channels": 2})
    stock = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="learned_range", clip_sample=False))
    ours = FaceDiffPipeline(unet=unet, scheduler=FaceDiffScheduler.from_config(as_saved(stock.scheduler.config)))
    for pipeline in (stock, ours):
        pipeline.set_progress_bar_config(disable=True)
    expected = stock(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=50, output_type="np")
    images = ours(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=50, output_type="np")
    assert images.images.shape == (2, 8, 8, 1)
    assert abs(images.images - expected.images).max() < 1e-4


def test_a_ddpm_pipeline_config_samples_as_ddpm_pipeline(tmp_path):
    # DDPMScheduler's defaults (fixed_small, clip_sample, leading spacing) saved as diffusers saves them, loaded.
    torch.manual_seed(0)
    DDPMScheduler().save_pretrained(tmp_path)
    unet = one_level_unet()
    stock = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(tmp_path))
    ours = FaceDiffPipeline(unet=unet, scheduler=FaceDiffScheduler.from_pretrained(tmp_path))
    for pipeline in (stock, ours):
        pipeline.set_progress_bar_config(disable=True)
    for steps in (1000, 25):
        expected = stock(batch_size=2, generator=torch.Generator().manual_seed(2), num_inference_steps=steps).images
        images = ours(batch_size=2, generator=torch.Generator().manual_seed(2), num_inference_steps=steps).images
        for a, b in zip(images, expected, strict=True):
            assert abs(torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))).max() <= 1


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"variance_type": "fixed_large_log"}, "variance_type must be one of"),
        ({"timestep_spacing": "even"}, "timestep_spacing must be one of linspace, leading, trailing"),
        ({"trained_betas": [0.1, 0.2]}, r"trained_betas must hold num_train_timesteps \(1000\) values in \(0, 1\]"),
    ],
)
def test_invalid_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        FaceDiffScheduler(**config)


def test_a_learned_variance_needs_the_variance_output():
    scheduler = FaceDiffScheduler(variance_type="learned_range")
    sample = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"twice the channels with a learned variance_type"):
        scheduler.step(torch.zeros(1, 3, 4, 4), 10, sample)
    with pytest.raises(ValueError, match=r"needs the model's variance output: a UNet with twice the sample's channels"):
        scheduler.step(torch.zeros(1, 1, 4, 4), 10, sample)


def test_steps_offset_past_the_chain_is_refused():
    with pytest.raises(ValueError, match="steps_offset 1 puts the first of 1000 steps at 1000"):
        FaceDiffScheduler(timestep_spacing="leading", steps_offset=1).set_timesteps(1000)


def test_a_fixed_variance_samples_a_learned_variance_model_with_its_own():
    # The variance output is ignored: the same step as with the prediction alone.
    scheduler = FaceDiffScheduler()
    sample, prediction = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    with_variance = torch.cat([prediction, torch.rand(2, 1, 4, 4)], dim=1)
    noise = torch.randn(2, 1, 4, 4)
    expected = scheduler.step(prediction, 500, sample, variance_noise=noise).prev_sample
    torch.testing.assert_close(scheduler.step(with_variance, 500, sample, variance_noise=noise).prev_sample, expected)
