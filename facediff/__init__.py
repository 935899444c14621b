"""facediff: DDPM face models trained with diffusers and Accelerate, shared as diffusers pipelines."""

from .editing import FaceDiffImg2ImgPipeline, FaceDiffInpaintPipeline, FaceDiffInterpolationPipeline
from .hub import FaceDiffPipeline
from .pipelines import FaceDiffScheduler, FaceDiffSchedulerOutput
from .unet_presets import UNET_PRESETS, build_unet

__all__ = [
    "FaceDiffImg2ImgPipeline",
    "FaceDiffInpaintPipeline",
    "FaceDiffInterpolationPipeline",
    "FaceDiffPipeline",
    "FaceDiffScheduler",
    "FaceDiffSchedulerOutput",
    "UNET_PRESETS",
    "build_unet",
]
