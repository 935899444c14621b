"""Sample grids during and after training: a fixed seed, so grids from different steps are comparable."""

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, init_empty_weights
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from .atomic_files import atomic_write
from .hub import FaceDiffPipeline
from .pipelines import FaceDiffScheduler


def sample_images(
    unet: UNet2DModel,
    scheduler: FaceDiffScheduler,
    num_images: int,
    num_inference_steps: int,
    seed: int,
    ema: EMAModel | None = None,
    low_noise_dtype: torch.dtype | None = None,
) -> list[Image.Image]:
    """
    Draw images with the EMA weights when given, leaving `unet`'s own weights and training mode as they were.

    Args:
        unet (`UNet2DModel`):
            The (unwrapped) model being trained.
        scheduler (`FaceDiffScheduler`):
            The training scheduler; sampling uses a copy, so its state is untouched.
        num_images (`int`):
            How many images.
        num_inference_steps (`int`):
            Respaced sampling steps.
        seed (`int`):
            Seed of the sampling generator (the global RNG is not touched, so resuming stays exact).
        ema (`EMAModel`, *optional*):
            Averaged weights to sample with.
        low_noise_dtype (`torch.dtype`, *optional*):
            Half precision for the low-noise half of the chain (the pipeline's `low_noise_dtype`).

    Returns:
        `list[PIL.Image.Image]`
    """
    pipeline = sampling_pipeline(unet, scheduler, ema)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipeline(
        batch_size=num_images,
        generator=generator,
        num_inference_steps=num_inference_steps,
        low_noise_dtype=low_noise_dtype,
    ).images


def sampling_pipeline(unet: UNet2DModel, scheduler: FaceDiffScheduler, ema: EMAModel | None = None) -> FaceDiffPipeline:
    """
    A pipeline over `sampling_unet(unet, ema)` and a copy of `scheduler`: sampling changes neither the model being
    trained nor the training scheduler.

    Args:
        unet (`UNet2DModel`):
            The (unwrapped) model being trained.
        scheduler (`FaceDiffScheduler`):
            The training scheduler.
        ema (`EMAModel`, *optional*):
            Averaged weights to sample with.

    Returns:
        `FaceDiffPipeline`
    """
    return FaceDiffPipeline(unet=sampling_unet(unet, ema), scheduler=FaceDiffScheduler.from_config(scheduler.config))


def sampling_unet(unet: UNet2DModel, ema: EMAModel | None = None) -> UNet2DModel:
    """
    A float32 copy of `unet` in eval mode, holding the EMA weights when given. A copy, so that the model being trained
    keeps its weights and mode, and samples outside the autocast that accelerate wraps its forward in under mixed
    precision: weights rounded to half precision for the whole chain shift every sample's colours (the pipeline's
    `low_noise_dtype` uses half precision where it is safe).

    Args:
        unet (`UNet2DModel`):
            The (unwrapped) model being trained.
        ema (`EMAModel`, *optional*):
            Averaged weights to copy in.
    """
    with init_empty_weights():
        copy = UNet2DModel.from_config(unet.config)
    copy.load_state_dict(
        {name: value.detach().float().clone() for name, value in unet.state_dict().items()}, assign=True
    )
    if ema is not None:
        ema.copy_to(copy.parameters())
    return copy.eval()


def draw(
    pipeline: FaceDiffPipeline,
    num_images: int,
    steps: int | None,
    seed: int,
    batch_size: int,
    output_type: str,
    memory_format: torch.memory_format | None = None,
    show_progress: bool = True,
    low_noise_dtype: torch.dtype | None = None,
) -> Iterator[tuple[range, list | np.ndarray | torch.Tensor]]:
    """
    Draw images in batches; image i comes from its own generator seeded `seed + i`, so it is the same image
    whatever the batch size.

    Args:
        pipeline (`FaceDiffPipeline`):
            The sampler.
        num_images (`int`):
            How many.
        steps (`int`, *optional*):
            Respaced sampling steps; `None`: all T.
        seed (`int`):
            Seed of image 0.
        batch_size (`int`):
            Images per pipeline call.
        output_type (`str`):
            `"pil"`, `"np"` or `"pt"`, as the pipeline takes it.
        memory_format (`torch.memory_format`, *optional*):
            The layout while sampling; default: the pipeline's (channels_last on a CPU).
        show_progress (`bool`, defaults to `True`):
            Show a progress bar over the images.
        low_noise_dtype (`torch.dtype`, *optional*):
            Half precision for the low-noise half of the chain (the pipeline's `low_noise_dtype`).

    Returns:
        `Iterator[tuple[range, list | np.ndarray | torch.Tensor]]`: the indices of each batch and its images.
    """
    pipeline.set_progress_bar_config(disable=True)
    progress = tqdm(
        total=num_images, desc=f"Sampling ({steps or 'all'} steps)", unit="image", disable=not show_progress
    )
    with progress:
        for start in range(0, num_images, batch_size):
            indices = range(start, min(start + batch_size, num_images))
            generators = [torch.Generator(device="cpu").manual_seed(seed + index) for index in indices]
            output = pipeline(
                batch_size=len(indices),
                generator=generators,
                num_inference_steps=steps,
                output_type=output_type,
                memory_format=memory_format,
                low_noise_dtype=low_noise_dtype,
            )
            yield indices, output.images
            progress.update(len(indices))


def grid_shape(num_images: int) -> tuple[int, int]:
    """
    Rows and columns of a near-square grid: an exact fit when one is at most twice as wide as it is tall (32 images:
    4x8), else the smallest square-ish grid with blank cells at the end (7 images: 3x3).

    Args:
        num_images (`int`):
            How many images, at least 1.

    Returns:
        `tuple[int, int]`
    """
    side = math.sqrt(num_images)
    cols = next((cols for cols in range(math.ceil(side), num_images + 1) if num_images % cols == 0), num_images)
    if cols > 2 * side:
        cols = math.ceil(side)
    return math.ceil(num_images / cols), cols


def save_grid(images: list[Image.Image], path: str | os.PathLike) -> Path:
    """
    Save images as one near-square grid PNG (`grid_shape`), atomically.

    Args:
        images (`list[PIL.Image.Image]`):
            The images, all the same size.
        path (`str` or `os.PathLike`):
            Where the PNG goes.

    Returns:
        `Path`
    """
    rows, cols = grid_shape(len(images))
    padded = images + [Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))
    grid = make_image_grid(padded, rows=rows, cols=cols)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as partial:
        grid.save(partial, format="PNG")
    return path


def as_array(images: list[Image.Image]) -> np.ndarray:
    """Images as one uint8 array (N, H, W, C), as trackers want them."""
    arrays = [np.asarray(image) for image in images]
    return np.stack([array[..., None] if array.ndim == 2 else array for array in arrays])


def log_images(accelerator: Accelerator, images: list[Image.Image], global_step: int):
    """Send a grid's images to the run's tracker (TensorBoard or Weights & Biases)."""
    if accelerator.trackers and accelerator.trackers[0].name == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_images("samples", as_array(images), global_step, dataformats="NHWC")
    elif accelerator.trackers and accelerator.trackers[0].name == "wandb":
        import wandb

        accelerator.get_tracker("wandb").log({"samples": [wandb.Image(image) for image in images]}, step=global_step)
