"""Two-process data-parallel training on CPU (gloo), launched exactly as users launch it."""

import json
import socket
import subprocess
import sys
from pathlib import Path

from .conftest import FACES

PROBE = Path(__file__).with_name("launch_probe.py")
FLAGS = ["--train_data_dir", str(FACES), "--max_train_samples", "64", "--resolution", "16",
         "--train_batch_size", "8", "--max_train_steps", "4", "--checkpointing_steps", "2",
         "--save_images_steps", "2", "--eval_batch_size", "4", "--num_inference_steps", "2",
         "--random_flip"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(record_dir: Path, output_dir: Path, *extra, processes: int = 2) -> dict[int, dict]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    launcher += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    result = subprocess.run(
        [*launcher, str(PROBE), str(record_dir), *FLAGS, "--output_dir", str(output_dir), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {rank: json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in range(processes)}


def test_two_processes_split_the_batch_and_stay_in_sync(tmp_path):
    ranks = launch(tmp_path / "ddp-record", tmp_path / "ddp")
    single = launch(tmp_path / "single-record", tmp_path / "single", processes=1)[0]

    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    for step, (first, second) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)):
        assert len(first) == len(second) == 4, step  # a global batch of 8, half on each process
        assert not set(first) & set(second), step
        assert sorted(first + second) == sorted(single["batches"][step]), step  # the same global batch

    # Only the main process writes; the others add just their own RNG state to each checkpoint.
    written_by_main = {Path(path).name for path in ranks[0]["writes"]}
    assert {".sample_grid.png.partial", ".README.md.partial", "model_index.json"} <= written_by_main
    assert all(path.startswith(".checkpoint-") for path in ranks[1]["writes"]), ranks[1]["writes"]
    output = tmp_path / "ddp"
    assert len(list(output.rglob("*.safetensors"))) == 2  # the pipeline's UNet and checkpoint-2's model
    assert sorted(path.name for path in (output / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    event_files = list((output / "logs").rglob("events.out.tfevents.*"))
    assert event_files and len({path.name.split(".")[-2] for path in event_files}) == 1  # written by one process


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    launch(tmp_path / "ddp-record", tmp_path / "run")
    resumed = launch(tmp_path / "resume-record", tmp_path / "run", "--resume_from_checkpoint", "latest", processes=1)
    assert resumed[0]["global_step"] == 4
    assert len(resumed[0]["batches"]) == 2  # steps 3 and 4 only
