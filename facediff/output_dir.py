"""The training output folder: refuse to mix two runs in one folder, and fail before training if it is unwritable."""

import json
import os
import shutil
from pathlib import Path

from .checkpointing import list_checkpoints
from .training_args import TrainingArguments

RUN_MARKERS = ("model_index.json", "training_args.json")


def check_output_dir(args: TrainingArguments, output_dir: Path, is_main_process: bool) -> None:
    """
    Make sure `output_dir` can take this run before anything is written: it must be writable (or creatable), and a
    folder that holds another run is refused unless resuming or `--overwrite_output_dir` (which then clears that
    run's checkpoints).

    Args:
        args (`TrainingArguments`):
            `resume_from_checkpoint`, `overwrite_output_dir`.
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
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"Cannot write to --output_dir {output_dir} ({existing} is not a writable folder): "
            "choose a writable folder."
        )


def write_json(path: Path, content: dict) -> None:
    """Write JSON atomically."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
