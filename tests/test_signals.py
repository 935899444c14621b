"""Ctrl-C and `kill`: training stops at a step boundary with a checkpoint and says how to resume."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facediff.checkpointing import checkpoint_step, list_checkpoints

from .conftest import FACES

TRAIN = Path(__file__).resolve().parents[1] / "train_accelerate.py"


def flags(output: Path, steps: int) -> list[str]:
    return ["--output_dir", str(output), "--train_data_dir", str(FACES), "--max_train_samples", "32",
            "--resolution", "16", "--train_batch_size", "8", "--max_train_steps", str(steps),
            "--checkpointing_steps", "100000", "--save_images_steps", "100000", "--eval_batch_size", "2",
            "--num_inference_steps", "2"]  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_non_zero(tmp_path, signum):
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN), *flags(output, 100000)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    for line in process.stderr:
        if "Training on" in line:
            break
    time.sleep(3)  # some steps in
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == 128 + signum
    assert f"Stopped by {signal.Signals(signum).name} at step" in stderr
    assert "--resume_from_checkpoint latest" in stderr and "Traceback" not in stderr
    (checkpoint,) = list_checkpoints(output)
    step = checkpoint_step(checkpoint)
    assert step >= 1 and checkpoint.name == f"checkpoint-{step}"

    resumed = subprocess.run(
        [sys.executable, str(TRAIN), *flags(output, step + 2), "--resume_from_checkpoint", "latest"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from {checkpoint} at step {step}" in resumed.stderr
    assert (output / "model_index.json").exists()
