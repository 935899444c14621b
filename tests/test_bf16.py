"""bfloat16 where the hardware computes it natively: the UNet in bfloat16, the sampling chain kept in float32."""

import logging
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

import facediff.precision as precision
import facediff.training as training
from facediff import FaceDiffPipeline, FaceDiffScheduler
from facediff.cli import main
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, one_level_unet, tiny_run

MU, S = 0.3, 0.5


def gaussian_denoiser(dtype: torch.dtype) -> UNet2DModel:
    """A UNet2DModel whose forward is the exact noise prediction for data drawn from N(MU, S^2) per pixel, computed
    in `dtype`: the model is perfect, so whatever the samples get wrong, the sampling chain got wrong."""
    unet = one_level_unet().to(dtype)
    alphas_cumprod = FaceDiffScheduler().alphas_cumprod

    def forward(sample, timestep, *args, **kwargs):
        alphabar = alphas_cumprod[int(timestep)].item()
        x = sample.to(dtype)
        eps = (x - alphabar**0.5 * MU) * (1 - alphabar) ** 0.5 / (alphabar * S**2 + 1 - alphabar)
        return UNet2DOutput(sample=eps.to(dtype))

    unet.forward = forward
    return unet


def ours(dtype: torch.dtype) -> torch.Tensor:
    pipeline = FaceDiffPipeline(unet=gaussian_denoiser(dtype), scheduler=FaceDiffScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=256, generator=torch.Generator().manual_seed(0), output_type="pt").images.float()


def chain_in_the_unets_dtype(dtype: torch.dtype) -> torch.Tensor:
    """DDPMPipeline's loop: x_t drawn and updated by diffusers' DDPMScheduler in the UNet's dtype. (DDPMPipeline
    itself cannot return bfloat16 images on a CPU: numpy has no bfloat16.)"""
    unet = gaussian_denoiser(dtype)
    scheduler = DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    scheduler.set_timesteps(1000)
    generator = torch.Generator().manual_seed(0)
    image = randn_tensor((256, 1, 8, 8), generator=generator, dtype=dtype)
    for t in scheduler.timesteps:
        image = scheduler.step(unet(image, t).sample, t, image, generator=generator).prev_sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


def test_a_bfloat16_unet_samples_as_float32_where_a_bfloat16_chain_drifts():
    reference = ours(torch.float32)
    torch.testing.assert_close(chain_in_the_unets_dtype(torch.float32), reference, atol=1e-4, rtol=0)
    in_bfloat16 = ours(torch.bfloat16)
    drifted = chain_in_the_unets_dtype(torch.bfloat16)
    # The betas' small terms survive in float32: the same images up to the UNet's own rounding.
    assert (in_bfloat16 - reference).abs().mean() < 1e-3
    assert abs(in_bfloat16.mean() - reference.mean()) < 1e-4 and abs(in_bfloat16.std() / reference.std() - 1) < 1e-3
    # In bfloat16 they are lost and the whole distribution moves.
    assert abs(drifted.mean() - reference.mean()) > 2e-3 and abs(drifted.std() / reference.std() - 1) > 2e-3
    assert (drifted - reference).abs().mean() > 10 * (in_bfloat16 - reference).abs().mean()


@pytest.mark.parametrize(
    "checks,dtype,reason",
    [
        ((("AMX", lambda: True), ("AVX512-BF16", lambda: False)), torch.bfloat16, "natively (AMX)"),
        ((("AMX", lambda: False), ("AVX512-BF16", lambda: True)), torch.bfloat16, "natively (AVX512-BF16)"),
        ((("AMX", lambda: False), ("AVX512-BF16", lambda: False)), torch.float32, "no native bfloat16"),
    ],
)
def test_auto_picks_bfloat16_only_where_the_cpu_computes_it(monkeypatch, checks, dtype, reason):
    monkeypatch.setattr(precision, "CPU_BF16_CHECKS", checks)
    chosen, line = precision.auto_dtype("cpu")
    assert chosen == dtype and reason in line and line.startswith(str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("native", [True, False])
def test_sample_dtype_auto_says_what_it_picked_and_samples_in_it(gray_pipeline, tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(precision, "CPU_BF16_CHECKS", (("AMX", lambda: native),))
    gray_pipeline.save_pretrained(tmp_path / "model")
    flags = ["sample", str(tmp_path / "model"), "--num-images", "2", "--steps", "3", "--device", "cpu"]
    assert main([*flags, "--out", str(tmp_path / "auto")]) == 0
    picked = "bfloat16" if native else "float32"
    assert f"Sampling in {picked}: this CPU" in capsys.readouterr().err
    assert main([*flags, "--dtype", picked, "--out", str(tmp_path / "explicit")]) == 0
    for name in ("00000.png", "00001.png", "grid.png"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "explicit" / name).read_bytes()


def trained_weights(output) -> dict[str, torch.Tensor]:
    return load_file(output / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize(
    "native,launcher,expected,reason",
    [
        (True, None, "bf16", "this CPU computes bfloat16 natively (AMX)"),
        (False, None, "no", "this CPU has no native bfloat16"),
        (False, "bf16", "bf16", "as accelerate launch asks"),
    ],
)
def test_training_mixed_precision_auto(tmp_path, monkeypatch, caplog, native, launcher, expected, reason):
    monkeypatch.setattr(precision, "CPU_BF16_CHECKS", (("AMX", lambda: native),))
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    accelerators = []
    make_accelerator = training._make_accelerator

    def recording(*args):
        accelerators.append(make_accelerator(*args))
        return accelerators[-1]

    monkeypatch.setattr(training, "_make_accelerator", recording)
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "8", "--max_train_steps", "2"]
    with caplog.at_level(logging.INFO):
        train(parse_training_arguments(tiny_run(tmp_path / "run", *flags, "--mixed_precision", "auto")))
    assert accelerators[0].mixed_precision == expected
    assert f"Mixed precision {expected}: {reason}" in caplog.text


def test_bf16_training_repeats_bit_for_bit_and_resumes_exactly(tmp_path):
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--mixed_precision", "bf16", "--random_flip"]
    train(parse_training_arguments(tiny_run(tmp_path / "first", *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(parse_training_arguments(tiny_run(tmp_path / "again", *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)
    # A run stopped after its first checkpoint: that checkpoint alone, resumed to the end.
    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(parse_training_arguments(tiny_run(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")))

    first = trained_weights(tmp_path / "first")
    for other in ("again", "resumed"):
        weights = trained_weights(tmp_path / other)
        assert all(torch.equal(weights[name], first[name]) for name in first), other
