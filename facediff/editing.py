"""facediff's editing pipelines: the remote-code ones that every saved model carries (inpainting, image-to-image,
interpolation), with what an installed facediff adds: loading with installed classes alone, and training's own image
conversion (`facediff.data.to_pixels`), which also scales 16- and 32-bit gray."""

import os

import numpy as np
from PIL import Image

from .data import to_pixels
from .hub import FaceDiffPipeline
from .pipelines import pipeline_facediff_img2img, pipeline_facediff_inpaint, pipeline_facediff_interpolate


class _InstalledEditing:
    """Mixed in before a remote-code editing pipeline: installed loading and training's conversion."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """
        Load the `unet` and `scheduler` of a saved facediff model as [`FaceDiffPipeline.from_pretrained`] does: from
        installed classes only, safetensors only, no code from the folder run. `from_pipe(pipeline)` builds one from
        a loaded pipeline's components instead.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A saved pipeline folder, or a Hub repo id.
            kwargs:
                As [`FaceDiffPipeline.from_pretrained`] takes them (`torch_dtype`, `cache_dir`, `revision`, ...).

        Returns:
            The editing pipeline.
        """
        model = FaceDiffPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipeline = cls(unet=model.unet, scheduler=model.scheduler)
        pipeline.register_to_config(_name_or_path=model.name_or_path)
        return pipeline

    def pixels(self, image: Image.Image) -> np.ndarray:
        """
        One image as training converts it, with a centre crop.

        Args:
            image (`PIL.Image.Image`):
                Any mode, any size.

        Returns:
            `np.ndarray`: uint8, (channels, size, size).
        """
        return to_pixels(image, self.unet.config.in_channels, self.unet.config.sample_size)


class FaceDiffInpaintPipeline(_InstalledEditing, pipeline_facediff_inpaint.FaceDiffInpaintPipeline):
    """Fills in the masked part of images (white: repaint, black: keep) by RePaint on the model's sampler; see the
    remote-code class for the arguments."""


class FaceDiffImg2ImgPipeline(_InstalledEditing, pipeline_facediff_img2img.FaceDiffImg2ImgPipeline):
    """Edits images by noising them to `strength * T` and running the model's reverse chain from there (SDEdit);
    see the remote-code class for the arguments."""


class FaceDiffInterpolationPipeline(_InstalledEditing, pipeline_facediff_interpolate.FaceDiffInterpolationPipeline):
    """Interpolates between two images (DDIM-inverted) or two seeds, by slerp and DDIM decoding; see the remote-code
    class for the arguments."""
