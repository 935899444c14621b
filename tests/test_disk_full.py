"""A disk that fills up while saving: a one-line error naming the folder, and everything saved before intact."""

import errno
import os
import sys
from pathlib import Path

import accelerate.utils.other
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import UNet2DModel
from safetensors import SafetensorError

import train_accelerate
from facediff.checkpointing import DiskFullError, list_checkpoints, resolve_checkpoint
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, folder_state, tiny_run

STAGING = ".checkpoint-2.partial"


def flags(output: Path, *extra: str) -> list[str]:
    return tiny_run(output, "--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_train_steps", "3",
                    "--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--save_images_steps", "100",
                    "--eval_batch_size", "1", "--num_inference_steps", "1", *extra)  # fmt: skip


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    previous = {}
    real_save = torch.save

    def disk_fills_up(obj, path, *args, **kwargs):
        """torch.save writes the optimizer state, after the weights: the disk fills up halfway through it."""
        if STAGING not in str(path):
            return real_save(obj, path, *args, **kwargs)
        previous.update(folder_state(output / "checkpoint-1"))
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.setattr(sys, "argv", ["train_accelerate.py", *flags(output)])
    assert train_accelerate.main() == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1] == (
        f"error: The disk holding {output} is full: checkpoint-2 could not be written (checkpoint-1 is the newest "
        "checkpoint, intact). Free some space, then rerun the same command with --resume_from_checkpoint latest."
    )
    assert "Traceback" not in stderr

    assert previous and folder_state(output / "checkpoint-1") == previous
    assert resolve_checkpoint("latest", output) == output / "checkpoint-1"
    assert not [path for path in output.iterdir() if path.name.startswith(".checkpoint")]  # its space is given back
    assert not (output / "model_index.json").exists()

    monkeypatch.setattr(torch, "save", real_save)
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train(parse_training_arguments(flags(output, "--resume_from_checkpoint", "latest")))
    assert result.global_step == 3 and [path.name for path in list_checkpoints(output)] == ["checkpoint-3"]
    assert (output / "model_index.json").exists()


def test_a_full_disk_reported_by_safetensors_is_recognised(tmp_path, monkeypatch):
    output = tmp_path / "run"
    real_save_file = accelerate.utils.other.safe_save_file

    def disk_fills_up(tensors, path, *args, **kwargs):
        """safetensors (Rust) reports the OS error inside its own exception type."""
        if STAGING in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", disk_fills_up)
    with pytest.raises(DiskFullError, match=r"is full: checkpoint-2 could not be written \(checkpoint-1 is the newest"):
        train(parse_training_arguments(flags(output)))
    assert [path.name for path in output.iterdir() if "checkpoint" in path.name] == ["checkpoint-1"]


def test_a_full_disk_during_the_final_save_keeps_the_previous_pipeline(tmp_path, monkeypatch):
    output = tmp_path / "run"
    train(parse_training_arguments(flags(output, "--max_train_steps", "2")))
    AcceleratorState._reset_state(reset_partial_state=True)
    pipeline = ["model_index.json", "unet", "scheduler", "pipeline_facediff.py", "scheduling_facediff.py",
                "training_args.json", "README.md"]  # fmt: skip
    before = {name: folder_state(output / name) for name in pipeline}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(UNet2DModel, "save_pretrained", disk_full)
    resumed = flags(output, "--resume_from_checkpoint", "latest")  # one step more than the first run
    # The extra step is kept: its checkpoint is written before the pipeline.
    with pytest.raises(DiskFullError, match=r"is full: the final pipeline could not be written \(checkpoint-3 is the"):
        train(parse_training_arguments(resumed))
    assert {name: folder_state(output / name) for name in pipeline} == before
    assert not [path for path in output.iterdir() if path.name.startswith(".facediff")]
