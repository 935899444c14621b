"""SIGKILL at the worst moments: resuming from `latest` always works and ends where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from facediff.checkpointing import list_checkpoints, resolve_checkpoint
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, tiny_run

PROBE = Path(__file__).with_name("kill_probe.py")


def flags(output: Path) -> list[str]:
    """5 steps of 8 faces, 4 batches an epoch: checkpoints at steps 2 and 4 and a sample grid at step 3, so that a
    run reaches every kill point below."""
    return tiny_run(output, "--train_data_dir", str(FACES), "--max_train_samples", "32", "--max_train_steps", "5",
                    "--save_images_steps", "3", "--eval_batch_size", "2", "--num_inference_steps", "2",
                    "--random_flip")  # fmt: skip


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Trained in this process: on a CPU the same flags give the same weights, bit for bit, in any process."""
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(parse_training_arguments(flags(output)))
    AcceleratorState._reset_state(reset_partial_state=True)
    return final_weights(output)


# (kill point, on which arrival, the checkpoint `latest` must then be)
KILL_POINTS = [
    ("step", 5, "checkpoint-4"),  # mid-step 5
    ("checkpoint", 2, "checkpoint-2"),  # checkpoint-4 written but not yet renamed
    ("grid", 1, "checkpoint-2"),  # the step-3 sample grid half done
    ("final", 1, "checkpoint-5"),  # the final pipeline half moved into place, after the last step's checkpoint
]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> tuple[Path, dict[str, int], str]:
    """A run killed at each point, each a process of its own (SIGKILL is the point), all forked from one probe that
    imports the packages once: the folder holding each run's output folder, each run's exit code, the probe's stderr."""
    root = tmp_path_factory.mktemp("killed")
    points = [f"{point}:{nth}" for point, nth, _ in KILL_POINTS]
    probe = subprocess.run(
        [sys.executable, str(PROBE), *points, "--", *flags(root)], capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    return root, json.loads(probe.stdout.splitlines()[-1]), probe.stderr


@pytest.mark.parametrize("point,nth,latest", KILL_POINTS)
def test_killed_run_resumes_to_the_uninterrupted_result(killed_runs, uninterrupted, point, nth, latest):
    root, exit_codes, probe_stderr = killed_runs
    output = root / point
    assert exit_codes[point] == -signal.SIGKILL, probe_stderr[-4000:]
    assert resolve_checkpoint("latest", output) == output / latest
    assert all(path.name.startswith("checkpoint-") for path in list_checkpoints(output))

    train(parse_training_arguments([*flags(output), "--resume_from_checkpoint", "latest"]))
    weights = final_weights(output)
    assert weights.keys() == uninterrupted.keys()
    assert all(torch.equal(weights[name], uninterrupted[name]) for name in weights)
