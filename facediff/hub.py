"""facediff's `FaceDiffPipeline`: the sampler that saved folders carry as remote code, with what only an installed
facediff does on top: loading with installed classes alone, atomic saving, and a one-commit Hub push with a model card.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path

import diffusers
from diffusers import UNet2DModel
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

from .atomic_files import replace_entries
from .errors import first_line
from .locations import looks_like_hub_id
from .model_card import pipeline_model_card
from .pipelines import pipeline_facediff
from .pipelines.scheduling_facediff import FaceDiffScheduler

# The keyword arguments that say where a folder or Hub repo is and how to fetch it, as every from_pretrained takes.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
# The repo id in a model card's usage lines: `FaceDiffPipeline.from_pretrained("...")` and the remote-code one.
# The images a card written by training shows: the sample grid, and the evaluations during training (--eval_steps).
CARD_IMAGES = ("sample_grid.png", "eval_curve.png")
USAGE_REPO_ID = re.compile(r'((?:FaceDiffPipeline|DiffusionPipeline)\.from_pretrained\(")[^"]*(")')


class FaceDiffPipeline(pipeline_facediff.FaceDiffPipeline):
    """
    Draws images from a trained DDPM: noise x_T, then the document's reverse update down to x_0. The sampler and its
    arguments (`unet`, `scheduler`) are those of the remote-code pipeline it extends, which every saved folder
    carries; this class adds loading with installed classes only, atomic saving and a one-commit Hub push with a
    model card.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "FaceDiffPipeline":
        """
        Load a pipeline saved by [`FaceDiffPipeline.save_pretrained`] from a folder or a Hub repo id.

        The folder also carries the sampler as remote code for users without facediff; this method builds the
        pipeline from facediff's and diffusers' installed classes instead, so no code from the folder runs and
        `trust_remote_code` is not needed. Weights load from safetensors only unless `use_safetensors=False` is
        passed.

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
        check_model_location(location)
        try:
            index = cls.load_config(pretrained_model_name_or_path, **hub_kwargs)
        except OSError as error:
            if not os.path.isdir(location):
                raise
            unfinished_run = any(name.startswith("checkpoint-") for name in os.listdir(location))
            fix = (
                "it holds checkpoints of an unfinished run: finish it with --resume_from_checkpoint latest, or make "
                f"a pipeline of its latest checkpoint with `facediff export {location} OUT`"
                if unfinished_run
                else "pass the folder that save_pretrained or training wrote"
            )
            raise OSError(f"{first_line(error).rstrip('.')}: not a saved pipeline; {fix}.") from error
        _check_model_index(index, location)
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
        pipeline.register_to_config(_name_or_path=location)
        return pipeline

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """
        Save the weights (safetensors), `model_index.json`, the scheduler config and the sampler's code, so that
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without facediff installed.

        The folder is written whole into a staging folder first and then moved into place, so a crash never leaves
        a half-written pipeline behind; files in `save_directory` that the pipeline does not own are kept.

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder to write; created if missing.
            push_to_hub (`bool`, defaults to `False`):
                Also upload the saved pipeline with [`FaceDiffPipeline.push_to_hub`], with the folder's model card and
                its images; `repo_id` defaults to the folder's name.
            kwargs:
                Passed to [`~DiffusionPipeline.save_pretrained`] (`safe_serialization`, `variant`, ...) or, with
                `push_to_hub`, to `push_to_hub` (`repo_id`, `private`, `token`, `commit_message`, `create_pr`).
        """
        push_kwargs = {name: kwargs.pop(name) for name in pipeline_facediff.HUB_UPLOAD_KWARGS if name in kwargs}
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".facediff-staging-", dir=save_directory))
        try:
            super().save_pretrained(staging, **kwargs)
            replace_entries(staging, save_directory, last="model_index.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", save_directory.resolve().name)
            save_kwargs = {name: kwargs[name] for name in ("safe_serialization", "variant") if name in kwargs}
            self.push_to_hub(repo_id, card_folder=save_directory, **push_kwargs, **save_kwargs)

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
        model card `README.md` and the images it shows (`CARD_IMAGES`) of `card_folder` when it has them, in one
        commit; nothing else.
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
                Where the card and its images are; default: the folder this pipeline was loaded from.

        Returns:
            `huggingface_hub.CommitInfo`
        """
        card_folder = card_folder or self.name_or_path  # None for a pipeline built in memory
        card_folder = Path(card_folder) if card_folder else None
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # with the user's namespace
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            card = card_folder / "README.md" if card_folder else None
            if card is not None and card.is_file():
                # The card was written for a folder or another repo: its usage lines name where it now goes.
                (folder / "README.md").write_text(USAGE_REPO_ID.sub(rf"\g<1>{repo_id}\g<2>", card.read_text()))
            else:
                pipeline_model_card(self, repo_id).save(folder / "README.md")
            for image in CARD_IMAGES:
                if card_folder and (card_folder / image).is_file():
                    shutil.copyfile(card_folder / image, folder / image)
            files = sorted(path for path in folder.rglob("*") if path.is_file())
            operations = [CommitOperationAdd(str(path.relative_to(folder)), str(path)) for path in files]
            return api.create_commit(
                repo_id=repo_id, operations=operations, commit_message=commit_message, create_pr=create_pr
            )


def check_model_location(location: str) -> None:
    """
    Refuse what is neither a folder nor a Hub repo id (`user/name`), such as a mistyped path, before anything is read.

    Args:
        location (`str`):
            What `from_pretrained` or a command was given.
    """
    if not os.path.isdir(location) and not looks_like_hub_id(location):
        raise ValueError(
            f"{location} is neither a folder nor a Hub repo id (user/name): pass a folder written by save_pretrained "
            "or a repo id."
        )


def _check_model_index(index: dict, location: str) -> None:
    """Refuse a model_index.json that does not describe a FaceDiffPipeline, naming the file and what is wrong."""
    schedulers = (FaceDiffScheduler.__name__, *FaceDiffScheduler._compatibles)
    expected = {"_class_name": (FaceDiffPipeline.__name__,), "unet": ("UNet2DModel",), "scheduler": schedulers}
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
