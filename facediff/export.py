"""A training checkpoint's weights as a pipeline (`facediff export`): any step of a run, not only the one it saved.

A checkpoint keeps the model's and the scheduler's configs, the trained weights (`model.safetensors`) and the EMA
weights (one of Accelerate's `custom_checkpoint_*.pkl`, read with `torch.load(weights_only=True)`, which builds
tensors and plain values only and runs no code), so neither the training data nor the flags are needed.
"""

import os
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import SAFE_WEIGHTS_NAME
from diffusers import UNet2DModel
from safetensors.torch import load_file

from .checkpointing import STATE_FILE, checkpoint_pipeline_configs, checkpoint_step, list_checkpoints
from .hub import FaceDiffPipeline
from .pipelines import FaceDiffScheduler


def export_checkpoint(
    checkpoint: str | os.PathLike, weights: Literal["ema", "trained"] = "ema"
) -> tuple[FaceDiffPipeline, int]:
    """
    The pipeline a checkpoint's weights make, with the scheduler the run trained and samples with.

    Args:
        checkpoint (`str` or `os.PathLike`):
            A `checkpoint-<step>` folder, or a training output folder for its latest checkpoint.
        weights (`str`, defaults to `"ema"`):
            `"ema"`: the exponential moving average, what training saves; `"trained"`: the optimizer's weights.

    Returns:
        `tuple[FaceDiffPipeline, int]`: the pipeline, and the step the checkpoint was taken at.

    Raises:
        `ValueError`: when `checkpoint` is no complete facediff checkpoint, predates the configs being kept, or has
        no EMA weights to export.
    """
    path = _checkpoint_folder(Path(checkpoint))
    configs = checkpoint_pipeline_configs(path)
    if configs is None:
        raise ValueError(
            f"{path} was saved before checkpoints kept the model's config: resume the run from it "
            "(--resume_from_checkpoint) so that it saves a checkpoint that facediff export can read."
        )
    unet = UNet2DModel.from_config(configs["unet"])
    state = _ema_weights(path, unet) if weights == "ema" else load_file(path / SAFE_WEIGHTS_NAME)
    unet.load_state_dict(state)
    scheduler = FaceDiffScheduler.from_config(configs["scheduler"])
    return FaceDiffPipeline(unet=unet, scheduler=scheduler), checkpoint_step(path)


def _checkpoint_folder(location: Path) -> Path:
    if (location / STATE_FILE).is_file():
        return location
    checkpoints = list_checkpoints(location)
    if checkpoints:
        return checkpoints[-1]
    raise ValueError(
        f"{location} is neither a facediff checkpoint (no {STATE_FILE}) nor a training output folder with one: "
        "pass a checkpoint-<step> folder or the run's --output_dir."
    )


def _ema_weights(checkpoint: Path, unet: UNet2DModel) -> dict[str, torch.Tensor]:
    """The EMA's shadow parameters by name; they follow `unet.parameters()`'s order, as EMAModel keeps them."""
    for state_file in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "shadow_params" in state:
            names = [name for name, _ in unet.named_parameters()]
            shadows = state["shadow_params"]
            shapes = [tuple(shadow.shape) for shadow in shadows]
            if shapes != [tuple(parameter.shape) for parameter in unet.parameters()]:
                raise ValueError(f"{state_file}'s EMA weights do not fit the model of {checkpoint / STATE_FILE}.")
            return dict(zip(names, shadows, strict=True))
    raise ValueError(f"{checkpoint} has no EMA weights (trained with --use_ema false): export with --weights trained.")
