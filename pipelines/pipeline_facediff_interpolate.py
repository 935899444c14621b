# Written as it stands into every saved FaceDiffPipeline, as remote code (see pipeline_facediff.py): it imports only
# torch, diffusers and its siblings. Without facediff: DiffusionPipeline.from_pretrained(folder_or_repo_id,
# custom_pipeline="pipeline_facediff_interpolate", trust_remote_code=True).
"""Interpolation with a trained DDPM: two images are DDIM-inverted to their x_T (Song et al. 2021), or two seeds
give two noises; the frames between are spherical interpolations of the two, decoded by DDIM (eta 0)."""

import inspect

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .image_io_facediff import FaceDiffImageIO
from .scheduling_facediff import FaceDiffScheduler

# DDIM on the model's schedule, inverted and decoded over the same steps: "trailing" steps start at T-1, the only
# spacing both classes offer that reaches x_T, and neither clips, so that decoding retraces the inversion.
DDIM_OPTIONS = {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0}


class FaceDiffInterpolationPipeline(DiffusionPipeline, FaceDiffImageIO):
    """
    Moves between two faces: the frames are DDIM decodings of latents spherically interpolated between the ends'.

    Args:
        unet ([`UNet2DModel`]):
            The noise predictor M(x_t, t).
        scheduler ([`FaceDiffScheduler`]):
            The model's sampler; only its schedule is used (its config builds `DDIMInverseScheduler` and
            `DDIMScheduler`).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FaceDiffScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_frames: int = 8,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        low_noise_dtype: torch.dtype | None = None,
    ) -> ImagePipelineOutput | tuple:
        """
        Interpolate between two images, or between two seeds.

        Args:
            image (list of two `PIL.Image.Image`, or `torch.Tensor`, *optional*):
                The two ends, of any mode and size (converted as training converts them), or a tensor (2, C, H, W)
                in [0, 1]. The first and last frames are their DDIM round trips, close to them (see `invert`).
            generator (`torch.Generator` or a list of two, *optional*):
                Without `image`: draws the two ends' noise (two generators: one each, e.g. two seeds).
            num_frames (`int`, defaults to 8):
                Frames, both ends included: at least 2.
            num_inference_steps (`int`, defaults to 50):
                DDIM steps, for the inversion and for decoding.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (N, H, W, C in [0, 1]) or `"pt"` (N, C, H, W in [0, 1]).
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] rather than a tuple.
            low_noise_dtype (`torch.dtype`, *optional*):
                Run a float32 UNet under `torch.autocast` in this dtype (`torch.bfloat16`) for the steps with
                t < T/2 only, as [`FaceDiffPipeline`] does, in the inversion and the decoding.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the `num_frames` frames.
        """
        if num_frames < 2:
            raise ValueError(f"num_frames must be at least 2, both ends included; got {num_frames}.")
        self.check_call(2, generator, output_type, low_noise_dtype)
        if image is not None and len(self.preprocess(image)) != 2:  # converting is cheap; the inversion is not
            raise ValueError(f"Interpolation needs two images, got {len(self.preprocess(image))}.")
        if image is not None:
            ends = self.invert(image, num_inference_steps, low_noise_dtype)
        else:
            size = self.unet.config.sample_size
            shape = (2, self.unet.config.in_channels, size, size)
            ends = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.chain_dtype)
        sample = torch.stack([slerp(ends[0], ends[1], fraction) for fraction in torch.linspace(0, 1, num_frames)])

        decoder = ddim_on_schedule(DDIMScheduler, self.scheduler)
        decoder.set_timesteps(num_inference_steps)
        for t in self.progress_bar(decoder.timesteps):
            sample = decoder.step(self.model_output(sample, t, low_noise_dtype), t, sample, eta=0.0).prev_sample

        images = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def invert(self, image, num_inference_steps: int = 50, low_noise_dtype: torch.dtype | None = None) -> torch.Tensor:
        """
        DDIM inversion: the x_T from which DDIM (eta 0) over the same steps decodes back to about `image`. The
        round trip is not exact, since each inverted step evaluates the model at the level it leaves rather than
        the one it reaches; fewer steps err more.

        Args:
            image (`PIL.Image.Image`, a list of them, or `torch.Tensor`):
                As `__call__` takes it, any number of images.
            num_inference_steps (`int`, defaults to 50):
                DDIM steps.
            low_noise_dtype (`torch.dtype`, *optional*):
                As `__call__` takes it.

        Returns:
            `torch.Tensor`: x_T, (N, C, H, W).
        """
        sample = self.preprocess(image)
        inverse = ddim_on_schedule(DDIMInverseScheduler, self.scheduler)
        inverse.set_timesteps(num_inference_steps)
        for t in self.progress_bar(inverse.timesteps):
            sample = inverse.step(self.model_output(sample, t, low_noise_dtype), t, sample).prev_sample
        return sample


def ddim_on_schedule(ddim_class: type, scheduler) -> DDIMScheduler | DDIMInverseScheduler:
    """
    A DDIM scheduler (or its inverse) on `scheduler`'s schedule, with `DDIM_OPTIONS`. Only the keys DDIM takes are
    passed, all of them: diffusers would warn about the others, and give a key left at its default in an in-memory
    config DDIM's own default instead (`_use_default_values`).

    Args:
        ddim_class (`type`):
            `DDIMScheduler` or `DDIMInverseScheduler`.
        scheduler (`SchedulerMixin`):
            The model's scheduler.

    Returns:
        `DDIMScheduler` or `DDIMInverseScheduler`
    """
    keys = inspect.signature(ddim_class.__init__).parameters
    config = {key: value for key, value in scheduler.config.items() if key in keys}
    return ddim_class.from_config({**config, **DDIM_OPTIONS})


def slerp(start: torch.Tensor, end: torch.Tensor, fraction: float) -> torch.Tensor:
    """
    Spherical interpolation, which keeps a Gaussian latent's norm where a straight line would shrink it (Shoemake
    1985, as in the DDIM paper's interpolations); nearly parallel ends are interpolated linearly.

    Args:
        start (`torch.Tensor`):
            At fraction 0.
        end (`torch.Tensor`):
            At fraction 1, the same shape.
        fraction (`float`):
            Where between them, in [0, 1].

    Returns:
        `torch.Tensor`
    """
    cosine = (start * end).sum() / (start.norm() * end.norm())
    angle = torch.arccos(cosine.clamp(-1, 1))
    if angle < 1e-4:
        return (1 - fraction) * start + fraction * end
    return (torch.sin((1 - fraction) * angle) * start + torch.sin(fraction * angle) * end) / torch.sin(angle)
