"""The CUDA paths: mixed-precision training end to end, fp16's gradient scaler, and sampling in half precision.

Skipped where no GPU is present (CI has none); run them on a GPU machine with `python -m pytest tests/test_cuda.py`.
They train on the built-in digits, so they need no data beside the repository.
"""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

import facediff.training as training
from facediff import FaceDiffPipeline, FaceDiffScheduler, build_unet
from facediff.training import NonFiniteLossError, train
from facediff.training_args import parse_training_arguments

from .conftest import inf_gradients_for, tiny_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_mixed_precision_training_on_cuda_end_to_end(tmp_path, precision, dtype):
    output = tmp_path / precision
    flags = ["--mixed_precision", precision, "--max_train_steps", "30", "--max_train_samples", "256"]
    result = train(parse_training_arguments(tiny_run(output, *flags)))
    assert result.global_step == 30 and result.final_loss < 1.0
    assert next(result.unet.parameters()).device.type == "cuda"

    pipeline = FaceDiffPipeline.from_pretrained(output, torch_dtype=dtype).to("cuda")
    assert pipeline.unet.dtype == dtype
    images = pipeline(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                      output_type="pt").images  # fmt: skip
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    assert (output / "sample_grid.png").is_file() and (output / "checkpoint-2").is_dir()


def test_fp16_gradient_scaler_skips_overflow_and_stops_when_it_persists(tmp_path, monkeypatch):
    skips = training.MAX_CONSECUTIVE_SKIPPED_STEPS
    monkeypatch.setattr(training, "_build_model", inf_gradients_for(10_000))
    output = tmp_path / "run"
    flags = ["--mixed_precision", "fp16", "--max_train_samples", "64", "--max_train_steps", str(skips + 5),
             "--checkpointing_steps", "10", "--save_images_steps", "100"]  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=rf"fp16 loss scale for {skips} steps\) became inf at step {skips}"):
        train(parse_training_arguments(tiny_run(output, *flags)))


def test_cuda_sampling_matches_ddpm_pipeline(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("small", 16, 1).to("cuda")
    stock = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="fixed_large", clip_sample=False))
    ours = FaceDiffPipeline(unet=unet, scheduler=FaceDiffScheduler())
    expected = stock(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    images = ours(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    # TF32 convolutions and layout-dependent kernels round differently; over 1000 steps that stays small.
    assert (images - expected).abs().max().item() < 2e-2


def test_cuda_sampling_defaults_to_the_contiguous_layout():
    torch.manual_seed(0)
    pipeline = FaceDiffPipeline(unet=build_unet("small", 16, 3), scheduler=FaceDiffScheduler()).to("cuda")
    seen = []
    pipeline.unet.conv_in.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].is_contiguous()))
    pipeline(batch_size=2, num_inference_steps=3, output_type="pt")
    assert seen == [True, True, True]
