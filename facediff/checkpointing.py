"""Resumable checkpoints: Accelerate's `save_state` into a staging folder, renamed into place when complete.

A checkpoint is `checkpoint-<step>` and nothing else: a process killed mid-save leaves only a `.checkpoint-*`
staging folder, which `latest` never picks and the next save clears away.
"""

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

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
    The checkpoint `--resume_from_checkpoint` names: a folder, or "latest" (None when there is none yet).

    Args:
        resume_from_checkpoint (`str`):
            A checkpoint folder, or "latest".
        output_dir (`str` or `os.PathLike`):
            Where "latest" looks.

    Returns:
        `Path` or `None`
    """
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint} does not exist: pass a checkpoint-<step> folder "
            "or 'latest'."
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


def save_checkpoint(accelerator: Accelerator, output_dir: Path, global_step: int, total_limit: int | None) -> Path:
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

    Returns:
        `Path`: the checkpoint.
    """
    final = output_dir / f"checkpoint-{global_step}"
    staging = output_dir / f".checkpoint-{global_step}.partial"
    if accelerator.is_main_process:
        for leftover in output_dir.glob(".checkpoint-*.partial"):
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps({"global_step": global_step}) + "\n")
        _sync_to_disk(staging)
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
