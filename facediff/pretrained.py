"""Fine-tuning's starting point: the UNet weights and noise schedule of a saved facediff or diffusers DDPM pipeline,
from a folder or a Hub repo, and whether the run's data and settings fit them."""

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import UNet2DModel
from huggingface_hub import HfApi, try_to_load_from_cache

from .errors import first_line
from .hub import check_model_location
from .locations import looks_like_hub_id
from .pipelines import FaceDiffScheduler
from .pipelines.scheduling_facediff import LEARNED_VARIANCES
from .training_args import TrainingArguments

PICKLE_WEIGHTS = "unet/diffusion_pytorch_model.bin"
# Schedulers whose config means what FaceDiffScheduler's means: betas over num_train_timesteps and a prediction type.
BASE_SCHEDULERS = ("FaceDiffScheduler", "DDPMScheduler", "DDIMScheduler")


@dataclass
class PretrainedBase:
    """
    A model to fine-tune.

    Args:
        location (`str`):
            The folder or Hub repo id it was loaded from, as given.
        unet (`UNet2DModel`):
            Its weights, in float32.
        scheduler (`FaceDiffScheduler`):
            Its noise schedule and sampling settings.
    """

    location: str
    unet: UNet2DModel
    scheduler: FaceDiffScheduler

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels


def load_pretrained_base(location: str, cache_dir: str | None = None) -> PretrainedBase:
    """
    Load the UNet (safetensors only) and scheduler config of a saved `FaceDiffPipeline` or diffusers `DDPMPipeline`.

    Args:
        location (`str`):
            A folder with `unet/` and `scheduler/`, or a Hub repo id (read from the Hub cache when offline).
        cache_dir (`str`, *optional*):
            The Hub cache to download into and read from.

    Returns:
        [`PretrainedBase`]

    Raises:
        `ValueError`: one line naming the problem and the fix, for a location that holds no such model, pickle-only
        weights, or a model facediff cannot fine-tune (learned variances, an invalid scheduler config).
    """
    flag = f"--pretrained_model_name_or_path {location}"
    check_model_location(location)
    try:
        unet_config = UNet2DModel.load_config(location, subfolder="unet", cache_dir=cache_dir)
        scheduler_config = FaceDiffScheduler.load_config(location, subfolder="scheduler", cache_dir=cache_dir)
    except OSError as error:
        raise ValueError(
            f"{flag}: no UNet and scheduler config there ({first_line(error)}): pass a folder or Hub repo that "
            "FaceDiffPipeline or DDPMPipeline.save_pretrained wrote (with unet/ and scheduler/)."
        ) from error
    unet_class, scheduler_class = unet_config.get("_class_name"), scheduler_config.get("_class_name")
    if unet_class != "UNet2DModel":
        raise ValueError(f"{flag}: unet/ holds a {unet_class}, not a UNet2DModel: pass a DDPM pipeline.")
    if scheduler_class not in BASE_SCHEDULERS:
        raise ValueError(
            f"{flag}: its scheduler is a {scheduler_class}; facediff fine-tunes models saved with "
            f"{', '.join(BASE_SCHEDULERS)}."
        )
    if unet_config.get("out_channels") != unet_config.get("in_channels"):
        raise ValueError(
            f"{flag}: its UNet outputs {unet_config.get('out_channels')} channels for {unet_config.get('in_channels')}"
            " in (learned variances): facediff fine-tunes noise predictors, whose output has the input's channels."
        )
    if scheduler_config.get("variance_type") in LEARNED_VARIANCES:
        raise ValueError(
            f"{flag}: its scheduler's variance_type {scheduler_config['variance_type']} is learned, and facediff "
            "trains noise predictors with fixed variances only: pass a base with a fixed variance_type."
        )
    # Every key FaceDiffScheduler has (a superset of DDPMScheduler's): the schedule the base learned and how it samples.
    known = FaceDiffScheduler._get_init_keys(FaceDiffScheduler)
    try:
        scheduler = FaceDiffScheduler.from_config(
            {key: value for key, value in scheduler_config.items() if key in known}
        )
    except ValueError as error:
        raise ValueError(f"{flag}: its scheduler config is not one facediff can train ({first_line(error)})") from error

    try:
        unet = UNet2DModel.from_pretrained(
            location, subfolder="unet", use_safetensors=True, cache_dir=cache_dir, torch_dtype=torch.float32
        )
    except OSError as error:
        if _has_pickle_weights(location, cache_dir):
            converted = f"{Path(location).name}-safetensors"
            raise ValueError(
                f"{flag}: its weights are pickle only ({PICKLE_WEIGHTS}), which can run code when loaded, and facediff "
                'loads safetensors only. If you trust them, convert them once with `python -c "from diffusers '
                f"import DDPMPipeline; DDPMPipeline.from_pretrained('{location}', use_safetensors=False)"
                f".save_pretrained('{converted}')\"` and pass --pretrained_model_name_or_path {converted}."
            ) from error
        raise ValueError(
            f"{flag}: its UNet weights do not load ({first_line(error)}): pass a complete saved pipeline."
        ) from error
    return PretrainedBase(location=location, unet=unet, scheduler=scheduler)


def settings_for_base(args: TrainingArguments, base: PretrainedBase) -> TrainingArguments:
    """
    The run's settings with the base's resolution when none is given, after checking that the base fits them.

    Args:
        args (`TrainingArguments`):
            The run's settings, as given.
        base (`PretrainedBase`):
            The model to fine-tune.

    Returns:
        `TrainingArguments`

    Raises:
        `ValueError`: naming the flag to change, for a resolution or noise schedule other than the base's.
    """
    flag = f"--pretrained_model_name_or_path {base.location}"
    if args.resolution is not None and args.resolution != base.resolution:
        raise ValueError(
            f"{flag} was trained at {base.resolution}x{base.resolution}, not at --resolution {args.resolution}: "
            f"pass --resolution {base.resolution}, or leave it out."
        )
    schedule = base.scheduler.config
    learned = (
        ("ddpm_num_steps", args.ddpm_num_steps, schedule.num_train_timesteps),
        ("ddpm_beta_schedule", args.ddpm_beta_schedule, schedule.beta_schedule),
        ("prediction_type", args.prediction_type, schedule.prediction_type),
    )
    for name, value, base_value in learned:
        if value != base_value:
            raise ValueError(
                f"{flag} learned with {name.replace('ddpm_', '')} {base_value}, not --{name} {value}: pass --{name} "
                f"{base_value} to fine-tune it."
            )
    return replace(args, resolution=base.resolution)


def channels_for_base(base: PretrainedBase, requested: int | None, found: int) -> int:
    """
    The channel count to train the base with: its own. Gray images are converted for an RGB model; RGB images for
    a gray model only when asked (`--num_channels 1`), since that drops their colour.

    Args:
        base (`PretrainedBase`):
            The model to fine-tune.
        requested (`int`, *optional*):
            `--num_channels`, if given.
        found (`int`):
            The channel count of the data (or `requested`).

    Returns:
        `int`
    """
    flag = f"--pretrained_model_name_or_path {base.location}"
    kind = {1: "gray", 3: "RGB"}
    if requested is not None and requested != base.channels:
        raise ValueError(
            f"{flag} is a {kind[base.channels]} model, not --num_channels {requested}: pass --num_channels "
            f"{base.channels}, or leave it out."
        )
    if requested is None and found == 3 and base.channels == 1:
        raise ValueError(
            f"{flag} is a gray model and the images are RGB: pass --num_channels 1 to fine-tune it on them in gray, "
            "or fine-tune an RGB model."
        )
    return base.channels


def _has_pickle_weights(location: str, cache_dir: str | None) -> bool:
    if os.path.isdir(location):
        return os.path.isfile(os.path.join(location, PICKLE_WEIGHTS))
    if not looks_like_hub_id(location):
        return False
    try:
        return HfApi().file_exists(location, PICKLE_WEIGHTS)
    except Exception:  # offline, or no access: what the cache holds
        return isinstance(try_to_load_from_cache(location, PICKLE_WEIGHTS, cache_dir=cache_dir), str)
