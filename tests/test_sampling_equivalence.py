"""Sampling gives diffusers' images: FaceDiffPipeline against DDPMPipeline, and the memory-format speed option."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

from facediff import FaceDiffPipeline, FaceDiffScheduler

from .conftest import one_level_unet


@pytest.mark.parametrize(
    "sampler",
    [
        {"variance_type": "fixed_large", "clip_sample": False},  # the document's update
        {"variance_type": "fixed_small", "clip_sample": True},  # DDPMPipeline's defaults: x_0 clipped
    ],
)
def test_full_chain_matches_diffusers_ddpm_pipeline(sampler):
    # Both draw x_T and every step's noise from the generator in the same order, so the images agree up to float
    # rounding. Any UNet shows it, and the smallest keeps the 1000-step calls fast; untrained, its x_0 predictions
    # leave [-1, 1], so clipping changes the images.
    torch.manual_seed(0)
    unet = one_level_unet()
    stock = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, **sampler))
    ours = FaceDiffPipeline(unet=unet, scheduler=FaceDiffScheduler(**sampler))
    stock.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)

    expected = stock(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    images = ours(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="np").images

    assert len(ours.scheduler.timesteps) == 1000  # the default is the full chain
    assert images.shape == expected.shape == (2, 8, 8, 1)
    assert abs(images - expected).max() < 2e-3
    assert abs(images - expected).mean() < 1e-4
    if sampler["clip_sample"]:
        ours.scheduler = FaceDiffScheduler.from_config(ours.scheduler.config, clip_sample=False)
        unclipped = ours(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="np").images
        assert abs(unclipped - expected).max() > 0.05


@pytest.mark.parametrize(
    "scheduler_class,num_train_timesteps,num_inference_steps",
    [(DDPMScheduler, 50, None), (DDIMScheduler, 50, None), (DPMSolverMultistepScheduler, 1000, 10)],
)
def test_a_compatible_diffusers_scheduler_samples_as_in_ddpm_pipeline(
    gray_pipeline, scheduler_class, num_train_timesteps, num_inference_steps
):
    # The usual diffusers swap, made from our scheduler's config; DDPMPipeline runs the same scheduler on the same
    # UNet. A 50-step chain keeps the default call (num_inference_steps=None: the full chain) cheap; DPMSolver
    # needs the full-length schedule to reach t = 0 (it gives NaN on a 50-step one, in DDPMPipeline too).
    ours = FaceDiffScheduler(num_train_timesteps=num_train_timesteps)
    assert scheduler_class in ours.compatibles
    gray_pipeline.scheduler = scheduler_class.from_config(ours.config)
    stock = DDPMPipeline(unet=gray_pipeline.unet, scheduler=scheduler_class.from_config(ours.config))
    stock.set_progress_bar_config(disable=True)
    gray_pipeline.set_progress_bar_config(disable=True)

    generator = torch.Generator().manual_seed(5)
    steps = num_inference_steps or num_train_timesteps
    expected = stock(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np").images
    generator = torch.Generator().manual_seed(5)
    images = gray_pipeline(
        batch_size=2,
        generator=generator,
        num_inference_steps=num_inference_steps,
        output_type="np",
        memory_format=torch.contiguous_format,
    ).images

    assert len(gray_pipeline.scheduler.timesteps) == steps
    assert np.isfinite(images).all() and abs(images - expected).max() < 1e-4


def test_channels_last_gives_the_same_images(gray_pipeline, rgb_pipeline):
    for pipeline in (gray_pipeline, rgb_pipeline):
        pipeline.set_progress_bar_config(disable=True)
        runs = {}
        for memory_format in (torch.channels_last, torch.contiguous_format):
            generator = torch.Generator().manual_seed(0)
            runs[memory_format] = pipeline(
                batch_size=3, generator=generator, num_inference_steps=10, output_type="pt", memory_format=memory_format
            ).images
        torch.testing.assert_close(runs[torch.channels_last], runs[torch.contiguous_format], atol=1e-3, rtol=0)
        # Equal up to float rounding (oneDNN sums in another order); the tensor returned is in the ordinary layout.
        assert runs[torch.channels_last].is_contiguous()


def test_sampling_leaves_the_unet_layout_as_it_was(gray_pipeline):
    # A model being trained is sampled from for its sample grids: its weights must compute afterwards exactly as
    # before, or a resumed run would drift from an uninterrupted one.
    gray_pipeline.set_progress_bar_config(disable=True)
    conv_weight = gray_pipeline.unet.down_blocks[0].resnets[0].conv1.weight
    for layout in (torch.contiguous_format, torch.channels_last):
        gray_pipeline.unet.to(memory_format=layout)
        for memory_format in (torch.channels_last, torch.contiguous_format):
            gray_pipeline(num_inference_steps=2, output_type="pt", memory_format=memory_format)
            for parameter in gray_pipeline.unet.parameters():
                assert parameter.dim() != 4 or parameter.is_contiguous(memory_format=layout)
            weight = gray_pipeline.unet.down_blocks[0].resnets[0].conv1.weight
            assert weight.is_contiguous() == (layout == torch.contiguous_format)
    torch.testing.assert_close(weight, conv_weight, rtol=0, atol=0)


def test_default_layout_is_channels_last_on_a_cpu(rgb_pipeline):
    rgb_pipeline.set_progress_bar_config(disable=True)
    seen = []
    rgb_pipeline.unet.conv_in.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    rgb_pipeline(batch_size=2, num_inference_steps=3, output_type="pt")
    assert seen == [True, True, True]
    rgb_pipeline(batch_size=2, num_inference_steps=2, output_type="pt", memory_format=torch.contiguous_format)
    assert seen[3:] == [False, False]
