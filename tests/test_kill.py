"""SIGKILL at the worst moments: resuming from `latest` always works and ends where an uninterrupted run ends."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facediff.checkpointing import list_checkpoints, resolve_checkpoint

from .conftest import FACES

TESTS = Path(__file__).resolve().parent
TRAIN = TESTS.parent / "train_accelerate.py"


def flags(output: Path) -> list[str]:
    return ["--output_dir", str(output), "--train_data_dir", str(FACES), "--max_train_samples", "32",
            "--resolution", "16", "--train_batch_size", "8", "--max_train_steps", "6", "--checkpointing_steps", "2",
            "--save_images_steps", "3", "--eval_batch_size", "2", "--num_inference_steps", "2",
            "--random_flip"]  # fmt: skip


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run([sys.executable, str(TRAIN), *flags(output)], check=True, capture_output=True, timeout=300)
    return final_weights(output)


# (kill point, on which arrival, the checkpoint `latest` must then be)
KILL_POINTS = [
    ("step", 5, "checkpoint-4"),  # mid-step 5
    ("checkpoint", 2, "checkpoint-2"),  # checkpoint-4 written but not yet renamed
    ("grid", 1, "checkpoint-2"),  # the step-3 sample grid half done
    ("final", 1, "checkpoint-4"),  # the final pipeline half moved into place
]


@pytest.mark.parametrize("point,nth,latest", KILL_POINTS)
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, point, nth, latest):
    output = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, str(TESTS / "kill_probe.py"), point, str(nth), *flags(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert resolve_checkpoint("latest", output) == output / latest
    assert all(path.name.startswith("checkpoint-") for path in list_checkpoints(output))

    resumed = subprocess.run(
        [sys.executable, str(TRAIN), *flags(output), "--resume_from_checkpoint", "latest"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    weights = final_weights(output)
    assert weights.keys() == uninterrupted.keys()
    assert all(torch.equal(weights[name], uninterrupted[name]) for name in weights)
