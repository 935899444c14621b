# Written as it stands into every saved FaceDiffPipeline, as remote code (see pipeline_facediff.py): it imports only
# torch, diffusers and its siblings. Without facediff: DiffusionPipeline.from_pretrained(folder_or_repo_id,
# custom_pipeline="pipeline_facediff_img2img", trust_remote_code=True).
"""Image-to-image with a trained DDPM (SDEdit, Meng et al. 2022): noise an image part of the way by (3), then run the
reverse chain from there, so that a rough or damaged face comes back as one the model would draw."""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel

from .image_io_facediff import FaceDiffImageIO
from .scheduling_facediff import FaceDiffScheduler


class FaceDiffImg2ImgPipeline(DiffusionPipeline, FaceDiffImageIO):
    """
    Edits images with a trained DDPM: each is noised to step `strength * T` by the forward process (3) and denoised
    by the reverse chain of the model's sampler from there.

    Args:
        unet ([`UNet2DModel`]):
            The noise predictor M(x_t, t).
        scheduler ([`FaceDiffScheduler`]):
            The model's sampler, or one of the diffusers schedulers in `scheduler.compatibles`.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FaceDiffScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        image,
        strength: float = 0.5,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        low_noise_dtype: torch.dtype | None = None,
    ) -> ImagePipelineOutput | tuple:
        """
        Edit images.

        Args:
            image (`PIL.Image.Image`, a list of them, or `torch.Tensor`):
                The images, of any mode and size (converted as training converts them), or a tensor in [0, 1] at the
                model's channels and size.
            strength (`float`, defaults to 0.5):
                How far to noise, in [0, 1]: the last `int(strength * num_inference_steps)` steps of the sampler's
                chain are run, as in diffusers' img2img pipelines. 0 returns the image; 1 ignores it and samples from
                pure noise, as [`FaceDiffPipeline`] does with the same generator.
            num_inference_steps (`int`, *optional*):
                The sampler's chain, respaced as in [`FaceDiffPipeline`]; `None`: all T steps.
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
            [`ImagePipelineOutput`] or `tuple`: the edited images.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {strength}: 0 returns the image, 1 draws a new one.")
        original = self.preprocess(image)
        self.check_call(len(original), generator, output_type, low_noise_dtype)
        num_inference_steps = num_inference_steps or self.scheduler.config.num_train_timesteps
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps[num_inference_steps - int(strength * num_inference_steps) :]
        # Drawn first, as FaceDiffPipeline draws x_T, so that strength 1 is its sampling with the same generator.
        noise = self.noise_like(original, generator)
        if len(timesteps) == num_inference_steps:  # the whole chain starts from pure noise, as sampling does
            sample = noise
        elif len(timesteps) > 0:
            sample = self.scheduler.add_noise(original, noise, timesteps[:1].repeat(len(original)))
        else:
            sample = original
        for t in self.progress_bar(timesteps):
            model_output = self.model_output(sample, t, low_noise_dtype)
            sample = self.scheduler.step(model_output, t, sample, generator=generator).prev_sample

        images = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
