"""Two-process data-parallel training on CPU (gloo), launched exactly as users launch it."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import facediff.training as training
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, TINY_GRAY_UNET, record_batches

PROBE = Path(__file__).with_name("launch_probe.py")
# The steps end the run; --max_train_minutes makes the processes agree on the clock at every step all the same.
FLAGS = ["--train_data_dir", str(FACES), "--mixed_precision", "no", "--max_train_samples", "64", "--resolution", "16",
         "--model_config_name_or_path", str(TINY_GRAY_UNET), "--train_batch_size", "8", "--max_train_steps", "4",
         "--checkpointing_steps", "2", "--save_images_steps", "2", "--eval_batch_size", "4",
         "--num_inference_steps", "2", "--random_flip",
         "--max_train_minutes", "60"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """One `accelerate launch` of two processes, shared by the tests (the process boundary is the point): its output
    folder and what each rank recorded."""
    root = tmp_path_factory.mktemp("ddp")
    output, record_dir = root / "run", root / "record"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--multi_gpu",
                "--num_processes", "2"]  # fmt: skip
    result = subprocess.run(
        [*launcher, str(PROBE), str(record_dir), *FLAGS, "--output_dir", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return output, {rank: json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in range(2)}


def record_images(monkeypatch) -> list[list[str]]:
    """Hash each image of each batch the loss sees, batch by batch, as launch_probe.py records a launched process's."""
    seen = []
    original = training._diffusion_loss

    def recording(unet, scheduler, pixels, args):
        seen.append([hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in pixels])
        return original(unet, scheduler, pixels, args)

    monkeypatch.setattr(training, "_diffusion_loss", recording)
    return seen


def test_two_processes_split_the_batch_and_stay_in_sync(two_process_run, tmp_path, monkeypatch):
    output, ranks = two_process_run
    single_batches = record_images(monkeypatch)
    train(parse_training_arguments([*FLAGS, "--output_dir", str(tmp_path / "single")]))  # one process, this one

    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    for step, (first, second) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)):
        assert len(first) == len(second) == 4, step  # a global batch of 8, half on each process
        assert not set(first) & set(second), step
        assert sorted(first + second) == sorted(single_batches[step]), step  # the same global batch

    # Only the main process writes; the others add just their own RNG state to each checkpoint.
    written_by_main = {Path(path).name for path in ranks[0]["writes"]}
    assert {".sample_grid.png.partial", ".README.md.partial", "model_index.json"} <= written_by_main
    assert all(path.startswith(".checkpoint-") for path in ranks[1]["writes"]), ranks[1]["writes"]
    assert len(list(output.rglob("*.safetensors"))) == 3  # the pipeline's UNet and the models of checkpoints 2 and 4
    assert sorted(path.name for path in (output / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    event_files = list((output / "logs").rglob("events.out.tfevents.*"))
    assert event_files and len({path.name.split(".")[-2] for path in event_files}) == 1  # written by one process


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path, monkeypatch):
    output = tmp_path / "run"
    shutil.copytree(two_process_run[0], output)  # the launched run's folder stays as it was, for the other test
    batches = record_batches(monkeypatch)
    resumed = [*FLAGS, "--output_dir", str(output), "--resume_from_checkpoint", "checkpoint-2"]
    result = train(parse_training_arguments(resumed))
    assert result.global_step == 4
    assert len(batches) == 2  # steps 3 and 4 only
