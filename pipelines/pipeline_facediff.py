# This file is written as it stands into every saved FaceDiffPipeline (as remote code), so it imports nothing from
# facediff: only torch, diffusers and its sibling scheduling_facediff.py, which is saved beside it. (diffusers checks
# every import line of remote code; facediff's card template is reached through importlib, and only when installed.)
"""Unconditional image generation with a UNet2DModel and the document's DDPM sampler."""

import contextlib
import importlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

from .scheduling_facediff import FaceDiffScheduler

OUTPUT_TYPES = ("pil", "np", "pt")
# The keyword arguments that say where a folder or Hub repo is and how to fetch it, as every from_pretrained takes.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
# The repo id in a model card's usage lines: `FaceDiffPipeline.from_pretrained("...")` and the remote-code one.
_USAGE_REPO_ID = re.compile(r'((?:FaceDiffPipeline|DiffusionPipeline)\.from_pretrained\(")[^"]*(")')


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
                (N, C, H, W in [0, 1]).
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] rather than a tuple.
            memory_format (`torch.memory_format`, *optional*):
                Layout of the UNet's weights and of the sample while sampling. By default `torch.channels_last`
                on a CPU, where convolutions run faster on it (1.2-1.3x on a 2-core CPU, see the README), and
                `torch.contiguous_format` elsewhere (on an H100, channels_last sampled 3-10% slower than
                contiguous in each dtype). The UNet gets its own layout back afterwards, so that a model being
                trained keeps computing as it did. The images are the same up to float rounding.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images, as `images` or as the tuple's first element.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for batch_size={batch_size}: pass one per image.")

        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        device = self._execution_device
        if memory_format is None:
            memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image.contiguous(memory_format=memory_format)

        if num_inference_steps is None:  # the full chain, also for a diffusers scheduler swapped in
            num_inference_steps = self.scheduler.config.num_train_timesteps
        # The scheduler reads each t as a number and the UNet takes it as a tensor on its device: keeping a copy
        # of the chain on each side spares a GPU a wait for the device (a read or a blocking copy) at every step.
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps_on_device = self.scheduler.timesteps.to(device)
        with _unet_layout(self.unet, memory_format):
            for t, t_on_device in zip(self.progress_bar(self.scheduler.timesteps), timesteps_on_device, strict=True):
                model_output = self.unet(image, t_on_device).sample
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "FaceDiffPipeline":
        """
        Load a pipeline saved by [`FaceDiffPipeline.save_pretrained`] from a folder or a Hub repo id.

        The folder also carries this module as remote code for users without facediff; loading through this
        class uses the installed classes instead, so no code from the folder runs and `trust_remote_code` is not
        needed. Weights load from safetensors only unless `use_safetensors=False` is passed.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A local folder, or a Hub repo id such as `"user/name"` (read from the Hub cache when offline).
            kwargs:
                `unet` or `scheduler` to use instead of the saved ones; Hub arguments (`cache_dir`, `revision`,
                `token`, `local_files_only`, ...); and UNet loading arguments such as `torch_dtype`.

        Returns:
            [`FaceDiffPipeline`]
        """
        hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
        unet = kwargs.pop("unet", None)
        scheduler = kwargs.pop("scheduler", None)
        kwargs.setdefault("use_safetensors", True)

        location = str(pretrained_model_name_or_path)
        check_location(location)
        try:
            index = cls.load_config(pretrained_model_name_or_path, **hub_kwargs)
        except OSError as error:
            if not os.path.isdir(location):
                raise
            unfinished_run = any(name.startswith("checkpoint-") for name in os.listdir(location))
            fix = (
                "it holds checkpoints of an unfinished run: finish it with --resume_from_checkpoint latest"
                if unfinished_run
                else "pass the folder that save_pretrained or training wrote"
            )
            raise OSError(f"{first_line(error).rstrip('.')}: not a saved pipeline; {fix}.") from error
        _check_model_index(index, pretrained_model_name_or_path)
        if unet is None:
            try:
                unet = UNet2DModel.from_pretrained(
                    pretrained_model_name_or_path, subfolder="unet", **hub_kwargs, **kwargs
                )
            except OSError as error:
                pickle_only = kwargs["use_safetensors"] and os.path.isfile(
                    os.path.join(location, "unet", "diffusion_pytorch_model.bin")
                )
                fix = (
                    "Its weights are pickle-based .bin, which can run code: pass use_safetensors=False only if you "
                    "trust the folder, or convert it with save_pretrained."
                    if pickle_only
                    else "Restore unet/ from the saved pipeline or save it again."
                )
                raise OSError(f"{location}/unet: {first_line(error)} {fix}") from error
        if scheduler is None:
            scheduler_class = _scheduler_class(index["scheduler"][-1])
            try:
                scheduler = scheduler_class.from_pretrained(
                    pretrained_model_name_or_path, subfolder="scheduler", **hub_kwargs
                )
            except ValueError as error:
                raise ValueError(f"{location}/scheduler/scheduler_config.json: {first_line(error)}") from error
        pipeline = cls(unet=unet, scheduler=scheduler)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """
        Save the weights (safetensors), `model_index.json`, the scheduler config and this module with its scheduler
        as remote code, so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without
        facediff installed.

        The folder is written whole into a staging folder first and then moved into place, so a crash never leaves
        a half-written pipeline behind; files in `save_directory` that the pipeline does not own are kept.

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder to write; created if missing.
            push_to_hub (`bool`, defaults to `False`):
                Also upload the saved pipeline with [`FaceDiffPipeline.push_to_hub`], with the folder's model card and
                sample grid; `repo_id` defaults to the folder's name.
            kwargs:
                Passed to [`~DiffusionPipeline.save_pretrained`] (`safe_serialization`, `variant`, ...) or, with
                `push_to_hub`, to `push_to_hub` (`repo_id`, `private`, `token`, `commit_message`, `create_pr`).
        """
        hub_kwargs = {
            name: kwargs.pop(name)
            for name in ("repo_id", "private", "token", "commit_message", "create_pr")
            if name in kwargs
        }
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".facediff-staging-", dir=save_directory))
        try:
            super().save_pretrained(staging, **kwargs)
            self._write_remote_code(staging)
            _move_entries_into_place(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", save_directory.resolve().name)
            save_kwargs = {name: kwargs[name] for name in ("safe_serialization", "variant") if name in kwargs}
            self.push_to_hub(repo_id, card_folder=save_directory, **hub_kwargs, **save_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload facediff pipeline",
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        card_folder: str | os.PathLike | None = None,
    ) -> CommitInfo:
        """
        Upload the pipeline as [`FaceDiffPipeline.save_pretrained`] writes it (weights, configs, the code), with the
        model card `README.md` and `sample_grid.png` of `card_folder` when it has them, in one commit; nothing else.
        A pipeline without a card (built in memory) gets one rendered from its configs with facediff's template.

        Args:
            repo_id (`str`):
                The Hub model repo, `user/name`; created if missing.
            commit_message (`str`):
                The commit's title.
            private (`bool`, *optional*):
                Create the repo as private.
            token (`str`, *optional*):
                A Hub token; default: huggingface_hub's usual sources (HF_TOKEN, the saved login). Never written.
            create_pr (`bool`, defaults to `False`):
                Open a pull request instead of committing to main.
            safe_serialization (`bool`, defaults to `True`):
                Upload the weights as safetensors (`False`: pickle, which facediff never loads by default).
            variant (`str`, *optional*):
                Upload the weights as `diffusion_pytorch_model.<variant>.safetensors`, e.g. `"fp16"`.
            card_folder (`str` or `os.PathLike`, *optional*):
                Where the card and sample grid are; default: the folder this pipeline was loaded from.

        Returns:
            `huggingface_hub.CommitInfo`
        """
        card_folder = card_folder or self.name_or_path  # None for a pipeline built in memory
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # with the user's namespace
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            card = Path(card_folder) / "README.md" if card_folder else None
            if card is not None and card.is_file():
                # The card was written for a folder or another repo: its usage lines name where it now goes.
                (folder / "README.md").write_text(_USAGE_REPO_ID.sub(rf"\g<1>{repo_id}\g<2>", card.read_text()))
            elif __package__ == "facediff.pipelines":
                # The template ships with facediff; as remote code without facediff there is none to render.
                card_module = importlib.import_module("facediff.model_card")
                card_module.pipeline_model_card(self, repo_id).save(folder / "README.md")
            if card_folder and (Path(card_folder) / "sample_grid.png").is_file():
                shutil.copyfile(Path(card_folder) / "sample_grid.png", folder / "sample_grid.png")
            files = sorted(path for path in folder.rglob("*") if path.is_file())
            operations = [CommitOperationAdd(str(path.relative_to(folder)), str(path)) for path in files]
            return api.create_commit(
                repo_id=repo_id, operations=operations, commit_message=commit_message, create_pr=create_pr
            )

    @staticmethod
    def _write_remote_code(folder: Path):
        """Copy this module and the scheduler's into `folder` and point `model_index.json` at them."""
        pipeline_source = Path(__file__)
        scheduler_source = Path(__file__).with_name("scheduling_facediff.py")
        shutil.copyfile(pipeline_source, folder / pipeline_source.name)
        # Beside the pipeline for its relative import; for our scheduler, also in scheduler/, where diffusers looks
        # for a component's own code. A diffusers scheduler keeps the entry diffusers wrote for it.
        shutil.copyfile(scheduler_source, folder / scheduler_source.name)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [pipeline_source.stem, FaceDiffPipeline.__name__]
        if index["scheduler"][-1] == FaceDiffScheduler.__name__:
            shutil.copyfile(scheduler_source, folder / "scheduler" / scheduler_source.name)
            index["scheduler"] = [scheduler_source.stem, FaceDiffScheduler.__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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


def check_location(location: str) -> None:
    """
    Refuse what is neither a folder nor a Hub repo id (`user/name`), such as a mistyped path, before anything is read.

    Args:
        location (`str`):
            What `from_pretrained` was given.
    """
    if not os.path.isdir(location) and (os.path.isabs(location) or location.startswith(".") or location.count("/") > 1):
        raise ValueError(
            f"{location} is neither a folder nor a Hub repo id (user/name): pass a folder written by save_pretrained "
            "or a repo id."
        )


def first_line(error: BaseException) -> str:
    """
    An error's message on one line (Hub and loading errors add lines of detail), or its type when it has none.

    Args:
        error (`BaseException`):
            The error.
    """
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _check_model_index(index: dict, location) -> None:
    """Refuse a model_index.json that does not describe a FaceDiffPipeline, naming the file and what is wrong."""
    schedulers = (FaceDiffScheduler.__name__, *FaceDiffScheduler._compatibles)
    expected = {"_class_name": ("FaceDiffPipeline",), "unet": ("UNet2DModel",), "scheduler": schedulers}
    for key, class_names in expected.items():
        entry = index.get(key)
        found = entry[-1] if isinstance(entry, (list, tuple)) and entry else entry
        if found not in class_names:
            raise ValueError(
                f"{location}/model_index.json names {key}={entry!r}, but a FaceDiffPipeline needs "
                f"{' or '.join(class_names)}: load this folder with the pipeline class it was saved from."
            )


def _scheduler_class(name: str) -> type:
    """Ours, or the diffusers scheduler of that name: only classes of installed libraries, never a folder's code."""
    return FaceDiffScheduler if name == FaceDiffScheduler.__name__ else getattr(diffusers, name)


def _move_entries_into_place(staging: Path, target: Path) -> None:
    """
    Move every entry of `staging` into `target`, replacing entries of the same name and keeping the others.

    model_index.json goes first out and last in, so that at no moment does `target` look like a loadable pipeline
    made of old and new parts; the replaced entries are deleted only once everything new is in place.
    """
    backup = target / f".facediff-replaced-{uuid.uuid4().hex}"
    backup.mkdir()
    names = sorted(entry.name for entry in staging.iterdir())
    names.sort(key=lambda name: name == "model_index.json")
    if (target / "model_index.json").exists():
        os.replace(target / "model_index.json", backup / "model_index.json")
    for name in names:
        if (target / name).exists():
            os.replace(target / name, backup / name)
        os.replace(staging / name, target / name)
    shutil.rmtree(backup)
