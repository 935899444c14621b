"""The training output folder: refuse to mix two runs in one folder, and fail before training if it is unwritable."""

import json
import os
import shutil
from pathlib import Path

from .checkpointing import checkpoint_training_args, list_checkpoints, resolve_checkpoint
from .pipelines.pipeline_facediff import SIBLING_MODULES
from .training_args import TrainingArguments, default_resolution

RUN_MARKERS = ("model_index.json", "training_args.json")
# What a finished run writes besides its checkpoints and logs: --overwrite_output_dir removes it all, so that no file
# of the old run is taken for the new one's (its training_args.json would make the new run's resume look foreign).
RUN_OUTPUTS = (
    *RUN_MARKERS, "unet", "scheduler", "pipeline_facediff.py", *SIBLING_MODULES, "README.md",
    "sample_grid.png", "samples", "eval_log.jsonl", "eval_curve.png", "best_eval.safetensors",
)  # fmt: skip

# A resume must not change what defines the run: what the model is, what it learns from and in which order, and how
# it is optimised. Changing one would either mix two runs in one folder, or be silently ignored because the
# checkpoint restores the old value (the optimizer's, LR schedule's and EMA's hyperparameters live in its state).
RUN_DEFINING_SETTINGS = (
    # the model and the diffusion process it learns
    "model_preset", "model_config_name_or_path", "pretrained_model_name_or_path", "resolution", "num_channels",
    "ddpm_num_steps", "ddpm_beta_schedule", "prediction_type", "snr_gamma", "variance_type",
    # the data, its preprocessing and its order (the resume point is counted in batches of this size)
    "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "preserve_input_precision",
    "max_train_samples", "center_crop", "random_flip", "seed", "train_batch_size", "gradient_accumulation_steps",
    # the optimizer, the learning-rate schedule and the EMA
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "use_ema", "ema_inv_gamma", "ema_power", "ema_max_decay",
)  # fmt: skip
# Settings that may name a local path: `data/train`, `./data/train/` and `/abs/data/train` are the same data.
PATH_SETTINGS = ("dataset_name", "train_data_dir", "model_config_name_or_path", "pretrained_model_name_or_path")
# A resume may change how long the run goes on (the LR schedule then stretches to the new length), how often it
# saves, samples, evaluates and logs, how its sampler treats x_0 (--clip_sample: the weights do not depend on it),
# which weights it keeps at the end (--save_best), where it writes, the hardware and speed settings, and the two
# remedies for a diverging run that do take effect on resume: --mixed_precision and --max_grad_norm.
RESUMABLE_SETTINGS = (
    "num_epochs", "max_train_steps", "max_train_minutes", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "save_images_steps", "eval_batch_size", "num_inference_steps", "eval_steps",
    "eval_num_images", "eval_inference_steps", "save_best", "logger", "logging_dir", "push_to_hub",
    "hub_model_id", "hub_private_repo", "output_dir", "overwrite_output_dir", "dataloader_num_workers",
    "preprocessing_num_workers", "cpu_threads", "cache_dir", "mixed_precision", "max_grad_norm",
    "save_images_epochs", "save_model_epochs", "hub_token", "enable_xformers_memory_efficient_attention", "local_rank",
    "clip_sample",
)  # fmt: skip


def check_output_dir(args: TrainingArguments, output_dir: Path) -> None:
    """
    Make sure `output_dir` can take this run before anything is written: it must be writable (or creatable), and a
    folder that holds another run is refused unless resuming or `--overwrite_output_dir` (see `clear_previous_run`;
    a resume is checked by `refuse_a_different_run` once the settings in effect are known).

    Args:
        args (`TrainingArguments`):
            The run's settings.
        output_dir (`Path`):
            The folder.
    """
    previous = _previous_run(output_dir)
    if previous and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {output_dir} already holds a training run ({', '.join(previous[:4])}): resume it with "
            "--resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir."
        )
    existing = _nearest_existing(output_dir)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"Cannot write to --output_dir {output_dir} ({existing} is not a writable folder): "
            "choose a writable folder."
        )


def check_writable_file(path: Path, option: str) -> None:
    """
    Make sure a file can be written at `path` before the work whose result it holds starts: it must not be a folder,
    and the folder it goes into must exist and be writable, or be creatable.

    Args:
        path (`Path`):
            The file.
        option (`str`):
            The command-line option that named it, for the message (`--out`).
    """
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: pass a file path, such as {path / 'results.json'}.")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"Cannot write {option} {path} ({existing} is not a writable folder): choose a path in a writable folder."
        )


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: the folder that a write there would create folders in."""
    while not path.exists():
        path = path.parent
    return path


def clear_previous_run(args: TrainingArguments, output_dir: Path) -> None:
    """
    With `--overwrite_output_dir` and no resume, delete what another run left in `output_dir` (checkpoints, the
    pipeline, its card, samples, training_args.json and the log folder); call on the main process only, once the
    data and the model are set up, so that a mistake in them loses nothing.

    Args:
        args (`TrainingArguments`):
            The run's settings.
        output_dir (`Path`):
            The folder.
    """
    if not args.overwrite_output_dir or args.resume_from_checkpoint is not None or not _previous_run(output_dir):
        return
    old = [*list_checkpoints(output_dir), *output_dir.glob(".*.partial"), *output_dir.glob(".facediff-*")]
    old += [output_dir / name for name in RUN_OUTPUTS]  # and the leftovers of its interrupted saves, above
    logs = (output_dir / args.logging_dir).resolve()
    if logs.is_relative_to(output_dir.resolve()) and logs != output_dir.resolve():  # never a folder outside it
        old.append(logs)
    for path in old:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _previous_run(output_dir: Path) -> list[str]:
    """What in `output_dir` shows that a run has trained there."""
    previous = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    return previous + [path.name for path in list_checkpoints(output_dir)]


def refuse_a_different_run(args: TrainingArguments, output_dir: Path, channels: int) -> None:
    """
    Before a resume, compare the run-defining settings in effect with those saved in `output_dir/training_args.json`
    (by a run that finished) and in the checkpoint to resume.

    Args:
        args (`TrainingArguments`):
            The run's settings, as given.
        output_dir (`Path`):
            The folder.
        channels (`int`):
            The channel count in effect: `--num_channels`, or the data's.
    """
    saved_runs = []
    if (output_dir / "training_args.json").is_file():
        saved_runs.append((output_dir / "training_args.json", _read_json(output_dir / "training_args.json")))
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None and (saved := checkpoint_training_args(checkpoint)) is not None:
        saved_runs.append((checkpoint, saved))
    settings = args.in_effect(channels).to_dict()
    for source, saved in saved_runs:
        saved = _in_effect(saved, detected_channels=channels if args.num_channels is None else None)
        changed = [
            name for name in RUN_DEFINING_SETTINGS if name in saved and not _same(name, saved[name], settings[name])
        ]
        if args.num_channels is None and set(changed) & {"dataset_name", "train_data_dir", "image_column"}:
            # A channel count left to the data follows it: the change of data is the difference to report.
            changed = [name for name in changed if name != "num_channels"]
        if changed:
            differences = ", ".join(f"--{name} {settings[name]} (saved: {saved[name]})" for name in changed)
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: {source} is from a different run "
                f"({differences}): resume with the saved settings, or start a new run in another --output_dir "
                "(or with --overwrite_output_dir and without --resume_from_checkpoint)."
            )


def _in_effect(saved: dict, detected_channels: int | None) -> dict:
    """Runs saved before the values in effect were kept have None for a resolution or channel count left to its
    default, and runs saved before `--snr_gamma 0` have None for the unweighted loss: resolve them as that run did."""
    if saved.get("snr_gamma", 0.0) is None:
        saved = {**saved, "snr_gamma": 0.0}
    if "resolution" in saved and saved["resolution"] is None:
        saved = {**saved, "resolution": default_resolution(saved.get("dataset_name"), saved.get("train_data_dir"))}
    if "num_channels" in saved and saved["num_channels"] is None and detected_channels is not None:
        saved = {**saved, "num_channels": detected_channels}  # detected from the same data (compared too) as now
    return saved


def _same(name: str, saved, current) -> bool:
    """Equal, or, for a path setting, two spellings of one existing file or folder (relative to the current folder)."""
    if saved == current:
        return True
    if name not in PATH_SETTINGS or not isinstance(saved, str) or not isinstance(current, str):
        return False
    try:
        return os.path.samefile(saved, current)
    except OSError:  # either one is not an existing path (a Hub id, or moved data)
        return False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): restore it, or delete it to resume anyway.") from error
