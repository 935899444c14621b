# Written as it stands into every saved FaceDiffPipeline, as remote code (see pipeline_facediff.py): it imports only
# torch, numpy, PIL, diffusers and its siblings. Without facediff: DiffusionPipeline.from_pretrained(folder_or_repo_id,
# custom_pipeline="pipeline_facediff_inpaint", trust_remote_code=True).
"""Inpainting with a trained DDPM (RePaint, Lugmayr et al. 2022): the known pixels are noised by (3) at every step,
the model denoises the rest, and the chain goes back up now and then so that the two parts agree."""

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from PIL import Image, ImageOps

from .image_io_facediff import FaceDiffImageIO
from .scheduling_facediff import FaceDiffScheduler


class FaceDiffInpaintPipeline(DiffusionPipeline, FaceDiffImageIO):
    """
    Fills in the masked part of images with a trained DDPM, by RePaint's resampling on the model's own sampler.

    Args:
        unet ([`UNet2DModel`]):
            The noise predictor M(x_t, t).
        scheduler ([`FaceDiffScheduler`]):
            The model's sampler, whose step goes to the previous step of its chain (`FaceDiffScheduler`, or a
            `DDPMScheduler`).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FaceDiffScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        image,
        mask_image,
        num_inference_steps: int | None = None,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        low_noise_dtype: torch.dtype | None = None,
    ) -> ImagePipelineOutput | tuple:
        """
        Inpaint images.

        Args:
            image (`PIL.Image.Image`, a list of them, or `torch.Tensor`):
                The images, of any mode and size (converted as training converts them), or a tensor in [0, 1] at the
                model's channels and size.
            mask_image (`PIL.Image.Image`, a list of them, or `torch.Tensor`):
                White (1) where to repaint, black (0) where to keep, as diffusers' inpainting pipelines take it: one
                for all images or one per image, each of its image's size (a tensor: the model's size). A model pixel
                is repainted when any of it is white (at least 128 of 255).
            num_inference_steps (`int`, *optional*):
                The sampler's chain, respaced as in [`FaceDiffPipeline`]; `None`: all T steps. The resampling runs
                about `jump_n_sample` times as many model calls.
            jump_length (`int`, defaults to 10):
                Steps taken back up the chain at each jump (RePaint's j).
            jump_n_sample (`int`, defaults to 10):
                How often each stretch of `jump_length` steps is run (RePaint's r); 1 turns resampling off.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws the noise; a list gives one generator per image.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (N, H, W, C in [0, 1]) or `"pt"` (N, C, H, W in [0, 1]).
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] rather than a tuple.
            low_noise_dtype (`torch.dtype`, *optional*):
                Run a float32 UNet under `torch.autocast` in this dtype (`torch.bfloat16`) for the steps with
                t < T/2 only, as [`FaceDiffPipeline`] does: faster where the hardware computes it natively.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the inpainted images; the kept pixels are the input's.
        """
        if jump_length < 1 or jump_n_sample < 1:
            raise ValueError(f"jump_length and jump_n_sample must be at least 1, got {jump_length}, {jump_n_sample}.")
        original = self.preprocess(image)
        mask = self.preprocess_mask(mask_image, image, len(original))
        self.check_call(len(original), generator, output_type, low_noise_dtype)
        num_inference_steps = num_inference_steps or self.scheduler.config.num_train_timesteps
        self.scheduler.set_timesteps(num_inference_steps)
        # The chain from its clean end: level j + 1 is the j-th step, level 0 the clean image (alphabar 1).
        levels = [-1, *self.scheduler.timesteps.flip(0).tolist()]
        alpha_prods = [1.0, *(float(self.scheduler.alphas_cumprod[t]) for t in levels[1:])]

        sample, previous = self.noise_like(original, generator), num_inference_steps
        for j in self.progress_bar(repaint_schedule(num_inference_steps, jump_length, jump_n_sample)):
            if j < previous:  # a reverse step down to level j, with the known pixels put there by (3)
                t = levels[j + 1]
                model_output = self.model_output(sample, t, low_noise_dtype)
                sample = self.scheduler.step(model_output, t, sample, generator=generator).prev_sample
                noise = self.noise_like(original, generator)  # drawn at level 0 too, as RePaintPipeline draws it
                known = original
                if j > 0:
                    known = self.scheduler.add_noise(original, noise, torch.full((len(original),), levels[j]))
                sample = mask * sample + (1 - mask) * known
            else:  # resampling: back up from level j - 1 to level j by the forward process
                ratio = alpha_prods[j] / alpha_prods[j - 1]
                sample = ratio**0.5 * sample + (1 - ratio) ** 0.5 * self.noise_like(sample, generator)
            previous = j

        images = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def preprocess_mask(self, mask_image, image, batch_size: int) -> torch.Tensor:
        """
        Masks into the model's space, cropped and resized with their images; refuses a mask of another size than
        its image, or one that leaves nothing to repaint or nothing to keep.

        Args:
            mask_image (`PIL.Image.Image`, a list of them, or `torch.Tensor`):
                As `__call__` takes it.
            image (`PIL.Image.Image`, a list of them, or `torch.Tensor`):
                The images as given to `__call__`, whose sizes the masks must have.
            batch_size (`int`):
                How many images.

        Returns:
            `torch.Tensor`: (N, 1, H, W), 1 to repaint and 0 to keep, in `chain_dtype`.
        """
        size = self.unet.config.sample_size
        images = image if isinstance(image, (list, tuple)) else [image] * batch_size
        image_sizes = [each.size if isinstance(each, Image.Image) else (size, size) for each in images]
        masks = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image]
        if isinstance(mask_image, torch.Tensor):
            masks = list(mask_image.reshape(-1, 1, *mask_image.shape[-2:]).float().round())
        mask_sizes = [each.size if isinstance(each, Image.Image) else tuple(each.shape[:-3:-1]) for each in masks]
        if len(masks) not in (1, batch_size):
            raise ValueError(f"Got {len(masks)} masks for {batch_size} images: pass one for all, or one per image.")
        for index, image_size in enumerate(image_sizes):
            mask_size = mask_sizes[index % len(masks)]
            if mask_size != image_size:
                raise ValueError(
                    f"The mask is {mask_size[0]}x{mask_size[1]} but the image is {image_size[0]}x{image_size[1]}: "
                    "draw the mask at the image's size, white where to repaint and black where to keep."
                )
        if isinstance(mask_image, torch.Tensor):
            mask = torch.stack(masks)
        else:  # thresholded at 128; a model pixel is repainted when any part of it is white (the box filter's mean)
            binary = [each.convert("L").point(lambda value: 255 if value >= 128 else 0) for each in masks]
            fitted = [np.asarray(ImageOps.fit(each, (size, size), Image.Resampling.BOX)) > 0 for each in binary]
            mask = torch.from_numpy(np.stack(fitted)[:, None]).float()
        repainted = mask.flatten(1).mean(1)
        if (repainted == 0).any():
            raise ValueError(
                f"The mask marks nothing to repaint at the model's {size}x{size}: paint white where to repaint."
            )
        if (repainted == 1).any():
            raise ValueError(
                "The mask marks every pixel to repaint, so nothing of the image is kept: that is sampling "
                "(FaceDiffPipeline, `facediff sample`); leave black what to keep."
            )
        return mask.to(self._execution_device, self.chain_dtype)


def repaint_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """
    RePaint's path along a chain of `num_steps` steps (as `RePaintScheduler.set_timesteps`): the step numbers from
    the clean end, going down; after every `jump_length`-th step, `jump_n_sample - 1` times back up `jump_length`
    steps and down again. A number above the one before it is a step back up.

    Args:
        num_steps (`int`):
            The chain's length.
        jump_length (`int`):
            Steps per jump.
        jump_n_sample (`int`):
            How often each stretch is run.

    Returns:
        `list[int]`
    """
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    path, j = [], num_steps
    while j >= 1:
        j -= 1
        path.append(j)
        if jumps.get(j, 0) > 0:
            jumps[j] -= 1
            for _ in range(jump_length):
                j += 1
                path.append(j)
    return path
