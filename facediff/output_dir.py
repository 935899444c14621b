"""The training output folder: refuse to mix two runs in one folder, and fail before training if it is unwritable."""

import json
import os
import shutil
from pathlib import Path

from .checkpointing import checkpoint_training_args, list_checkpoints, resolve_checkpoint
from .training_args import TrainingArguments

RUN_MARKERS = ("model_index.json", "training_args.json")

# A resume must not change what defines the run: what the model is, what it learns from and in which order, and how
# it is optimised. Changing one would either mix two runs in one folder, or be silently ignored because the
# checkpoint restores the old value (the optimizer's, LR schedule's and EMA's hyperparameters live in its state).
RUN_DEFINING_SETTINGS = (
    # the model and the diffusion process it learns
    "model_preset", "model_config_name_or_path", "resolution", "num_channels", "ddpm_num_steps",
    "ddpm_beta_schedule", "prediction_type", "snr_gamma",
    # the data, its preprocessing and its order (the resume point is counted in batches of this size)
    "dataset_name", "train_data_dir", "image_column", "max_train_samples", "center_crop", "random_flip", "seed",
    "train_batch_size", "gradient_accumulation_steps",
    # the optimizer, the learning-rate schedule and the EMA
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "use_ema", "ema_inv_gamma", "ema_power", "ema_max_decay",
)  # fmt: skip
# Settings that may name a local path: `data/train`, `./data/train/` and `/abs/data/train` are the same data.
PATH_SETTINGS = ("dataset_name", "train_data_dir", "model_config_name_or_path")
# A resume may change how long the run goes on (the LR schedule then stretches to the new length), how often it
# saves, samples and logs, where it writes, the hardware and speed settings, and the two remedies for a diverging
# run that do take effect on resume: --mixed_precision and --max_grad_norm.
RESUMABLE_SETTINGS = (
    "num_epochs", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "save_images_steps", "eval_batch_size", "num_inference_steps", "logger", "logging_dir", "push_to_hub",
    "hub_model_id", "hub_private_repo", "output_dir", "overwrite_output_dir", "dataloader_num_workers",
    "preprocessing_num_workers", "cpu_threads", "cache_dir", "mixed_precision", "max_grad_norm",
)  # fmt: skip


def check_output_dir(args: TrainingArguments, output_dir: Path, is_main_process: bool) -> None:
    """
    Make sure `output_dir` can take this run before anything is written: it must be writable (or creatable), a
    folder that holds another run is refused unless resuming or `--overwrite_output_dir` (which then clears that
    run's checkpoints), and a resume is refused if it changes a setting that defines the run.

    Args:
        args (`TrainingArguments`):
            The run's settings.
        output_dir (`Path`):
            The folder.
        is_main_process (`bool`):
            Only the main process deletes anything.
    """
    previous = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    previous += [path.name for path in list_checkpoints(output_dir)]
    if previous and args.resume_from_checkpoint is None:
        if not args.overwrite_output_dir:
            raise ValueError(
                f"--output_dir {output_dir} already holds a training run ({', '.join(previous[:4])}): resume it with "
                "--resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir."
            )
        if is_main_process:
            for checkpoint in list_checkpoints(output_dir):
                shutil.rmtree(checkpoint)
    if args.resume_from_checkpoint is not None:
        _refuse_a_different_run(args, output_dir)
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"Cannot write to --output_dir {output_dir} ({existing} is not a writable folder): "
            "choose a writable folder."
        )


def _refuse_a_different_run(args: TrainingArguments, output_dir: Path) -> None:
    """Compare the run-defining settings with those saved in `output_dir/training_args.json` (by a run that
    finished) and in the checkpoint to resume."""
    saved_runs = []
    if (output_dir / "training_args.json").is_file():
        saved_runs.append((output_dir / "training_args.json", _read_json(output_dir / "training_args.json")))
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None and (saved := checkpoint_training_args(checkpoint)) is not None:
        saved_runs.append((checkpoint, saved))
    settings = args.to_dict()
    for source, saved in saved_runs:
        changed = [
            name for name in RUN_DEFINING_SETTINGS if name in saved and not _same(name, saved[name], settings[name])
        ]
        if changed:
            differences = ", ".join(f"--{name} {settings[name]} (saved: {saved[name]})" for name in changed)
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: {source} is from a different run "
                f"({differences}): resume with the saved settings, or start a new run in another --output_dir "
                "(or with --overwrite_output_dir and without --resume_from_checkpoint)."
            )


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


def write_json(path: Path, content: dict) -> None:
    """Write JSON atomically."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
