# Written as it stands into every saved FaceDiffPipeline, as remote code: it imports only torch, diffusers and its
# sibling scheduling_facediff.py, so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs it
# where facediff is not installed. facediff's own FaceDiffPipeline (facediff/hub.py) subclasses it to add loading
# with installed classes, atomic saving, the model card and the Hub push.
"""Unconditional image generation with a UNet2DModel and the document's DDPM sampler."""

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_facediff import FaceDiffScheduler

OUTPUT_TYPES = ("pil", "np", "pt")
# The modules saved beside this one, as remote code: its scheduler, and the editing pipelines built from the same
# unet and scheduler, which load from the saved folder with `custom_pipeline=`.
SIBLING_MODULES = (
    "scheduling_facediff.py",
    "image_io_facediff.py",
    "pipeline_facediff_inpaint.py",
    "pipeline_facediff_img2img.py",
    "pipeline_facediff_interpolate.py",
)
# What save_pretrained(..., push_to_hub=True) passes on to push_to_hub.
HUB_UPLOAD_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr")


class FaceDiffPipeline(DiffusionPipeline):
    """
    Draws images from a trained DDPM: noise x_T, then the document's reverse update down to x_0.

    Args:
        unet ([`UNet2DModel`]):
            The noise predictor M(x_t, t).
        scheduler ([`FaceDiffScheduler`]):
            The DDPM schedule and reverse update; one of diffusers' schedulers in `scheduler.compatibles`
            (`DDIMScheduler.from_config(pipeline.scheduler.config)`, ...) also samples, and saves and loads as such.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FaceDiffScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        memory_format: torch.memory_format | None = None,
        low_noise_dtype: torch.dtype | None = None,
    ) -> ImagePipelineOutput | tuple:
        """
        Generate images.

        Args:
            batch_size (`int`, defaults to 1):
                How many images.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling reproducible; a list gives one generator per image, and image i is then the image
                its generator alone gives with `batch_size=1`.
            num_inference_steps (`int`, *optional*):
                Reverse steps; `None` runs the full chain of T steps, fewer respace it.
            output_type (`str`, defaults to `"pil"`):
                `"pil"` (mode "L" for one channel, "RGB" for three), `"np"` (N, H, W, C in [0, 1]) or `"pt"`
                (N, C, H, W in [0, 1]; float32 under a bfloat16 or float16 UNet, whose chain runs in float32).
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] rather than a tuple.
            memory_format (`torch.memory_format`, *optional*):
                Layout of the UNet's weights and of the sample while sampling. By default `torch.channels_last`
                on a CPU, where oneDNN's convolutions are faster in it, and `torch.contiguous_format` elsewhere.
                The UNet gets its own layout back afterwards, so that a model being trained keeps computing as it
                did. The images are the same up to float rounding.
            low_noise_dtype (`torch.dtype`, *optional*):
                Run a float32 UNet under `torch.autocast` in this dtype (`torch.bfloat16`) for the steps with
                t < T/2 only. The steps above set each image's colours and layout from small differences in the
                predicted noise, which a UNet with weights rounded to bfloat16 shifts the same way for every image
                (64x64 faces come out darker); below, only detail is left to draw and half precision is safe.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images, as `images` or as the tuple's first element.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for batch_size={batch_size}: pass one per image.")
        if low_noise_dtype is not None and self.unet.dtype != torch.float32:
            raise ValueError(f"low_noise_dtype needs a float32 UNet, got {self.unet.dtype}: load it in float32.")

        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        device = self._execution_device
        if memory_format is None:
            memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        # The chain stays in float32 under a half-precision UNet: each step adds terms scaled by betas down to 1e-4,
        # which bfloat16's 8-bit mantissa would lose. Only the UNet's input and output are cast.
        unet_dtype = self.unet.dtype
        chain_dtype = torch.float32 if unet_dtype in (torch.bfloat16, torch.float16) else unet_dtype
        image = randn_tensor(shape, generator=generator, device=device, dtype=chain_dtype)
        image = image.contiguous(memory_format=memory_format)

        if num_inference_steps is None:  # the full chain, also for a diffusers scheduler swapped in
            num_inference_steps = self.scheduler.config.num_train_timesteps
        # The scheduler reads each t as a number and the UNet takes it as a tensor on its device: keeping a copy
        # of the chain on each side spares a GPU a wait for the device (a read or a blocking copy) at every step.
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps_on_device = self.scheduler.timesteps.to(device)
        half_chain = self.scheduler.config.num_train_timesteps // 2
        with _unet_layout(self.unet, memory_format):
            for t, t_on_device in zip(self.progress_bar(self.scheduler.timesteps), timesteps_on_device, strict=True):
                precision = contextlib.nullcontext()
                if low_noise_dtype is not None:
                    precision = torch.autocast(device.type, dtype=low_noise_dtype, enabled=bool(t < half_chain))
                with precision:
                    model_output = self.unet(image.to(unet_dtype), t_on_device).sample.to(chain_dtype)
                image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1).contiguous()
        if output_type != "pt":
            image = image.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """
        Save as [`~DiffusionPipeline.save_pretrained`] does, with this module, its scheduler's and the editing
        pipelines' beside the weights as remote code, so that the folder loads with `trust_remote_code=True` where
        facediff is not installed.

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder to write.
            push_to_hub (`bool`, defaults to `False`):
                Then upload it with `push_to_hub` (`repo_id`, default: the folder's name, `token`, ... in kwargs).
            kwargs:
                Passed to [`~DiffusionPipeline.save_pretrained`] (`safe_serialization`, `variant`, ...).
        """
        hub_kwargs = {name: kwargs.pop(name) for name in HUB_UPLOAD_KWARGS if name in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        folder, source = Path(save_directory), Path(__file__)
        scheduler_source = source.with_name("scheduling_facediff.py")
        # Beside the pipeline for the relative imports; for our scheduler, also in scheduler/, where diffusers looks
        # for a component's own code. A diffusers scheduler keeps the entry diffusers wrote for it. Run as remote
        # code, this module has beside it only the modules that diffusers copied for what was loaded: the editing
        # pipelines go along when they are there.
        for name in (source.name, *SIBLING_MODULES):
            if source.with_name(name).is_file():
                shutil.copyfile(source.with_name(name), folder / name)
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = [source.stem, FaceDiffPipeline.__name__]
        if index["scheduler"][-1] == FaceDiffScheduler.__name__:
            shutil.copyfile(scheduler_source, folder / "scheduler" / scheduler_source.name)
            index["scheduler"] = [scheduler_source.stem, FaceDiffScheduler.__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if push_to_hub:  # here, once the code is written: diffusers' own push would upload the folder before it
            save_kwargs = {name: kwargs[name] for name in ("safe_serialization", "variant") if name in kwargs}
            self.push_to_hub(hub_kwargs.pop("repo_id", folder.resolve().name), **hub_kwargs, **save_kwargs)


@contextlib.contextmanager
def _unet_layout(unet: torch.nn.Module, memory_format: torch.memory_format):
    """Give the UNet's convolution weights `memory_format` for the duration, then the layout they had."""
    # A weight whose layouts differ in memory (with one input channel and a 1x1 kernel, both are the same).
    conv_weight = next(
        (
            parameter
            for parameter in unet.parameters()
            if parameter.dim() == 4
            and parameter.is_contiguous() != parameter.is_contiguous(memory_format=torch.channels_last)
        ),
        None,
    )
    was_channels_last = conv_weight is not None and not conv_weight.is_contiguous()
    unet.to(memory_format=memory_format)
    try:
        yield
    finally:
        unet.to(memory_format=torch.channels_last if was_channels_last else torch.contiguous_format)
