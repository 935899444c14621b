"""bfloat16 where the hardware computes it natively: the UNet in bfloat16, the sampling chain kept in float32."""

import logging
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file

import facediff.precision as precision
import facediff.training as training
from facediff import (
    FaceDiffImg2ImgPipeline,
    FaceDiffInpaintPipeline,
    FaceDiffInterpolationPipeline,
    FaceDiffPipeline,
    FaceDiffScheduler,
)
from facediff.cli import main
from facediff.sample_grids import sampling_unet
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, one_level_unet, tiny_run, tiny_unet

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
        ((("AMX", lambda: False), ("AVX512-BF16", lambda: False)), None, "no native bfloat16"),
    ],
)
def test_auto_picks_bfloat16_only_where_the_cpu_computes_it(monkeypatch, checks, dtype, reason):
    monkeypatch.setattr(precision, "CPU_BF16_CHECKS", checks)
    chosen, line = precision.sampling_precision("cpu")
    assert chosen == dtype and reason in line
    assert line.startswith("float32, bfloat16 below t = T/2: " if dtype else "float32: ")


def unet_precision_per_step(pipeline: FaceDiffPipeline, **call) -> dict[int, torch.dtype]:
    """The dtype of the UNet's output at each timestep of one call."""
    seen = {}
    hook = pipeline.unet.register_forward_hook(
        lambda unet, args, output: seen.update({int(args[1]): output.sample.dtype})
    )
    pipeline(generator=torch.Generator().manual_seed(0), **call)
    hook.remove()
    return seen


def test_low_noise_dtype_runs_the_unet_in_half_precision_below_half_the_chain_only(gray_pipeline):
    gray_pipeline.set_progress_bar_config(disable=True)
    for steps in (None, 10):
        seen = unet_precision_per_step(gray_pipeline, num_inference_steps=steps, low_noise_dtype=torch.bfloat16)
        assert len(seen) == (steps or 1000)
        assert {t for t, dtype in seen.items() if dtype == torch.bfloat16} == {t for t in seen if t < 500}
        assert {dtype for t, dtype in seen.items() if t >= 500} == {torch.float32}
    assert set(unet_precision_per_step(gray_pipeline, num_inference_steps=10).values()) == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's own autocast is left alone without the option
        assert set(unet_precision_per_step(gray_pipeline, num_inference_steps=10).values()) == {torch.bfloat16}


def test_low_noise_dtype_needs_a_float32_unet(gray_pipeline):
    gray_pipeline.to(torch.bfloat16)
    with pytest.raises(ValueError, match="low_noise_dtype needs a float32 UNet, got torch.bfloat16"):
        gray_pipeline(num_inference_steps=2, low_noise_dtype=torch.bfloat16)


def test_half_precision_below_half_the_chain_stays_closer_to_float32_than_bfloat16_weights(rgb_pipeline):
    rgb_pipeline.set_progress_bar_config(disable=True)

    def images(pipeline, **call):
        generator = torch.Generator().manual_seed(0)
        return pipeline(batch_size=4, generator=generator, num_inference_steps=20, output_type="pt", **call).images

    reference = images(rgb_pipeline)
    low_noise = images(rgb_pipeline, low_noise_dtype=torch.bfloat16)
    throughout = images(rgb_pipeline.to(torch.bfloat16))
    assert 0 < (low_noise - reference).abs().mean() < (throughout - reference).abs().mean() / 2


@pytest.mark.parametrize("native", [True, False])
def test_sample_dtype_auto_says_what_it_picked_and_samples_in_it(gray_pipeline, tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(precision, "CPU_BF16_CHECKS", (("AMX", lambda: native),))
    gray_pipeline.save_pretrained(tmp_path / "model")
    flags = ["sample", str(tmp_path / "model"), "--num-images", "2", "--steps", "3", "--device", "cpu"]
    assert main([*flags, "--out", str(tmp_path / "auto")]) == 0
    picked = "float32, bfloat16 below t = T/2" if native else "float32"
    assert f"Sampling in {picked}: this CPU" in capsys.readouterr().err
    gray_pipeline.set_progress_bar_config(disable=True)
    for index in range(2):
        expected = gray_pipeline(
            generator=torch.Generator().manual_seed(index),
            num_inference_steps=3,
            low_noise_dtype=torch.bfloat16 if native else None,
        ).images[0]
        saved = Image.open(tmp_path / "auto" / f"{index:05d}.png")
        assert np.array_equal(np.asarray(saved), np.asarray(expected)), index


def editing_call(pipeline_class) -> tuple:
    """A gray editing pipeline on the full T = 1000 schedule, and a call of it over 10 steps of the whole chain."""
    torch.manual_seed(0)
    pipeline = pipeline_class(unet=tiny_unet(1), scheduler=FaceDiffScheduler())
    pipeline.set_progress_bar_config(disable=True)
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    if pipeline_class is FaceDiffInterpolationPipeline:  # inverts both ends, then decodes
        return pipeline, dict(image=torch.cat([image, image.flip(-1)]), num_frames=2, num_inference_steps=10)
    if pipeline_class is FaceDiffInpaintPipeline:
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., 4:12, 4:12] = 1
        return pipeline, dict(image=image, mask_image=mask, jump_n_sample=1, num_inference_steps=10)
    return pipeline, dict(image=image, strength=1.0, num_inference_steps=10)


@pytest.mark.parametrize(
    "pipeline_class", [FaceDiffImg2ImgPipeline, FaceDiffInpaintPipeline, FaceDiffInterpolationPipeline]
)
def test_editing_pipelines_take_half_precision_below_half_the_chain_only(pipeline_class):
    pipeline, call = editing_call(pipeline_class)
    assert set(unet_precision_per_step(pipeline, **call).values()) == {torch.float32}
    seen = unet_precision_per_step(pipeline, **call, low_noise_dtype=torch.bfloat16)
    assert len(seen) == 10
    assert {t for t, dtype in seen.items() if dtype == torch.bfloat16} == {t for t in seen if t < 500} != set()
    assert {dtype for t, dtype in seen.items() if t >= 500} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's own autocast is left alone without the option
        assert set(unet_precision_per_step(pipeline, **call).values()) == {torch.bfloat16}
    pipeline.to(torch.bfloat16)
    with pytest.raises(ValueError, match="low_noise_dtype needs a float32 UNet, got torch.bfloat16"):
        pipeline(**call, low_noise_dtype=torch.bfloat16)


@pytest.mark.parametrize("native", [True, False])
def test_editing_commands_dtype_auto_take_the_samplers_precision(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(precision, "CPU_BF16_CHECKS", (("AMX", lambda: native),))
    torch.manual_seed(0)
    FaceDiffPipeline(unet=tiny_unet(1), scheduler=FaceDiffScheduler()).save_pretrained(tmp_path / "model")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 32))
    mask.save(tmp_path / "mask.png")
    # Whether each UNet call ran under autocast, and at which t: the images alone may not show it on a tiny model.
    calls = []
    forward = UNet2DModel.forward

    def recording(unet, sample, timestep, *args, **kwargs):
        calls.append((int(timestep), torch.is_autocast_enabled("cpu")))
        return forward(unet, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", recording)
    model, face_file, common = str(tmp_path / "model"), str(FACES / "000.png"), ["--steps", "6", "--seed", "2"]
    edit = ["edit", model, "--image", face_file, "--strength", "0.9", "--out", str(tmp_path / "edit")]
    inpaint = ["inpaint", model, "--image", face_file, "--mask", str(tmp_path / "mask.png"), "--num-images", "1"]
    assert main([*edit, *common]) == 0
    assert main([*inpaint, "--jump-n-sample", "2", "--out", str(tmp_path / "fill"), *common]) == 0
    interpolate = ["interpolate", model, "--image", face_file, "--image", str(FACES / "001.png"), "--frames", "3"]
    assert main([*interpolate, "--steps", "6", "--out", str(tmp_path / "frames")]) == 0
    picked = "float32, bfloat16 below t = T/2" if native else "float32"
    assert capsys.readouterr().err.count(f"Sampling in {picked}: this CPU") == 3
    assert {t < 500 for t, _ in calls} == {True, False}
    assert all(autocast == (native and t < 500) for t, autocast in calls)
    low_noise_dtype = torch.bfloat16 if native else None
    editor = FaceDiffImg2ImgPipeline.from_pretrained(tmp_path / "model")
    inpainter = FaceDiffInpaintPipeline.from_pretrained(tmp_path / "model")
    interpolator = FaceDiffInterpolationPipeline.from_pretrained(tmp_path / "model")
    for pipeline in (editor, inpainter, interpolator):
        pipeline.set_progress_bar_config(disable=True)
    options = dict(num_inference_steps=6, low_noise_dtype=low_noise_dtype)
    face = Image.open(FACES / "000.png")
    edited = editor(image=face, strength=0.9, generator=torch.Generator().manual_seed(2), **options)
    filled = inpainter(
        image=face, mask_image=mask, jump_n_sample=2, generator=[torch.Generator().manual_seed(2)], **options
    )
    frames = interpolator(image=[face, Image.open(FACES / "001.png")], num_frames=3, **options)
    expected = {"edit/strength-0.9.png": edited.images[0], "fill/00000.png": filled.images[0]}
    expected.update({f"frames/{index:05d}.png": frame for index, frame in enumerate(frames.images)})
    for name, image in expected.items():  # one level at most: a loaded model may take other kernels (1e-7 apart)
        saved = np.asarray(Image.open(tmp_path / name), dtype=int)
        assert np.abs(saved - np.asarray(image, dtype=int)).max() <= 1, name


def test_training_samples_with_float32_weights_outside_accelerates_autocast():
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    trained = accelerator.unwrap_model(accelerator.prepare(one_level_unet()))
    ema = EMAModel(trained.parameters())
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.1)
    before = {name: value.clone() for name, value in trained.state_dict().items()}
    copy = sampling_unet(trained, ema)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(700)
    plain = one_level_unet()
    ema.copy_to(plain.parameters())
    assert trained(x, t).sample.dtype == torch.float32  # accelerate's wrapper casts its bfloat16 output back
    assert not torch.equal(trained(x, t).sample, plain.eval()(x, t).sample)
    assert torch.equal(copy(x, t).sample, plain(x, t).sample) and not copy.training
    assert all(torch.equal(value, before[name]) for name, value in trained.state_dict().items())
    AcceleratorState._reset_state(reset_partial_state=True)


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
