"""Resumable checkpoints: Accelerate's `save_state` into a staging folder, renamed into place when complete.

A checkpoint is `checkpoint-<step>` and nothing else: a process killed mid-save leaves only a `.checkpoint-*`
staging folder, which `latest` never picks and the next save clears away. A save that fails (a full disk) removes
its staging folder and leaves the previous checkpoints as they were.
"""

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator

from .atomic_files import atomic_copy

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "facediff_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """
    The complete checkpoints in `output_dir`, oldest first.

    Args:
        output_dir (`str` or `os.PathLike`):
            A training output folder.

    Returns:
        `list[Path]`
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        path for path in output_dir.iterdir() if CHECKPOINT_NAME.fullmatch(path.name) and (path / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: int(CHECKPOINT_NAME.fullmatch(path.name).group(1)))


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> Path | None:
    """
    The checkpoint `--resume_from_checkpoint` names: a folder, or "latest" (None when there is none yet). A relative
    name that is no folder here is looked for in `output_dir`, so `checkpoint-400` names the run's own.

    Args:
        resume_from_checkpoint (`str`):
            A checkpoint folder, or "latest".
        output_dir (`str` or `os.PathLike`):
            Where "latest" and relative names look.

    Returns:
        `Path` or `None`
    """
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.exists() and not path.is_absolute():
        path = Path(output_dir) / path
    if not path.is_dir():
        where = "" if Path(resume_from_checkpoint).is_absolute() else f" here or in --output_dir {output_dir}"
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint} does not exist{where}: pass a checkpoint-<step> "
            "folder or 'latest'."
        )
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is not a complete facediff checkpoint "
            f"(no {STATE_FILE}): pass a checkpoint-<step> folder or 'latest'."
        )
    return path


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was taken at."""
    return json.loads((checkpoint / STATE_FILE).read_text())["global_step"]


def checkpoint_train_seconds(checkpoint: Path) -> float:
    """Seconds of training up to a checkpoint's step (0 for checkpoints saved before they were counted)."""
    return json.loads((checkpoint / STATE_FILE).read_text()).get("train_seconds", 0.0)


def checkpoint_training_args(checkpoint: Path) -> dict | None:
    """The training arguments of the run that saved a checkpoint (None for checkpoints saved before they were kept)."""
    return json.loads((checkpoint / STATE_FILE).read_text()).get("training_args")


def checkpoint_pipeline_configs(checkpoint: Path) -> dict | None:
    """The UNet's and the scheduler's configs (None for checkpoints saved before they were kept)."""
    return json.loads((checkpoint / STATE_FILE).read_text()).get("pipeline_configs")


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    global_step: int,
    total_limit: int | None,
    training_args: dict,
    run_files: Sequence[Path] = (),
    train_seconds: float = 0.0,
    pipeline_configs: dict | None = None,
) -> Path:
    """
    Save everything needed to resume exactly (weights, optimizer, registered objects such as the LR schedule and
    EMA, every process's RNG states) as `output_dir/checkpoint-<global_step>`; call on every process.

    Args:
        accelerator (`Accelerator`):
            The run's accelerator, with the training objects prepared or registered.
        output_dir (`Path`):
            The run's output folder.
        global_step (`int`):
            Optimizer steps taken.
        total_limit (`int`, *optional*):
            Keep only this many newest checkpoints.
        training_args (`dict`):
            The run's arguments, kept in the checkpoint so that resuming with different settings can be refused.
        run_files (`Sequence[Path]`, *optional*):
            Files of the run that a resume must find as they are at this step (the best evaluation's weights), kept
            in the checkpoint under their names.

    Returns:
        `Path`: the checkpoint.

    Raises:
        `DiskFullError`: the disk filled up; the staging folder is removed and the older checkpoints are intact.
    """
    final = output_dir / f"checkpoint-{global_step}"
    staging = output_dir / f".checkpoint-{global_step}.partial"
    if accelerator.is_main_process:
        for leftover in output_dir.glob(".checkpoint-*.partial"):
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    try:
        with explain_disk_full(final.name, output_dir):
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                for path in run_files:
                    atomic_copy(path, staging / path.name)
                state = {
                    "global_step": global_step,
                    "train_seconds": train_seconds,
                    "training_args": training_args,
                    "pipeline_configs": pipeline_configs,
                }
                (staging / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
                _sync_to_disk(staging)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # gives back the space the incomplete copy took
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _sync_to_disk(folder: Path):
    """Flush the files to disk before the rename publishes them, so a power cut cannot leave an empty checkpoint."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


class DiskFullError(OSError):
    """The disk filled up during a save; what was saved before is intact."""


@contextmanager
def explain_disk_full(what: str, output_dir: Path) -> Iterator[None]:
    """
    Turn a full disk while writing `what` into a one-line `DiskFullError` that names the folder, the newest
    checkpoint still intact and the fix.

    Args:
        what (`str`):
            What was being written, e.g. "checkpoint-400".
        output_dir (`Path`):
            The run's output folder.
    """
    try:
        yield
    except Exception as error:
        # safetensors reports a full disk as a SafetensorError carrying the OS's message, not as an OSError.
        if getattr(error, "errno", None) != errno.ENOSPC and os.strerror(errno.ENOSPC) not in str(error):
            raise
        checkpoints = list_checkpoints(output_dir)
        kept = f"{checkpoints[-1].name} is the newest checkpoint, intact" if checkpoints else "no checkpoint is saved"
        raise DiskFullError(
            f"The disk holding {output_dir} is full: {what} could not be written ({kept}). Free some space, then "
            "rerun the same command with --resume_from_checkpoint latest."
        ) from error
