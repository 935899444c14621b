"""Ctrl-C and `kill`: training stops at a step boundary with a checkpoint and says how to resume."""

import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from facediff.checkpointing import checkpoint_step, list_checkpoints
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, TRAIN_SCRIPT, tiny_run


def flags(output: Path, steps: int) -> list[str]:
    return tiny_run(output, "--train_data_dir", str(FACES), "--max_train_samples", "32", "--max_train_steps",
                    str(steps), "--checkpointing_steps", "100000", "--save_images_steps", "100000",
                    "--eval_batch_size", "2", "--num_inference_steps", "2")  # fmt: skip


def read_until_a_step_is_done(stderr) -> str:
    """The run's stderr up to where its progress bar counts a step, or all of it if the run ends first. tqdm redraws
    the bar with carriage returns, so it is read a character at a time, not a line."""
    text = ""
    while not re.search(r"Training:[^\r\n]*\| *[1-9]\d*/", text) and (character := stderr.read(1)):
        text += character
    return text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_non_zero(tmp_path, signum, caplog):
    """The signalled run is a process of its own (a signal is the point); the resume runs here."""
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), *flags(output, 100000)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    started = read_until_a_step_is_done(process.stderr)  # a counted step: its signal handlers are in place
    process.send_signal(signum)
    _, rest = process.communicate(timeout=300)
    stderr = started + rest

    assert process.returncode == 128 + signum, stderr[-2000:]
    assert f"Stopped by {signal.Signals(signum).name} at step" in stderr
    assert "--resume_from_checkpoint latest" in stderr and "Traceback" not in stderr
    (checkpoint,) = list_checkpoints(output)
    step = checkpoint_step(checkpoint)
    assert step >= 1 and checkpoint.name == f"checkpoint-{step}"

    with caplog.at_level(logging.INFO):
        result = train(parse_training_arguments([*flags(output, step + 2), "--resume_from_checkpoint", "latest"]))
    assert f"Resumed from {checkpoint} at step {step}" in caplog.text
    assert result.global_step == step + 2 and (output / "model_index.json").exists()
