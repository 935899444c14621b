"""facediff: DDPM face models trained with diffusers and Accelerate, shared as diffusers pipelines."""

from .hub import FaceDiffPipeline
from .pipelines import FaceDiffScheduler, FaceDiffSchedulerOutput
from .unet_presets import UNET_PRESETS, build_unet

__all__ = ["FaceDiffPipeline", "FaceDiffScheduler", "FaceDiffSchedulerOutput", "UNET_PRESETS", "build_unet"]
