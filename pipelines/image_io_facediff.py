# Written as it stands into every saved FaceDiffPipeline, with the editing pipelines that import it, as remote code:
# it imports only torch, numpy, PIL and diffusers.
"""What the editing pipelines (inpainting, image-to-image, interpolation) share: images and masks into the model's
space, [-1, 1] at its channels and size as training converts them, and samples back out as `output_type` asks."""

import contextlib

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageOps

OUTPUT_TYPES = ("pil", "np", "pt")
# Modes that can hold transparency, which training puts on white (facediff.data.to_pixels).
TRANSPARENT_MODES = ("P", "PA", "LA", "RGBA")


class FaceDiffImageIO:
    """Mixed into a `DiffusionPipeline` with a `unet`: the conversions in and out of its space, and the UNet call."""

    @property
    def chain_dtype(self) -> torch.dtype:
        """float32 under a half-precision UNet, as in FaceDiffPipeline: bfloat16 would lose the small beta terms."""
        return torch.float32 if self.unet.dtype in (torch.bfloat16, torch.float16) else self.unet.dtype

    def pixels(self, image: Image.Image) -> np.ndarray:
        """
        One image as training sees it (`facediff.data.to_pixels` with a centre crop): transparency on white, the
        model's mode ("L" by ITU-R 601 luma, or "RGB"), the centred square of the shorter side resized by bicubic.
        facediff's installed pipelines use that function itself, which also scales 16- and 32-bit gray to 8 bits.

        Args:
            image (`PIL.Image.Image`):
                Any mode, any size.

        Returns:
            `np.ndarray`: uint8, (channels, size, size).
        """
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        if image.mode in TRANSPARENT_MODES:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        image = ImageOps.fit(image.convert("L" if channels == 1 else "RGB"), (size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if channels == 1 else array.transpose(2, 0, 1)

    def preprocess(self, image) -> torch.Tensor:
        """
        Images into the model's space.

        Args:
            image (`PIL.Image.Image`, a list of them, or `torch.Tensor`):
                PIL images of any mode and size, converted by `pixels`; or a tensor (N, C, H, W) or (C, H, W) in
                [0, 1] at the model's channels and size, as `output_type="pt"` gives.

        Returns:
            `torch.Tensor`: (N, C, H, W) in [-1, 1], on the pipeline's device, in `chain_dtype`.
        """
        if isinstance(image, torch.Tensor):
            image = image[None] if image.ndim == 3 else image
            size = self.unet.config.sample_size
            expected = (self.unet.config.in_channels, size, size)
            if image.ndim != 4 or tuple(image.shape[1:]) != expected:
                raise ValueError(
                    f"image is a tensor of shape {tuple(image.shape)}; the model takes "
                    f"(N, {', '.join(map(str, expected))}) in [0, 1]: pass PIL images to have them converted."
                )
            sample = image.float() * 2 - 1
        else:
            images = image if isinstance(image, (list, tuple)) else [image]
            sample = torch.from_numpy(np.stack([self.pixels(each) for each in images])).float() / 127.5 - 1
        return sample.to(self._execution_device, self.chain_dtype)

    def check_call(
        self, batch_size: int, generator, output_type: str, low_noise_dtype: torch.dtype | None = None
    ) -> None:
        """
        Refuse an `output_type`, a number of generators or a `low_noise_dtype` that a call cannot honour, before
        any work.

        Args:
            batch_size (`int`):
                Images in the call.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                As the call takes it.
            output_type (`str`):
                As the call takes it.
            low_noise_dtype (`torch.dtype`, *optional*):
                As the call takes it: it needs a float32 UNet.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images: pass one per image.")
        if low_noise_dtype is not None and self.unet.dtype != torch.float32:
            raise ValueError(f"low_noise_dtype needs a float32 UNet, got {self.unet.dtype}: load it in float32.")

    def noise_like(self, sample: torch.Tensor, generator) -> torch.Tensor:
        """
        Standard normal noise of `sample`'s shape, device and dtype.

        Args:
            sample (`torch.Tensor`):
                (N, C, H, W).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws it; a list, one per sample.

        Returns:
            `torch.Tensor`
        """
        return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

    def model_output(
        self, sample: torch.Tensor, t: torch.Tensor, low_noise_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """
        The UNet at (x_t, t), cast in and out of its dtype so that the chain keeps `sample`'s.

        Args:
            sample (`torch.Tensor`):
                x_t.
            t (`torch.Tensor`):
                The training step.
            low_noise_dtype (`torch.dtype`, *optional*):
                Run the float32 UNet under `torch.autocast` in this dtype when t < T/2, as `FaceDiffPipeline` does.

        Returns:
            `torch.Tensor`: in `sample`'s dtype.
        """
        precision = contextlib.nullcontext()  # a caller's own autocast, if any, holds
        if low_noise_dtype is not None:
            low_noise = bool(t < self.scheduler.config.num_train_timesteps // 2)
            precision = torch.autocast(sample.device.type, dtype=low_noise_dtype, enabled=low_noise)
        with precision:
            return self.unet(sample.to(self.unet.dtype), t).sample.to(sample.dtype)

    def postprocess(self, sample: torch.Tensor, output_type: str):
        """
        Samples out of the model's space.

        Args:
            sample (`torch.Tensor`):
                (N, C, H, W) in [-1, 1].
            output_type (`str`):
                `"pil"` (mode "L" or "RGB"), `"np"` (N, H, W, C in [0, 1]) or `"pt"` (N, C, H, W in [0, 1]).

        Returns:
            `list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`
        """
        image = (sample / 2 + 0.5).clamp(0, 1).contiguous()
        if output_type != "pt":
            image = image.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return image
